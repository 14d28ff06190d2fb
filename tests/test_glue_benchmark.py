"""`finetune glue` end to end on tiny random-weight models: results, table, chart, submission, resume."""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import GLUE, read_json
from finetune.tasks.glue import GLUE_TASKS
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from test_glue_mnli_ax import mnli_mirror  # noqa: F401  (fixture: a stand-in mirror with MNLI and AX)

from finetune import pipeline
from finetune.cli import main
from finetune.errors import PREEMPTED_EXIT_CODE, Preempted
from finetune.glue.submission import submission_value

SHORT = ["--max_train_samples", "16", "--max_eval_samples", "16", "--max_predict_samples", "10",
         "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3"]


def glue(model: Path, out: Path, tasks: str, *extra: str) -> int:
    return main(["glue", "--model_name_or_path", str(model), "--tasks", tasks, "--output_dir", str(out), *SHORT,
                 *extra])


@pytest.fixture(scope="module")
def benchmark(tiny_model_dir, tmp_path_factory) -> Path:
    """rte, stsb and wnli with two seeds; mnli, qqp and ax are not in the shared mirror."""
    out = tmp_path_factory.mktemp("glue")
    assert glue(tiny_model_dir("bert"), out, "rte,stsb,wnli,mnli,qqp,ax", "--seeds", "2") == 0
    return out


def test_results_table_chart_and_average(benchmark: Path) -> None:
    results = read_json(benchmark / "glue_results.json")
    tasks = results["tasks"]
    assert list(tasks) == ["qqp", "stsb", "mnli", "rte", "wnli", "ax"]  # table order
    assert {n: t["status"] for n, t in tasks.items()} == {
        "qqp": "skipped", "stsb": "done", "mnli": "skipped", "rte": "done", "wnli": "done", "ax": "skipped"}
    for name in ("mnli", "qqp", "ax"):
        assert "not in the data source" in tasks[name]["reason"] and f"no '{name}'" in tasks[name]["reason"]

    # every number comes from the runs' metrics.json: per-metric mean/std over seeds, task score, average
    for name in ("rte", "stsb", "wnli"):
        task = tasks[name]
        assert sorted(task["runs"]) == ["42", "43"]
        per_seed = [read_json(benchmark / task["runs"][s] / "metrics.json")["eval"]["validation"] for s in ("42", "43")]
        assert per_seed[0]["examples"] == 16
        for metric in GLUE_TASKS[name].metrics:
            values = [m[metric] for m in per_seed]
            stats = task["metrics"]["validation"][metric]
            assert stats["values"] == pytest.approx(values)
            assert stats["mean"] == pytest.approx(np.mean(values))
            assert stats["std"] == pytest.approx(np.std(values, ddof=1))
        scores = [np.mean([m[k] for k in GLUE_TASKS[name].metrics]) for m in per_seed]
        assert task["score"]["values"] == pytest.approx(scores)
        assert task["best_run"] == task["runs"][("42", "43")[int(np.argmax(scores))]]
    averaged = [tasks[n]["score"]["mean"] for n in ("stsb", "rte", "wnli")]
    assert results["glue_average"] == pytest.approx(np.mean(averaged))

    table = (benchmark / "glue_results.md").read_text()
    assert "| RTE | done | accuracy " in table and " ± " in table
    assert "| MNLI | skipped |" in table and "GLUE average over 3 task(s)" in table
    assert f"{100 * results['glue_average']:.1f}" in table
    assert (benchmark / "glue_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_and_run_reports(benchmark: Path) -> None:
    """report.html of the benchmark links every finished task's best run, each of which has its own report."""
    results = read_json(benchmark / "glue_results.json")
    page = (benchmark / "report.html").read_text()
    assert "<script" not in page and 'src="http' not in page
    assert page.count('src="data:image/png;base64,') == 1  # the score chart, embedded
    for name, task in results["tasks"].items():
        assert f"<td>{name.upper()}</td><td>{task['status']}</td>" in page
        if task["status"] == "done":
            assert f'<a href="{task["best_run"]}/report.html">' in page
            for run in task["runs"].values():
                assert 'id="curves"' in (benchmark / run / "report.html").read_text()
    assert f"<dt>GLUE average</dt><dd>{100 * results['glue_average']:.1f}</dd>" in page


def test_submission_files(benchmark: Path) -> None:
    with zipfile.ZipFile(benchmark / "glue_submission.zip") as bundle:
        assert sorted(bundle.namelist()) == ["RTE.tsv", "STS-B.tsv"]  # the mirror's WNLI has no test split
        rte = bundle.read("RTE.tsv").decode().splitlines()
        stsb = bundle.read("STS-B.tsv").decode().splitlines()
    assert rte[0] == stsb[0] == "index\tprediction"
    assert len(rte) == len(stsb) == 11
    assert [int(line.split("\t")[0]) for line in rte[1:]] == list(range(10))
    assert {line.split("\t")[1] for line in rte[1:]} <= {"entailment", "not_entailment"}
    assert all(0.0 <= float(line.split("\t")[1]) <= 5.0 for line in stsb[1:])
    assert "no test split" in read_json(benchmark / "glue_results.json")["tasks"]["wnli"]["note"]


def test_push_dry_run_card_holds_the_results(benchmark: Path, capsys) -> None:
    assert main(["push", str(benchmark), "--dry_run", "--hub_model_id", "me/tiny-glue"]) == 0
    shown = capsys.readouterr().out
    assert "rte/model.safetensors" in shown and "glue_submission.zip" in shown
    name, results = model_index_to_eval_results(metadata_load(benchmark / "README.md")["model-index"])
    tasks = read_json(benchmark / "glue_results.json")["tasks"]
    expected = {
        (name_, metric): round(stats["mean"], 4)
        for name_ in ("rte", "stsb", "wnli")
        for metric, stats in tasks[name_]["metrics"]["validation"].items()
    }
    assert name == "tiny-glue"
    assert {(r.dataset_config, r.metric_type): r.metric_value for r in results} == expected
    assert {(r.dataset_type, r.dataset_split, r.task_type) for r in results} == {
        ("nyu-mll/glue", "validation", "text-classification")}


def test_resume_skips_finished_runs_and_a_failing_task_does_not_stop_the_others(
    benchmark: Path, tiny_model_dir, monkeypatch, capsys
) -> None:
    trained: list[str] = []
    real_train = pipeline.train

    def train(config):
        trained.append(config.data.task_name)
        if config.data.task_name == "cola":
            raise RuntimeError("boom in cola")
        return real_train(config)

    monkeypatch.setattr(pipeline, "train", train)
    before = read_json(benchmark / "glue_results.json")["tasks"]["rte"]
    code = glue(tiny_model_dir("bert"), benchmark, "cola,rte,wnli", "--seeds", "2")
    assert code == 1 and trained == ["cola"]
    tasks = read_json(benchmark / "glue_results.json")["tasks"]
    assert tasks["cola"]["status"] == "failed" and "RuntimeError: boom in cola" in tasks["cola"]["reason"]
    assert tasks["rte"]["status"] == "done" and tasks["rte"]["metrics"] == before["metrics"]
    assert "| COLA | failed |" in (benchmark / "glue_results.md").read_text()
    assert "boom in cola" in (benchmark / "cola" / "error.log").read_text()
    assert "1 task(s) failed: cola" in capsys.readouterr().err


def test_a_stopped_seed_resumes_from_its_checkpoint_and_sigterm_stops_the_benchmark(
    benchmark: Path, tiny_model_dir, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "glue"
    shutil.copytree(benchmark / "rte" / "seed-42", out / "rte" / "seed-42")
    (out / "rte" / "seed-42" / "metrics.json").unlink()  # as if stopped after its last checkpoint
    resumed: list[str | None] = []

    def train(config):
        resumed.append(config.training.resume_from_checkpoint)
        raise Preempted(str(out / "rte" / "seed-42" / "checkpoint-2"), 2)

    monkeypatch.setattr(pipeline, "train", train)
    assert glue(tiny_model_dir("bert"), out, "rte,wnli") == PREEMPTED_EXIT_CODE
    assert resumed == ["last"]
    tasks = read_json(out / "glue_results.json")["tasks"]
    assert list(tasks) == ["rte"] and "SIGTERM" in tasks["rte"]["reason"]  # wnli never started


def test_ax_is_predicted_with_the_mnli_model(mnli_mirror: Path, tiny_model_dir, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "glue"
    assert glue(tiny_model_dir("bert"), out, "mnli,ax") == 0
    tasks = read_json(out / "glue_results.json")["tasks"]
    assert tasks["mnli"]["status"] == tasks["ax"]["status"] == "done"
    assert set(tasks["mnli"]["metrics"]) == {"validation_matched", "validation_mismatched"}
    assert "mnli/seed-42" in tasks["ax"]["note"] and tasks["ax"]["score"] is None
    with zipfile.ZipFile(out / "glue_submission.zip") as bundle:
        assert sorted(bundle.namelist()) == ["AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv"]
        ax = bundle.read("AX.tsv").decode().splitlines()
        matched = bundle.read("MNLI-m.tsv").decode().splitlines()
    assert len(ax) == 1 + 9 and len(matched) == 1 + 7
    assert {line.split("\t")[1] for line in ax[1:] + matched[1:]} <= {"entailment", "neutral", "contradiction"}


def test_submission_labels_cover_every_label_name_in_the_data() -> None:
    """Each binary task's mapping names every ClassLabel name of its mirror dataset, as 0/1 in id order."""
    checked = 0
    for name, preset in GLUE_TASKS.items():
        if not preset.submission_labels or not (GLUE / name).is_dir():
            continue
        names = datasets.load_dataset(str(GLUE), name, split="validation").features["label"].names
        assert dict(preset.submission_labels) == {label: str(i) for i, label in enumerate(names)}, name
        checked += 1
    assert checked >= 4
    assert submission_value(5.7, GLUE_TASKS["stsb"]) == "5.000"
    assert submission_value(-0.2, GLUE_TASKS["stsb"]) == "0.000"
    assert submission_value("not_entailment", GLUE_TASKS["rte"]) == "not_entailment"


def test_bad_options_are_one_line_errors(capsys) -> None:
    assert main(["glue", "--model_name_or_path", "x", "--tasks", "cola,nope"]) == 2
    assert "unknown GLUE task 'nope'" in capsys.readouterr().err
    assert main(["glue", "--model_name_or_path", "x", "--seed", "3"]) == 2
    assert "--seed is set by finetune glue" in capsys.readouterr().err


def test_readme_glue_table_merges_folders_and_sets_published_scores_beside(benchmark: Path, capsys) -> None:
    """benchmarks/glue_table.py: our row is the runs' task scores (x100, mean ± std), the averages are over the
    tasks run and over SST-2/MRPC/RTE, and the published rows show "—" where their source has no score."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import glue_table

    glue_table.main([str(benchmark)])
    printed = capsys.readouterr().out
    results = read_json(benchmark / "glue_results.json")
    # Other tests of this module re-run the benchmark folder with other tasks: take what it holds now.
    done = [t for t in glue_table.TASKS if results["tasks"].get(t, {}).get("status") == "done"]
    assert {"rte", "wnli"} <= set(done)
    ours = {t: 100 * np.array(results["tasks"][t]["score"]["values"]) for t in done}
    header, _, row, bert, distilbert, minilm = printed.split("\n\n")[0].splitlines()
    titles = " | ".join(glue_table.TITLES[t] for t in done)
    assert header == f"| model | {titles} | average ({len(done)} tasks) | average (SST-2, MRPC, RTE) |"
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[0] == f"**{Path(results['model_name_or_path']).name}** (finetune, 2 seeds)"
    assert cells[1:-2] == [f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" for v in ours.values()]
    assert cells[-2:] == [f"{np.mean([v.mean() for v in ours.values()]):.1f}", "—"]  # no SST-2/MRPC in this run

    def published(line: str) -> dict[str, str]:
        values = [c.strip() for c in line.split("|")[1:-1]]
        return dict(zip(["model", *done, "average", "common"], values, strict=True))

    distilbert_scores = {"cola": 51.3, "sst2": 91.3, "mrpc": 87.5, "stsb": 86.9, "rte": 59.9, "wnli": 56.3}
    assert published(distilbert) == {"model": "DistilBERT", **{t: f"{distilbert_scores[t]:.1f}" for t in done},
                                     "average": f"{np.mean([distilbert_scores[t] for t in done]):.1f}",
                                     "common": "79.6"}  # (91.3 + 87.5 + 59.9) / 3
    assert {k: published(minilm)[k] for k in ("rte", "wnli", "average", "common")} == {
        "rte": "68.9", "wnli": "—", "average": "—", "common": "82.3"}
    assert published(bert)["rte"] == "69.3" and published(bert)["wnli"] == "53.5"
    # the detail table's training seconds are each seed's train_runtime
    runs = results["tasks"]["rte"]["runs"].values()
    seconds = [read_json(benchmark / run / "metrics.json")["train"]["train_runtime"] for run in runs]
    detail_rte = next(line for line in printed.split("\n\n")[1].splitlines() if line.startswith("| RTE |"))
    assert f"| {' / '.join(f'{s:.0f}' for s in seconds)} |" in detail_rte
    assert "arXiv:1910.01108" in printed and "xtremedistil-l6-h384-uncased" in printed

    with pytest.raises(SystemExit, match=f"{done[0]} is in two folders"):
        glue_table.main([str(benchmark), str(benchmark)])
