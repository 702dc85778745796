"""Process memory: glibc's allocator returns large freed blocks to the OS (`train.mmap_threshold_mib`).

glibc serves a request of at least `M_MMAP_THRESHOLD` bytes (128 KiB at start) with its own `mmap`
and unmaps it on free; but after such a block is freed the threshold rises to its size (up to 32
MiB), so later blocks of that size come from the heap, and with several threads allocating, heap
holes the next tensors do not fit pile up. A decode step at Qwen3's vocabulary allocates a few
(rows, 151,936) float32 tensors (about 10 MiB at 16 rows); over 512 steps the process's resident set
grew from 1,052 to 3,909 MiB in one 16-row generation, and a whole RL step's peak was 8,872 MiB
instead of 3,287 (bench/real_shapes.py, which found it). Fixing the threshold (`mallopt(M_MMAP_THRESHOLD, n)`, which
also stops its adjustment) keeps every block from `n` bytes mmapped: freed at once, peak memory follows
what is live. No effect, and no error, off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["set_mmap_threshold"]

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def set_mmap_threshold(mib: float) -> bool:
    """Serve (and return to the OS) every allocation of at least `mib` MiB through mmap; True when the
    allocator took it (glibc), False where there is no glibc or `mib` <= 0 (glibc's default kept)."""
    if mib <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(mib * 2**20)))
