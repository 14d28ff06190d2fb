"""The accelerate configs and the SLURM script in launch/, checked without GPUs and without launching.

Each YAML is read with accelerate's own loader and then put through the same validation and environment
preparation that `accelerate launch` does before it starts any process, so a misspelt key, a field that
changed name between accelerate versions, or a combination accelerate refuses fails here. The SLURM script
is run against stand-in `srun`/`scontrol`/`scancel`/`accelerate` commands to check the command line it
builds and its requeue logic. Only cpu_2proc.yaml is ever run for real (by the distributed tests).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SLURM_SCRIPT = LAUNCH / "slurm.sh"

# What each config must say. A new launch/*.yaml without an entry here fails test_every_config_has_expectations.
EXPECTED: dict[str, dict[str, Any]] = {
    "cpu_2proc": {
        "distributed_type": "MULTI_GPU",  # torchrun path: MULTI_CPU would start a single process
        "num_processes": 2,
        "num_machines": 1,
        "mixed_precision": "no",
        "use_cpu": True,
    },
    "single_gpu": {"distributed_type": "NO", "num_processes": 1, "num_machines": 1, "mixed_precision": "bf16"},
    "multi_gpu": {"distributed_type": "MULTI_GPU", "num_processes": 8, "num_machines": 1, "mixed_precision": "bf16"},
    "fsdp": {"distributed_type": "FSDP", "num_processes": 8, "num_machines": 1, "mixed_precision": "bf16"},
    "deepspeed_zero2": {"distributed_type": "DEEPSPEED", "num_processes": 8, "num_machines": 1, "zero_stage": 2},
    "deepspeed_zero3": {"distributed_type": "DEEPSPEED", "num_processes": 8, "num_machines": 1, "zero_stage": 3},
    "multi_node": {
        "distributed_type": "MULTI_GPU",
        "num_processes": 16,
        "num_machines": 2,
        "mixed_precision": "bf16",
        "rdzv_backend": "static",
    },
}

CONFIGS = sorted(p.stem for p in LAUNCH.glob("*.yaml"))


def load(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(LAUNCH / f"{name}.yaml"))


def launcher_env(name: str, *extra: str) -> tuple[Any, dict[str, str]]:
    """(args, environment) as `accelerate launch --config_file launch/NAME.yaml -m finetune train` would hand
    to its workers: accelerate's own argument parsing, config merging, checks and env preparation, no launch."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import launch as accelerate_launch

    argv = ["--config_file", f"launch/{name}.yaml", *extra, "-m", "finetune", "train", "glue-mrpc"]
    args = launch_command_parser().parse_args(argv)
    cwd = os.getcwd()
    os.chdir(ROOT)  # relative paths in the configs (deepspeed_config_file) resolve against the launch directory
    try:
        # The port checks look at this machine; whether 29500 is busy here says nothing about the config.
        with mock.patch.object(accelerate_launch, "is_port_in_use", return_value=False):
            args, defaults, mixed_precision_from_config = _validate_launch_command(args)
            if args.use_deepspeed:
                fields = list(defaults.deepspeed_config)
                if mixed_precision_from_config:
                    fields.append("mixed_precision")
                args.deepspeed_fields_from_accelerate_config = ",".join(fields)
                _, env = accelerate_launch.prepare_deepspeed_cmd_env(args)
            elif args.multi_gpu or args.use_fsdp:
                env = accelerate_launch.prepare_multi_gpu_env(args)
            else:
                _, env = accelerate_launch.prepare_simple_launcher_cmd_env(args)
    finally:
        os.chdir(cwd)
    return args, env


# ---------------------------------------------------------------------------------------------------------
# The YAML files
# ---------------------------------------------------------------------------------------------------------


def test_every_config_has_expectations():
    assert CONFIGS, f"no accelerate configs in {LAUNCH}"
    assert set(CONFIGS) == set(EXPECTED), (
        f"launch/*.yaml {CONFIGS} and EXPECTED {sorted(EXPECTED)} differ: add expectations for new configs"
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_with_expected_fields(name: str):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment

    config = load(name)
    assert isinstance(config, ClusterConfig), "SageMakerConfig: compute_environment is not LOCAL_MACHINE"
    assert config.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    expected = EXPECTED[name]
    assert config.distributed_type.value == expected["distributed_type"]
    assert config.num_processes == expected["num_processes"]
    assert config.num_machines == expected["num_machines"]
    assert config.machine_rank == 0
    assert config.use_cpu is expected.get("use_cpu", False)
    if "mixed_precision" in expected:
        assert config.mixed_precision == expected["mixed_precision"]
    if "rdzv_backend" in expected:
        assert config.rdzv_backend == expected["rdzv_backend"]
    if config.distributed_type.value != "FSDP":
        assert config.fsdp_config == {}
    if config.distributed_type.value != "DEEPSPEED":
        assert config.deepspeed_config == {}


@pytest.mark.parametrize("name", CONFIGS)
def test_nested_keys_are_launch_arguments(name: str):
    """accelerate copies fsdp_config/deepspeed_config keys onto its arguments without checking them: a
    misspelt key would be ignored in silence. Every key must be an `accelerate launch` option."""
    from accelerate.commands.launch import launch_command_parser

    known = {action.dest for action in launch_command_parser()._actions}
    config = load(name)
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in getattr(config, section):
            dest = key if key.startswith(prefix) else prefix + key
            assert dest in known, f"{name}.yaml {section}.{key}: not an option of accelerate launch"


@pytest.mark.parametrize("name", CONFIGS)
def test_launcher_accepts_config(name: str):
    """`accelerate launch` validation and worker environment, as far as it goes without starting processes."""
    args, env = launcher_env(name)
    expected = EXPECTED[name]
    assert env["ACCELERATE_MIXED_PRECISION"] == expected.get("mixed_precision", "no")
    if expected["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED"):
        assert int(args.nproc_per_node) == expected["num_processes"] // expected["num_machines"]


def test_cpu_config_does_not_reach_workers_by_itself():
    """Why cpu_2proc.yaml says ACCELERATE_USE_CPU=1 is required: accelerate 1.15's torchrun path does not pass
    `use_cpu` on. If this starts failing, accelerate does it now and the note in cpu_2proc.yaml can go."""
    with mock.patch.dict(os.environ):
        os.environ.pop("ACCELERATE_USE_CPU", None)
        _, env = launcher_env("cpu_2proc")
    assert "ACCELERATE_USE_CPU" not in env


def test_fsdp_is_fsdp2_sharded_without_ram_efficient_loading():
    fsdp = load("fsdp").fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False  # see fsdp.yaml: breaks the Trainer's optimizer
    # FSDP1-only options FSDP2 rejects (backward/forward prefetch, use_orig_params) must stay out.
    for fsdp1_only in ("fsdp_backward_prefetch", "fsdp_forward_prefetch", "fsdp_use_orig_params"):
        assert fsdp1_only not in fsdp

    _, env = launcher_env("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"

    # The plugin the Trainer's Accelerator will build from that environment accepts it.
    from accelerate.utils import FullyShardedDataParallelPlugin

    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.cpu_ram_efficient_loading is False


AUTO_FIELDS = (
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer.params.lr",
    "optimizer.params.weight_decay",
    "bf16.enabled",
)


def nested(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_json_is_filled_by_the_trainer(name: str):
    config = load(name)
    assert config.mixed_precision is None, "accelerate refuses mixed_precision next to a DeepSpeed JSON file"
    ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
    assert ds_file.is_file(), f"{name}.yaml points at a missing {ds_file}"
    ds = json.loads(ds_file.read_text())
    assert ds["zero_optimization"]["stage"] == EXPECTED[name]["zero_stage"]
    for field in AUTO_FIELDS:
        assert nested(ds, field) == "auto", f"{ds_file.name}: {field} should be 'auto' (the Trainer fills it)"
    assert "scheduler" not in ds, "a DeepSpeed scheduler would override the recipe's lr_scheduler_type"
    if EXPECTED[name]["zero_stage"] == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True

    _, env = launcher_env(name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == config.deepspeed_config["deepspeed_config_file"]

    # The plugin the Trainer's Accelerator builds from that environment reads the file and accepts the mix
    # of accelerate fields (it raises when a YAML field competes with the JSON).
    from accelerate.utils import DeepSpeedPlugin

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with mock.patch.dict(os.environ, env):
            plugin = DeepSpeedPlugin()
    finally:
        os.chdir(cwd)
    assert plugin.zero_stage == EXPECTED[name]["zero_stage"]


def test_multi_node_overrides_from_the_command_line():
    """slurm.sh passes these; the placeholder address in the file must give way to them."""
    args, _ = launcher_env(
        "multi_node",
        *("--num_machines", "4", "--num_processes", "32", "--machine_rank", "3"),
        *("--main_process_ip", "gpu-017", "--main_process_port", "29511"),
    )
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("4", "8", 3)
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "gpu-017:29511")
    assert load("multi_node").main_process_ip.endswith(".invalid")


# ---------------------------------------------------------------------------------------------------------
# The SLURM script, against stand-in SLURM and accelerate commands
# ---------------------------------------------------------------------------------------------------------

FAKE_SRUN = """#!/usr/bin/env bash
echo "$@" > "$FAKE_DIR/srun.args"
while [[ "$1" == -* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") printf 'gpu-017\\ngpu-018\\n' ;;
  "show job") echo "JobId=$3 JobName=finetune JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None" ;;
  *) echo "$@" >> "$FAKE_DIR/scontrol.log" ;;
esac
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_DIR/scancel.log"
kill -TERM "$(cat "$FAKE_DIR/accelerate.pid")"
"""
# Stands in for `accelerate launch` and the trainer behind it: records its arguments, then finishes,
# reports "preempted", or runs until SIGTERM and then exits as the trainer does after its checkpoint.
FAKE_ACCELERATE = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_DIR/accelerate.args"
case "$FAKE_MODE" in
  ok) exit 0 ;;
  preempted) exit 143 ;;
  crash) exit 1 ;;
esac
trap 'kill $child 2>/dev/null; exit 1' TERM
sleep 20 & child=$!
echo $$ > "$FAKE_DIR/accelerate.pid"
wait $child
exit 0
"""


@pytest.fixture
def fake_slurm(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("srun", FAKE_SRUN),
        ("scontrol", FAKE_SCONTROL),
        ("scancel", FAKE_SCANCEL),
        ("accelerate", FAKE_ACCELERATE),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "FAKE_DIR": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-[017-018]",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_CPUS_PER_TASK": "16",
        "SLURM_GPUS_ON_NODE": "8",
    }
    return tmp_path, env


def run_slurm(env: dict[str, str], *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SLURM_SCRIPT), *args],
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_slurm_script_parses():
    result = subprocess.run(["bash", "-n", str(SLURM_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = SLURM_SCRIPT.read_text()
    for directive in ("--ntasks-per-node=1", "--gres=gpu:8", "--requeue", "--signal=B:USR1@"):
        assert f"#SBATCH {directive}" in text


def test_slurm_builds_one_accelerate_launch_per_node(fake_slurm):
    tmp, env = fake_slurm
    result = run_slurm(env, "glue-mrpc", "--output_dir", "runs/x y", FAKE_MODE="ok")
    assert result.returncode == 0, result.stdout + result.stderr
    srun = (tmp / "srun.args").read_text()
    assert "--nodes=2 --ntasks-per-node=1" in srun and "--cpus-per-task=16" in srun
    assert (tmp / "accelerate.args").read_text().splitlines() == [
        "launch",
        *("--machine_rank", "0"),
        *("--config_file", "launch/multi_node.yaml"),
        *("--num_machines", "2", "--num_processes", "16"),
        *("--main_process_ip", "gpu-017", "--main_process_port", "29500"),
        *("-m", "finetune", "train", "glue-mrpc", "--output_dir", "runs/x y"),
    ]
    assert not (tmp / "scontrol.log").exists()


def test_slurm_on_a_node_without_gpus(fake_slurm):
    """CPU-only node: one process per node unless GPUS_PER_NODE says more, fp32, and with one process in all the
    single-process config (accelerate refuses a MULTI_GPU config with one process)."""
    tmp, env = fake_slurm
    del env["SLURM_GPUS_ON_NODE"]
    env["PATH"] = f"{tmp / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"  # no python with CUDA here: 0 GPUs
    result = run_slurm(env, "glue-mrpc", FAKE_MODE="ok", SLURM_NNODES="1", SLURM_JOB_NODELIST="vm")
    assert result.returncode == 0, result.stdout + result.stderr
    args = (tmp / "accelerate.args").read_text().splitlines()
    assert args[args.index("--config_file") + 1] == "launch/single_gpu.yaml"
    assert args[args.index("--num_processes") + 1] == "1"
    assert args[args.index("--mixed_precision") + 1] == "no"

    run_slurm(env, "glue-mrpc", FAKE_MODE="ok", SLURM_NNODES="1", GPUS_PER_NODE="2")
    args = (tmp / "accelerate.args").read_text().splitlines()
    assert args[args.index("--config_file") + 1] == "launch/multi_node.yaml"
    assert args[args.index("--num_processes") + 1] == "2"
    assert args[args.index("--mixed_precision") + 1] == "no"


def test_slurm_resumes_only_a_requeued_run_with_a_checkpoint(fake_slurm):
    tmp, env = fake_slurm
    out = tmp / "run"
    (out / "checkpoint-10").mkdir(parents=True)
    run_slurm(env, "glue-mrpc", "--output_dir", str(out), FAKE_MODE="ok", SLURM_RESTART_COUNT="1")
    assert (tmp / "accelerate.args").read_text().splitlines()[-2:] == ["--resume_from_checkpoint", "last"]

    run_slurm(env, "glue-mrpc", "--output_dir", str(tmp / "empty"), FAKE_MODE="ok", SLURM_RESTART_COUNT="1")
    assert "--resume_from_checkpoint" not in (tmp / "accelerate.args").read_text()

    run_slurm(env, "glue-mrpc", "--output_dir", str(out), FAKE_MODE="ok")  # first run
    assert "--resume_from_checkpoint" not in (tmp / "accelerate.args").read_text()


def test_slurm_requeues_on_the_preempted_exit_code(fake_slurm):
    tmp, env = fake_slurm
    result = run_slurm(env, "glue-mrpc", FAKE_MODE="preempted")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp / "scontrol.log").read_text().split() == ["requeue", "4242"]

    (tmp / "scontrol.log").unlink()
    result = run_slurm(env, "glue-mrpc", FAKE_MODE="crash")
    assert result.returncode == 1
    assert not (tmp / "scontrol.log").exists(), "an ordinary failure must not requeue"

    result = run_slurm(env, "glue-mrpc", FAKE_MODE="preempted", SLURM_RESTART_COUNT="20")
    assert result.returncode == 143 and not (tmp / "scontrol.log").exists(), "FINETUNE_MAX_REQUEUES"


@pytest.mark.parametrize(("sig", "requeued"), [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_signal_stops_the_step_gracefully(fake_slurm, sig: signal.Signals, requeued: bool):
    """USR1 (time limit near): SIGTERM to the step through scancel, then requeue. SIGTERM to the batch shell
    alone (scancel --batch): the same SIGTERM to the step, no requeue from the script."""
    tmp, env = fake_slurm
    process = subprocess.Popen(
        ["bash", str(SLURM_SCRIPT), "glue-mrpc"],
        env={**env, "FAKE_MODE": "wait"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not (tmp / "accelerate.pid").exists():
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()[0]
        time.sleep(0.02)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=20)
    assert (tmp / "scancel.log").read_text().split() == ["--signal=TERM", "4242"], output
    if requeued:
        assert process.returncode == 0, output
        assert (tmp / "scontrol.log").read_text().split() == ["requeue", "4242"], output
    else:
        assert process.returncode == 1, output
        assert not (tmp / "scontrol.log").exists(), output


def test_slurm_leaves_a_requeue_or_cancel_to_slurm(fake_slurm):
    """SIGTERM while SLURM itself ends the job (scontrol requeue, scancel, preemption): SLURM signals the step,
    and refuses a further scancel ("Job can not be altered now"), so the script only waits for the step."""
    tmp, env = fake_slurm
    process = subprocess.Popen(
        ["bash", str(SLURM_SCRIPT), "glue-mrpc"],
        env={**env, "FAKE_MODE": "wait", "FAKE_JOB_STATE": "REQUEUED"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not (tmp / "accelerate.pid").exists():
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()[0]
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    os.kill(int((tmp / "accelerate.pid").read_text()), signal.SIGTERM)  # what SLURM does to the step
    output, _ = process.communicate(timeout=20)
    assert not (tmp / "scancel.log").exists(), output
    assert "SLURM is ending the job (state REQUEUED)" in output
    assert process.returncode == 1 and not (tmp / "scontrol.log").exists(), output
