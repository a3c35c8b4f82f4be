"""A decode step's absorbed attention in ktjax's C++ kernel (csrc/attention.cc), as the caches' AttentionKernel.

It takes decode steps and up to MAX_QUERIES queries per sequence at consecutive positions (speculative decoding's
verify pass, short prefill tails) over a dense or paged cache of every format, reading each sequence's keys once for
all its queries, and declines the rest (longer prefill chunks, sparse attention), which run the caches' XLA path.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ktjax.cpu import kernels
from ktjax.kv.cache import AttentionKernel

# Queries per sequence the kernel takes: a verify pass of up to 3 drafts (each query costs the kernel a pass of
# scores and sums over the keys it reads once; longer chunks run XLA's blockwise prefill, which has no mask
# over the prefix).
MAX_QUERIES = 4


@dataclasses.dataclass(frozen=True)
class CpuAttention(AttentionKernel):
    name = "cpu"

    def latent(self, cache, layer, q_lat, q_pe, q_positions, lengths, *, scale: float):
        if q_lat.shape[1] > MAX_QUERIES:
            return None
        # a dense cache: sequence b's one page is page b
        table = jnp.arange(q_lat.shape[0], dtype=jnp.int32)[:, None] if cache.dense else cache.page_table
        return decode(q_lat, q_pe, cache, table, layer, q_positions, lengths, scale)


def decode(q_lat, q_pe, cache, page_table, layer, q_positions, lengths, scale: float):
    """s queries per sequence (q_lat [b,s,h,R], q_pe [b,s,h,r] at q_positions [b,s]) over a page pool through
    `page_table` with the C++ kernel -> o_lat [b,s,h,R] float32; the keys query j sees are the XLA path's
    (t < lengths, t <= its position)."""
    visible = jnp.clip(jnp.minimum(lengths[:, None], q_positions + 1), 0, page_table.shape[1] * cache.c_kv.shape[2])
    return kernels.decode_attention(q_lat, q_pe, cache.c_kv, cache.scales, cache.k_pe, page_table, layer, visible,
                                    fmt=cache.fmt, scale=scale)


ATTENTION = CpuAttention()
