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
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False  # musl, macOS, Windows: their allocators differ; left as they are
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
    logger.debug("malloc keeps freed memory (M_MMAP_MAX 0, no heap trimming): %s", _kept)
    return _kept
