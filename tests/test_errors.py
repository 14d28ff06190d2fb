"""Bad input: one line on stderr, exit code 2, no traceback, nothing overwritten."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tiny_run(tmp_path: Path) -> list[str]:
    return ["--output_dir", str(tmp_path / "out"), "--max_train_samples", "8", "--max_eval_samples", "8"]


def test_unknown_task_family(capsys, tmp_path) -> None:
    code, err = run_cli(["train", "--task", "parsing", *tiny_run(tmp_path)], capsys)
    assert_one_line_error(code, err, "--task", "parsing", "summarization")


def test_unknown_glue_config(capsys, tmp_path) -> None:
    code, err = run_cli(["train", "--task_name", "mrcp", *tiny_run(tmp_path)], capsys)
    assert_one_line_error(code, err, "unknown glue task 'mrcp'", "mrpc")


def test_glue_task_missing_from_the_data_source(capsys, tmp_path) -> None:
    code, err = run_cli(["train", "glue-mnli", *tiny_run(tmp_path)], capsys)
    assert_one_line_error(code, err, "nyu-mll/glue", "mnli")


def test_missing_column(capsys, tmp_path) -> None:
    code, err = run_cli(["train", "glue-mrpc", "--text_column", "sentence", *tiny_run(tmp_path)], capsys)
    assert_one_line_error(code, err, "column 'sentence'", "sentence1")


def test_model_not_found(capsys, tmp_path) -> None:
    code, err = run_cli(["train", "glue-mrpc", "--model_name_or_path", "nobody/no-such-model", *tiny_run(tmp_path)],
                        capsys)
    assert_one_line_error(code, err, "nobody/no-such-model", "mirror", "Hub")


def test_empty_dataset(capsys, tmp_path) -> None:
    train = tmp_path / "train.csv"
    train.write_text("sentence,label\n")
    valid = tmp_path / "valid.csv"
    valid.write_text("sentence,label\ngood,1\n")
    code, err = run_cli(["train", "--train_file", str(train), "--validation_file", str(valid), *tiny_run(tmp_path)],
                        capsys)
    assert_one_line_error(code, err, "empty")


def test_malformed_csv_names_the_row_and_its_field_count(capsys, tmp_path) -> None:
    """Issue 25.7: rows with more fields than the header used to shift the columns (pandas takes the extra
    leading ones as an index) and the run stopped on 'row(s) without a value in label column'."""
    train = tmp_path / "reviews.csv"
    rows = ["great film,5", "bad,1", "fine, really, quite fine,4", "ok,3"]  # line 4: 4 fields, unquoted commas
    train.write_text("review,stars\n" + "\n".join(rows) + "\n")
    code, err = run_cli(["train", "--train_file", str(train), "--text_column", "review", "--label_column", "stars",
                         *tiny_run(tmp_path)], capsys)
    assert_one_line_error(code, err, "reviews.csv", "line 4 has 4 field(s)", "header (review,stars) has 2", "malformed")
    assert not (tmp_path / "out").exists()


def test_malformed_yaml(capsys, tmp_path) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("training:\n  learning_rate: [1e-4\n")
    code, err = run_cli(["train", str(recipe), *tiny_run(tmp_path)], capsys)
    assert_one_line_error(code, err, "malformed YAML", "broken.yaml")


def test_unknown_override_key(capsys, tmp_path) -> None:
    code, err = run_cli(["train", "glue-mrpc", "--learning_rat", "1e-4", *tiny_run(tmp_path)], capsys)
    assert_one_line_error(code, err, "learning_rat")


def test_unknown_recipe(capsys) -> None:
    code, err = run_cli(["train", "glue-nope"], capsys)
    assert_one_line_error(code, err, "no recipe 'glue-nope'")


def test_non_empty_output_dir_is_not_overwritten(capsys, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "results.txt"
    keep.write_text("precious")
    code, err = run_cli(["train", "glue-mrpc", *tiny_run(tmp_path)], capsys)
    assert_one_line_error(code, err, "not empty", "--overwrite_output_dir")
    assert keep.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["results.txt"]


def test_hub_mirror_flag_must_exist(capsys, tmp_path) -> None:
    code, err = run_cli(["train", "glue-mrpc", "--hub_mirror", str(tmp_path / "nowhere"), *tiny_run(tmp_path)], capsys)
    assert_one_line_error(code, err, "--hub_mirror", "no such folder")


@pytest.mark.parametrize("entry", [[sys.executable, "-m", "finetune"], [str(Path(sys.executable).parent / "finetune")]])
def test_real_process_prints_one_line_and_exits_2(entry: list[str], tmp_path: Path) -> None:
    result = subprocess.run(
        [*entry, "train", "--task_name", "nope", "--output_dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("finetune: error: unknown glue task 'nope'")
    assert "Traceback" not in result.stderr

