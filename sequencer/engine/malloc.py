"""Keep freed heap memory mapped while training on CPU (glibc's ``mallopt``).

By default glibc serves allocations above a moving threshold (at most 32 MiB) with fresh ``mmap`` regions
and hands freed memory at the top of its heap back to the system. A training step allocates and frees
the same large activations every step, so each step then takes its memory from the kernel again: tens of
thousands of page faults (zeroed pages) per Sequencer2D-S step at batch 8 on CPU, about 5% of its time.
Fixing the mmap threshold at its ceiling and raising the trim threshold keeps those blocks in the heap,
reused without faults; the process's resident size stays near its peak, which a training step reaches
every step anyway. Blocks above 32 MiB are still mapped and unmapped each time.

``sequencer train`` calls ``keep_freed_memory()`` on CPU (``--no-malloc-tuning`` turns it off);
``sequencer benchmark --malloc-tuning`` measures with it. Other C libraries and systems: no effect.
"""
import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
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
    """Set glibc's mmap threshold to its ceiling and its trim threshold to 1 GiB for this process; returns
    whether both settings took effect (False on other C libraries and systems)."""
    libc = _glibc()
    if libc is None:
        return False
    return (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
