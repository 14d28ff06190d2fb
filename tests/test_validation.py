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
    assert_one_line_error(code, err, "--learning_rate", "-1", ">= 0")
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


@pytest.mark.parametrize("command", ["evaluate", "predict", "push"])
def test_commands_on_a_folder_that_is_not_a_run(command, tmp_path, capsys) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("not a model\n")
    extra = ["--dry_run"] if command == "push" else ["--task_name", "mrpc"]
    code, err = run_cli([command, str(folder), *extra], capsys)
    line = assert_one_line_error(code, err, str(folder))
    assert "not a finetune run" in line or "not a finished finetune run" in line, line
    assert sorted(p.name for p in folder.iterdir()) == ["todo.txt"]


def test_evaluate_a_run_whose_training_did_not_finish(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "finetune_config.yaml").write_text("data:\n  task: glue\n  task_name: mrpc\n")
    code, err = run_cli(["evaluate", str(run)], capsys)
    assert_one_line_error(code, err, "without a saved model", "checkpoint-N")


@pytest.mark.parametrize(("model", "fragment"), [("./no/such/run", "no such folder"),
                                                 ("nyu-mll/glue", "is a dataset")])
def test_evaluate_a_missing_path_or_a_dataset_id(model, fragment, capsys) -> None:
    code, err = run_cli(["evaluate", model, "--task_name", "mrpc"], capsys)
    assert_one_line_error(code, err, model, fragment)


def test_rule_messages_name_flag_value_and_what_is_allowed(tmp_path) -> None:
    from finetune.config import parse_run_config
    from finetune.errors import FinetuneError

    cases = {
        ("--adam_beta2", "1"): "--adam_beta2 1.0: must be a number >= 0 and < 1",
        ("--max_steps", "0"): "--max_steps 0: must be -1 (train for num_train_epochs) or an integer >= 1",
        ("--warmup_steps", "nan"): "--warmup_steps nan: must be a number >= 0",
        ("--report_to", "tensorboard,nope"): "--report_to",
        ("--min_new_tokens", "9", "--max_new_tokens", "4"): "--min_new_tokens 9: must be <= --max_new_tokens (4)",
        ("--bf16", "true", "--fp16", "true"): "--bf16 and --fp16 are both true",
        ("--resume_from_checkpoint", str(tmp_path)): "has no trainer_state.json; not a complete checkpoint",
        ("--lr_scheduler_kwargs", "{'min_lr': 1}"): "--lr_scheduler_kwargs {'min_lr': 1}: not valid JSON",
        ("--optim_args", "betas"): "--optim_args betas: must be key=value pairs separated by commas",
        ("--deepspeed", "ds.json"): "--deepspeed ds.json: no such file (or give a JSON object)",
        ("--torch_compile_backend", "inductr"): "--torch_compile_backend inductr: must be one of no, eager,",
        ("--model_name_or_path", str(tmp_path), "--gguf_file", "m.gguf"): "--gguf_file m.gguf: no such file in the",
        ("--metric_for_best_model", "f2"): "--metric_for_best_model f2: must be one of accuracy, combined_score, "
                                           "examples, f1, loss (what glue task mrpc reports)",
        ("--task_name", "cola", "--metric_for_best_model", "eval_f1"): "--metric_for_best_model eval_f1: must be one "
                                                                       "of examples, loss, matthews_correlation",
    }
    for legal in ("eval_f1", "loss", "combined_score"):
        assert parse_run_config("glue-mrpc", ["--metric_for_best_model", legal]).training.metric_for_best_model
    for argv, message in cases.items():
        with pytest.raises(FinetuneError) as raised:
            parse_run_config("glue-mrpc", list(argv))
        assert message in str(raised.value), (argv, str(raised.value))
