"""Which precision a run computes in, decided when its settings are parsed, from what the device can do.

Left unset (no ``--bf16``/``--fp16`` in the recipe or on the command line, no accelerate config asking for
mixed precision), a run uses bf16 autocast where the device computes bf16 natively and fp32 elsewhere:

* a CUDA GPU with bf16 (Ampere or newer): bf16, as transformers' examples recommend;
* a CPU with bf16 matrix units, read at run time from the CPU's flags (``/proc/cpuinfo``): AMX-BF16 or
  AVX512-BF16. Hosts of one machine kind differ from day to day, so this is never a fact written into the
  code about "the" machine; ``MEASURED`` only holds what bf16 was worth where each kind of unit was measured;
* anything else (a CPU without those units, where oneDNN emulates bf16 and it is slower than fp32; an
  accelerator nobody measured; FSDP or DeepSpeed on a CPU, whose bf16 paths are their own): fp32.

Autocast keeps fp32 master weights and optimizer state; only the matrix products and the kernels autocast
lists run in bf16. The decision and its reason are one line in the log, the ``precision`` entry of
``finetune_config.yaml``, ``run_info.json`` and the model card. ``--bf16 true`` on a CPU works too: the
Trainer is then told to stay on the CPU (``use_cpu``), which transformers otherwise demands by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: overrides the CPU flags read from /proc/cpuinfo (space-separated; empty: a CPU without bf16 units). For
#: hosts whose hypervisor hides flags, and for the test suite, which pins fp32 so its expected numbers hold on
#: every host.
FLAGS_ENV = "FINETUNE_CPU_FLAGS"


@dataclass(frozen=True)
class Bf16Unit:
    """A kind of CPU bf16 unit and what bf16 autocast was measured to give with it."""

    flag: str  # as /proc/cpuinfo lists it
    name: str
    matmul_speedup: float  # bf16 over fp32 GFLOP/s of one 960x384 @ 384x1536 product, 2 threads
    source: str


#: strongest first: a CPU with AMX also lists avx512_bf16, and oneDNN uses AMX then
MEASURED: tuple[Bf16Unit, ...] = (
    Bf16Unit("amx_bf16", "AMX-BF16", 8.5, "issue 23: 2-core Xeon, 336 vs 2849 GFLOP/s"),
    Bf16Unit("avx512_bf16", "AVX512-BF16", 4.0, "BENCHMARKS.md 'Precision': 2-core AMD EPYC, 189 vs 762 GFLOP/s"),
)


@dataclass(frozen=True)
class Precision:
    """The settings a run's precision implies and why, in words."""

    settings: dict[str, Any]  # derived training settings (bf16, use_cpu), for fields the user left unset
    reason: str

    @property
    def bf16(self) -> bool:
        return bool(self.settings.get("bf16"))


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags: ``FINETUNE_CPU_FLAGS`` if set, else cpuinfo's (empty where unreadable)."""
    if FLAGS_ENV in os.environ:
        return frozenset(os.environ[FLAGS_ENV].split())
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm64
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_unit(flags: frozenset[str]) -> Bf16Unit | None:
    """The strongest bf16 unit the flags list, or None."""
    return next((unit for unit in MEASURED if unit.flag in flags), None)


def accelerator_kind() -> str | None:
    """The accelerator a run would use (``cuda``, ``mps``, ...), or None on a CPU-only machine."""
    if torch.cuda.is_available():
        return "cuda"
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type
    return None


def sharded_engine() -> str | None:
    """FSDP or DeepSpeed when the launch (accelerate config) or the settings ask for one."""
    from finetune.distributed import env_flag

    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def decided_precision(values: dict[str, Any], explicit: set[str]) -> Precision:
    """bf16 autocast or fp32 for a run with these parsed ``values``; only fields not in ``explicit`` are derived."""
    on_cpu = accelerator_kind() is None or bool(values.get("use_cpu"))
    chosen = explicit_precision(values, explicit)
    if chosen is None:
        bf16, why = default_precision(values, on_cpu)
        mode = "bf16" if bf16 else "fp32"
    else:
        mode, why = chosen
        if mode == "bf16" and on_cpu and cpu_bf16_unit(cpu_flags()) is None:
            why += "; this CPU has no bf16 units (no amx_bf16/avx512_bf16 flag), so bf16 is emulated and slower"
    label = {"bf16": "bf16 autocast", "fp16": "fp16 autocast", "fp32": "fp32"}[mode]
    return Precision(cpu_settings(mode == "bf16", on_cpu, explicit, values), f"{label}: {why}")


def explicit_precision(values: dict[str, Any], explicit: set[str]) -> tuple[str, str] | None:
    """(bf16, fp16 or fp32, why) when the recipe, the command line or an accelerate config chose; None if unset."""
    given = sorted({"bf16", "fp16"} & explicit)
    if given:
        mode = "bf16" if values.get("bf16") else "fp16" if values.get("fp16") else "fp32"
        flags = " and ".join(f"--{name} {str(bool(values.get(name))).lower()}" for name in given)
        return mode, f"{flags} given"
    launch = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launch != "no":  # accelerate launch always sets it; "no" is also its default, so it decides nothing
        return ("bf16" if launch == "bf16" else "fp16" if launch == "fp16" else "fp32",
                f"the accelerate config sets mixed_precision {launch}")
    return None


def default_precision(values: dict[str, Any], on_cpu: bool) -> tuple[bool, str]:
    """(bf16 or not, why) for a run that leaves precision unset."""
    if not on_cpu:
        kind = accelerator_kind()
        if kind == "cuda":
            if torch.cuda.is_bf16_supported():
                return True, f"{torch.cuda.get_device_name()} computes bf16 natively (--bf16 false for fp32)"
            return False, f"{torch.cuda.get_device_name()} has no bf16 (--fp16 true for fp16 autocast)"
        return False, f"bf16 has not been measured on {kind} (--bf16 true to use it)"
    engine = sharded_engine() or ("FSDP" if values.get("fsdp") else None)
    if engine:
        return False, f"{engine} on a CPU: its bf16 path has not been measured (--bf16 true to use it)"
    unit = cpu_bf16_unit(cpu_flags())
    if unit is None:
        return False, ("this CPU has no bf16 matrix units (neither amx_bf16 nor avx512_bf16 among its flags), so "
                       "bf16 would be emulated and slower (--bf16 true to use it anyway)")
    return True, (f"the CPU has {unit.name} (flag {unit.flag}): bf16 matrix products measured {unit.matmul_speedup}x "
                  f"fp32 on such a CPU ({unit.source}); --bf16 false for fp32")


def cpu_settings(bf16: bool, on_cpu: bool, explicit: set[str], values: dict[str, Any]) -> dict[str, Any]:
    """The derived fields: ``bf16`` where unset, and ``use_cpu`` where bf16 runs on a CPU.

    TrainingArguments refuses bf16 without a bf16 GPU unless ``use_cpu`` is set; accelerate then autocasts on
    the CPU. Not under DeepSpeed, which ``use_cpu`` would switch off (TrainingArguments checks it first).
    """
    settings: dict[str, Any] = {}
    if "bf16" not in explicit and bool(values.get("bf16")) != bf16:
        settings["bf16"] = bf16
    if bf16 and on_cpu and "use_cpu" not in explicit and not values.get("use_cpu") and sharded_engine() != "DeepSpeed":
        settings["use_cpu"] = True
    return settings
