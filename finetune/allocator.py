"""Keep freed memory in the process, so that each training step does not map fresh pages from the kernel.

PyTorch's CPU allocator hands every tensor to the C library's ``malloc``. glibc serves blocks above its mmap
threshold (at most 32 MiB) with a new ``mmap`` and gives them back with ``munmap`` when freed, so such a
tensor costs a page fault per 4 KiB page every time it is allocated. A training step allocates some of
those anew each time: the word-embedding gradient alone (vocabulary x hidden, 30522 x 384 floats = 45 MiB
for all-MiniLM-L6-v2) is created zero-filled by the embedding's backward at every step. Under bf16 autocast,
with matrix products several times cheaper, that zero fill was the largest single operation of a step
(BENCHMARKS.md 'Precision'). Intel's CPU recipes swap in jemalloc or tcmalloc for the same reason. Here two
things do it within the running process:

* glibc's ``mallopt``: no mmap for large blocks (they come from the heap) and no trimming of the heap's top,
  so after a few steps a freed block is reused by the next one;
* PyTorch's own ``THP_MEM_ALLOC_ENABLE``: blocks of 2 MiB and more are aligned to transparent huge pages, so
  the kernel maps them in 2 MiB pages instead of 4 KiB ones while the heap grows (it reads the variable at
  its first large allocation, so it is set before any model loads; a value the user set is kept).

The arithmetic is untouched; the process keeps its peak memory until it exits instead of returning it.

That pays where a step allocates large blocks afresh (a trained embedding's gradient), and costs where it does
not: a LoRA step (frozen embeddings) frees hundreds of small rank-r tensors between its large activations, the
heap cannot shrink past them, and with nothing unmapped SmolLM2's LoRA peak grew by 0.7 GB for no speed (4007 vs
3320 MB, 1.14 vs 1.22 samples/s: BENCHMARKS.md 'Decoder memory and QLoRA'), so :func:`configure_for` leaves glibc's own
settings to LoRA runs. (A fixed 128 KiB mmap threshold gave 3238 MB but 0.49 samples/s: each activation then
costs its page faults.)

Neither glibc setting serves both: glibc's default left a LoRA step of SmolLM2 (4 x 448 tokens, fp32) 2.9 GB of
freed-but-held memory beyond its 2.4 GB autograd graph, and the settings that return it cost speed. tcmalloc
(gperftools; what Intel's and PyTorch's CPU launchers preload) keeps per-size free lists, so freed activations
are reused by the next step without page faults and without the heap's holes: LoRA's peak 4522 vs 6520 MB and
both arms' steps faster (BENCHMARKS.md 'Which malloc'). A malloc cannot be swapped inside a running process, so
the command line restarts itself under it (:func:`restart_with_tcmalloc`: ``exec`` with ``LD_PRELOAD``) where
it is installed; ``FINETUNE_MALLOC=system`` keeps glibc's, tuned as above.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

from finetune.errors import FinetuneError

logger = logging.getLogger("finetune")

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
_kept = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed blocks instead of unmapping them; True where it took effect."""
    global _kept
    if _kept:
        return True
    libc = glibc()
    if libc is None:
        return False  # musl, macOS, Windows: their allocators differ; left as they are
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    _kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    logger.debug("malloc keeps freed memory (M_MMAP_MAX 0, no heap trimming): %s", _kept)
    return _kept


def glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (whose mallopt this module speaks)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def configure_for(trains_embeddings: bool) -> bool:
    """Keep freed memory where a step allocates a trained embedding's gradient anew; else leave glibc as it is.

    Nothing to do where a malloc replacement serves the process (tcmalloc after :func:`restart_with_tcmalloc`):
    glibc's settings would not reach it.
    """
    if preloaded_malloc() is not None:
        return False
    return keep_freed_memory() if trains_embeddings else False


# ---------------------------------------------------------------------------------------------------------
# tcmalloc: chosen before the process starts, so the command line restarts itself under it
# ---------------------------------------------------------------------------------------------------------

#: FINETUNE_MALLOC=tcmalloc (the default: used where installed) or system (the C library's malloc, tuned above)
MALLOC_ENV = "FINETUNE_MALLOC"
#: set in the restarted process, so that a library that fails to preload never restarts it twice
RESTARTED_ENV = "FINETUNE_MALLOC_RESTARTED"
#: gperftools' library names: libtcmalloc-minimal4 / libgoogle-perftools4 (Debian, Ubuntu), gperftools-libs
#: (Fedora, RHEL), `conda install gperftools` (the environment's lib/)
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
#: malloc replacements recognised in /proc/self/maps (a user's LD_PRELOAD of any of them is kept as it is)
REPLACEMENTS = ("tcmalloc", "jemalloc", "mimalloc")


def preloaded_malloc(maps: str = "/proc/self/maps") -> str | None:
    """The malloc replacement mapped into this process (e.g. ``tcmalloc (/usr/lib/.../libtcmalloc_minimal.so.4)``)."""
    try:
        with open(maps) as handle:
            paths = {line.split()[-1] for line in handle if "/" in line}
    except OSError:
        return None  # not Linux
    for name in REPLACEMENTS:
        found = sorted(path for path in paths if f"lib{name}" in Path(path).name)
        if found:
            return f"{name} ({found[0]})"
    return None


def malloc_in_use() -> str:
    """What serves this process's allocations, as a run records it: a replacement, else the C library's."""
    return preloaded_malloc() or (f"glibc{' (freed memory kept)' if _kept else ''}" if glibc() else "system")


def tcmalloc_library() -> str | None:
    """The installed tcmalloc library, if any: the Python environment's own lib/ first (conda), then the system's."""
    for directory in (str(Path(sys.prefix) / "lib"), *LIBRARY_DIRS):
        for name in TCMALLOC_NAMES:
            if os.path.isfile(os.path.join(directory, name)):
                return os.path.join(directory, name)
    return None


def environment_with_tcmalloc(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to restart this process in so that tcmalloc serves it; None where it should run as it is.

    None: not glibc Linux, ``FINETUNE_MALLOC=system``, already restarted once, a replacement already preloaded
    (the user's choice), or no tcmalloc installed.
    """
    choice = environ.get(MALLOC_ENV, "tcmalloc")
    if choice not in ("tcmalloc", "system"):
        raise FinetuneError(f"{MALLOC_ENV}={choice!r}: use tcmalloc (the default where installed) or system")
    if choice == "system" or glibc() is None or environ.get(RESTARTED_ENV) or preloaded_malloc():
        return None
    if any(name in environ.get("LD_PRELOAD", "") for name in REPLACEMENTS):
        return None
    library = tcmalloc_library()
    if library is None:
        return None
    return {
        **environ,
        "LD_PRELOAD": " ".join(filter(None, (library, environ.get("LD_PRELOAD")))),
        # tcmalloc otherwise prints a line for every allocation above 1 GiB (a large vocabulary's logits)
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**40)),
        RESTARTED_ENV: "1",
    }


def restart_with_tcmalloc() -> None:
    """Replace this process by the same command under tcmalloc, where :func:`environment_with_tcmalloc` says so.

    exec keeps the process id, its open files and its signals' recipients, so a launcher (accelerate, torchrun,
    SLURM) that started it still holds it. Called by the command line before anything heavy is imported.
    """
    environment = environment_with_tcmalloc(os.environ)
    if environment is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
