"""Training throughput of `finetune`'s default recipe against `run_glue.py`'s defaults and a tuned plain Trainer.

The first two arms run the real pipeline (``finetune.config.parse_run_config`` -> task -> tokenized datasets
-> ``Task.build_trainer`` -> ``Trainer.train``) on the same model, data, seed and number of optimizer steps,
with the recipe's optimization hyperparameters (learning rate, batch size, warmup, weight decay); they
differ only in the speed settings:

* ``baseline``: run_glue.py's defaults: every example padded to ``max_seq_length`` (128), random
  sampling, fp32, plain ``adamw_torch``, eval batch 8, no dataloader workers;
* ``finetune``: the shipped recipe as it is (dynamic padding, length-grouped batches, the precision
  finetune decides for this machine: bf16 autocast where the CPU has bf16 units, ...);
* ``plain_trainer``: ``benchmarks/plain_trainer.py``, a plain ``Trainer`` with nothing of finetune's but
  dynamic padding, ``group_by_length`` and fused AdamW, the same hyperparameters and data, in fp32;
* ``plain_trainer_bf16``: the same plain Trainer with bf16 autocast (``bf16=True, use_cpu=True`` on a CPU):
  the strongest peer on a CPU with bf16 units.

Each run is a fresh subprocess (so peak memory, compile caches and thread settings are its own), and the
arms alternate (a, b, a, b, ...) so that drift of a shared machine's load falls on both. Training time is
measured by a TrainerCallback from ``on_train_begin`` to ``on_train_end`` (evaluation and checkpointing
are switched off in both arms and measured separately); real tokens are counted from the attention mask.

    FINETUNE_HUB_MIRROR=../shared/hub python benchmarks/throughput.py            # a vs b, 2 rounds
    FINETUNE_HUB_MIRROR=../shared/hub python benchmarks/throughput.py --ablation # every feature alone
    python benchmarks/throughput.py --model bert-base --bf16 ...                  # GPU: MFU, BERT-base size

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402  (benchmarks/ is not a package)

RECIPE = "glue-mrpc"
#: the arm that is a plain Trainer script (benchmarks/plain_trainer.py), not finetune's pipeline
PLAIN = "plain_trainer"
#: replaced by a folder created for each invocation of the benchmark
FRESH_CACHE = "{fresh_cache}"
PLAIN_BF16 = "plain_trainer_bf16"
#: benchmark-only setting: which dropout modules an experiment sets to p=0 ("attention" or "all")
DROPOUT = "_dropout_off"
#: benchmark-only setting: pad training batches to a multiple of this (what finetune does on a GPU)
PAD_MULTIPLE = "_pad_to_multiple_of"
#: settings of an arm that are experiments, not finetune settings
ALLOCATOR = "_default_allocator"  # experiment: leave glibc malloc as it is (no finetune.allocator)
EXPERIMENTS = (DROPOUT, PAD_MULTIPLE, ALLOCATOR)

#: run_glue.py's speed-relevant defaults (TrainingArguments' defaults before fused AdamW became one).
RUN_GLUE_DEFAULTS: dict[str, Any] = {
    "pad_to_max_length": True,
    "train_sampling_strategy": "random",
    "optim": "adamw_torch",
    "per_device_eval_batch_size": 8,
    "bf16": False,
    "fp16": False,
    "torch_compile": False,
    "dataloader_num_workers": 0,
}

#: arm name -> (settings on top of the recipe, extra environment, what it is)
ARMS: dict[str, tuple[dict[str, Any], dict[str, str], str]] = {
    "baseline": (RUN_GLUE_DEFAULTS, {}, "run_glue.py defaults: pad to 128, random order, fp32, adamw_torch"),
    "finetune": ({}, {}, "the glue-mrpc recipe as shipped (finetune's defaults)"),
    PLAIN: ({}, {}, "a plain Trainer: dynamic padding + group_by_length + fused AdamW (benchmarks/plain_trainer.py)"),
    PLAIN_BF16: ({}, {}, "the same plain Trainer with bf16 autocast (bf16=True, use_cpu=True on a CPU)"),
    "finetune+fp32": ({"bf16": False}, {}, "finetune with --bf16 false"),
    "finetune+pad_multiple_8": ({PAD_MULTIPLE: 8}, {}, "finetune, batches padded to a multiple of 8 (as on a GPU)"),
    "finetune+default_malloc": (
        {ALLOCATOR: True}, {}, "finetune without finetune.allocator (glibc malloc unmaps large freed blocks)"
    ),
    # ablation: one feature at a time, cumulative from the baseline up to finetune's defaults
    "+dynamic_padding": (
        {**RUN_GLUE_DEFAULTS, "pad_to_max_length": False},
        {},
        "baseline, but each batch padded to its longest member",
    ),
    "+group_by_length": (
        {**RUN_GLUE_DEFAULTS, "pad_to_max_length": False, "train_sampling_strategy": "group_by_length",
         "group_by_length_window": None},
        {},
        "... + length-grouped batches, transformers' windows (LengthGroupedSampler)",
    ),
    "+fused_adamw": (
        {**RUN_GLUE_DEFAULTS, "pad_to_max_length": False, "train_sampling_strategy": "group_by_length",
         "group_by_length_window": None, "optim": "adamw_torch_fused"},
        {},
        "... + fused AdamW",
    ),
    "+global_length_sort": (
        {**RUN_GLUE_DEFAULTS, "pad_to_max_length": False, "train_sampling_strategy": "group_by_length",
         "group_by_length_window": 0, "optim": "adamw_torch_fused"},
        {},
        "... + whole-set length sort, shuffled batches (= finetune's training defaults, eval batch 8)",
    ),
    "finetune+eager_attention": ({"attn_implementation": "eager"}, {}, "finetune with eager instead of SDPA attention"),
    "finetune+torch_compile": ({"torch_compile": True}, {}, "finetune with torch.compile (inductor)"),
    # the same, with inductor's on-disk cache in a folder new to this invocation: the first run compiles
    # from scratch (cold), a second run of this arm in the same invocation finds the first one's kernels (warm)
    "finetune+torch_compile_own_cache": (
        {"torch_compile": True}, {"TORCHINDUCTOR_CACHE_DIR": FRESH_CACHE}, "torch.compile, cache new to this benchmark"
    ),
    "finetune+1_thread": ({}, {"OMP_NUM_THREADS": "1"}, "finetune with one intra-op thread instead of 2"),
    # experiments, not settings finetune has: what the dropout masks and the batch size cost on this machine
    "finetune+no_attention_dropout": (
        {DROPOUT: "attention"}, {}, "finetune with attention-probability dropout 0 (SDPA can use its fused kernel)"
    ),
    "finetune+no_dropout": ({DROPOUT: "all"}, {}, "finetune with every dropout 0 (no random masks at all)"),
    "finetune+batch_32": (
        {"per_device_train_batch_size": 32}, {}, "finetune at batch 32: does a bigger batch raise samples/s here?"
    ),
}
ABLATION = [
    "baseline", "+dynamic_padding", "+group_by_length", "+fused_adamw", "+global_length_sort",
    "finetune+eager_attention", "finetune+1_thread", "finetune+torch_compile",
    "finetune+no_attention_dropout", "finetune+no_dropout", "finetune+batch_32",
]

#: dense bf16 peak FLOP/s by GPU name (vendor datasheets, without sparsity)
PEAK_BF16_FLOPS = {
    "H100 SXM": 989.4e12,
    "H100 NVL": 835.0e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "A100": 312.0e12,
    "L4": 121.0e12,
}


@dataclass
class RunResult:
    arm: str
    round: int
    train_samples: int = 0
    optimizer_steps: int = 0
    train_wall_s: float = 0.0
    train_samples_per_s: float = 0.0
    real_tokens_per_s: float = 0.0
    padding_fraction: float = 0.0
    steady_samples_per_s: float = 0.0
    steady_real_tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0
    eval_samples: int = 0
    eval_wall_s: float = 0.0
    eval_samples_per_s: float = 0.0
    eval_metrics: dict[str, float] = field(default_factory=dict)
    parameters: int = 0
    mfu: float | None = None
    device: str = ""
    load_average_end: list[float] = field(default_factory=list)  # 1, 5, 15 minutes, as the run ended
    settings: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# One run (child process)
# ---------------------------------------------------------------------------------------------------------


def counting_collator(collate, counts: dict[str, int]):
    """The task's collator, counting real (attention mask) and padded tokens of every batch it builds."""

    def collate_and_count(features):
        batch = collate(features)
        ids = batch["input_ids"]
        counts["padded"] += int(ids.numel())
        mask = batch.get("attention_mask")
        counts["real"] += int(mask.sum()) if mask is not None else int(ids.numel())
        return batch

    return collate_and_count


def timing_callback(skip_steps: int):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        """Wall time of training, and of the steps after the first ``skip_steps`` (warm-up, compilation)."""

        def __init__(self):
            self.begin = self.end = self.steady_begin = None
            self.steady_tokens_begin = 0
            self.steady_steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == skip_steps:
                sync()
                self.steady_begin = time.perf_counter()
                self.steady_tokens_begin = state.num_input_tokens_seen
            elif state.global_step > skip_steps:
                self.steady_steps += 1

        def on_train_end(self, args, state, control, **kwargs):
            sync()
            self.end = time.perf_counter()
            self.tokens = state.num_input_tokens_seen

    return Timing()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_flops(device_name: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in device_name:
            return flops
    return None


def finetune_trainer(arm: str, opts: argparse.Namespace, callbacks: list) -> tuple[Any, Any, Any]:
    """(trainer, validation split, evaluate()) of finetune's pipeline with the arm's settings."""
    from transformers import set_seed

    from finetune.allocator import keep_freed_memory
    from finetune.config import parse_run_config
    from finetune.pipeline import build_task, tokenized_splits

    if not ARMS[arm][0].get(ALLOCATOR):
        keep_freed_memory()  # as finetune's own pipeline does (prepare_training), before the model loads
    settings = {k: v for k, v in ARMS[arm][0].items() if k not in EXPERIMENTS}
    common = {
        "model_name_or_path": opts.model_path,
        "max_train_samples": opts.train_samples or None,
        "max_eval_samples": opts.eval_samples or None,  # 0: no evaluation (run_arm skips it)
        "max_steps": opts.steps or -1,
        "num_train_epochs": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "load_best_model_at_end": False,
        "report_to": "none",
        "disable_tqdm": True,
        "output_dir": tempfile.mkdtemp(prefix=f"bench-{arm}-"),
        "overwrite_output_dir": True,
    }
    if opts.bf16 and arm != "baseline":
        common["bf16"] = True
    config = parse_run_config(RECIPE, overrides={**common, **settings})
    # Set here, not as an override: the command-line parser reads this str-or-bool field as a bool.
    config.replace_training(include_num_input_tokens_seen="non_padding")
    task = build_task(config)
    set_seed(config.training.seed)
    _raw, tokenized, tokenizer = tokenized_splits(task, config)
    model = without_dropout(task.load_model(tokenizer), ARMS[arm][0].get(DROPOUT))
    trainer = task.build_trainer(model, tokenizer, tokenized["train"], None, callbacks)
    if ARMS[arm][0].get(PAD_MULTIPLE):
        trainer.data_collator.pad_to_multiple_of = ARMS[arm][0][PAD_MULTIPLE]
    validation = tokenized["validation"]

    def evaluate():
        trainer.data_collator = task.data_collator(tokenizer, model)
        return task.predict(trainer, validation, "validation").metrics

    return trainer, validation, evaluate


def without_dropout(model: Any, which: str | None) -> Any:
    """The model with its attention-probability dropout ("attention") or every dropout ("all") set to 0."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and (which == "all" or (which == "attention" and ".self." in name)):
            module.p = 0.0
    return model


def plain_trainer(opts: argparse.Namespace, callbacks: list, bf16: bool = False) -> tuple[Any, Any, Any]:
    """(trainer, validation split, evaluate()) of the plain Trainer script, arm (c), in fp32 or bf16."""
    sys.path.insert(0, str(Path(__file__).parent))
    from plain_trainer import build_trainer

    trainer = build_trainer(
        opts.model_path, opts.train_samples or None, opts.eval_samples or None, opts.steps or -1, 1,
        tempfile.mkdtemp(prefix="bench-plain-"), callbacks, bf16=bf16 or opts.bf16,
    )
    trainer.args.include_num_input_tokens_seen = "non_padding"
    return trainer, trainer.eval_dataset, trainer.evaluate


def run_arm(arm: str, round_: int, opts: argparse.Namespace) -> RunResult:
    """Train one arm for ``opts.steps`` optimizer steps, then evaluate it; all in this process."""
    import torch

    timer = timing_callback(opts.skip_steps)
    if arm in (PLAIN, PLAIN_BF16):
        trainer, validation, evaluate = plain_trainer(opts, [timer], bf16=arm == PLAIN_BF16)
    else:
        trainer, validation, evaluate = finetune_trainer(arm, opts, [timer])
    counts = {"real": 0, "padded": 0}
    trainer.data_collator = counting_collator(trainer.data_collator, counts)
    trainer.train()
    batch = trainer.args.per_device_train_batch_size
    steps = trainer.state.global_step
    samples = min(steps * batch, len(trainer.train_dataset) * max(1, int(trainer.state.epoch + 0.999)))
    wall = timer.end - timer.begin
    steady_wall = timer.end - timer.steady_begin if timer.steady_begin else float("nan")
    result = RunResult(arm=arm, round=round_, train_samples=samples, optimizer_steps=steps, train_wall_s=wall)
    result.train_samples_per_s = samples / wall
    result.real_tokens_per_s = timer.tokens / wall
    result.padding_fraction = 1 - counts["real"] / max(counts["padded"], 1)
    result.steady_samples_per_s = timer.steady_steps * batch / steady_wall
    result.steady_real_tokens_per_s = (timer.tokens - timer.steady_tokens_begin) / steady_wall
    result.peak_memory_mb = peak_memory_mb()
    result.parameters = trainer.model.num_parameters()
    result.device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    peak = peak_flops(result.device) if torch.cuda.is_available() else None
    if peak:
        result.mfu = 6 * result.parameters * result.steady_real_tokens_per_s / peak
    result.settings = {k: str(v) for k, v in {**ARMS[arm][0], "threads": torch.get_num_threads()}.items()}
    result.settings["precision"] = "bf16" if trainer.args.bf16 else "fp32"

    if opts.eval_samples != 0:
        sync()
        start = time.perf_counter()
        metrics = evaluate() or {}
        sync()
        result.eval_wall_s = time.perf_counter() - start
        result.eval_samples = len(validation)
        result.eval_samples_per_s = result.eval_samples / result.eval_wall_s
        named = {k.removeprefix("eval_"): v for k, v in metrics.items()}
        result.eval_metrics = {k: round(v, 4) for k, v in named.items() if k in ("f1", "accuracy")}
    return result


# ---------------------------------------------------------------------------------------------------------
# The schedule (parent process)
# ---------------------------------------------------------------------------------------------------------


def run_in_subprocess(arm: str, round_: int, opts: argparse.Namespace, argv: list[str]) -> RunResult:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    env = {**os.environ, **{k: v.replace(FRESH_CACHE, opts.fresh_cache) for k, v in ARMS[arm][1].items()}}
    command = [sys.executable, __file__, *argv, "--_child", arm, "--_round", str(round_), "--_result", result_path]
    subprocess.run(command, env=env, check=True)
    values = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    return RunResult(**values)


def median_by_arm(results: list[RunResult]) -> dict[str, dict[str, Any]]:
    """Per arm: the median of each figure over its rounds."""
    summary: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(r.arm for r in results):
        runs = [r for r in results if r.arm == arm]
        row: dict[str, Any] = {"rounds": len(runs)}
        for key, value in asdict(runs[0]).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
                row[key] = statistics.median(getattr(r, key) for r in runs)
        metrics = {k for r in runs for k in r.eval_metrics}
        row["eval_metrics"] = {k: statistics.median(r.eval_metrics[k] for r in runs) for k in sorted(metrics)}
        row["mfu"] = statistics.median(r.mfu for r in runs) if all(r.mfu is not None for r in runs) else None
        summary[arm] = row
    return summary


def ratios(summary: dict[str, dict[str, Any]], reference: str = "baseline") -> dict[str, dict[str, float]]:
    """Each arm's throughput figures divided by the reference arm's (>1: faster)."""
    if reference not in summary:
        return {}
    base = summary[reference]
    keys = ("train_samples_per_s", "real_tokens_per_s", "steady_samples_per_s", "eval_samples_per_s")
    return {
        arm: {k: row[k] / base[k] for k in keys if base.get(k)}
        | {"train_wall_time": row["train_wall_s"] / base["train_wall_s"]}
        for arm, row in summary.items()
    }


def table(summary: dict[str, dict[str, Any]], *relative: dict[str, dict[str, float]]) -> str:
    """One row per arm; ``relative``: ratios against the baseline, the plain Trainer and its bf16 arm."""
    header = (
        "| arm | train samples/s | x baseline | x plain Trainer | x plain Trainer bf16 | real tokens/s | padding "
        "| steady samples/s | peak MB | train wall s | eval samples/s | F1 | accuracy | MFU |"
    )
    lines = [header, "|" + "---|" * 14]
    for arm, row in summary.items():
        metrics = row["eval_metrics"]
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
        ratios_ = " | ".join(f"{rel.get(arm, {}).get('train_samples_per_s', float('nan')):.2f}" for rel in relative)
        lines.append(
            f"| {arm} | {row['train_samples_per_s']:.2f} | {ratios_} "
            f"| {row['real_tokens_per_s']:.0f} | {row['padding_fraction']:.1%} | {row['steady_samples_per_s']:.2f} "
            f"| {row['peak_memory_mb']:.0f} | {row['train_wall_s']:.1f} | {row['eval_samples_per_s']:.1f} "
            f"| {metrics.get('f1', float('nan')):.4f} | {metrics.get('accuracy', float('nan')):.4f} | {mfu} |"
        )
    return "\n".join(lines)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=f"baseline,finetune,{PLAIN}", help="comma-separated arms: " + ", ".join(ARMS))
    parser.add_argument("--ablation", action="store_true", help="run every feature arm: " + ", ".join(ABLATION))
    parser.add_argument("--rounds", type=int, default=2, help="times each arm runs (alternating)")
    parser.add_argument("--train_samples", type=int, default=512, help="first N training rows (0: all 3668)")
    parser.add_argument("--steps", type=int, default=32,
                        help="optimizer steps per run (512 / 16 = one epoch); 0: one epoch at each arm's batch size")
    parser.add_argument("--eval_samples", type=int, default=None, help="validation rows evaluated (0: none; all)")
    parser.add_argument("--skip_steps", type=int, default=2, help="steps left out of the steady-state figures")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                        help="Hub id / path, or 'bert-base' for a BERT-base-sized model built from its config")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast in every arm but the baseline, on a GPU or a CPU (default: finetune's arms "
                        "decide per run, the plain Trainer arms are fp32 / bf16 by name)")
    parser.add_argument("--json", default="benchmarks/results/throughput.json", help="where to write the results")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    parser.add_argument("--_model_path", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.model_path = opts._model_path or opts.model

    if opts._child:
        result = run_arm(opts._child, opts._round, opts)
        Path(opts._result).write_text(json.dumps(asdict(result)))
        return 0

    arms = ABLATION if opts.ablation else [a.strip() for a in opts.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    child_argv = [a for a in argv if not a.startswith("--_")]
    opts.fresh_cache = tempfile.mkdtemp(prefix="bench-inductor-cache-")
    if opts.model == "bert-base":
        child_argv += ["--_model_path", bert_base_checkpoint()]
    load_before = load_average()
    started = time.time()
    results = []
    # An arm named twice in --arms runs twice per round (e.g. the slow baseline once, the others twice).
    occurrences = {arm: arms.count(arm) for arm in arms}
    for round_ in range(opts.rounds):
        seen: dict[str, int] = {}
        for arm in arms:
            seen[arm] = seen.get(arm, 0) + 1
            result = run_in_subprocess(arm, round_ * occurrences[arm] + seen[arm] - 1, opts, child_argv)
            result.load_average_end = load_average()
            print(
                f"round {result.round} {arm}: {result.train_samples_per_s:.2f} samples/s, "
                f"padding {result.padding_fraction:.1%}, eval {result.eval_metrics}",
                flush=True,
            )
            results.append(result)
            write_report(opts, child_argv, arms, results, load_before, started)
    report = write_report(opts, child_argv, arms, results, load_before, started)
    print(table(report["summary"], report["ratios_vs_baseline"], report["ratios_vs_plain_trainer"],
                report["ratios_vs_plain_trainer_bf16"]))
    print(f"load average before {load_before}, after {report['machine']['load_average_after']}")
    if opts.json:
        print(f"wrote {opts.json}")
    return 0


def write_report(
    opts: argparse.Namespace, child_argv: list[str], arms: list[str], results: list[RunResult],
    load_before: list[float], started: float,
) -> dict[str, Any]:
    """The report so far, written after every run so that an interrupted benchmark keeps what it measured."""
    summary = median_by_arm(results)
    rel = ratios(summary)
    report = {
        "command": "python benchmarks/throughput.py " + " ".join(child_argv),
        "recipe": RECIPE,
        "model": opts.model,
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": load_average()},
        "elapsed_s": round(time.time() - started, 1),
        "arms": {arm: ARMS[arm][2] for arm in arms},
        "summary": summary,
        "ratios_vs_baseline": rel,
        "ratios_vs_plain_trainer": ratios(summary, PLAIN),
        "ratios_vs_plain_trainer_bf16": ratios(summary, PLAIN_BF16),
        "runs": [asdict(r) for r in results],
    }
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def bert_base_checkpoint() -> str:
    """A BERT-base-sized random-weight checkpoint (bert-base-uncased's config and MiniLM's identical vocab)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig

    from finetune import mirror

    path = Path(tempfile.gettempdir()) / "finetune-bench-bert-base"
    if not (path / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(mirror.resolve("sentence-transformers/all-MiniLM-L6-v2", "models"))
        AutoModelForMaskedLM.from_config(BertConfig(vocab_size=len(tokenizer))).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
