"""When ``torch.compile`` pays for itself, and how a run compiles when it does.

Compiling costs seconds to minutes before the first step and saves a little on each step after it, so it
pays only past a break-even number of steps: compile time / (eager step - compiled step). ``MEASURED``
holds those figures per device kind, measured by ``benchmarks/throughput.py`` (BENCHMARKS.md); a run
that leaves ``torch_compile`` unset compiles only when its planned steps exceed that break-even, and says
which way it decided and why. When a run compiles, it compiles each repeated layer once (accelerate's
regional compilation: one transformer block instead of the whole graph) with a dynamic sequence length,
so batches of new lengths reuse the compiled code instead of compiling again; inductor's on-disk cache
(on by default in torch) makes a second run with the same model compile in a fraction of the time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("finetune")


@dataclass(frozen=True)
class CompileCost:
    """One measurement of compile against eager on one kind of device (seconds)."""

    compile_s: float  # extra wall time of the compiled run's first steps, cold inductor cache
    eager_step_s: float  # mean training step after warm-up, eager
    compiled_step_s: float  # mean training step after warm-up, compiled
    source: str  # where the figures come from

    def break_even_steps(self) -> float:
        """Steps after which compiling has paid for itself (inf: compiled steps are not faster)."""
        saving = self.eager_step_s - self.compiled_step_s
        return self.compile_s / saving if saving > 0 else math.inf


#: "device/precision" -> measurement (all-MiniLM-L6-v2, one MRPC epoch at batch 16, regional + dynamic
#: compilation; benchmarks/results/ablation_epoch.json and throughput_epoch.json: medians of the steady-state
#: rates). Precision is part of the key: under bf16 the matrix products are several times cheaper, so the
#: elementwise work a compiler fuses is a larger share of a step.
MEASURED: dict[str, CompileCost] = {
    "cpu/fp32": CompileCost(
        compile_s=44.0,  # cold inductor cache; 9 s with a warm one
        eager_step_s=0.385,
        compiled_step_s=0.420,
        source="BENCHMARKS.md 'What each lever gives', 2-core Xeon (AVX2), torch 2.13",
    ),
    # 230 steps: eager 47.4 s (0.199 s/step steady), compiled 92.2 s (0.210 s/step steady), so ~44 s of compile
    "cpu/bf16": CompileCost(
        compile_s=44.0,
        eager_step_s=0.199,
        compiled_step_s=0.210,
        source="BENCHMARKS.md 'Precision', 2-core AMD EPYC (AVX512-BF16), torch 2.13",
    ),
}


def device_kind(args: Any = None) -> str:
    """``cuda/bf16``, ``cpu/fp32``, ...: the device a run trains on and the precision it computes in."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not getattr(args, "use_cpu", False) else "cpu"
    precision = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"
    return f"{device}/{precision}"


def compile_decision(planned_steps: int, kind: str) -> tuple[bool, str]:
    """(compile or not, the reason in words) for a run of ``planned_steps`` optimizer steps on ``kind``."""
    cost = MEASURED.get(kind)
    if cost is None:
        return False, f"off: compile has not been measured on {kind} (--torch_compile true compiles anyway)"
    break_even = cost.break_even_steps()
    if math.isinf(break_even):
        return False, (
            f"off: on {kind} a compiled step measured {cost.compiled_step_s:.3f} s against {cost.eager_step_s:.3f} s "
            f"eager, so compiling never pays ({cost.source}); --torch_compile true compiles anyway"
        )
    verdict = "on" if planned_steps > break_even else "off"
    return planned_steps > break_even, (
        f"{verdict}: {planned_steps} planned steps, break-even {break_even:.0f} on {kind} "
        f"({cost.compile_s:.0f} s to compile, {cost.eager_step_s:.3f} -> {cost.compiled_step_s:.3f} s per step; "
        f"{cost.source})"
    )


def planned_steps(args: Any, train_rows: int) -> int:
    """Optimizer steps the run will take: ``max_steps``, or the epochs over ``train_rows``."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(train_rows / (args.per_device_train_batch_size * max(args.world_size, 1)))
    return math.ceil(batches / args.gradient_accumulation_steps) * math.ceil(args.num_train_epochs)


def decided_compile(args: Any, train_rows: int) -> dict[str, Any]:
    """The training-argument change that settles an unset ``torch_compile`` for this run, logged once."""
    if args.torch_compile is not None:
        return {}
    on, reason = compile_decision(planned_steps(args, train_rows), device_kind(args))
    if args.process_index == 0:
        logger.warning("torch.compile %s", reason)
    return {"torch_compile": on}


class RegionalCompileMixin:
    """Trainer mixin: under ``torch_compile``, compile each repeated block once, with dynamic shapes."""

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        args = super()._build_accelerator_args(**kwargs)  # type: ignore[misc]
        plugin = args.get("dynamo_plugin")
        if plugin is not None and self.args.torch_compile:  # type: ignore[attr-defined]
            plugin.use_regional_compilation = True
            if plugin.dynamic is None:  # the Trainer sets False only for backends that cannot
                plugin.dynamic = True
        return args
