"""Process-level memory settings of the ``medreg`` command line."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Freed blocks up to this size stay in the heap for reuse (glibc's largest allowed threshold).
MMAP_THRESHOLD = 32 * 2 ** 20

#: Free memory at the top of the heap is returned to the system only above this.
TRIM_THRESHOLD = 1 << 30


def reuse_freed_memory() -> bool:
    """Let glibc keep and reuse freed blocks of up to 32 MB instead of unmapping them.

    A registration allocates and frees tensors of the same image and field sizes at every
    iteration. With glibc's defaults each block above 128 kB is a fresh ``mmap`` until malloc's
    dynamic threshold has adapted, and each fresh mapping's pages are faulted in and zeroed again
    by the kernel: a whole first registration in a process (what every command runs) was ~15 %
    slower than a second one (vxm `fast`, benchmarks/RESULTS.md). Returns whether the settings
    were applied: not on other C libraries or systems, nor when the user set glibc's own
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (their choice wins).
    """
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
