"""Where the kernels run: compiled through Triton on an NVIDIA GPU, interpreted elsewhere (with a notice)."""
from __future__ import annotations

import functools
import os
import warnings

import jax

# Triton's e4m3 conversion needs compute capability 8.9 (Ada) or newer; older cards decode the bits by hand.
FP8_NATIVE_MIN_CAPABILITY = (8, 9)


class InterpretModeWarning(UserWarning):
    """The Pallas kernels run in interpret mode: correct, but far slower than the XLA path."""


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


@functools.cache
def warn_interpreted_once() -> None:
    # functools.cache makes this a once-per-process notice.
    warnings.warn("ktjax: no GPU, the Pallas attention kernels run in interpret mode (slow; for checking only)",
                  InterpretModeWarning, stacklevel=3)


def resolve_interpret(interpret: bool | None) -> bool:
    """None means: compiled on a GPU, interpreted anywhere else."""
    if interpret is None:
        interpret = not on_gpu()
    if interpret:
        warn_interpreted_once()
    return interpret


def compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first GPU, or None without one."""
    if not on_gpu():
        return None
    cap = getattr(jax.devices()[0], "compute_capability", None)
    if cap is None:
        return None
    try:
        major, minor = str(cap).split(".")[:2]
        return int(major), int(minor)
    except ValueError:  # not an NVIDIA capability (ROCm reports a gfx name)
        return None


def fp8_needs_bit_decode(interpret: bool) -> bool:
    """True on GPUs older than Ada, whose Triton has no e4m3 conversion."""
    cap = None if interpret else compute_capability()
    return cap is not None and cap < FP8_NATIVE_MIN_CAPABILITY


# The wide decode tiles (kernel_config) take ~200 KB of shared memory with two stages: Hopper (9.0) gives a program
# up to 227 KB, an A100 163 KB, RTX 30xx / 40xx 99 KB.
WIDE_TILES_MIN_CAPABILITY = (9, 0)


def wide_tiles() -> bool:
    """Whether the GPU's shared memory holds kernel_config's wide tiles (64 rows x 64 keys of bf16)."""
    cap = compute_capability()
    return cap is not None and cap >= WIDE_TILES_MIN_CAPABILITY


# Set to 1 to run the Mosaic GPU decode kernel (mosaic.py) for decode steps over a bf16 dense cache on Hopper and
# later (backend.py). Off by default until a GPU run has compiled and timed it (gpu_check.py runs its tests
# compiled). Read here, so that the Pallas backend imports Mosaic GPU only when it is asked for.
MOSAIC_ENV = "KTJAX_MOSAIC"


def mosaic_requested() -> bool:
    return os.environ.get(MOSAIC_ENV) == "1"


def core_count() -> int:
    """Streaming multiprocessors on a GPU (for sizing the grid); 1 elsewhere, where the grid runs in sequence."""
    if not on_gpu():
        return 1
    return int(getattr(jax.devices()[0], "core_count", 0) or 108)
