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

The update is the other way round: its activations are many blocks of 1-30 MiB, allocated and freed
per micro-batch, and serving each from a fresh mmap made the kernel zero their pages every time (the
update of SmolLM2-135M over 16 rows took 7.2-7.6 s at a 1 MiB threshold, 4.6-5.1 s at glibc's own
ceiling of 32 MiB: bench/results/real-model-cpu.md). With `train.update_mmap_threshold_mib=32`,
`update_heap` raises the threshold for the update, so those blocks come from the heap and are reused
(a higher peak: freed blocks stay resident until the update ends), then trims the heap and restores
the threshold for the next generation. Off by default: the lean peak is what the default keeps.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

__all__ = ["set_mmap_threshold", "update_heap"]
UPDATE_MMAP_MIB = 32  # glibc's own maximum for its adaptive threshold (64-bit)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@contextlib.contextmanager
def update_heap(mib: float, update_mib: float):
    """The update's blocks below `update_mib` (train.update_mmap_threshold_mib, e.g. UPDATE_MMAP_MIB)
    from the heap; afterwards the heap's free memory goes back to the OS (`malloc_trim`) and the
    threshold back to `mib`. Nothing when either is 0 (the threshold stays as it is) or off glibc."""
    if mib <= 0 or update_mib <= 0 or update_mib == mib or not set_mmap_threshold(update_mib):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError):
            _libc().malloc_trim(0)
        set_mmap_threshold(mib)


def set_mmap_threshold(mib: float) -> bool:
    """Serve (and return to the OS) every allocation of at least `mib` MiB through mmap; True when the
    allocator took it (glibc), False where there is no glibc or `mib` <= 0 (glibc's default kept)."""
    if mib <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = _libc()
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(mib * 2**20)))
