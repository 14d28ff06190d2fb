"""Custom classification data: label values of any kind, and checkpoints that already carry a head.

Labels go through a sorted list of the values train has (numbers in numeric order), as run_glue.py does:
the model's id2label names are the original values, predictions show the original values, float labels
mean regression, and a validation/test label that train never had is a one-line error.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
from conftest import read_json, read_jsonl

from finetune.cli import main

WORDS = ("awful", "poor", "fine", "good", "great", "superb", "bland", "tasty")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def review_rows(labels: list[Any], count: int, offset: int = 0) -> list[dict[str, Any]]:
    """Reviews whose first word goes with the label, cycling through ``labels``."""
    rows = []
    for i in range(count):
        k = (i + offset) % len(labels)
        rows.append({"review": f"{WORDS[k % len(WORDS)]} food and {WORDS[(i * 3) % len(WORDS)]} service {i}",
                     "stars": labels[k]})
    return rows


def run_args(model: Path, train: Path, validation: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model_name_or_path", str(model),
        "--train_file", str(train), "--validation_file", str(validation),
        "--text_column", "review", "--label_column", "stars",
        "--output_dir", str(out), "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-3", "--max_seq_length", "32",
        *extra,
    ]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("labels", "names"),
    [
        ([1, 2, 3, 4, 5], ["1", "2", "3", "4", "5"]),  # stars: not 0..n-1
        ([10, 0, 2], ["0", "2", "10"]),  # sparse: numeric order, not string order ("10" < "2")
        ([True, False], ["False", "True"]),  # pandas reads True/False as booleans
    ],
    ids=["stars", "sparse", "bool"],
)
def test_label_values_keep_their_names(labels: list[Any], names: list[str], tiny_model_dir, tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", review_rows(labels, 24))
    dev_rows = review_rows(labels, 10, offset=1)
    dev = write_csv(tmp_path / "dev.csv", dev_rows)
    test = write_csv(tmp_path / "test.csv", review_rows(labels, 6, offset=2))
    out = tmp_path / "run"
    assert main(run_args(tiny_model_dir("bert"), train, dev, out, "--test_file", str(test))) == 0

    config = read_json(out / "config.json")
    assert config["id2label"] == {str(i): name for i, name in enumerate(names)}
    assert config["label2id"] == {name: i for i, name in enumerate(names)}
    assert read_json(out / "metrics.json")["eval"]["validation"]["examples"] == 10

    predictions = read_jsonl(out / "predictions_validation.jsonl")
    assert [p["label"] for p in predictions] == [r["stars"] for r in dev_rows]  # original values, in row order
    assert {p["prediction"] for p in predictions} <= set(labels)
    assert all(type(p["prediction"]) is type(labels[0]) for p in predictions)

    # predict on the run directory reads the labels back from the saved head
    assert main(["predict", str(out)]) == 0
    rows = read_jsonl(out / "predictions_test.jsonl")
    assert len(rows) == 6 and {r["prediction"] for r in rows} <= set(labels)
    assert [r["label"] for r in rows] == [r["stars"] for r in review_rows(labels, 6, offset=2)]


def test_string_labels_sorted_and_float_labels_regress(tiny_model_dir, tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", review_rows(["pos", "neg", "mixed"], 24))
    dev = write_csv(tmp_path / "dev.csv", review_rows(["pos", "neg", "mixed"], 6))
    out = tmp_path / "strings"
    assert main(run_args(tiny_model_dir("bert"), train, dev, out)) == 0
    assert read_json(out / "config.json")["id2label"] == {"0": "mixed", "1": "neg", "2": "pos"}
    assert {p["prediction"] for p in read_jsonl(out / "predictions_validation.jsonl")} <= {"mixed", "neg", "pos"}

    train = write_csv(tmp_path / "scores.csv", review_rows([0.5, 1.0, 4.25], 24))
    dev = write_csv(tmp_path / "dev-scores.csv", review_rows([0.5, 1.0, 4.25], 6))
    out = tmp_path / "regression"
    assert main(run_args(tiny_model_dir("bert"), train, dev, out)) == 0
    config = read_json(out / "config.json")
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    assert set(read_json(out / "metrics.json")["eval"]["validation"]) >= {"pearson", "spearmanr"}
    assert all(isinstance(p["prediction"], float) for p in read_jsonl(out / "predictions_validation.jsonl"))


@pytest.mark.parametrize("split", ["validation", "test"])
def test_label_train_never_had_is_a_one_line_error(split: str, tiny_model_dir, tmp_path: Path, capsys) -> None:
    train = write_csv(tmp_path / "train.csv", review_rows([1, 2, 3], 12))
    unseen = review_rows([1, 2, 3], 6)
    unseen[4]["stars"] = 7
    dev = write_csv(tmp_path / "dev.csv", unseen if split == "validation" else review_rows([1, 2, 3], 6))
    test = write_csv(tmp_path / "test.csv", unseen)
    out = tmp_path / "run"
    code = main(run_args(tiny_model_dir("bert"), train, dev, out, "--test_file", str(test)))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "7" in line and ("dev.csv" if split == "validation" else "test.csv") in line, line
    assert not (out / "model.safetensors").exists()


def test_rows_without_label_are_an_error_and_empty_texts_are_kept(tiny_model_dir, tmp_path: Path, capsys) -> None:
    rows = review_rows([1, 2, 3], 12)
    rows[5]["stars"] = ""  # an empty cell: pandas reads NaN, the column becomes float
    train = write_csv(tmp_path / "train.csv", rows)
    dev = write_csv(tmp_path / "dev.csv", review_rows([1, 2, 3], 6))
    code = main(run_args(tiny_model_dir("bert"), train, dev, tmp_path / "a"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "train.csv" in line and "stars" in line and "1 row" in line, line

    rows = review_rows([1, 2, 3], 12)
    rows[5]["review"] = ""  # an empty text is still an example: kept (as an empty string), counted in the log
    train = write_csv(tmp_path / "train.csv", rows)
    dev_rows = review_rows([1, 2, 3], 6)
    dev_rows[2]["review"] = ""
    dev = write_csv(tmp_path / "dev.csv", dev_rows)
    test_rows = review_rows([1, 2, 3], 4)
    test_rows[0]["stars"], test_rows[1]["stars"] = "", -1  # unlabelled test rows: no label, or GLUE's -1
    test = write_csv(tmp_path / "test.csv", test_rows)
    out = tmp_path / "b"
    assert main(run_args(tiny_model_dir("bert"), train, dev, out, "--test_file", str(test))) == 0
    assert "empty text" in capsys.readouterr().err
    assert read_json(out / "metrics.json")["eval"]["validation"]["examples"] == 6
    predictions = read_jsonl(out / "predictions_validation.jsonl")
    assert len(predictions) == 6 and predictions[2]["review"] == ""
    assert main(["predict", str(out)]) == 0
    labels = [r.get("label") for r in read_jsonl(out / "predictions_test.jsonl")]
    assert labels == [None, None, 3, 1] and type(labels[2]) is int  # the class value, though the cell read 3.0


# -- checkpoints that already have a classification head ---------------------------------------------------


@pytest.fixture(scope="module")
def two_label_checkpoint(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with a 2-output classification head named generically (LABEL_0, LABEL_1)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    source = tiny_model_dir("bert")
    path = tmp_path_factory.mktemp("two-label-head")
    AutoModelForSequenceClassification.from_pretrained(source, num_labels=2).save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    assert AutoConfig.from_pretrained(path).id2label == {0: "LABEL_0", 1: "LABEL_1"}  # the default: not in the file
    return path


def head_shape(run: Path) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), "pt") as weights:
        return tuple(weights.get_slice("classifier.weight").get_shape())


@pytest.mark.parametrize("data", ["five-classes", "stsb"])
def test_head_of_another_size_is_replaced_only_when_asked(
    data: str, two_label_checkpoint: Path, tmp_path: Path, capsys, caplog
) -> None:
    if data == "stsb":  # 2 outputs, but STS-B is a regression: 1 output
        args = ["train", "glue-stsb", "--model_name_or_path", str(two_label_checkpoint),
                "--max_train_samples", "16", "--max_eval_samples", "8", "--num_train_epochs", "1",
                "--per_device_train_batch_size", "8", "--max_seq_length", "32"]
        wanted = "regression"
    else:
        train = write_csv(tmp_path / "train.csv", review_rows([1, 2, 3, 4, 5], 20))
        dev = write_csv(tmp_path / "dev.csv", review_rows([1, 2, 3, 4, 5], 5))
        args = run_args(two_label_checkpoint, train, dev, tmp_path / "unused")
        args = [a for a in args if a not in ("--output_dir", str(tmp_path / "unused"))]
        wanted = "['1', '2', '3', '4', '5']"
    code = main([*args, "--output_dir", str(tmp_path / "refused")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    for fragment in ("['LABEL_0', 'LABEL_1']", wanted, "--ignore_mismatched_sizes"):
        assert fragment in line, line

    out = tmp_path / "replaced"
    with caplog.at_level("WARNING", logger="finetune"):
        assert main([*args, "--output_dir", str(out), "--ignore_mismatched_sizes", "true"]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "finetune" and "head" in r.getMessage()]
    assert len(said) == 1 and "ignore_mismatched_sizes" in said[0] and "LABEL_0" in said[0], said
    assert "\n" not in said[0]
    config = read_json(out / "config.json")
    if data == "stsb":
        assert config["problem_type"] == "regression" and head_shape(out) == (1, 32)
    else:
        assert config["id2label"] == {str(i): str(i + 1) for i in range(5)} and head_shape(out) == (5, 32)


def test_head_of_the_same_size_keeps_loading(two_label_checkpoint: Path, tmp_path: Path, caplog) -> None:
    train = write_csv(tmp_path / "train.csv", review_rows(["no", "yes"], 16))
    dev = write_csv(tmp_path / "dev.csv", review_rows(["no", "yes"], 4))
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="finetune"):
        assert main(run_args(two_label_checkpoint, train, dev, out)) == 0
    assert not [r for r in caplog.records if r.name == "finetune" and "head" in r.getMessage()]
    assert read_json(out / "config.json")["id2label"] == {"0": "no", "1": "yes"} and head_shape(out) == (2, 32)


def test_named_head_for_other_labels_is_relabelled_only_when_asked(
    two_label_checkpoint: Path, tmp_path: Path, capsys, caplog
) -> None:
    import json
    import shutil

    named = tmp_path / "sentiment"
    shutil.copytree(two_label_checkpoint, named)
    config = read_json(named / "config.json")
    config.update(id2label={"0": "negative", "1": "positive"}, label2id={"negative": 0, "positive": 1})
    (named / "config.json").write_text(json.dumps(config))
    train = write_csv(tmp_path / "train.csv", review_rows(["no", "yes"], 16))
    dev = write_csv(tmp_path / "dev.csv", review_rows(["no", "yes"], 4))

    assert main(run_args(named, train, dev, tmp_path / "refused")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "['negative', 'positive']" in line and "['no', 'yes']" in line and "--ignore_mismatched_sizes" in line

    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="finetune"):
        assert main(run_args(named, train, dev, out, "--ignore_mismatched_sizes", "true")) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "finetune" and "head" in r.getMessage()]
    assert len(said) == 1 and "relabelled" in said[0], said
    assert read_json(out / "config.json")["id2label"] == {"0": "no", "1": "yes"} and head_shape(out) == (2, 32)
