"""One-shot GPU check: bf16 really in effect, BERT-base MFU at sequence length 128, and the GPU launch paths.

On the lent GPU machine (no Hub, no package registry, ../shared absent), from the bundle that
``benchmarks/gpu_bundle.py`` builds here (carry it: ``carry: [".gpu"]``):

    python benchmarks/gpu_bundle.py --out .gpu                                 # here, on the CPU machine
    python benchmarks/gpu_check.py --bundle .gpu --dry_run                     # here: is every file there?
    python benchmarks/gpu_check.py --bundle .gpu --json $OUT/gpu_check.json    # there: under 8 minutes

On a GPU machine that has the project installed and a mirror, without a bundle:

    FINETUNE_HUB_MIRROR=../shared/hub python benchmarks/gpu_check.py [--json benchmarks/results/gpu_check.json]
    python benchmarks/gpu_check.py --dry_run      # the plan (commands, sizes, limits) without a GPU

With ``--bundle`` the check first sets up, each as a subprocess with its own time limit:

- ``install``: ``pip install --no-index --no-deps --target <work>/site <bundle>/wheels/*.whl``: the packages the
  image lacks, beside (never over) the image's torch; the project's pins are not installed.
- a source overlay ``<work>/src/finetune`` (links to the checkout's ``finetune/`` files plus ``tasks`` ->
  ``tasks/``, the layout the package installs as), since the checkout root itself would give a ``finetune``
  without ``finetune.tasks``; children run with ``PYTHONPATH=<work>/src:<work>/site`` and their working directory
  in ``<work>``, away from the checkout root, which ``python -m`` would put first on the path.
- ``prepare``: a working mirror ``<work>/hub`` (the bundle's ``hub/``, laid out as ../shared/hub, with MiniLM's
  bf16 weights written back as fp32 ``model.safetensors``), and SmolLM2 with random weights where finetune
  caches its dense GGUF copy (``FINETUNE_CACHE``), so the recipe runs unchanged.
- ``preflight``: every import the steps need, their versions, where finetune and torch come from, and that
  finetune finds the seeded SmolLM2 copy. If it fails, the checks are skipped (the device time is saved).

Checks, each with "ok" in the summary (exit code 0 only if all are ok):

- ``bf16``: for each task family (GLUE encoder classification, decoder-only generation with SmolLM2,
  encoder-decoder generation: MiniLM warm-started as bert2bert, the mirror's only encoder-decoder), two
  optimizer steps of the real ``finetune train`` pipeline with ``--bf16 true``; forward hooks on the model's
  Linear layers must see bfloat16 outputs (autocast in effect) while the trainable weights stay float32
  (master weights).
- ``mfu``: a BERT-base-sized model (bert-base-uncased's config, random weights) trained with the Trainer on
  fixed-length 128-token batches, bf16, fused AdamW; model FLOPs per token = 6 x (Linear parameters) +
  12 x layers x 128 x hidden (attention scores and weighted sum, forward + backward); MFU = FLOPs/s over
  the GPU's dense bf16 peak (``benchmarks/throughput.py``'s table; H100/H200 989 TFLOPS). Target >= 35%.
- ``single_gpu``: ``accelerate launch --config_file launch/single_gpu.yaml -m finetune train glue-mrpc``.
- ``fsdp_one_process``: the same with ``launch/fsdp.yaml --num_processes 1``: FSDP2 sharded checkpoint
  (``pytorch_model_fsdp_0/*.distcp``) and a full final model.
- ``smollm2_generation``: ``summarization-scitldr`` (SmolLM2-135M-Instruct, decoder-only, generates in
  evaluation) on a subset through ``launch/single_gpu.yaml``.

Every step has its own time limit (``STEP_LIMITS_S``) and all share one budget (``--budget_s``, 450 s): a step
that hangs is killed with its process group when its limit or the budget runs out, and steps that no longer
fit are reported as skipped. The summary is printed as one JSON object at the end, and rewritten after each
step to ``--json`` and, where the variable OUT is set, to ``$OUT/gpu_check.json`` (with every step's log in
``$OUT/gpu_check_logs.txt``), so a run cut short still leaves what it did.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_bundle  # noqa: E402  (benchmarks/ is not a package)
from throughput import peak_flops  # noqa: E402

MFU_TARGET = 0.35
SEQ_LEN = 128

#: family -> finetune train arguments for the two-step bf16 check (small subsets, no evaluation during training)
BF16_RUNS: dict[str, list[str]] = {
    "glue_encoder": ["glue-mrpc"],
    "decoder_generation": ["summarization-scitldr"],
    "encoder_decoder_generation": [
        "summarization-scitldr", "--model_name_or_path", "sentence-transformers/all-MiniLM-L6-v2", "--gguf_file", "",
    ],
}
# --max_final_eval_samples: the generation tasks' evaluation after training otherwise generates for the whole split
BF16_COMMON = ["--max_train_samples", "32", "--max_eval_samples", "8", "--max_final_eval_samples", "8",
               "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--eval_strategy", "no",
               "--save_strategy", "no", "--load_best_model_at_end", "false", "--bf16", "true", "--report_to", "none",
               "--disable_tqdm", "true"]

SETUP_STEPS = ("install", "prepare", "preflight")
CHECKS = (*(f"bf16:{family}" for family in BF16_RUNS), "mfu", "single_gpu", "fsdp_one_process",
          "smollm2_generation")
#: step -> its own time limit in seconds. Sized from the work each does (a full MRPC epoch of MiniLM, 64 SmolLM2
#: steps, 80 BERT-base steps: seconds of GPU time each) plus interpreter start and model loading; not yet
#: measured on a GPU. Together they exceed the budget on purpose: the budget, not the sum, bounds the run.
STEP_LIMITS_S: dict[str, int] = {
    "install": 90, "prepare": 120, "preflight": 90,
    "bf16:glue_encoder": 120, "bf16:decoder_generation": 150, "bf16:encoder_decoder_generation": 120,
    "mfu": 150, "single_gpu": 180, "fsdp_one_process": 180, "smollm2_generation": 180,
}
BUDGET_S = 450  # 7.5 minutes: the whole run stays under 8 on one H200
MIN_STEP_S = 20  # a step given less than this would only start up and be killed
LOG_TAIL = 2000
SUMMARY_NAME = "gpu_check.json"
LOGS_NAME = "gpu_check_logs.txt"


def launch_runs(out: Path) -> dict[str, list[str]]:
    """name -> command line of the accelerate-launched runs (config paths absolute: the runs start in `out`)."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    mrpc = ["-m", "finetune", "train", "glue-mrpc", "--num_train_epochs", "1", "--disable_tqdm", "true"]
    return {
        "single_gpu": [*accelerate, "--config_file", str(ROOT / "launch/single_gpu.yaml"), *mrpc,
                       "--output_dir", str(out / "single_gpu")],
        "fsdp_one_process": [*accelerate, "--config_file", str(ROOT / "launch/fsdp.yaml"), "--num_processes", "1",
                             "--main_process_port", "0", *mrpc, "--output_dir", str(out / "fsdp_one_process")],
        "smollm2_generation": [*accelerate, "--config_file", str(ROOT / "launch/single_gpu.yaml"), "-m", "finetune",
                               "train", "summarization-scitldr", "--max_train_samples", "512",
                               "--max_eval_samples", "64", "--max_final_eval_samples", "64", "--disable_tqdm", "true",
                               "--output_dir", str(out / "smollm2_generation")],
    }


# ---------------------------------------------------------------------------------------------------------
# FLOPs and MFU
# ---------------------------------------------------------------------------------------------------------


def linear_parameters(model: Any) -> int:
    """Parameters that take part in matrix multiplications (Linear weights; biases are not multiplies)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def training_flops_per_token(model: Any, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward): 6 x Linear parameters for the
    matmuls, plus 12 x layers x seq_len x hidden for attention scores (QK^T) and the weighted sum (AV)."""
    config = model.config
    attention = 12 * config.num_hidden_layers * seq_len * config.hidden_size
    return 6 * linear_parameters(model) + attention


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    return flops_per_token * tokens_per_s / peak if peak else None


def measure_mfu(steps: int = 80, batch: int = 128, skip: int = 10, config: Any = None) -> dict[str, Any]:
    """BERT-base-sized sequence classifier, fixed 128-token batches, bf16 on GPU, Trainer; steady-state MFU."""
    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    config = config or BertConfig(num_labels=2)  # bert-base-uncased: 12 layers, hidden 768, vocab 30522
    model = BertForSequenceClassification(config)
    cuda = torch.cuda.is_available()
    rows = batch * steps
    data = Dataset.from_dict({
        "input_ids": torch.randint(1000, config.vocab_size, (rows, SEQ_LEN)).tolist(),
        "attention_mask": [[1] * SEQ_LEN] * rows,
        "labels": torch.randint(0, 2, (rows,)).tolist(),
    })

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    clock = Clock()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="gpu-check-mfu-"), per_device_train_batch_size=batch, max_steps=steps,
        bf16=cuda, optim="adamw_torch_fused", learning_rate=1e-4, report_to="none", save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=2 if cuda else 0, dataloader_pin_memory=cuda,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[clock]).train()
    steady = clock.times[skip:]
    seconds = steady[-1] - steady[0]
    tokens_per_s = (len(steady) - 1) * batch * SEQ_LEN / seconds
    per_token = training_flops_per_token(model, SEQ_LEN)
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
    value = mfu(per_token, tokens_per_s, peak)
    return {
        "model": f"BERT ({config.num_hidden_layers} layers, hidden {config.hidden_size}), sequence classification",
        "parameters": model.num_parameters(), "seq_len": SEQ_LEN, "batch": batch, "steps_timed": len(steady) - 1,
        "tokens_per_s": round(tokens_per_s), "flops_per_token": per_token, "peak_flops": peak, "mfu": value,
        "target": MFU_TARGET,
        "ok": value is not None and value >= MFU_TARGET,
    }


# ---------------------------------------------------------------------------------------------------------
# bf16 in effect, per family
# ---------------------------------------------------------------------------------------------------------


def check_bf16(family: str, out: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Two optimizer steps of `finetune train ... --bf16 true`; dtypes seen by hooks on the Linear layers."""
    import torch
    from transformers import TrainerCallback

    from finetune import callbacks, cli

    seen: dict[str, set[str]] = {"linear_outputs": set(), "trainable_weights": set()}

    class Dtypes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_hook(lambda m, i, o: seen["linear_outputs"].add(str(o.dtype)))
            seen["trainable_weights"] |= {str(p.dtype) for p in model.parameters() if p.requires_grad}

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    original = callbacks.default_callbacks
    callbacks.default_callbacks = lambda config: [*original(config), Dtypes()]
    args = BF16_RUNS[family]
    started = time.perf_counter()
    try:
        code = cli.main(["train", *args, *BF16_COMMON, *extra, "--output_dir", str(out / f"bf16-{family}")])
    finally:
        callbacks.default_callbacks = original
    ok = code == 0 and "torch.bfloat16" in seen["linear_outputs"] and seen["trainable_weights"] == {"torch.float32"}
    return {"exit_code": code, "linear_output_dtypes": sorted(seen["linear_outputs"]),
            "trainable_weight_dtypes": sorted(seen["trainable_weights"]),
            "seconds": round(time.perf_counter() - started, 1), "ok": ok}


# ---------------------------------------------------------------------------------------------------------
# Setting up from a bundle
# ---------------------------------------------------------------------------------------------------------


def dense_copy_name(model: str, gguf_file: str, revision: str = "main") -> str:
    """The folder under $FINETUNE_CACHE/gguf where finetune.modeling.dense_gguf_copy keeps a converted GGUF
    (its formula; the preflight and the tests check it against finetune's own answer)."""
    key = hashlib.sha1(f"{model}::{gguf_file}::{revision}".encode()).hexdigest()[:12]
    return f"{model.replace('/', '--')}--{Path(gguf_file).stem}-{key}"


def seeded_smollm2(work: Path) -> Path:
    return work / "cache" / "gguf" / dense_copy_name(gpu_bundle.SMOLLM2, gpu_bundle.SMOLLM2_GGUF)


def source_overlay(work: Path) -> Path:
    """<work>/src holding a `finetune` package of links: the checkout's finetune/ entries, and tasks/ as
    finetune/tasks (pyproject's package-dir mapping), so the checkout's code runs without being installed."""
    package = work / "src" / "finetune"
    package.mkdir(parents=True, exist_ok=True)
    for entry in (ROOT / "finetune").iterdir():
        if entry.name != "__pycache__" and not (package / entry.name).exists():
            (package / entry.name).symlink_to(entry)
    if not (package / "tasks").exists():
        (package / "tasks").symlink_to(ROOT / "tasks")
    return work / "src"


def working_mirror(bundle: Path, work: Path) -> Path:
    """A copy of the bundle's hub/ that `prepare` completes (the bundle itself stays as carried)."""
    target = work / "hub"
    if not target.exists():
        shutil.copytree(bundle / "hub", target)
    return target


def bundle_env(work: Path) -> dict[str, str]:
    """The environment of every child: wheels and overlay on the path, the working mirror, offline."""
    env = dict(os.environ)
    # On another Python (a rehearsal) the 3.12 wheels cannot be imported: this interpreter's packages stand in.
    site = [] if foreign_interpreter() else [str(work / "site")]
    paths = [str(work / "src"), *site, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    env.update({
        "PYTHONPATH": os.pathsep.join(paths), "FINETUNE_HUB_MIRROR": str(work / "hub"),
        "FINETUNE_CACHE": str(work / "cache"), "HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    })
    return env


def foreign_interpreter() -> bool:
    """Whether this Python is not the device's (a rehearsal here): the wheels are for CPython 3.12."""
    return f"{sys.version_info.major}.{sys.version_info.minor}" != gpu_bundle.TARGET_PYTHON


def install_command(bundle: Path, work: Path) -> list[str]:
    wheels = sorted(str(p) for p in (bundle / "wheels").glob("*.whl"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--target", str(work / "site"), *wheels]
    if foreign_interpreter():  # still checks that pip takes every wheel for the device's Python
        platforms = [arg for platform in gpu_bundle.TARGET_PLATFORMS for arg in ("--platform", platform)]
        command += ["--python-version", gpu_bundle.TARGET_PYTHON, "--implementation", "cp", "--only-binary=:all:",
                    *platforms]
    return command


def prepare(bundle: Path, work: Path) -> dict[str, Any]:
    """MiniLM's weights back to fp32 in the working mirror; SmolLM2 with random weights in finetune's cache."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = load_file(bundle / gpu_bundle.MINILM_WEIGHTS)
    fp32 = {name: t.float() if t.is_floating_point() else t for name, t in weights.items()}
    save_file(fp32, work / "hub" / "models" / gpu_bundle.MINILM / "model.safetensors", metadata={"format": "pt"})

    source, target = bundle / gpu_bundle.SMOLLM2_DIR, seeded_smollm2(work)
    if (target / "config.json").is_file():  # seeded by an earlier run into the same --out
        return {"smollm2_copy": str(target), "ok": True}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    for file in source.iterdir():  # tokenizer, chat template and generation config exactly as converted here
        if file.name != "config.json":
            shutil.copy2(file, partial / file.name)
    os.replace(partial, target)
    return {"minilm_parameters": sum(t.numel() for t in fp32.values()), "smollm2_parameters": model.num_parameters(),
            "smollm2_copy": str(target), "ok": True}


def preflight(bundle: Path | None, work: Path) -> dict[str, Any]:
    """Import everything the steps import; say from where, at which versions; check the seeded SmolLM2."""
    from importlib import import_module, metadata

    versions, failed = {}, {}
    for module, dist in [*gpu_bundle.IMPORTS.items(), ("finetune.cli", "finetune"),
                         ("finetune.tasks.glue", "finetune"), ("finetune.tasks.summarization", "finetune")]:
        try:
            import_module(module)
            versions[dist] = metadata.version(dist) if dist != "finetune" else sys.modules["finetune"].__version__
        except Exception as error:  # any failure to import is what this step reports
            failed[module] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    result: dict[str, Any] = {"python": sys.version.split()[0], "versions": versions, "import_failures": failed}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        result["torch_file"] = torch.__file__
        result["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if "finetune" in sys.modules:
        result["finetune_file"] = sys.modules["finetune"].__file__
    checks = [not failed]
    if bundle is not None and not failed:
        site = str(work / "site")
        result["torch_from_image"] = not result["torch_file"].startswith(site)
        result["finetune_from_checkout"] = Path(result["finetune_file"]).resolve().is_relative_to(ROOT / "finetune")
        from finetune import modeling
        from finetune.config import ModelConfig

        found = modeling.checkpoint_path(ModelConfig(model_name_or_path=gpu_bundle.SMOLLM2,
                                                     gguf_file=gpu_bundle.SMOLLM2_GGUF))
        result["smollm2_seeded_copy_found"] = Path(found) == seeded_smollm2(work)
        checks += [result["torch_from_image"], result["finetune_from_checkout"], result["smollm2_seeded_copy_found"]]
    result["ok"] = all(checks)
    return result


def bundle_problems(bundle: Path, steps: list[str]) -> list[str]:
    """One line per file a step reads that the bundle lacks, and per gap in the wheels."""
    problems = [f"{path}: missing (read by {', '.join(readers)})"
                for path, readers in gpu_bundle.missing_files(bundle, steps).items()]
    if (bundle / "wheels").is_dir():
        problems += gpu_bundle.wheel_problems(bundle)
    else:
        problems.append("wheels/: missing (read by install)")
    return problems


# ---------------------------------------------------------------------------------------------------------
# Running steps with time limits
# ---------------------------------------------------------------------------------------------------------


def stop_group(process: subprocess.Popen) -> None:
    """End a step's whole process group (accelerate's workers too): SIGTERM, 10 s to finish, then SIGKILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # nothing of the group is left
        return
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever ignored SIGTERM, or outlived the leader
    except ProcessLookupError:
        pass
    process.wait()


def run_limited(command: list[str], env: dict[str, str] | None, cwd: Path, timeout_s: float,
                log: Path) -> tuple[int | None, float]:
    """(exit code, or None if killed at the limit; seconds) of `command`, its output into `log`."""
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own group: a hang is killed with its children
        try:
            code: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        stop_group(process)  # also ends workers left behind by a step that did exit
    return code, round(time.perf_counter() - started, 1)


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL:] if log.is_file() else ""


def outcome(code: int | None, seconds: float, timeout_s: float) -> dict[str, Any]:
    result: dict[str, Any] = {"exit_code": code, "seconds": seconds}
    if code is None:
        result["timed_out_after_s"] = round(timeout_s)
    return result


def step_command(name: str, work: Path, result_file: Path, opts: argparse.Namespace) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(work),
               "--result", str(result_file), "--mfu_steps", str(opts.mfu_steps)]
    if opts.bundle:
        command += ["--bundle", str(Path(opts.bundle).resolve())]
    if opts.use_cpu:
        command.append("--use_cpu")
    return command


def run_step(name: str, work: Path, env: dict[str, str] | None, timeout_s: float,
             opts: argparse.Namespace) -> dict[str, Any]:
    """A step run in a child (this script with --step), its JSON result merged with how the child ended."""
    result_file = work / "results" / f"{name.replace(':', '-')}.json"
    log = work / "logs" / f"{name.replace(':', '-')}.log"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    code, seconds = run_limited(step_command(name, work, result_file, opts), env, work, timeout_s, log)
    result = json.loads(result_file.read_text()) if result_file.is_file() else {"ok": False}
    result.update(outcome(code, seconds, timeout_s))
    result["ok"] = bool(result.get("ok")) and code == 0
    if not result["ok"]:
        result["log_tail"] = log_tail(log)
    return result


def run_launch(name: str, command: list[str], out: Path, timeout: float, env: dict[str, str] | None = None,
               work: Path | None = None) -> dict[str, Any]:
    """An accelerate-launched run: exit code, its final evaluation, the full model (and the FSDP shards)."""
    work = work or out
    log = work / "logs" / f"{name}.log"
    code, seconds = run_limited(command, env, work, timeout, log)
    run = out / name
    result: dict[str, Any] = outcome(code, seconds, timeout)
    metrics_file = run / "metrics.json"
    if metrics_file.is_file():
        result["eval"] = json.loads(metrics_file.read_text()).get("eval", {})
    result["full_model"] = (run / "model.safetensors").is_file()
    ok = code == 0 and result["full_model"]
    if name == "fsdp_one_process":
        shards = sorted(str(p.relative_to(run)) for p in run.glob("checkpoint-*/pytorch_model_fsdp_0/*.distcp"))
        result["fsdp_shards"] = shards
        ok = ok and bool(shards)
    if not ok:
        result["log_tail"] = log_tail(log)
    result["ok"] = ok
    return result


def run_install(bundle: Path, work: Path, timeout_s: float) -> dict[str, Any]:
    log = work / "logs" / "install.log"
    code, seconds = run_limited(install_command(bundle, work), None, work, timeout_s, log)
    result = outcome(code, seconds, timeout_s)
    result["wheels"] = sorted(p.name for p in (bundle / "wheels").glob("*.whl"))
    result["ok"] = code == 0
    if code != 0:
        result["log_tail"] = log_tail(log)
    return result


class Budget:
    """One deadline for the whole run; each step gets its own limit or what is left, whichever is less."""

    def __init__(self, seconds: float, scale: float = 1.0) -> None:
        self.seconds = seconds
        self.scale = scale
        self.started = time.monotonic()
        self.deadline = self.started + seconds

    def timeout_for(self, step: str) -> float | None:
        """Seconds the step may run, or None when too little is left to start it."""
        left = self.deadline - time.monotonic()
        return min(STEP_LIMITS_S[step] * self.scale, left) if left >= MIN_STEP_S else None


# ---------------------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------------------


def summary_paths(json_path: str | None) -> list[Path]:
    """Where the summary goes: --json, and $OUT/gpu_check.json when the device tool's OUT is set."""
    paths = [Path(json_path)] if json_path else []
    if os.environ.get("OUT"):
        extra = Path(os.environ["OUT"]) / SUMMARY_NAME
        if all(p.resolve() != extra.resolve() for p in paths):
            paths.append(extra)
    return paths


def write_summary(summary: dict[str, Any], paths: list[Path], work: Path) -> str:
    text = json.dumps(summary, indent=2, default=str)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    if os.environ.get("OUT"):  # every log, newest last, each cut to its end: one file comes back
        logs = sorted((work / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime)
        joined = "".join(f"===== {p.name}\n{p.read_text(errors='replace')[-200_000:]}\n" for p in logs)
        (Path(os.environ["OUT"]) / LOGS_NAME).write_text(joined)
    return text


def record(summary: dict[str, Any], step: str, result: dict[str, Any]) -> None:
    """Put a step's result where the summary keeps it (bf16 families under "bf16", setup under "setup")."""
    if step.startswith("bf16:"):
        summary.setdefault("bf16", {})[step.split(":", 1)[1]] = result
    elif step in SETUP_STEPS:
        summary.setdefault("setup", {})[step] = result
    else:
        summary[step] = result


def check_results(summary: dict[str, Any], checks: list[str]) -> list[dict[str, Any]]:
    return [summary["bf16"][c.split(":", 1)[1]] if c.startswith("bf16:") else summary[c] for c in checks]


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------


def plan(out: Path, steps: list[str] | None = None) -> dict[str, Any]:
    return {
        "bf16": {family: ["finetune", "train", *args, *BF16_COMMON] for family, args in BF16_RUNS.items()},
        "mfu": {"model": "BertConfig() (bert-base-uncased size)", "seq_len": SEQ_LEN, "target": MFU_TARGET},
        "launch": launch_runs(out / "runs"),
        "steps": steps or list(CHECKS),
        "limits_s": STEP_LIMITS_S,
        "budget_s": BUDGET_S,
    }


def chosen_checks(text: str | None) -> list[str]:
    if not text:
        return list(CHECKS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        raise SystemExit(f"gpu_check: error: unknown --steps {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    return names


def dry_run(opts: argparse.Namespace, out: Path, checks: list[str]) -> int:
    """The plan as JSON; with --bundle, also whether every file each step reads is there."""
    report = plan(out, checks)
    if not opts.bundle:
        print(json.dumps(report, indent=2))
        return 0
    bundle = Path(opts.bundle)
    steps = [*SETUP_STEPS, *checks]
    problems = bundle_problems(bundle, steps)
    report["bundle"] = {"path": str(bundle), "ok": not problems, "problems": problems,
                        "wheels": [f"{w['name']} {w['version']}" for w in gpu_bundle.bundle_wheels(bundle)]
                        if (bundle / "wheels").is_dir() else []}
    print(json.dumps(report, indent=2))
    for problem in problems:
        print(f"gpu_check: bundle {bundle}: {problem}", file=sys.stderr)
    return 0 if not problems else 1


def child_main(opts: argparse.Namespace) -> int:
    """Run one step in this process (the parent gave it a time limit) and write its JSON result."""
    work = Path(opts.out)
    bundle = Path(opts.bundle) if opts.bundle else None
    step = opts.step
    if step == "prepare":
        result = prepare(bundle, work)
    elif step == "preflight":
        result = preflight(bundle, work)
    elif step == "mfu":
        result = measure_mfu(steps=opts.mfu_steps)
    elif step.startswith("bf16:"):
        result = check_bf16(step.split(":", 1)[1], work / "runs", extra=("--use_cpu", "true") if opts.use_cpu else ())
    else:
        raise SystemExit(f"gpu_check: error: no step {step}")
    Path(opts.result).write_text(json.dumps(result, default=str))
    return 0


def run_folder(work: Path, step: str) -> Path:
    """Where a check's finetune run writes (cleared before it runs: finetune refuses a used output_dir)."""
    return work / "runs" / (f"bf16-{step.split(':', 1)[1]}" if step.startswith("bf16:") else step)


def run_all(opts: argparse.Namespace, work: Path, checks: list[str], summary: dict[str, Any]) -> None:
    """Set up (with a bundle), then every check, each within its limit and the shared budget."""
    budget = Budget(opts.budget_s, opts.limit_scale)
    paths = summary_paths(opts.json)
    env: dict[str, str] | None = None
    bundle = Path(opts.bundle).resolve() if opts.bundle else None
    setup = ["preflight"]
    if bundle is not None:
        source_overlay(work)
        working_mirror(bundle, work)
        env = bundle_env(work)
        setup = list(SETUP_STEPS)
    stop_reason = None
    for step in [*setup, *checks]:
        timeout = budget.timeout_for(step)
        shutil.rmtree(run_folder(work, step), ignore_errors=True)  # a rerun into the same --out starts clean
        if stop_reason or timeout is None:
            result = {"ok": False, "skipped": stop_reason or f"out of time (budget {budget.seconds:.0f} s)"}
        elif step == "install":
            result = run_install(bundle, work, timeout)
        elif step in launch_runs(work / "runs"):
            result = run_launch(step, launch_runs(work / "runs")[step], work / "runs", timeout, env, work)
        else:
            result = run_step(step, work, env, timeout, opts)
        record(summary, step, result)
        state = "ok" if result["ok"] else result.get("skipped") or "FAILED"
        print(f"gpu_check: {step}: {state} ({result.get('seconds', 0)} s)", file=sys.stderr, flush=True)
        if step in SETUP_STEPS and not result["ok"] and not stop_reason:
            stop_reason = f"{step} failed"  # nothing after a failed setup can pass: save the device time
        summary["elapsed_s"] = round(time.monotonic() - budget.started, 1)
        write_summary(summary, paths, work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="folder built by benchmarks/gpu_bundle.py (the device run)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the plan as JSON (with --bundle: and check the bundle's files); needs no GPU")
    parser.add_argument("--json", default=None, help="also write the summary to this file")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--steps", default=None, help=f"comma-separated checks (default all: {','.join(CHECKS)})")
    parser.add_argument("--budget_s", type=float, default=BUDGET_S, help="time for the whole run, setup included")
    parser.add_argument("--mfu_steps", type=int, default=80)
    parser.add_argument("--limit_scale", type=float, default=1.0,
                        help="multiply every step's time limit (a CPU rehearsal is far slower than the GPU)")
    parser.add_argument("--allow_cpu", action="store_true",
                        help="rehearse without a GPU (the wiring only: bf16 runs on the CPU, figures mean nothing)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # a child running one step
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--use_cpu", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.step:
        return child_main(opts)
    checks = chosen_checks(opts.steps)
    if opts.dry_run:  # names the folder a run would use, without making it
        return dry_run(opts, Path(opts.out or Path(tempfile.gettempdir()) / "gpu-check-XXXX").resolve(), checks)
    out = Path(opts.out or tempfile.mkdtemp(prefix="gpu-check-")).resolve()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not opts.allow_cpu:
        print("gpu_check: error: no CUDA GPU visible (torch.cuda.is_available() is False); "
              "use --dry_run to see the plan", file=sys.stderr)
        return 2
    if opts.bundle:
        problems = bundle_problems(Path(opts.bundle), [*SETUP_STEPS, *checks])
        for problem in problems:
            print(f"gpu_check: bundle {opts.bundle}: {problem}", file=sys.stderr)
        if problems:
            return 3
    opts.use_cpu = not cuda  # a rehearsal: the bf16 runs autocast on the CPU
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (rehearsal)", "torch": torch.__version__,
        "platform": platform.platform(), "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "bundle": str(opts.bundle) if opts.bundle else None, "budget_s": opts.budget_s, "work": str(out),
    }
    if opts.bundle and (Path(opts.bundle) / gpu_bundle.MANIFEST).is_file():
        built = json.loads((Path(opts.bundle) / gpu_bundle.MANIFEST).read_text())
        summary["bundle_key"], summary["bundle_wheels"] = built.get("key"), built.get("wheels")
    run_all(opts, out, checks, summary)
    summary["ok"] = all(check["ok"] for check in [*summary["setup"].values(), *check_results(summary, checks)])
    print(write_summary(summary, summary_paths(opts.json), out))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
