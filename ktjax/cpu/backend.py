"""ktjax's C++ CPU kernels as a backend of the door (ktjax/runtime/backend.py): what the door asks of them.

They run on one CPU device (a custom call is not partitioned over a mesh), once built (build.py): the matmuls
over the weights they hold (weights.py) and a decode step's attention (attention.py).
"""
from __future__ import annotations

import numpy as np

from ktjax.cpu import build
from ktjax.cpu.attention import ATTENTION, CpuAttention
from ktjax.cpu.weights import held_counts, hold_for_kernels
from ktjax.model.decoder import matmul_weight_dtypes

__all__ = ["ATTENTION", "attention_kernel", "held_counts", "hold", "integer_products_fast", "reads", "require",
           "unavailable"]

KERNEL_DTYPES = {np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.float32)}


def unavailable() -> str | None:
    """None where the kernels build and register, else why not (one line)."""
    return build.available()


def require():
    """Build and register the kernels now, or raise KtjaxError with the reason."""
    build.require()


def integer_products_fast() -> bool:
    return build.integer_products_fast()


def reads(state) -> bool:
    """Whether any matmul weight of a model state is of a format the kernels read: int8, int4 or float32."""
    return bool(matmul_weight_dtypes(state) & KERNEL_DTYPES)


def hold(state, consume: bool, *, int8_activations: bool):
    """The weights held for the kernels (weights.hold_for_kernels)."""
    return hold_for_kernels(state, consume=consume, int8_activations=int8_activations)


def attention_kernel(page_size: int | None = None) -> CpuAttention:
    """The decode kernel reads any page size, and a dense cache."""
    return ATTENTION
