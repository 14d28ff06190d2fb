"""Two real gloo processes on CPU (`accelerate launch --config_file launch/cpu_2proc.yaml`).

Checks what data parallelism can get wrong: the training data is split (not trained twice), tokenization
happens once (the second process reads the first one's cache), evaluation sees every example exactly once
(41 examples over 2 processes x batches of 8 forces padded duplicates that must be dropped), metrics equal
a single-process evaluation of the same weights, and only the main process writes and prints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_json, read_jsonl

from finetune.callbacks import last_complete_checkpoint
from finetune.cli import main

pytestmark = pytest.mark.distributed

EVAL_SAMPLES = 41  # odd, and not a multiple of 2 processes x 8: the last batches need padding
TRAIN_ARGS = [
    "--max_train_samples", "64", "--max_eval_samples", str(EVAL_SAMPLES),
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
    "--num_train_epochs", "1", "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_tqdm", "true",
]


def accelerate_launch(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).parent / "accelerate"
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    command = [str(launcher), "launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"), "-m", "finetune"]
    done = subprocess.run([*command, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(run directory, datasets cache, output) of `finetune train glue-mrpc` on 2 processes."""
    root = tmp_path_factory.mktemp("two-proc")
    run, cache = root / "run", root / "datasets-cache"
    done = accelerate_launch(
        ["train", "glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir", str(run),
         *TRAIN_ARGS],
        cache,
    )
    return run, cache, done.stdout


def tokenization_cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("cache-*.arrow"))


def test_two_processes_split_training_and_evaluate_each_example_once(two_process_run) -> None:
    run, cache, stdout = two_process_run
    state = read_json(run / "trainer_state.json")
    # 64 examples / (8 per process x 2 processes) = 4 steps; two unsynchronised copies would take 8 each.
    assert state["global_step"] == 4
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]

    validation = read_json(run / "metrics.json")["eval"]["validation"]
    assert validation["examples"] == EVAL_SAMPLES
    rows = read_jsonl(run / "predictions_validation.jsonl")
    assert len(rows) == EVAL_SAMPLES
    assert len({row["index"] for row in rows}) == EVAL_SAMPLES  # no duplicate stands in for a missing one

    # One writer, one printer: the run summary appears once, not once per process.
    assert stdout.count("run saved to") == 1
    assert stdout.count("validation  examples") == 1

    # Tokenized once: one cache file per split (train, validation, test). A fingerprint that differed
    # between the processes would leave each process its own copy, i.e. six.
    files = tokenization_cache_files(cache)
    assert len(files) == 3, [f.name for f in files]


def test_two_process_evaluation_equals_one_process(two_process_run, tmp_path: Path) -> None:
    run, cache, _ = two_process_run
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["evaluate", str(run), "--output_dir", str(one), "--per_device_eval_batch_size", "8"]) == 0
    finally:
        torch.set_num_threads(threads)
    accelerate_launch(["evaluate", str(run), "--output_dir", str(two), "--per_device_eval_batch_size", "8"], cache)

    single = read_json(one / "eval_results.json")["validation"]
    double = read_json(two / "eval_results.json")["validation"]
    during_training = read_json(run / "metrics.json")["eval"]["validation"]  # 2 processes, same final weights
    for result in (double, during_training):
        assert result["examples"] == single["examples"] == EVAL_SAMPLES
        for name in ("accuracy", "f1", "combined_score"):
            assert result[name] == single[name], name
    # The loss is the Trainer's, not a task metric: it averages per-batch mean losses, and under 2 processes
    # the last batch is padded with copies of the first examples, whose losses enter that batch's mean
    # (gather_for_metrics drops the copies from predictions and labels, not from a batch mean). So it matches
    # the single process only to ~1e-3 here, and exactly between the two 2-process evaluations. A loss
    # scaled by the process count (the Trainer's average_tokens_across_devices on a per-batch-mean loss)
    # would be off by 100%.
    assert double["loss"] == pytest.approx(during_training["loss"], rel=1e-6)
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-2)
    # Same records; the predicted class's probability comes from logits that differ in the last float digits
    # between batch layouts, like the loss.
    records = {n: read_jsonl(path / "predictions_validation.jsonl") for n, path in (("one", one), ("two", two))}
    confidence = {n: [r.pop("confidence") for r in rows] for n, rows in records.items()}
    assert records["two"] == records["one"]
    assert confidence["two"] == pytest.approx(confidence["one"], abs=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_all_and_resumes(tiny_model_dir, tmp_path: Path) -> None:
    """SIGTERM reaching only rank 1: the ranks agree at the step's end, save together (no rank left waiting
    in a collective), stop, and a 2-process resume from `last` finishes the schedule."""
    import psutil

    run, cache = tmp_path / "run", tmp_path / "datasets-cache"
    # 64 examples / (2 per process x 2 processes) = 16 steps per epoch.
    common = ["train", "glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir", str(run),
              "--max_train_samples", "64", "--max_eval_samples", "16", "--per_device_train_batch_size", "2",
              "--logging_steps", "1", "--disable_tqdm", "true"]
    args = [*common, "--num_train_epochs", "20"]
    launcher = Path(sys.executable).parent / "accelerate"
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [str(launcher), "launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"), "-m", "finetune"]
    process = subprocess.Popen([*command, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(line)
            if line.startswith("{") and "'loss'" in line:
                break
        workers = {
            child.environ().get("RANK"): child
            for child in psutil.Process(process.pid).children(recursive=True)
            if "finetune" in " ".join(child.cmdline())
        }
        workers["1"].send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(seen) + rest
    stopped = [line for line in output.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(stopped) == 1, output[-4000:]  # printed by rank 0 only
    checkpoint = Path(last_complete_checkpoint(run) or "")
    assert checkpoint.name.startswith("checkpoint-"), output[-4000:]
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert not (run / "metrics.json").exists()

    stopped_at = int(checkpoint.name.split("-")[1])
    assert stopped_at < 16, "SIGTERM arrived too late for this test's resume schedule"
    # The requeued job, cut to one epoch to stay short (the scheduler is rebuilt for the new length).
    accelerate_launch([*common, "--num_train_epochs", "1", "--resume_from_checkpoint", "last"], cache)
    state = read_json(run / "trainer_state.json")
    assert state["global_step"] == 16
    assert sorted(e["step"] for e in state["log_history"] if "loss" in e) == list(range(1, 17))
