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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

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
    """Keep freed memory where a step allocates a trained embedding's gradient anew; else leave glibc as it is."""
    return keep_freed_memory() if trains_embeddings else False
