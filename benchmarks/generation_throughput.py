"""Evaluation rows/s of a trained decoder run: the loss forward and generate's prefill apart, or one shared forward.

Issue 24, item 4. ``finetune evaluate RUN_DIR`` on a decoder computes, per batch, the teacher-forced loss
over prompt + target and then generates from the prompt. Before ``finetune.generation.shared_prompt`` the
prompts went through the model twice (the loss forward, then generate's prefill); now generate starts from
the loss forward's KV cache. This scores the same validation rows both ways in one invocation, as
``finetune evaluate`` does (``GenerationTask.predict``: longest first, the run's generation settings and
precision), and reports wall time, rows/s, eval_loss, ROUGE and how many predictions are identical:

    FINETUNE_HUB_MIRROR=../shared/hub HF_HUB_OFFLINE=1 \\
        python benchmarks/generation_throughput.py RUN_DIR [--rows N] [--batch 64] [--json PATH]

RUN_DIR is a finished generation run (docs/lora.md gives the SciTLDR LoRA command). ``--rows`` takes the
first N validation rows (default: all). Both arms first score the first ``--batch`` / 8 rows unrecorded, so
neither pays for oneDNN's first-call kernel set-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

ARMS = {"apart": False, "shared": True}  # arm -> GenerationTrainer.share_prompt_forward
SCORES = ("loss", "rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len")


def scored(task: Any, trainer: Any, dataset: Any, shared: bool) -> tuple[float, Any]:
    """(seconds, PredictionOutput) of one arm over ``dataset``."""
    trainer.share_prompt_forward = shared
    start = time.perf_counter()
    output = task.predict(trainer, dataset, "validation")
    return time.perf_counter() - start, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--rows", type=int, default=None, help="first N validation rows (default: all)")
    parser.add_argument("--batch", type=int, default=64, help="per_device_eval_batch_size (finetune evaluate's)")
    parser.add_argument("--json", default="benchmarks/results/generation_throughput.json")
    opts = parser.parse_args(argv)

    from finetune import cli, pipeline

    flags = [opts.run_dir, "--per_device_eval_batch_size", str(opts.batch)]
    if opts.rows is not None:
        flags += ["--max_final_eval_samples", str(opts.rows)]
    config, _ = cli.inference_config(flags, "bench")
    task, trainer, _, tokenized = pipeline.load_for_inference(config)
    rows = tokenized["validation"]
    if opts.rows is not None:
        rows = rows.select(range(min(opts.rows, len(rows))))
    warm = rows.select(range(max(opts.batch // 8, 1)))
    for shared in ARMS.values():
        scored(task, trainer, warm, shared)

    load_before = os.getloadavg()
    arms: dict[str, dict[str, Any]] = {}
    predictions = {}
    for arm, shared in ARMS.items():
        seconds, output = scored(task, trainer, rows, shared)
        metrics = output.metrics or {}
        predictions[arm] = output.predictions.tolist()
        arms[arm] = {"seconds": round(seconds, 1), "rows_per_s": round(len(rows) / seconds, 3),
                     **{k: metrics.get(f"eval_{k}") for k in SCORES}}
    result = {
        "command": "python benchmarks/generation_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "precision": trainer.args.bf16 and "bf16" or "fp32",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": len(rows),
        "batch": opts.batch,
        "arms": arms,
        "speedup_shared_over_apart": round(arms["apart"]["seconds"] / arms["shared"]["seconds"], 2),
        "predictions_identical": sum(a == b for a, b in zip(predictions["apart"], predictions["shared"], strict=True)),
    }
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("arms", "speedup_shared_over_apart", "predictions_identical")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
