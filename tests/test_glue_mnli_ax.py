"""MNLI's two validation splits and AX predicted with the MNLI model, on a small stand-in mirror.

The shared mirror has no MNLI/AX, so this builds a Hub-style dataset repo in a temporary folder with
MNLI's columns, label names and split names, filled with RTE sentences.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from conftest import GLUE, read_json, read_jsonl

from finetune.cli import main

LABELS = ["entailment", "neutral", "contradiction"]
SPLITS = {"train": 40, "validation_matched": 13, "validation_mismatched": 11, "test_matched": 7,
          "test_mismatched": 5}


def write_config(root: Path, name: str, splits: dict[str, datasets.Dataset]) -> list[str]:
    lines = [f"- config_name: {name}", "  data_files:"]
    for split, data in splits.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        data.to_parquet(root / name / f"{split}-00000-of-00001.parquet")
        lines += [f"  - split: {split}", f"    path: {name}/{split}-*"]
    return lines


@pytest.fixture
def mnli_mirror(tmp_path: Path, monkeypatch) -> Path:
    rte = datasets.load_dataset(str(GLUE), "rte")["train"]
    features = datasets.Features({
        "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
        "label": datasets.ClassLabel(names=LABELS), "idx": datasets.Value("int32"),
    })

    def part(start: int, size: int, hidden: bool) -> datasets.Dataset:
        rows = rte.select(range(start, start + size))
        return datasets.Dataset.from_dict({
            "premise": rows["sentence1"], "hypothesis": rows["sentence2"],
            "label": [-1 if hidden else i % 3 for i in range(size)], "idx": list(range(size)),
        }, features=features)

    repo = tmp_path / "mirror" / "datasets" / "nyu-mll" / "glue"
    start, mnli = 0, {}
    for split, size in SPLITS.items():
        mnli[split] = part(start, size, hidden=split.startswith("test"))
        start += size
    lines = ["---", "configs:", *write_config(repo, "mnli", mnli),
             *write_config(repo, "ax", {"test": part(start, 9, hidden=True)}), "---"]
    (repo / "README.md").write_text("\n".join(lines) + "\n")
    (tmp_path / "mirror" / "models").symlink_to(GLUE.parents[2] / "models")
    (tmp_path / "mirror" / "spaces").symlink_to(GLUE.parents[2] / "spaces")  # evaluate's metric modules
    monkeypatch.setenv("FINETUNE_HUB_MIRROR", str(tmp_path / "mirror"))
    return tmp_path / "mirror"


def test_mnli_matched_mismatched_then_ax(mnli_mirror: Path, tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "mnli"
    code = main(["train", "glue-mnli", "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir", str(out),
                 "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3"])
    assert code == 0
    evaluated = read_json(out / "metrics.json")["eval"]
    assert set(evaluated) == {"validation_matched", "validation_mismatched"}
    assert evaluated["validation_matched"]["examples"] == 13
    assert evaluated["validation_mismatched"]["examples"] == 11
    state = read_json(out / "trainer_state.json")
    assert state["best_metric"] == pytest.approx(evaluated["validation_matched"]["accuracy"])
    assert len(read_jsonl(out / "predictions_validation_mismatched.jsonl")) == 11
    # the run report: the best model's matched accuracy, and a 3 x 3 confusion matrix of the matched split
    page = (out / "report.html").read_text()
    accuracy = f"{evaluated['validation_matched']['accuracy']:.4f}".rstrip("0").rstrip(".")
    assert f"<dt>validation_matched accuracy</dt><dd>{accuracy}</dd>" in page
    matrix = page[page.index('id="confusion-matrix"'):page.index('id="per-class"')]
    assert "validation_matched, 13 examples" in matrix and matrix.count("<tr>") == 1 + 3

    assert main(["predict", str(out)]) == 0
    assert len(read_jsonl(out / "predictions_test_matched.jsonl")) == 7
    assert len(read_jsonl(out / "predictions_test_mismatched.jsonl")) == 5

    assert main(["predict", str(out), "--task_name", "ax", "--output_dir", str(tmp_path / "ax")]) == 0
    ax = read_jsonl(tmp_path / "ax" / "predictions_test.jsonl")
    assert len(ax) == 9
    assert {row["prediction"] for row in ax} <= set(LABELS)
