"""The distributed engines of launch/ run for real on CPU: FSDP2 over gloo, two machines on loopback, SLURM.

Each test starts real `accelerate launch` processes with a launch/*.yaml file, on tiny models and a few dozen
examples. What they check is what a silent fallback would get wrong: FSDP really shards (one .distcp file per
rank in every checkpoint), the final model is one full state dict that evaluates like the run said, two
"machines" split the data and evaluate each example once, and a job stopped midway resumes to the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_json, read_jsonl

from finetune.callbacks import last_complete_checkpoint
from finetune.cli import main

pytestmark = pytest.mark.distributed

LAUNCH = ROOT / "launch"
ACCELERATE = Path(sys.executable).parent / "accelerate"
# 48 train examples / (4 per process x 2 processes) = 6 steps per epoch; 20 eval examples over 2 processes.
EVAL_SAMPLES = 20
SMALL_RUN = [
    "--max_train_samples", "48", "--max_eval_samples", str(EVAL_SAMPLES), "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_tqdm", "true",
]


def launch_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def launch_command(config: str, *launch_args: str) -> list[str]:
    return [str(ACCELERATE), "launch", "--config_file", str(LAUNCH / config), *launch_args, "-m", "finetune"]


def run_launch(command: list[str], cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=launch_env(cache), cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done


def evaluate_in_one_process(model_dir: Path, out: Path) -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["evaluate", str(model_dir), "--output_dir", str(out), "--per_device_eval_batch_size", "4"]) == 0
    finally:
        torch.set_num_threads(threads)
    return read_json(out / "eval_results.json")["validation"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------
# FSDP2 on CPU
# ---------------------------------------------------------------------------------------------------------

# fsdp.yaml as shipped, with two CPU processes in fp32 (bf16 autocast on CPU is slow and changes the numbers).
FSDP_ON_CPU = ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"]


def fsdp_shards(checkpoint: Path) -> list[str]:
    return sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))


def assert_full_model_evaluates_as_the_run_said(run: Path, tmp_path: Path) -> None:
    """output_dir holds one full state dict (not shards) whose one-process evaluation equals the run's."""
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    assert not (run / "pytorch_model_fsdp_0").exists()
    with safe_open(str(run / "model.safetensors"), "pt") as weights:
        embedding = weights.get_tensor("bert.embeddings.word_embeddings.weight")
    model = AutoModelForSequenceClassification.from_pretrained(run)
    assert embedding.shape == model.bert.embeddings.word_embeddings.weight.shape  # full, not one rank's half
    assert torch.equal(embedding, model.bert.embeddings.word_embeddings.weight)

    single = evaluate_in_one_process(run, tmp_path / "eval")
    during_run = read_json(run / "metrics.json")["eval"]["validation"]
    assert single["examples"] == during_run["examples"] == EVAL_SAMPLES
    for name in ("accuracy", "f1"):
        assert single[name] == during_run[name], name
    assert single["loss"] == pytest.approx(during_run["loss"], rel=1e-2)  # see test_distributed: padded last batch


def test_fsdp_config_shards_on_cpu_and_saves_one_full_model(tiny_model_dir, tmp_path: Path) -> None:
    """launch/fsdp.yaml on 2 CPU processes is FSDP2, not DDP: sharded checkpoints (one .distcp per rank),
    the best checkpoint reloaded at the end on both ranks (sharded state + load_best_model_at_end), and a
    final model that is one loadable full state dict."""
    run, cache = tmp_path / "run", tmp_path / "datasets-cache"
    run_launch(
        [*launch_command("fsdp.yaml", *FSDP_ON_CPU), "train", "glue-mrpc", "--model_name_or_path",
         str(tiny_model_dir("bert")), "--output_dir", str(run), "--num_train_epochs", "1", *SMALL_RUN],
        cache,
    )
    state = read_json(run / "trainer_state.json")
    assert state["global_step"] == 6  # 48 / (4 x 2): the ranks split the data
    # One evaluation, at the last step, so the best checkpoint is the one being written. With sharded
    # checkpoints the Trainer used to look for its folder before any rank had created it: rank 0 recorded
    # no best checkpoint (and skipped loading it) while a slower rank could record it and wait in a
    # collective to load it, a hang. Every rank must record it.
    assert state["best_global_step"] == 6
    checkpoint = Path(state["best_model_checkpoint"] or "")
    assert checkpoint == run / "checkpoint-6"
    assert fsdp_shards(checkpoint) == ["__0_0.distcp", "__1_0.distcp"], sorted(os.listdir(checkpoint))
    assert not (checkpoint / "model.safetensors").exists()
    assert_full_model_evaluates_as_the_run_said(run, tmp_path)


@pytest.mark.slow
def test_fsdp_sigterm_checkpoints_shards_and_resumes(tiny_model_dir, tmp_path: Path) -> None:
    """SIGTERM to one FSDP rank: both ranks write their shards, stop; `--resume_from_checkpoint last` on
    2 processes loads the shards and finishes; the final full model evaluates as the run said."""
    import psutil

    run, cache = tmp_path / "run", tmp_path / "datasets-cache"
    common = ["train", "glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir", str(run),
              *SMALL_RUN, "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps",
              "--eval_steps", "2"]
    process = subprocess.Popen(
        [*launch_command("fsdp.yaml", *FSDP_ON_CPU), *common, "--num_train_epochs", "20"],
        env=launch_env(cache), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
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
        rest, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(seen) + rest
    checkpoint = Path(last_complete_checkpoint(run) or "")
    assert checkpoint.name.startswith("checkpoint-"), output[-4000:]
    stopped_at = int(checkpoint.name.split("-")[1])
    assert stopped_at < 6, "SIGTERM arrived too late for this test's resume schedule"
    assert fsdp_shards(checkpoint) == ["__0_0.distcp", "__1_0.distcp"]
    assert (checkpoint / "optimizer_0").is_dir()
    assert not (run / "metrics.json").exists()

    # The requeued job, cut to one epoch (6 steps) to stay short.
    run_launch([*launch_command("fsdp.yaml", *FSDP_ON_CPU), *common, "--num_train_epochs", "1",
                "--resume_from_checkpoint", "last"], cache)
    state = read_json(run / "trainer_state.json")
    assert state["global_step"] == 6
    assert sorted(e["step"] for e in state["log_history"] if "loss" in e) == list(range(1, 7))
    assert_full_model_evaluates_as_the_run_said(run, tmp_path)


def test_fsdp_decoder_only_generation_finishes(tiny_model_dir, tmp_path: Path) -> None:
    """Decoder-only generation in evaluation under FSDP2 on 2 processes: every forward gathers weights from
    both ranks, so a rank whose rows finish early must keep joining (synced_gpus) or the other hangs."""
    from conftest import SAMPLES

    run, cache = tmp_path / "run", tmp_path / "datasets-cache"
    run_launch(
        [*launch_command("fsdp.yaml", *FSDP_ON_CPU), "train", "--task", "summarization", "--model_name_or_path",
         str(tiny_model_dir("llama")), "--output_dir", str(run), "--train_file",
         str(SAMPLES / "xsum_sample" / "sample.jsonl"), "--validation_split_percentage", "30",
         "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
         "--max_new_tokens", "12", "--max_seq_length", "96", "--max_target_length", "24", "--disable_tqdm", "true"],
        cache,
    )
    assert read_json(run / "metrics.json")["eval"]["validation"]["examples"] == 3
    assert len(read_jsonl(run / "generated_predictions.jsonl")) == 3
    checkpoint = Path(read_json(run / "trainer_state.json")["best_model_checkpoint"])
    assert fsdp_shards(checkpoint) == ["__0_0.distcp", "__1_0.distcp"]


def test_fsdp_with_cpu_flag_is_an_error_not_one_process(tiny_model_dir, tmp_path: Path) -> None:
    """`--cpu` sends an FSDP (or MULTI_GPU) config to accelerate's single-process launcher: one line, exit 2."""
    done = run_launch(
        [str(ACCELERATE), "launch", "--config_file", str(LAUNCH / "fsdp.yaml"), "--cpu", "--num_processes", "2",
         "--mixed_precision", "no", "-m", "finetune", "train", "glue-mrpc", "--model_name_or_path",
         str(tiny_model_dir("bert")), "--output_dir", str(tmp_path / "run"), *SMALL_RUN],
        tmp_path / "cache", check=False,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1 and "started only this process" in errors[0], done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# Two machines on loopback
# ---------------------------------------------------------------------------------------------------------


def launch_two_machines(args: list[str], cache: Path) -> list[str]:
    """`accelerate launch --config_file launch/multi_node.yaml` once per "machine" (rank 0 and 1, one process
    each, rendezvous on 127.0.0.1), as launch/slurm.sh runs it on every node; returns both outputs."""
    port = str(free_port())
    machines = [
        subprocess.Popen(
            [*launch_command("multi_node.yaml", "--num_machines", "2", "--num_processes", "2", "--machine_rank",
                             str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                             "--mixed_precision", "no"), *args],
            env=launch_env(cache), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for machine in machines:
            outputs.append(machine.communicate(timeout=600)[0])
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
    for machine, output in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, output[-5000:]
    return outputs


@pytest.mark.slow
def test_two_machines_on_loopback_train_evaluate_once_and_resume(tiny_model_dir, tmp_path: Path) -> None:
    run, cache = tmp_path / "run", tmp_path / "datasets-cache"
    common = ["train", "glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir", str(run),
              *SMALL_RUN]
    first = launch_two_machines([*common, "--num_train_epochs", "1"], cache)
    state = read_json(run / "trainer_state.json")
    assert state["global_step"] == 6  # 48 / (4 per process x 2 machines): one data-parallel group
    validation = read_json(run / "metrics.json")["eval"]["validation"]
    assert validation["examples"] == EVAL_SAMPLES
    rows = read_jsonl(run / "predictions_validation.jsonl")
    assert len(rows) == EVAL_SAMPLES and len({row["index"] for row in rows}) == EVAL_SAMPLES
    # One writer and printer (global rank 0, on machine 0), not one per machine.
    assert first[0].count("run saved to") == 1 and first[1].count("run saved to") == 0
    checkpoint = Path(last_complete_checkpoint(run) or "")
    assert checkpoint.name == "checkpoint-6"
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]

    # Both machines resume from the shared checkpoint and train the second epoch only.
    launch_two_machines([*common, "--num_train_epochs", "2", "--resume_from_checkpoint", "last"], cache)
    state = read_json(run / "trainer_state.json")
    assert state["global_step"] == 12
    assert sorted(e["step"] for e in state["log_history"] if "loss" in e) == list(range(1, 13))
    assert read_json(run / "metrics.json")["eval"]["validation"]["examples"] == EVAL_SAMPLES


@pytest.mark.parametrize("config", [None, "cpu_2proc.yaml"])
def test_several_machines_without_a_multi_process_type_is_an_error(config, tiny_model_dir, tmp_path: Path) -> None:
    """--num_machines 2 with no config (or with --cpu) makes accelerate start one plain process per machine,
    each of which would train alone: one line, non-zero exit, nothing trained."""
    launcher = [str(ACCELERATE), "launch", *(["--config_file", str(LAUNCH / config), "--cpu"] if config else [])]
    done = run_launch(
        [*launcher, "--num_machines", "2", "--num_processes", "2", "--machine_rank", "0", "--main_process_ip",
         "127.0.0.1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "-m", "finetune", "train",
         "glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir", str(tmp_path / "run"),
         *SMALL_RUN],
        tmp_path / "cache", check=False,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1 and "started only this process" in errors[0], done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# SLURM (a one-host cluster: launch/slurm_cluster.sh up)
# ---------------------------------------------------------------------------------------------------------


def slurm_not_up() -> str | None:
    """Why no SLURM cluster can take jobs here, or None."""
    status = subprocess.run(["bash", str(LAUNCH / "slurm_cluster.sh"), "status"], capture_output=True, text=True)
    if status.returncode != 0:
        return (status.stdout + status.stderr).strip() or "launch/slurm_cluster.sh status failed"
    return None


def sbatch(args: list[str], log: Path, cache: Path, **env: str) -> str:
    """Submit launch/slurm.sh on this host's one-node cluster: 2 CPU processes, fp32; returns the job id."""
    command = ["sbatch", "--parsable", "--nodes", "1", "--gres=none", "--cpus-per-task", "2", "--output",
               str(log), "--job-name", "finetune-test", str(LAUNCH / "slurm.sh"), *args]
    environment = {**launch_env(cache), "GPUS_PER_NODE": "2", "MAIN_PROCESS_PORT": str(free_port()), **env}
    environment["PATH"] = os.pathsep.join((str(ACCELERATE.parent), environment["PATH"]))
    done = subprocess.run(command, env=environment, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().split(";")[0]


def job_fields(job: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def wait_for_job(job: str, log: Path, timeout: float = 900) -> dict[str, str]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(job)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return fields
        time.sleep(2)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} did not end in {timeout} s: {log.read_text()[-3000:] if log.exists() else ''}")


def start_requeued_job_now(job: str, timeout: float = 120) -> None:
    """SLURM holds a requeued job for about two minutes (BeginTime) before it may start again; as an admin may,
    make it eligible at once, so that the test does not sit out the hold."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(job)
        if fields.get("JobState") == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, text=True)
            return
        if fields.get("JobState") == "RUNNING" and fields.get("Restarts") == "1":
            return  # already back
        time.sleep(0.5)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.mark.slow
def test_slurm_job_and_a_requeued_job_end_with_the_same_weights(tiny_model_dir, tmp_path: Path) -> None:
    """`sbatch launch/slurm.sh` runs to completion; a job requeued midway (`scontrol requeue`, as an admin or a
    preemption does) checkpoints on SIGTERM, comes back with `--resume_from_checkpoint last` and ends with the
    same final weights as the uninterrupted job."""
    import time

    reason = slurm_not_up()
    if reason:
        pytest.skip(f"no SLURM cluster here ({reason}); start one with: sudo launch/slurm_cluster.sh up")
    cache = tmp_path / "datasets-cache"
    train = ["glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), *SMALL_RUN, "--num_train_epochs", "2",
             "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2"]

    straight, straight_log = tmp_path / "straight", tmp_path / "straight.out"
    fields = wait_for_job(sbatch([*train, "--output_dir", str(straight)], straight_log, cache), straight_log)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0", straight_log.read_text()[-3000:]
    assert read_json(straight / "trainer_state.json")["global_step"] == 12

    requeued, requeued_log = tmp_path / "requeued", tmp_path / "requeued.out"
    job = sbatch([*train, "--output_dir", str(requeued)], requeued_log, cache)
    deadline = time.monotonic() + 600
    while last_complete_checkpoint(requeued) is None:
        assert time.monotonic() < deadline and job_fields(job).get("JobState") in ("PENDING", "RUNNING"), (
            requeued_log.read_text()[-3000:] if requeued_log.exists() else job_fields(job)
        )
        time.sleep(0.5)
    assert subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True).returncode == 0
    start_requeued_job_now(job)
    fields = wait_for_job(job, requeued_log)
    log = requeued_log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-4000:]
    assert "restart 1:" in log and "--resume_from_checkpoint last" in log, log[-4000:]
    # The batch shell leaves the stopping to SLURM (which signals the step itself) instead of a refused scancel.
    assert "SLURM is ending the job" in log and "Job can not be altered now" not in log, log[-4000:]
    state = read_json(requeued / "trainer_state.json")
    assert state["global_step"] == 12
    assert sorted({e["step"] for e in state["log_history"] if "loss" in e}) == list(range(1, 13))

    expected, got = final_weights(straight), final_weights(requeued)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed on CPU (only where deepspeed is installed: pip install deepspeed)
# ---------------------------------------------------------------------------------------------------------


def deepspeed_missing(cache: Path) -> str | None:
    probe = subprocess.run([sys.executable, "-c", "import deepspeed"], env=launch_env(cache), capture_output=True,
                           text=True, timeout=300)
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["import failed"])[-1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_trains_and_resumes(stage: int, tiny_model_dir, tmp_path: Path) -> None:
    """launch/deepspeed_zero{2,3}.yaml on 2 CPU processes: DeepSpeed's own sharded checkpoint (one optimizer
    shard per rank), a full final model, and a 2-process resume from `last` that trains the second epoch only.
    DeepSpeed compiles its CPU ops (shm comm, fused Adam) at first use: minutes, once per machine."""
    cache = tmp_path / "datasets-cache"
    missing = deepspeed_missing(cache)
    if missing:
        pytest.skip(f"deepspeed is not installed ({missing})")
    run = tmp_path / "run"
    command = [*launch_command(f"deepspeed_zero{stage}.yaml", "--num_processes", "2", "--main_process_port", "0"),
               "train", "glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir", str(run),
               *SMALL_RUN]
    run_launch([*command, "--num_train_epochs", "1"], cache)
    checkpoint = Path(last_complete_checkpoint(run) or "")
    assert checkpoint.name == "checkpoint-6"
    shards = sorted(p.name for p in (checkpoint / "global_step6").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one ZeRO optimizer partition per rank: DeepSpeed, not DDP

    run_launch([*command, "--num_train_epochs", "2", "--resume_from_checkpoint", "last"], cache)
    state = read_json(run / "trainer_state.json")
    assert state["global_step"] == 12
    assert sorted(e["step"] for e in state["log_history"] if "loss" in e) == list(range(1, 13))
    assert read_json(run / "metrics.json")["eval"]["validation"]["examples"] == EVAL_SAMPLES
    assert (run / "model.safetensors").is_file()
