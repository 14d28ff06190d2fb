"""Evaluation rows/s of a trained decoder run: loss forward and prefill apart, one shared forward, merged adapter.

Issue 24, item 4. ``finetune evaluate RUN_DIR`` on a decoder computes, per batch, the teacher-forced loss
over prompt + target and then generates from the prompt. Before ``finetune.generation.shared_prompt`` the
prompts went through the model twice (the loss forward, then generate's prefill); now generate starts from
the loss forward's KV cache. This scores the same validation rows every way in one invocation, as
``finetune evaluate`` does (``GenerationTask.predict``: longest first, the run's generation settings), and
reports wall time, rows/s, eval_loss, ROUGE and how many predictions equal the first arm's:

    FINETUNE_HUB_MIRROR=../shared/hub HF_HUB_OFFLINE=1 \\
        python benchmarks/generation_throughput.py RUN_DIR [--rows N] [--batch 64] [--precisions fp32,bf16]

Arms: ``apart`` (two forwards), ``shared`` (one forward), ``bf16_weights`` (one forward, frozen Linear weights
held in bf16 for the evaluation instead of cast by autocast at every forward: ``finetune.frozen_weights.
frozen_linear_weights_in``, finetune's default under bf16; skipped in fp32, where it changes nothing), ``merged``
(``bf16_weights`` with the LoRA adapter merged into the base weights by peft's ``merge_adapter`` for the arm and
unmerged after it; runs without an adapter skip it). ``--arms`` picks some. ``--precisions`` runs the arms once
per precision, each in a child process of this invocation (autocast is
decided when the Trainer is built), one after the other; without it, the run's own precision decision.
RUN_DIR is a finished generation run (docs/lora.md gives the SciTLDR LoRA command). ``--rows`` takes the
first N validation rows (default: all). Every arm first scores the first ``--batch`` / 8 rows unrecorded, so
none pays for oneDNN's first-call kernel set-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

ARMS = ("apart", "shared", "bf16_weights", "merged")
PRECISION_FLAGS = {"fp32": ["--bf16", "false"], "bf16": ["--bf16", "true"]}
SCORES = ("loss", "rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len")


@contextlib.contextmanager
def arm_settings(trainer: Any, arm: str):
    """The trainer as the arm runs it: shared prompt forward or not, bf16 weights or not, the adapter merged or not."""
    trainer.share_prompt_forward = arm != "apart"
    trainer.frozen_weights_in_bf16 = arm in ("bf16_weights", "merged")
    merge = arm == "merged"
    if merge:
        trainer.model.merge_adapter()
    try:
        yield
    finally:
        if merge:
            trainer.model.unmerge_adapter()


def scored(task: Any, trainer: Any, dataset: Any, arm: str) -> tuple[float, Any]:
    """(seconds, PredictionOutput) of one arm over ``dataset``."""
    with arm_settings(trainer, arm):
        start = time.perf_counter()
        output = task.predict(trainer, dataset, "validation")
        return time.perf_counter() - start, output


def measured_arms(opts: argparse.Namespace, extra_flags: list[str]) -> dict[str, Any]:
    """Every arm over the rows, in this process: seconds, rows/s, scores and predictions."""
    from finetune import adapters, cli, pipeline

    flags = [opts.run_dir, "--per_device_eval_batch_size", str(opts.batch), *extra_flags]
    if opts.rows is not None:
        flags += ["--max_final_eval_samples", str(opts.rows)]
    config, _ = cli.inference_config(flags, "bench")
    task, trainer, _, tokenized = pipeline.load_for_inference(config)
    bf16 = trainer.args.bf16
    arms = [a for a in opts.arms.split(",") if (a != "merged" or adapters.is_peft_model(trainer.model))
            and (a != "bf16_weights" or bf16)]
    rows = tokenized["validation"]
    if opts.rows is not None:
        rows = rows.select(range(min(opts.rows, len(rows))))
    warm = rows.select(range(max(opts.batch // 8, 1)))
    for arm in arms:
        scored(task, trainer, warm, arm)

    load_before = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    for arm in arms:
        seconds, output = scored(task, trainer, rows, arm)
        metrics = output.metrics or {}
        results[arm] = {"seconds": round(seconds, 1), "rows_per_s": round(len(rows) / seconds, 3),
                        **{k: metrics.get(f"eval_{k}") for k in SCORES},
                        "predictions": output.predictions.tolist()}
    return {"precision": "bf16" if trainer.args.bf16 else "fp32", "rows": len(rows),
            "load_average_before": load_before, "load_average_after": os.getloadavg(), "arms": results}


def child_result(opts: argparse.Namespace, precision: str) -> dict[str, Any]:
    """measured_arms in a fresh process under one precision."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "arms.json"
        command = [sys.executable, __file__, opts.run_dir, "--batch", str(opts.batch), "--arms", opts.arms,
                   "--child", str(out),
                   "--child-precision", precision] + (["--rows", str(opts.rows)] if opts.rows is not None else [])
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def summary(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per precision and arm: rows/s, x the first arm measured, predictions equal to that precision's first arm."""
    first = next(iter(runs.values()))
    base_seconds = next(iter(first["arms"].values()))["seconds"]
    table = {}
    for precision, run in runs.items():
        reference = next(iter(run["arms"].values()))["predictions"]
        for arm, measured in run["arms"].items():
            table[f"{precision} {arm}"] = {
                **{k: v for k, v in measured.items() if k != "predictions"},
                "speedup": round(base_seconds / measured["seconds"], 2),
                "identical_to_first_arm": sum(a == b for a, b in zip(reference, measured["predictions"], strict=True)),
            }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--rows", type=int, default=None, help="first N validation rows (default: all)")
    parser.add_argument("--batch", type=int, default=64, help="per_device_eval_batch_size (finetune evaluate's)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated fp32,bf16: the arms once per precision (default: the run's decision)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--json", default="benchmarks/results/generation_throughput.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-precision", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    if opts.child:
        flags = PRECISION_FLAGS.get(opts.child_precision, [])
        Path(opts.child).write_text(json.dumps(measured_arms(opts, flags)))
        return 0
    load_before = os.getloadavg()
    if opts.precisions:
        runs = {p: child_result(opts, p) for p in opts.precisions.split(",")}
    else:
        run = measured_arms(opts, [])
        runs = {run["precision"]: run}
    table = summary(runs)
    result = {
        "command": "python benchmarks/generation_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": next(iter(runs.values()))["rows"],
        "batch": opts.batch,
        "arms": table,
        "predictions": {p: {a: m["predictions"] for a, m in r["arms"].items()} for p, r in runs.items()},
    }
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
