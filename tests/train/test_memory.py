"""forkrl.training.memory: with the mmap threshold fixed, a freed large block leaves the resident set.

glibc's adaptive threshold is the cause reproduced here: once a 16 MiB mmapped block is freed the
threshold rises to 16 MiB, the next such block comes from the heap and, freed, stays resident (the
heap is only trimmed past twice the threshold). That is how generation at Qwen3's vocabulary grew
from 1,052 to 3,909 MiB (bench/real_shapes.py's per-stage peaks). Each case runs in a fresh interpreter so that no earlier
allocation has moved the threshold.
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

CHILD = r"""
import ctypes, sys
from forkrl.training.memory import set_mmap_threshold

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))

if sys.argv[1] == "fixed" and not set_mmap_threshold(1):
    print("no-glibc"); sys.exit(0)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 16 * 2**20
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)  # mmapped; glibc now raises its threshold
before = rss_kib()
q = libc.malloc(n); ctypes.memset(q, 1, n); libc.free(q)  # heap (adaptive) or mmapped (fixed)
print(rss_kib() - before)
"""


def _kept_kib(mode: str) -> int | None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    ).stdout
    return None if out.strip() == "no-glibc" else int(out)


def test_a_fixed_threshold_returns_a_freed_block_and_the_adaptive_default_keeps_it():
    fixed = _kept_kib("fixed")
    if fixed is None:
        pytest.skip("no glibc mallopt here")
    assert fixed < 2 * 1024  # the 16 MiB block went back to the OS
    assert _kept_kib("default") > 12 * 1024  # glibc's default kept it resident: what the setting fixes


def test_zero_keeps_glibcs_default():
    from forkrl.training.memory import set_mmap_threshold

    assert set_mmap_threshold(0) is False


def test_update_heap_raises_the_threshold_for_the_update_only_when_asked(monkeypatch):
    import forkrl.training.memory as memory

    calls = []
    monkeypatch.setattr(memory, "set_mmap_threshold", lambda mib: calls.append(mib) or True)
    with memory.update_heap(1.0, 0.0):  # the default: the lean threshold stays
        pass
    assert calls == []
    with memory.update_heap(1.0, 32.0):
        assert calls == [32.0]
    assert calls == [32.0, 1.0]  # restored for the next generation
    calls.clear()
    try:
        with memory.update_heap(1.0, 32.0):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert calls == [32.0, 1.0]
