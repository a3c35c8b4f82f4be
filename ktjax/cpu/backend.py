"""ktjax's C++ CPU kernels as a backend of the door (ktjax/runtime/backend.py): what the door asks of them.

They run on one CPU device (a custom call is not partitioned over a mesh), once built (build.py): the matmuls
over the weights they hold (weights.py), a decode step's attention (attention.py) and, under experts: host, the
routed experts from the host expert store (host_experts.py).
"""
from __future__ import annotations

import numpy as np

from ktjax.cpu import build
from ktjax.cpu.attention import ATTENTION, CpuAttention
from ktjax.cpu.host_experts import (HostExpertStore, LoaderFill, keep_on_device, most_routed, store_experts,
                                    store_of)
from ktjax.cpu.weights import held_counts, hold_for_kernels
from ktjax.model.decoder import matmul_weight_dtypes

__all__ = ["ATTENTION", "HostExpertStore", "bridge_flags", "LoaderFill", "attention_kernel", "held_counts", "hold",
           "integer_products_fast", "keep_on_device", "most_routed", "reads", "require", "store_experts", "store_of",
           "unavailable"]

KERNEL_DTYPES = {np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.float32)}


def unavailable() -> str | None:
    """None where the kernels build and register, else why not (one line)."""
    return build.available()


def require():
    """Build and register the kernels now, or raise KtjaxError with the reason."""
    build.require()


def bridge_flags() -> tuple:
    """The GPU bridge's build flags (build.py): empty where it is not built (no GPU, or no CUDA runtime)."""
    return build.bridge_flags()


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
