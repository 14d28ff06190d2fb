"""Full fine-tuning vs LoRA on the same decoder, model, data, seed and number of optimizer steps.

For each task (``glue-mrpc``: sequence classification; ``summarization-scitldr``: generation) two arms run
the real pipeline (``parse_run_config`` -> task -> tokenized datasets -> ``trainable_model`` ->
``Task.build_trainer`` -> ``Trainer.train``), each in a fresh subprocess so that peak memory is its own:

* ``full``: every weight trains (the recipe as shipped);
* ``lora``: ``--use_peft true --lora_r 16 --lora_alpha 32 --lora_target_modules all-linear`` (same learning
  rate: the comparison is of cost per step, not of tuned quality);
* ``qlora4``, ``qlora8`` (only when named in ``--arms``): the ``lora`` arm over a base loaded in 4-bit NF4
  (``--load_in_4bit true``) or 8-bit (``--load_in_8bit true``) through bitsandbytes (on a CPU: its CPU backend,
  ``pip install -e ".[qlora]"``);
* ``lora_fp32_frozen`` (only when named): the ``lora`` arm with its frozen Linear weights kept in fp32 through
  training, as before ``finetune.frozen_weights`` (the same run as ``lora`` where training is fp32).

``--mallocs system,tcmalloc`` runs every arm under each malloc (``finetune.allocator``: the C library's, tuned
as finetune tunes it, or tcmalloc preloaded as the command line does where it is installed); each run records the
malloc it observed in its own process.

The arms alternate within each round (full, lora, full, lora, ...) so that drift of a shared machine's load
falls on both. Training time is measured from ``on_train_begin`` to ``on_train_end`` (evaluation and
checkpointing off), then the validation metric is computed on the first ``--eval_samples`` rows.

    FINETUNE_HUB_MIRROR=../shared/hub python benchmarks/lora.py --json benchmarks/results/lora.json

Not a test: it asserts nothing about timings. It prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: task recipe -> (validation metric shown, settings for a small, equal-steps comparison)
TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "glue-mrpc": ("f1", {"per_device_train_batch_size": 16, "per_device_eval_batch_size": 32}),
    "summarization-scitldr": ("rougeL", {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 16}),
}
ARMS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": {"use_peft": True, "lora_r": 16, "lora_alpha": 32, "lora_target_modules": ["all-linear"]},
}
ARMS["qlora4"] = {**ARMS["lora"], "load_in_4bit": True}
ARMS["qlora8"] = {**ARMS["lora"], "load_in_8bit": True}
# --gradient_checkpointing: each block's activations recomputed in the backward instead of kept
ARMS["full_gc"] = {"gradient_checkpointing": True}
ARMS["lora_gc"] = {**ARMS["lora"], "gradient_checkpointing": True}
# LoRA as before finetune.frozen_weights: the frozen Linear weights kept in fp32 through training (under bf16
# autocast; in fp32 the two arms are the same run). A Trainer attribute, not a setting: TRAINER_ATTRIBUTES.
ARMS["lora_fp32_frozen"] = {**ARMS["lora"], "release_frozen_weights": False}
TRAINER_ATTRIBUTES = ("release_frozen_weights",)
#: the arms run when --arms is not given (the QLoRA arms need bitsandbytes)
DEFAULT_ARMS = ("full", "lora")


@dataclass
class RunResult:
    task: str
    arm: str
    round: int
    optimizer_steps: int = 0
    train_samples: int = 0
    train_wall_s: float = 0.0
    train_samples_per_s: float = 0.0
    steady_samples_per_s: float = 0.0
    peak_rss_mb: float = 0.0
    train_peak_rss_mb: float = 0.0
    trainable_parameters: int = 0
    total_parameters: int = 0
    eval_samples: int = 0
    eval_metric: str = ""
    eval_value: float | None = None
    train_loss: float | None = None
    threads: int = 0
    malloc: str = ""
    load_average: list[float] = field(default_factory=list)


def timing_callback():
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        """Wall time of training, and of the steps after the first one (warm-up)."""

        def __init__(self):
            self.begin = self.end = self.steady_begin = None
            self.steady_steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.steady_begin = time.perf_counter()
            else:
                self.steady_steps += 1

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    return Timing()


def run_arm(task_name: str, arm: str, round_: int, opts: argparse.Namespace) -> RunResult:
    """Train one arm for ``opts.steps`` optimizer steps, then score it; all in this process."""
    import torch
    from transformers import set_seed

    from finetune import adapters, allocator
    from finetune.config import parse_run_config
    from finetune.pipeline import build_task, tokenized_splits, trainable_model

    # as pipeline.prepare_training does, before the model loads
    allocator.configure_for(trains_embeddings=not ARMS[arm].get("use_peft", False))
    metric, task_settings = TASKS[task_name]
    overrides = {
        "model_name_or_path": MODEL, "gguf_file": GGUF, "max_train_samples": opts.train_samples,
        "max_eval_samples": opts.eval_samples, "max_final_eval_samples": opts.eval_samples,
        "max_steps": opts.steps, "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False,
        "report_to": "none", "disable_tqdm": True, "logging_steps": 1,
        "output_dir": tempfile.mkdtemp(prefix=f"bench-{arm}-"), "overwrite_output_dir": True,
        **task_settings, **{k: v for k, v in ARMS[arm].items() if k not in TRAINER_ATTRIBUTES},
    }
    if ARMS[arm].get("use_peft"):  # every LoRA arm: the same adapter settings
        overrides["lora_dropout"] = opts.lora_dropout
    config = parse_run_config(task_name, overrides=overrides)
    task = build_task(config)
    set_seed(config.training.seed)
    raw, tokenized, tokenizer = tokenized_splits(task, config)
    model = trainable_model(task.load_model(tokenizer), config)
    timer = timing_callback()
    trainer = task.build_trainer(model, tokenizer, tokenized["train"], None, [timer])
    for name in TRAINER_ATTRIBUTES:
        if name in ARMS[arm]:
            setattr(trainer, name, ARMS[arm][name])
    output = trainer.train()
    batch = config.training.per_device_train_batch_size
    result = RunResult(task=task_name, arm=arm, round=round_, optimizer_steps=trainer.state.global_step)
    result.train_samples = result.optimizer_steps * batch
    result.train_wall_s = timer.end - timer.begin
    result.train_samples_per_s = result.train_samples / result.train_wall_s
    result.steady_samples_per_s = timer.steady_steps * batch / (timer.end - timer.steady_begin)
    result.train_loss = output.training_loss
    counts = adapters.parameter_counts(model)
    result.trainable_parameters, result.total_parameters = counts["trainable"], counts["total"]
    # Training's own peak (the evaluation below generates and may peak elsewhere).
    result.train_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    predicted = task.predict(trainer, tokenized["validation"], "validation")
    result.eval_samples = len(tokenized["validation"])
    result.eval_metric = metric
    result.eval_value = (predicted.metrics or {}).get(f"eval_{metric}")
    # Peak resident memory of this process: model, activations, gradients, optimizer state (Linux: KiB).
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.threads = torch.get_num_threads()
    result.malloc = allocator.malloc_in_use()
    result.load_average = [round(x, 1) for x in os.getloadavg()]
    return result


def malloc_environment(malloc: str) -> dict[str, str]:
    """The environment a run starts in to get ``malloc`` (system or tcmalloc), as ``finetune``'s command line does."""
    from finetune import allocator

    system = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.RESTARTED_ENV)}
    system[allocator.MALLOC_ENV] = malloc
    if malloc == "system":
        return system
    environment = allocator.environment_with_tcmalloc(system)
    if environment is None:
        sys.exit("no tcmalloc installed (apt-get install libtcmalloc-minimal4): run with --mallocs system")
    return environment


def run_in_subprocess(task_name: str, arm: str, round_: int, argv: list[str], malloc: str) -> RunResult:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    command = [sys.executable, __file__, *argv, "--_child", f"{task_name}:{arm}", "--_round", str(round_),
               "--_result", result_path]
    subprocess.run(command, check=True, env=malloc_environment(malloc))
    values = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    return RunResult(**values)


def summary_rows(results: list[RunResult]) -> list[dict[str, Any]]:
    """Per task, arm and malloc: the median of each figure over its rounds, and the speed-up over full (same malloc)."""
    rows = []
    for key in dict.fromkeys((r.task, r.arm, malloc_name(r.malloc)) for r in results):
        runs = [r for r in results if (r.task, r.arm, malloc_name(r.malloc)) == key]
        row: dict[str, Any] = {"task": key[0], "arm": key[1], "malloc": key[2], "rounds": len(runs)}
        for name in ("train_samples_per_s", "steady_samples_per_s", "peak_rss_mb", "train_peak_rss_mb", "train_wall_s"):
            row[name] = statistics.median(getattr(r, name) for r in runs)
        values = [r.eval_value for r in runs if r.eval_value is not None]
        row.update(eval_metric=runs[0].eval_metric, eval_value=statistics.median(values) if values else None,
                   trainable_parameters=runs[0].trainable_parameters, total_parameters=runs[0].total_parameters,
                   optimizer_steps=runs[0].optimizer_steps, train_samples=runs[0].train_samples)
        rows.append(row)
    for row in rows:
        full = next((r for r in rows if (r["task"], r["arm"], r["malloc"]) == (row["task"], "full", row["malloc"])),
                    None)
        row["speedup_vs_full"] = row["train_samples_per_s"] / full["train_samples_per_s"] if full else None
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | arm | malloc | steps x batch | train samples/s | x full | steady samples/s | peak RSS MB "
             "(training) | trainable params | validation |", "|" + "---|" * 10]
    for row in rows:
        share = row["trainable_parameters"] / row["total_parameters"]
        value = "-" if row["eval_value"] is None else f"{row['eval_metric']} {row['eval_value']:.4g}"
        speedup = "-" if row["speedup_vs_full"] is None else f"{row['speedup_vs_full']:.2f}"  # no full arm run
        batch = row["train_samples"] // row["optimizer_steps"]
        lines.append(
            f"| {row['task']} | {row['arm']} | {row['malloc']} | {row['optimizer_steps']} x {batch} "
            f"| {row['train_samples_per_s']:.3f} | {speedup} | {row['steady_samples_per_s']:.3f} "
            f"| {row['peak_rss_mb']:.0f} ({row['train_peak_rss_mb']:.0f}) "
            f"| {row['trainable_parameters']:,} ({share:.1%}) | {value} |"
        )
    return "\n".join(lines)


def malloc_name(observed: str) -> str:
    """tcmalloc / glibc ...: the first word of what a run observed."""
    return observed.split(" ")[0] if observed else "-"


def arm_list(text: str) -> list[str]:
    """--arms: names of ARMS, comma-separated."""
    arms = [name for name in text.split(",") if name]
    unknown = [name for name in arms if name not in ARMS]
    if unknown or not arms:
        raise argparse.ArgumentTypeError(f"unknown arm {unknown[0] if unknown else '(none)'}; arms: {', '.join(ARMS)}")
    return arms


def main() -> int:
    from finetune import precision

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="recipes to compare on")
    parser.add_argument("--arms", type=arm_list, default=list(DEFAULT_ARMS),
                        help=f"arms to run, comma-separated, in this order within each round (of {', '.join(ARMS)})")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the same for both arms)")
    parser.add_argument("--train_samples", type=int, default=256, help="training rows tokenized")
    parser.add_argument("--eval_samples", type=int, default=32, help="validation rows scored after training")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (the arms in turn) per task")
    parser.add_argument("--mallocs", default=None,
                        help="comma-separated: system (the C library's malloc as finetune tunes it), tcmalloc; every "
                             "arm runs under each (default: what finetune's command line uses here)")
    parser.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout of the LoRA arms")
    parser.add_argument("--json", default=None, help="write every run and the summary here")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts._child:
        task_name, arm = opts._child.split(":")
        Path(opts._result).write_text(json.dumps(asdict(run_arm(task_name, arm, opts._round, opts))))
        return 0
    if opts.mallocs is None:
        from finetune import allocator

        opts.mallocs = "tcmalloc" if allocator.tcmalloc_library() and allocator.glibc() else "system"
    argv = [a for a in sys.argv[1:] if not a.startswith("--json") and a != opts.json]
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = []
    for task_name in opts.tasks.split(","):
        for round_ in range(opts.rounds):
            for malloc in opts.mallocs.split(","):
                for arm in opts.arms:
                    result = run_in_subprocess(task_name, arm, round_, argv, malloc)
                    print(json.dumps(asdict(result)), flush=True)
                    results.append(result)
    rows = summary_rows(results)
    print(table(rows))
    print(f"load average before {load_before}, after {[round(x, 2) for x in os.getloadavg()]}")
    if opts.json:
        document = {
            "command": "python benchmarks/lora.py " + " ".join(sys.argv[1:]),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "flags": sorted(f for f in precision.cpu_flags() if f.startswith(("avx512", "amx", "avx2")))},
            "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
            "runs": [asdict(r) for r in results],
            "summary": rows,
        }
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
