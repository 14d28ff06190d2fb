"""What every benchmark result records about the machine it ran on.

Hosts of one machine kind differ from session to session (AMX on one, AVX512-BF16 on another, neither on a
third), and bf16 speed depends on exactly that, so each result JSON carries the CPU's model and bf16 flags,
torch's CPU capability and thread count, and the load average, beside its figures.
"""

from __future__ import annotations

import os
import platform
from typing import Any

#: the flags that decide what bf16 (and int8) matrix products cost on an x86 CPU
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8",
                         "avx512_vnni", "avx_vnni")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import torch

    from finetune.precision import FLAGS_ENV, cpu_bf16_unit

    flags = real_cpu_flags()
    unit = cpu_bf16_unit(flags)
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": [flag for flag in CPU_FLAGS_OF_INTEREST if flag in flags],
        "cpu_bf16_unit": unit.name if unit else None,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **({"finetune_cpu_flags_override": os.environ[FLAGS_ENV]} if FLAGS_ENV in os.environ else {}),
    }


def real_cpu_flags() -> frozenset[str]:
    """The flags /proc/cpuinfo lists (not FINETUNE_CPU_FLAGS, which only changes what finetune decides)."""
    from finetune.precision import cpu_flags

    saved = os.environ.pop("FINETUNE_CPU_FLAGS", None)
    try:
        return cpu_flags()
    finally:
        if saved is not None:
            os.environ["FINETUNE_CPU_FLAGS"] = saved
