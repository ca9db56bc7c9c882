"""Keep freed heap memory for the next step while training on CPU (glibc's ``mallopt``).

By default glibc serves allocations above a moving threshold (at most 32 MiB) with fresh ``mmap`` regions
and hands freed memory at the top of its heap back to the system. A training step allocates and frees
the same large activations every step, so each step then takes its memory from the kernel again: hundreds of
thousands of page faults (zeroed pages) per step. ``keep_freed_memory`` serves every block from the heap (no
``mmap``, blocks above 32 MiB included) and raises the trim threshold, so that freed blocks stay in the heap
and are reused without faults. The process's resident size stays near its peak, which a training step reaches
every step anyway; memory freed in the middle of the heap is reused by the process rather than returned to
the system.

Measured on a 2-core Xeon (``benchmarks/malloc_cost.py``, Sequencer2D-S training, float32, medians per step):
timm's model at batch 8 went from 523,000 faults and 3.58 s to 4,600 faults and 2.88 s; ours at batch 32 from
573,000 faults (1.6 s of kernel time) and 8.82 s to 5 faults (0.3 s) and 8.54 s. Fixing only the mmap
threshold (the previous setting) left the faults of blocks above 32 MiB (278,000 per step at batch 32) for
about the same step time on this machine.

``sequencer train`` calls ``keep_freed_memory()`` on CPU (``--no-malloc-tuning`` turns it off);
``sequencer benchmark --malloc-tuning`` measures with it. Other C libraries and systems: no effect.
"""
import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024   # glibc's ceiling on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def _glibc():
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.gnu_get_libc_version   # glibc only: other C libraries treat mallopt differently or not at all
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Serve every allocation of this process from glibc's heap (no ``mmap``; the mmap threshold at its ceiling
    for what glibc still maps itself) and set the trim threshold to 1 GiB; returns whether the settings took
    effect (False on other C libraries and systems)."""
    libc = _glibc()
    if libc is None:
        return False
    return (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
            and libc.mallopt(M_MMAP_MAX, 0) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
