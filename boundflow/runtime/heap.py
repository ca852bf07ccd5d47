"""Freed heap memory kept for reuse (glibc).

Bound passes allocate and free tensors of 0.1-30 MB at a high rate. glibc serves a request
above its mmap threshold (128 KiB at start, raised adaptively up to 32 MiB as such blocks are
freed) with a fresh mmap, which page-faults on first touch and is unmapped again on free, and
it hands the top of the heap back to the system past its trim threshold. How fast a process
runs then depends on where those adaptive thresholds happen to be: CROWN on cifar_base_kw took
12-20 ms depending on the process, resnet_2b 121 ms with the thresholds fixed high and 157-166
ms without. `keep_freed_memory` fixes them high once per process, so such tensors come from
the heap and go back to it; the cost is that the process keeps its peak heap instead of giving
it back. Set BOUNDFLOW_KEEP_HEAP=0 (or glibc's own MALLOC_MMAP_THRESHOLD_ or
MALLOC_TRIM_THRESHOLD_) to leave malloc alone; other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20                        # glibc's largest on 64-bit systems
TRIM_THRESHOLD = 256 << 20


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError):                # no such name: not glibc
        return False


@functools.cache
def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds high, once per process; True when it did."""
    if os.environ.get("BOUNDFLOW_KEEP_HEAP", "1") == "0" or not _glibc():
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False                             # the user tuned malloc already
    libc = ctypes.CDLL(None)                     # the C library this process runs on
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
