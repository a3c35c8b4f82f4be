"""A decode step's absorbed attention in ktjax's C++ kernel (csrc/attention.cc), as the caches' AttentionKernel.

It takes decode steps (one query per sequence) over a dense or paged cache of every format, and declines the rest
(prefill chunks, sparse attention), which run the caches' XLA path.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ktjax.cpu import kernels
from ktjax.kv.cache import AttentionKernel


@dataclasses.dataclass(frozen=True)
class CpuAttention(AttentionKernel):
    name = "cpu"

    def latent(self, cache, layer, q_lat, q_pe, q_positions, lengths, *, scale: float):
        if q_lat.shape[1] != 1:
            return None
        table = jnp.arange(q_lat.shape[0], dtype=jnp.int32)[:, None]  # [L, B, T, ...] is B pages of T slots
        return decode(q_lat, q_pe, cache, table, layer, q_positions, lengths, scale)

    def paged_latent(self, cache, layer, q_lat, q_pe, q_positions, lengths, *, scale: float):
        if q_lat.shape[1] != 1:
            return None
        return decode(q_lat, q_pe, cache, cache.page_table, layer, q_positions, lengths, scale)


def decode(q_lat, q_pe, cache, page_table, layer, q_positions, lengths, scale: float):
    """One query per sequence (q_lat [b,1,h,R], q_pe [b,1,h,r]) over a page pool through `page_table` with the
    C++ kernel -> o_lat [b,1,h,R] float32; the keys it sees are the XLA path's (t < lengths, t <= position)."""
    visible = jnp.clip(jnp.minimum(lengths, q_positions[:, 0] + 1), 0, page_table.shape[1] * cache.c_kv.shape[2])
    out = kernels.decode_attention(q_lat[:, 0], q_pe[:, 0], cache.c_kv, cache.scales, cache.k_pe, page_table, layer,
                                   visible, fmt=cache.fmt, scale=scale)
    return out[:, None]


ATTENTION = CpuAttention()
