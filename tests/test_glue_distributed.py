"""`finetune glue` under `accelerate launch --config_file launch/cpu_2proc.yaml`: the same outputs as one process.

Every rank runs the benchmark loop (training and prediction are collective), but only rank 0 may record
results, write the reports and the submission, delete stale submission files and print; and the ranks must
agree on what they record (RTE has a test split, the mirror's WNLI has none).

The single process trains at the global batch of the two (2 x 8 = 16), with a random sampler and without
dropout, so both take the same steps on the same examples.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import read_json
from test_distributed import accelerate_launch
from test_loss_scaling import without_dropout

from finetune.cli import main

pytestmark = pytest.mark.distributed

FLAGS = ["--max_train_samples", "32", "--max_eval_samples", "16", "--max_predict_samples", "10",
         "--num_train_epochs", "1", "--learning_rate", "1e-3", "--train_sampling_strategy", "random",
         "--report_to", "none", "--disable_tqdm", "true"]
STALE = ("CoLA.tsv", "QQP.tsv")  # left by an earlier benchmark in the same folder


def glue_command(model: Path, out: Path, batch: int) -> list[str]:
    return ["glue", "--model_name_or_path", str(model), "--tasks", "rte,wnli", "--output_dir", str(out), *FLAGS,
            "--per_device_train_batch_size", str(batch)]


def with_stale_submission(out: Path) -> Path:
    (out / "submission").mkdir(parents=True)
    for name in STALE:
        (out / "submission" / name).write_text("index\tprediction\n0\t1\n")
    return out


def recorded(out: Path) -> dict:
    """glue_results.json without what differs on purpose: the folder and the per-process batch size."""
    document = read_json(out / "glue_results.json")
    document.pop("command")
    assert document.pop("train_flags")[-2:] in (["--per_device_train_batch_size", "8"],
                                                ["--per_device_train_batch_size", "16"])
    return document


def test_glue_on_two_processes_writes_what_one_process_writes(tiny_model_dir, tmp_path: Path, capfd) -> None:
    model = without_dropout(tiny_model_dir("bert"), tmp_path / "model")
    one, two = with_stale_submission(tmp_path / "one"), with_stale_submission(tmp_path / "two")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(glue_command(model, one, 16)) == 0
    finally:
        torch.set_num_threads(threads)
    capfd.readouterr()
    done = accelerate_launch(glue_command(model, two, 8), tmp_path / "datasets-cache")

    # One printer: the table and each task's banner once, not once per process.
    assert done.stdout.count("| RTE | done |") == 1 and done.stdout.count("== GLUE rte ==") == 1
    # One writer, and both ranks recorded the same: RTE predicted its test split, WNLI has none.
    single, double = recorded(one), recorded(two)
    assert double["tasks"]["rte"]["note"] is None and double["tasks"]["rte"]["submission"] == {"RTE.tsv": 10}
    assert "no test split" in double["tasks"]["wnli"]["note"] and double["tasks"]["wnli"]["submission"] == {}
    for name in ("rte", "wnli"):
        assert double["tasks"][name]["status"] == "done"
        # metrics.json of each run: 2 processes evaluated all 16 examples once
        run = read_json(two / double["tasks"][name]["best_run"] / "metrics.json")
        assert run["eval"]["validation"]["examples"] == 16
    assert json.dumps(double, sort_keys=True) == json.dumps(single, sort_keys=True)
    one_table = (one / "glue_results.md").read_text().replace("batch_size 16", "batch_size 8")
    assert (two / "glue_results.md").read_text() == one_table
    # Stale files of the earlier benchmark are gone (deleted once, not raced over), the new one is in the zip.
    assert sorted(p.name for p in (two / "submission").iterdir()) == ["RTE.tsv"]
    assert (two / "submission" / "RTE.tsv").read_text() == (one / "submission" / "RTE.tsv").read_text()
    with zipfile.ZipFile(two / "glue_submission.zip") as bundle:
        assert bundle.namelist() == ["RTE.tsv"]
