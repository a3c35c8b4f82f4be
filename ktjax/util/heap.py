"""Freed host memory handed back to the OS while the weights are converted.

On a CPU, XLA's buffers come from the C allocator. Converting a model's weights (per-layer splits, kernel
layouts) frees thousands of 1-100 MB buffers while allocating their replacements from other threads, hence
other malloc arenas: glibc keeps the freed pages and the process stays that much larger (V2-Lite at full size:
16.4 GB resident for 9.4 GB of weights after the kernel layouts, 10.1 GB after malloc_trim; docs/results.md,
"Memory at real size"). release_freed_memory() returns them; elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


RELEASE_EVERY = 256 * 2**20  # freed bytes between two releases while converting: the most the peak carries
_freed = [0]


def release_freed_memory() -> bool:
    """Give the pages of freed heap memory back to the OS (glibc's malloc_trim) -> whether it could."""
    _freed[0] = 0
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def freed(nbytes: int):
    """Note nbytes freed while converting; every RELEASE_EVERY bytes, release them (a trim costs about a second per
    6 GB released, little more per call)."""
    _freed[0] += nbytes
    if _freed[0] >= RELEASE_EVERY:
        release_freed_memory()
