"""Fault tolerance: exact resume after SIGKILL, checkpoint-and-exit on SIGTERM, complete checkpoints, NaN loss.

The killed runs are real processes (``python -m finetune train``), as on a cluster; the runs they are
compared with run in this process through the same command-line entry point.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_json
from safetensors.torch import load_file

from finetune import callbacks
from finetune.callbacks import COMPLETE_MARKER, last_complete_checkpoint
from finetune.cli import main
from finetune.config import parse_run_config
from finetune.errors import PREEMPTED_EXIT_CODE, FinetuneError
from finetune.pipeline import resume_checkpoint

# 48 examples, batch 4: 12 steps per epoch, so 30 steps cross two epoch boundaries (a resume in epoch 2
# must rebuild the same length-grouped order). The default sampling strategy is group_by_length.
RESUME_ARGS = [
    "--max_train_samples", "48", "--max_eval_samples", "24",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "24",
    "--max_steps", "30", "--learning_rate", "3e-4", "--logging_steps", "1",
    "--eval_strategy", "steps", "--eval_steps", "8", "--save_strategy", "steps", "--save_steps", "8",
    "--seed", "11",
]

# Dies with SIGKILL in the middle of writing checkpoint-<step>: after the model weights, before the
# optimizer, RNG states and trainer_state.json, i.e. the state a kill during the save leaves behind.
KILL_DURING_SAVE = """
import os, signal, sys
from transformers import Trainer
from finetune.cli import main

kill_at = int(os.environ["KILL_DURING_SAVE_OF_STEP"])
save_optimizer = Trainer._save_optimizer_and_scheduler

def save_or_die(self, output_dir):
    if self.state.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_optimizer(self, output_dir)

Trainer._save_optimizer_and_scheduler = save_or_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread here and in the children: the runs compared must use the same kernels, and on a
    small shared machine a second thread per tiny matmul only adds contention (10x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def train_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "glue-mrpc", "--model_name_or_path", str(model), "--output_dir", str(out), *extra]


def step_losses(run: Path) -> dict[int, float]:
    history = read_json(run / "trainer_state.json")["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def eval_losses(run: Path) -> dict[int, float]:
    history = read_json(run / "trainer_state.json")["log_history"]
    return {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("bert")
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    assert main(train_argv(model, whole, *RESUME_ARGS)) == 0

    # Killed while writing checkpoint-24, in epoch 2: checkpoint-16 is the newest complete one.
    child = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, *train_argv(model, killed, *RESUME_ARGS)],
        env=child_env(KILL_DURING_SAVE_OF_STEP="24"), capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    half_written = killed / "checkpoint-24"
    assert (half_written / "model.safetensors").is_file()  # looks like a checkpoint...
    assert not (half_written / COMPLETE_MARKER).exists()  # ...but is not marked complete
    assert last_complete_checkpoint(killed) == str(killed / "checkpoint-16")

    assert main(train_argv(model, killed, *RESUME_ARGS, "--resume_from_checkpoint", "last")) == 0

    expected, resumed = step_losses(whole), step_losses(killed)
    assert sorted(expected) == list(range(1, 31))
    # The resumed run's history is checkpoint-16's (steps 1-16) plus what it trained itself (17-30).
    assert sorted(resumed) == list(range(1, 31))
    # Same seed, same data order (restored sampler position, epoch-seeded length grouping), same dropout
    # masks (per-process RNG states restored), same optimizer and scheduler state, the same kernels on the
    # same machine: the arithmetic is identical, so the losses are too. The tolerance only allows for
    # float32 rounding (~1e-7 relative) should a kernel pick another summation order; a wrong batch or
    # dropout mask changes a loss by ~1e-2.
    for step in range(17, 31):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    assert eval_losses(killed) == pytest.approx(eval_losses(whole), rel=1e-6)

    final_expected = read_json(whole / "metrics.json")["eval"]["validation"]
    final_resumed = read_json(killed / "metrics.json")["eval"]["validation"]
    for name in ("accuracy", "f1", "examples"):
        assert final_resumed[name] == final_expected[name], name
    assert final_resumed["loss"] == pytest.approx(final_expected["loss"], rel=1e-6)
    a, b = weights(whole), weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)


def read_until_step(process: subprocess.Popen, step: int, seen: list[str]) -> None:
    """Read the child's output until it has logged the loss of ``step``."""
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        if line.startswith("{") and "'loss'" in line:
            logged = sum(1 for s in seen if s.startswith("{") and "'loss'" in s)
            if logged >= step:
                return
    tail = "".join(seen[-30:])
    raise AssertionError(f"training ended before step {step}:\n{tail}")


def test_sigterm_saves_checkpoint_exits_preempted_and_resumes(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("bert")
    out = tmp_path / "run"
    args = [
        "--max_train_samples", "48", "--max_eval_samples", "16",
        "--per_device_train_batch_size", "4", "--num_train_epochs", "20", "--logging_steps", "1",
        "--eval_strategy", "epoch", "--save_strategy", "epoch", "--disable_tqdm", "true",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", *train_argv(model, out, *args)],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    seen: list[str] = []
    try:
        read_until_step(process, 3, seen)  # mid-epoch 1, before any checkpoint
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(seen) + rest

    assert process.returncode == PREEMPTED_EXIT_CODE == 143, output[-3000:]
    checkpoint = Path(last_complete_checkpoint(out) or "")
    assert checkpoint.name.startswith("checkpoint-"), output[-3000:]
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 3 <= stopped_at < 240
    assert f"stopped by SIGTERM at step {stopped_at}; checkpoint saved to {checkpoint}" in output
    assert "--resume_from_checkpoint last" in output
    assert read_json(checkpoint / "trainer_state.json")["global_step"] == stopped_at
    # No final save or evaluation on the way out.
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()

    # The requeued job: same command plus --resume_from_checkpoint last; fewer epochs keep the test short
    # (the number of epochs does not enter the state that is restored).
    resumed = [a if a != "20" else "2" for a in args]
    assert main(train_argv(model, out, *resumed, "--resume_from_checkpoint", "last")) == 0
    state = read_json(out / "trainer_state.json")
    assert state["global_step"] == 24
    logged = sorted(e["step"] for e in state["log_history"] if "loss" in e)
    assert logged == list(range(1, 25))  # every step exactly once: none lost, none repeated
    assert read_json(out / "metrics.json")["eval"]["validation"]["examples"] == 16


def test_sigterm_handler_is_removed_after_training(tiny_model_dir, tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    args = ["--max_train_samples", "8", "--max_eval_samples", "8", "--max_steps", "1"]
    assert main(train_argv(tiny_model_dir("bert"), tmp_path / "run", *args)) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_last_skips_half_written_checkpoints(tmp_path: Path) -> None:
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        if complete:
            (folder / COMPLETE_MARKER).write_text(f"{step}\n")
    (tmp_path / "checkpoint-99.tmp").mkdir()  # not a checkpoint name
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")

    config = parse_run_config("glue-mrpc", ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "last"])
    assert resume_checkpoint(config) == str(tmp_path / "checkpoint-8")

    (tmp_path / "checkpoint-4" / COMPLETE_MARKER).unlink()
    (tmp_path / "checkpoint-8" / COMPLETE_MARKER).unlink()
    with pytest.raises(FinetuneError, match="no complete checkpoint"):
        resume_checkpoint(config)

    partial = tmp_path / "checkpoint-12"
    (partial / "trainer_state.json").unlink()
    with pytest.raises(FinetuneError, match="has no trainer_state.json; not a complete checkpoint"):
        parse_run_config("glue-mrpc", ["--output_dir", str(tmp_path), "--resume_from_checkpoint", str(partial)])


def nan_args(*extra: str) -> list[str]:
    # A learning rate of 1e20 makes the weights overflow after a step or two; logging only every 50 steps
    # shows that the check does not wait for a logged loss.
    return [
        "--max_train_samples", "48", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
        "--max_steps", "12", "--learning_rate", "1e20", "--max_grad_norm", "0", "--warmup_steps", "0",
        "--logging_steps", "50", "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true", *extra,
    ]


class LossRecorder(callbacks.TrainerCallback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def test_non_finite_loss_stops_at_the_step_it_happens(tiny_model_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    model = tiny_model_dir("bert")
    out = tmp_path / "diverged"
    assert main(train_argv(model, out, *nan_args())) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1 and errors[0].startswith("finetune: error: training loss became "), errors
    error = errors[0]
    stopped_at = int(error.split(" at step ")[1].split()[0])
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()

    # The same run without the check and without the Trainer's NaN filter, logging every step: the first
    # non-finite logged loss is at the step the check named, and every earlier one is finite.
    recorder = LossRecorder()
    defaults = callbacks.default_callbacks
    monkeypatch.setattr(
        callbacks, "default_callbacks",
        lambda config: [c for c in defaults(config) if not isinstance(c, callbacks.StopOnNonFiniteLoss)] + [recorder],
    )
    unchecked = nan_args("--logging_steps", "1", "--logging_nan_inf_filter", "false")
    assert main(train_argv(model, tmp_path / "unchecked", *unchecked)) == 0
    first_bad = min(step for step, loss in recorder.losses.items() if not math.isfinite(loss))
    assert first_bad == stopped_at
    assert all(math.isfinite(recorder.losses[step]) for step in range(1, first_bad))


def test_preempted_exit_code_matches_slurm_script() -> None:
    script = (ROOT / "launch" / "slurm.sh").read_text()
    assert f'PREEMPTED_EXIT_CODE="${{FINETUNE_PREEMPTED_EXIT_CODE:-{PREEMPTED_EXIT_CODE}}}"' in script
