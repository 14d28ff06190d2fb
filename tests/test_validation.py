"""Every invalid setting is one `finetune: error:` line and exit code 2, before any data or model is loaded.

The first five tests are the cases of issue 18, each of which failed on main f358a87 (traceback, or a
silent run for max_seq_length 0, or a message that did not say the file was empty).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tiny_csv(path: Path, rows: int = 8) -> Path:
    sentences = ["a fine film", "dull and slow", "I loved it", "a waste of time", "great acting",
                 "boring plot", "wonderful", "awful"]
    path.write_text("sentence,label\n" + "".join(f"{sentences[i % 8]},{(i + 1) % 2}\n" for i in range(rows)))
    return path


@pytest.fixture
def mrpc_args(tmp_path: Path, tiny_model_dir) -> list[str]:
    """glue-mrpc as in the issue, on the tiny bert and 8 rows (these tests must stop before training)."""
    return ["train", "glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert")),
            "--output_dir", str(tmp_path / "out"), "--max_train_samples", "8", "--max_eval_samples", "8"]


def nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_negative_learning_rate(mrpc_args, tmp_path, capsys) -> None:
    code, err = run_cli([*mrpc_args, "--learning_rate", "-1"], capsys)
    assert_one_line_error(code, err, "--learning_rate", "-1", "> 0")
    assert nothing_written(tmp_path)


def test_zero_train_batch_size(mrpc_args, tmp_path, capsys) -> None:
    code, err = run_cli([*mrpc_args, "--per_device_train_batch_size", "0"], capsys)
    assert_one_line_error(code, err, "--per_device_train_batch_size", "0", ">= 1")
    assert nothing_written(tmp_path)


def test_predict_on_a_folder_that_is_not_a_run(tmp_path, capsys) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("not a model\n")
    code, err = run_cli(["predict", str(folder), "--split", "test"], capsys)
    assert_one_line_error(code, err, str(folder), "not a finetune run", "finetune_config.yaml")
    assert sorted(p.name for p in folder.iterdir()) == ["todo.txt"]


def test_zero_max_seq_length(mrpc_args, tmp_path, capsys) -> None:
    code, err = run_cli([*mrpc_args, "--max_seq_length", "0"], capsys)
    assert_one_line_error(code, err, "--max_seq_length", "0", ">= 1")
    assert nothing_written(tmp_path)


def test_header_only_csv_says_the_file_is_empty(tmp_path, tiny_model_dir, capsys) -> None:
    train = tmp_path / "train.csv"
    train.write_text("sentence,label\n")
    code, err = run_cli(["train", "--train_file", str(train), "--model_name_or_path", str(tiny_model_dir("bert")),
                         "--output_dir", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, str(train), "empty")
    assert nothing_written(tmp_path)
