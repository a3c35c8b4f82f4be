"""The Pallas kernels as a backend of the door (ktjax/runtime/backend.py): the caches' AttentionKernel.

Absorbed attention over a dense cache (decode steps and prefill chunks: mla_kernels.py), over a page pool
(paged.py) and a decode step's sparse attention over a dense cache (sparse_kernels.py); the naive form and a
sequence-sharded cache stay on the XLA path. Those are Pallas Triton kernels; on Hopper and later a decode step
over a bf16 dense cache runs the Mosaic GPU kernel (mosaic.py) instead where $KTJAX_MOSAIC=1 (until a GPU run
has measured it).
"""
from __future__ import annotations

import dataclasses

import jax

from ktjax.kv.cache import AttentionKernel
from ktjax.kv.quant import from_bits
from ktjax.kv.sparse import select_topk
from ktjax.pallas import platform
from ktjax.pallas.mla_kernels import mla_decode, mla_prefill
from ktjax.pallas.paged import kernel_fits, paged_attention
from ktjax.pallas.sparse_kernels import index_scores_decode, sparse_decode


@dataclasses.dataclass(frozen=True)
class PallasAttention(AttentionKernel):
    name = "pallas"

    def latent(self, cache, layer, q_lat, q_pe, q_positions, lengths, *, scale: float):
        if not cache.dense:
            return paged_attention(q_lat, q_pe, cache, layer, q_positions, lengths, scale=scale)
        c_kv, scales, k_pe = _layer_values(cache, layer)
        kw = dict(fmt=cache.fmt, scale=scale, block=cache.block)
        if q_lat.shape[1] == 1 and platform.mosaic_requested():
            from ktjax.pallas import mosaic  # Mosaic GPU is imported only where it is asked for
            if mosaic.chosen(cache.fmt.name):
                return mosaic.mla_decode_mosaic(q_lat[:, 0], q_pe[:, 0], c_kv, k_pe, lengths, scale=scale)[:, None]
        if q_lat.shape[1] == 1:
            return mla_decode(q_lat[:, 0], q_pe[:, 0], c_kv, scales, k_pe, lengths, **kw)[:, None]
        return mla_prefill(q_lat, q_pe, c_kv, scales, k_pe, q_positions, lengths, **kw)

    def sparse_decode(self, cache, layer, q_lat, q_pe, q_idx, weights, lengths, *, topk: int, scale: float):
        """Index scores in the kernel, XLA's top-k, then attention over the gathered rows in the kernel (a dense
        cache; a page pool's sparse decode runs the XLA path)."""
        if not cache.dense:
            return None
        k_idx, k_scale = (None if x is None else jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
                          for x in (cache.k_idx, cache.k_idx_scale))
        scores = index_scores_decode(q_idx, weights, k_idx, k_scale, lengths, fmt=cache.fmt)
        indices, valid = select_topk(scores, topk)
        c_kv, scales, k_pe = _layer_values(cache, layer)
        return sparse_decode(q_lat, q_pe, c_kv, scales, k_pe, indices, valid, fmt=cache.fmt, scale=scale)


def _layer_values(cache, layer):
    """One layer of a dense cache as the kernels read it: (c_kv, scales, k_pe), the latents as their values."""
    c_kv, scales, k_pe = cache.layer(layer)
    return from_bits(c_kv, cache.fmt.store_dtype), scales, from_bits(k_pe, cache.fmt.k_pe_dtype)


ATTENTION = PallasAttention()


def attention_kernel(page_size: int | None = None) -> PallasAttention | None:
    """The kernel for a dense cache (page_size None) or pages of page_size; None where the kernel cannot tile
    the pages (a power of two >= 16)."""
    return ATTENTION if page_size is None or kernel_fits(page_size) else None
