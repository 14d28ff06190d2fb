"""Where a training step's CPU time goes, by kind of operation, in fp32 and under bf16 autocast.

Builds the ``finetune`` arm of ``benchmarks/throughput.py`` (the real pipeline, the glue-mrpc recipe) and
profiles ``--steps`` optimizer steps after ``--warmup`` steps with ``torch.profiler``, then sums the self CPU
time of every aten op into kinds: matrix products, dropout masks, attention (SDPA), softmax, normalisation,
activations, elementwise arithmetic, dtype casts and copies, the optimizer, and the rest.

    FINETUNE_HUB_MIRROR=../shared/hub python benchmarks/profile_step.py --precision bf16 fp32 \
        --json benchmarks/results/profile_step.json

Not a test; the shares are of self CPU time as the profiler sees it (with its own overhead per op).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402  (benchmarks/ is not a package)

#: op kind -> substrings of aten op names (first match wins, in this order)
KINDS: dict[str, tuple[str, ...]] = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                        "mkldnn", "aten::_weight_int"),
    "dropout masks": ("bernoulli", "dropout", "aten::uniform_", "aten::rand"),
    "attention (SDPA)": ("scaled_dot_product", "_flash_attention", "_efficient_attention"),
    "softmax": ("softmax",),
    "normalisation": ("layer_norm", "native_layer_norm", "rms_norm"),
    "activations": ("gelu", "silu", "tanh", "relu"),
    "optimizer": ("_fused_adam", "_foreach", "adam"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous",
                         "aten::cat", "aten::index", "aten::embedding"),
    "elementwise": ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::where", "aten::masked_fill",
                    "aten::sum", "aten::fill_", "aten::zero_", "aten::neg", "aten::rsqrt", "aten::pow"),
}


def kind_of(name: str) -> str:
    for kind, needles in KINDS.items():
        if any(needle in name for needle in needles):
            return kind
    return "other"


def profile(precision: str, opts: argparse.Namespace) -> dict[str, Any]:
    import throughput
    import torch
    from torch.profiler import ProfilerActivity
    from transformers import TrainerCallback

    class Window(TrainerCallback):
        """Profiles steps warmup+1 .. warmup+steps."""

        def __init__(self):
            self.profiler = torch.profiler.profile(activities=[ProfilerActivity.CPU])

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == opts.warmup:
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == opts.warmup + opts.steps:
                self.profiler.__exit__(None, None, None)

    window = Window()
    arm = "finetune+fp32" if precision == "fp32" else "finetune"
    bench = argparse.Namespace(model_path=opts.model, train_samples=(opts.warmup + opts.steps) * 16, eval_samples=0,
                               steps=opts.warmup + opts.steps, skip_steps=0, bf16=precision == "bf16")
    trainer, _validation, _evaluate = throughput.finetune_trainer(arm, bench, [window])
    trainer.train()
    assert trainer.args.bf16 == (precision == "bf16")
    totals: dict[str, float] = {}
    ops: dict[str, float] = {}
    for event in window.profiler.key_averages():
        if not event.key.startswith("aten::"):
            continue
        self_us = event.self_cpu_time_total
        totals[kind_of(event.key)] = totals.get(kind_of(event.key), 0.0) + self_us
        ops[event.key] = self_us
    whole = sum(totals.values())
    return {
        "precision": precision,
        "steps": opts.steps,
        "self_cpu_ms_per_step": round(whole / 1000 / opts.steps, 2),
        "share": {k: round(v / whole, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
        "ms_per_step": {k: round(v / 1000 / opts.steps, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
        "top_ops_ms_per_step": {k: round(v / 1000 / opts.steps, 2)
                                for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:15]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=("bf16", "fp32"))
    parser.add_argument("--warmup", type=int, default=5, help="steps before the profiled window")
    parser.add_argument("--steps", type=int, default=20, help="profiled optimizer steps")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    results = [profile(precision, opts) for precision in opts.precision]
    for result in results:
        print(f"{result['precision']}: {result['self_cpu_ms_per_step']} ms of self CPU time per step")
        for kind, share in result["share"].items():
            print(f"  {kind:<18} {share:6.1%}  {result['ms_per_step'][kind]:8.2f} ms")
    if opts.json:
        opts.json.write_text(json.dumps({"machine": machine_info(), "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
