"""--report_to: TensorBoard event files from a real run; one-line errors for unknown or missing trackers."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_json

from finetune import tracking
from finetune.cli import main


def tiny_run(model_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", "glue-mrpc", "--model_name_or_path", str(model_dir), "--output_dir", str(out),
                 "--max_train_samples", "32", "--max_eval_samples", "16", "--num_train_epochs", "2",
                 "--per_device_train_batch_size", "8", "--logging_steps", "1", *extra])


def test_tensorboard_event_files_hold_the_runs_curves(tiny_model_dir, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert tiny_run(tiny_model_dir("bert"), out, "--report_to", "tensorboard") == 0
    event_files = list((out / "runs").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/f1", "eval/accuracy", "eval/loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))  # 32 rows / 8 per step, 2 epochs
    assert len(events.Scalars("eval/f1")) == 2  # one evaluation per epoch
    first_eval = [e for e in read_json(out / "trainer_state.json")["log_history"] if "eval_f1" in e][0]
    assert events.Scalars("eval/f1")[0].value == pytest.approx(first_eval["eval_f1"])


def test_trackers_by_comma_list_and_one_line_errors(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(tracking.EXTRAS, "trackio", ("trackio", lambda: True))
    assert tracking.checked_report_to("none") == []
    assert tracking.checked_report_to(["tensorboard,trackio"]) == ["tensorboard", "trackio"]
    monkeypatch.setitem(tracking.EXTRAS, "wandb", ("wandb", lambda: False))
    for flag, expected in (("wandb", 'needs the wandb package: pip install -e ".[wandb]"'),
                           ("tensorbord", "unknown integration (known: none, all, azure_ml")):
        code = main(["train", "glue-mrpc", "--report_to", flag, "--output_dir", str(tmp_path / flag)])
        assert code == 2
        err = capsys.readouterr().err
        assert f"finetune: error: --report_to {flag}" in err and expected in err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / flag).exists()
