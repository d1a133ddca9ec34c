"""Process-wide compute settings of a learner: torch threads and how freed memory is kept.

Why keep freed memory: glibc hands large freed blocks straight back to the kernel (everything over
its mmap threshold, which tops out at 32 MB, and the heap top beyond the trim threshold) and maps
them afresh on the next allocation, zero-filled page by page on first touch. A Dreamer update
frees and reallocates the same activations every time, so on CPU much of it went to page faults
(2 cores, 64x64 pixels, 2024 recipe: size1m 5.3 -> 2.8 s and size12m 32 -> 14 s per update).
With `dreamer.keep_heap` every allocation comes from the heap and nothing is trimmed: the second
update on reuses the first one's pages. The price: the process's resident memory stays at its peak.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from core.config.agent import DreamerConfig

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TOP_PAD = 256 << 20  # grow the heap in 256 MB steps: fewer brk calls while the first update runs

_kept = False


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (no mmap'd blocks, no trimming), once per process.

    Returns whether it is in effect: False off Linux or on a C library without `mallopt` (musl).
    """
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # A trim threshold of -1 is SIZE_MAX inside glibc: the heap top is never handed back.
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, TOP_PAD))
    _kept = all(mallopt(param, value) == 1 for param, value in settings)
    return _kept


def configure_compute(cfg: DreamerConfig) -> None:
    """Apply `dreamer.threads` and `dreamer.keep_heap` to this process (a learner's, not a robot's)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.keep_heap:
        keep_freed_memory()
