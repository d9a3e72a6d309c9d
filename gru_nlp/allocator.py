"""Keep glibc from returning large freed buffers to the OS between training steps.

A training step allocates and frees the same large activation buffers every time. By
default glibc serves each allocation above 128 KiB with a fresh ``mmap`` and unmaps it on
free, so every step pays the page faults of touching hundreds of MB of new memory again
(measured here: the fused GRU faulted 200-256 MB per step, 0.14-0.24 s of system time).
With ``mmap`` off for the heap and trimming disabled, freed buffers are reused in place.
The cost is that memory freed at the peak is kept by the process instead of returned.

This is a process-wide setting, so only the training entry points (the ``gru-nlp`` fit /
validate / test / predict commands and the scripts) call it, never library imports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Turn off mmap-backed allocations and heap trimming in glibc; True if it took effect.

    A no-op (returning False) on systems without glibc's ``mallopt`` (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt returns 1 on success.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
