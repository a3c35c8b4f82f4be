"""The latent KV cache: per layer, c_kv [batch, cache_lens, R] (stored in its format, with group scales)
and k_pe [batch, cache_lens, r], all layers stacked on a leading axis, preallocated once. A model with
DeepSeek Sparse Attention also caches each token's index key k_idx [batch, cache_lens, D] (kv/sparse.py:
bf16/float32, or e4m3 with a per-token scale under a quantized format), laid out like the latents.

The model asks the cache to `write` a layer's new latents and to `attend` (absorbed or naive) over a layer;
the cache knows its format, where it lies (one device or sequence-sharded, kv/layout.py) and which attention
runs over it: its `attention` field holds a backend's AttentionKernel, chosen by the backend door
(ktjax/runtime/backend.py), or None for the XLA path of kv/attention.py, which is also every kernel's reference.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ktjax.kv.attention import mla_decode_xla, mla_prefill_xla, naive_prefill
from ktjax.kv.formats import SCALE_DTYPE, CacheFormat, container, index_scaled, index_store_dtype
from ktjax.kv.layout import CacheLayout, write_rows
from ktjax.kv.quant import quantize, to_bits
from ktjax.kv.sparse import (index_scores, quantize_index_keys, select_topk, select_topk_sharded,
                     selection_mask, sparse_attend_gathered)

# Attention walks the cache in blocks of this many tokens; cache_lens is a multiple of the block.
MAX_KV_BLOCK = 512
MIN_KV_BLOCK = 16


def plan_cache_lens(requested: int, shards: int = 1) -> tuple[int, int]:
    """Round a requested capacity up to what attention needs; returns (cache_lens, kv_block). A cache sharded
    along the sequence over `shards` devices gets an equal whole number of blocks on each device."""
    local = -(-max(int(requested), 1) // shards)
    if local >= MAX_KV_BLOCK:
        block = MAX_KV_BLOCK
    else:
        block = -(-local // MIN_KV_BLOCK) * MIN_KV_BLOCK
    return -(-local // block) * block * shards, block


class AttentionKernel:
    """Attention over a cache by a backend's kernels. A cache's static `attention` field holds one (so it must be
    hashable: a frozen dataclass), or None for the XLA path. The cache calls it only where it lies on one device;
    each method returns the output, or None to decline, and the cache then runs its XLA path."""
    name = "xla"  # the value the settings table declares for it (the setting attention)

    def latent(self, cache, layer, q_lat, q_pe, q_positions, lengths, *, scale: float):
        """LatentCache.attend_latent (a dense cache) -> o_lat [b,s,h,R] float32, or None."""
        return None

    def paged_latent(self, cache, layer, q_lat, q_pe, q_positions, lengths, *, scale: float):
        """PagedLatentCache.attend_latent -> o_lat [b,s,h,R] float32, or None."""
        return None

    def sparse_decode(self, cache, layer, q_lat, q_pe, q_idx, weights, lengths, *, topk: int, scale: float):
        """A decode step's sparse attention (DSA) over a dense cache: q_lat [b,h,R], q_pe [b,h,r], index queries
        q_idx [b,H,D] and weights [b,H] -> o_lat [b,h,R] float32, or None."""
        return None

    def paged_sparse_decode(self, cache, layer, q_lat, q_pe, q_idx, weights, lengths, *, topk: int, scale: float):
        """sparse_decode over a PagedLatentCache (its pages through the page table), or None."""
        return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
    c_kv: jax.Array            # [L, B, T, stored_width]: fmt.store_dtype values, held as container() bits
    scales: jax.Array | None   # [L, B, T, n_groups] float32, quantized formats only
    k_pe: jax.Array            # [L, B, T, r]: fmt.k_pe_dtype values, held as container() bits
    fmt: CacheFormat = dataclasses.field(metadata=dict(static=True))
    rank: int = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(metadata=dict(static=True))        # attention's key block
    attention: AttentionKernel | None = dataclasses.field(metadata=dict(static=True))  # None: the XLA path
    layout: CacheLayout | None = dataclasses.field(default=None, metadata=dict(static=True))  # None: one device
    k_idx: jax.Array | None = None  # [L, B, T, D]: index keys (index_store_dtype bits), models with an indexer
    k_idx_scale: jax.Array | None = None  # [L, B, T, 1] float32, e4m3 index keys only

    @classmethod
    def create(cls, cfg, fmt: CacheFormat, batch: int, cache_lens: int, *, block: int,
               attention: AttentionKernel | None = None, layout: CacheLayout | None = None,
               extra_layers: int = 0) -> "LatentCache":
        """An empty cache of cfg.num_hidden_layers + extra_layers layer slots (extra_layers=1: the slice of the
        multi-token-prediction module, layer num_hidden_layers; model/mtp.py)."""
        lead = (cfg.num_hidden_layers + extra_layers, batch, cache_lens)
        r = cfg.kv_lora_rank
        indexed = getattr(cfg, "has_indexer", False)

        def zeros():
            scales = jnp.ones(lead + (fmt.n_groups(r),), SCALE_DTYPE) if fmt.quantized else None
            k_idx = jnp.zeros(lead + (cfg.index_head_dim,), container(index_store_dtype(fmt))) if indexed else None
            k_idx_scale = jnp.ones(lead + (1,), SCALE_DTYPE) if indexed and index_scaled(fmt) else None
            return (jnp.zeros(lead + (fmt.stored_width(r),), container(fmt.store_dtype)), scales,
                    jnp.zeros(lead + (cfg.qk_rope_head_dim,), container(fmt.k_pe_dtype)), k_idx, k_idx_scale)

        if layout is not None:  # each device allocates its own shard, never the whole cache
            zeros = jax.jit(zeros, out_shardings=layout.sharding)
        c_kv, scales, k_pe, k_idx, k_idx_scale = zeros()
        return cls(c_kv=c_kv, scales=scales, k_pe=k_pe, k_idx=k_idx, k_idx_scale=k_idx_scale, fmt=fmt, rank=r,
                   block=block, attention=attention, layout=layout)

    @property
    def cache_lens(self) -> int:
        return self.c_kv.shape[2]

    @property
    def buffers(self) -> tuple:
        """The latent buffers, what attention reads: (c_kv, scales, k_pe)."""
        return self.c_kv, self.scales, self.k_pe

    @property
    def all_buffers(self) -> tuple:
        """Every buffer, what a write updates: the latents', then the index cache's (None without one)."""
        return self.c_kv, self.scales, self.k_pe, self.k_idx, self.k_idx_scale

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def write(self, layer, positions, c_kv, k_pe, k_idx=None) -> "LatentCache":
        """Store new latents c_kv [b,s,R] / k_pe [b,s,r] (and index keys k_idx [b,s,D] when the cache has an
        index cache) of `layer` at positions [b,s]; positions >= cache_lens (padding) are dropped."""
        q, scales = quantize(self.fmt, c_kv)
        k_q, k_scale = quantize_index_keys(self.fmt, k_idx) if self.k_idx is not None else (None, None)
        new = (to_bits(q), scales, to_bits(k_pe.astype(self.fmt.k_pe_dtype)),
               None if k_q is None else to_bits(k_q), k_scale)
        if self.layout is not None:
            out = self.layout.write(self.all_buffers, layer, positions, new)
        else:
            out = tuple(None if buf is None else write_rows(buf, layer, positions, x)
                        for buf, x in zip(self.all_buffers, new))
        return dataclasses.replace(self, **dict(zip(("c_kv", "scales", "k_pe", "k_idx", "k_idx_scale"), out)))

    def _select(self, index_cache, q_idx, weights, q_positions, lengths, topk, layer=None, axis=None):
        """The top-k of the index cache (one layer's, or the stacks at `layer`) for each query -> (indices,
        valid) [b,s,k]; with `axis`, this device's share of the global top-k of a sequence-sharded cache."""
        scores = index_scores(q_idx, weights, *index_cache, q_positions, lengths, fmt=self.fmt, block=self.block,
                              layer=layer)
        return select_topk(scores, topk) if axis is None else select_topk_sharded(scores, topk, axis)

    def attend_sparse(self, layer, q_lat, q_pe, index_queries, q_positions, lengths, *, scale: float,
                      topk: int, naive_weights=None):
        """Sparse attention (DSA) over `layer`: index_queries (q_idx [b,s,H,D], weights [b,s,H]) select the
        topk best-scored visible tokens per query, then queries attend over those only. Absorbed (q_lat
        [b,s,h,R]) unless naive_weights (w_uk, w_uv) are given (q_lat is then q_nope). -> [b,s,h,R or d_v]
        float32. A decode step gathers the selected rows; a prefill chunk masks the blockwise attention."""
        kw = dict(fmt=self.fmt, scale=scale)
        gathered = q_lat.shape[1] == 1 and naive_weights is None

        if gathered and self.layout is None and self.attention is not None:
            q_idx, w = index_queries
            out = self.attention.sparse_decode(self, layer, q_lat[:, 0], q_pe[:, 0], q_idx[:, 0], w[:, 0], lengths,
                                               topk=topk, scale=scale)
            if out is not None:
                return out[:, None]

        def attend(queries, weights, latent_cache, index_cache, pos, lens, layer_at, axis):
            q_lat, q_pe, q_idx, w = queries
            lse = axis is not None
            indices, valid = self._select(index_cache, q_idx, w, pos, lens, topk, layer_at, axis)
            if gathered:
                out = sparse_attend_gathered(q_lat[:, 0], q_pe[:, 0], *latent_cache, indices[:, 0], valid[:, 0],
                                             with_lse=lse, layer=layer_at, **kw)
                return jax.tree.map(lambda x: x[:, None], out)
            selected = selection_mask(indices, valid, latent_cache[0].shape[-2])
            kw_flash = dict(kw, block=self.block, with_lse=lse, layer=layer_at, selected=selected)
            if naive_weights is not None:
                return naive_prefill(q_lat, q_pe, *latent_cache, pos, lens, *weights, **kw_flash)
            return mla_prefill_xla(q_lat, q_pe, *latent_cache, pos, lens, **kw_flash)

        queries = (q_lat, q_pe, *index_queries)
        weights = () if naive_weights is None else tuple(naive_weights)
        if self.layout is not None:
            def partial(queries, weights, layer_cache, pos, lens):
                return attend(queries, weights, layer_cache[:3], layer_cache[3:], pos, lens, None,
                              self.layout.seq_axis)
            return self.layout.attend(partial, queries, weights, self.all_buffers, layer, q_positions, lengths)
        return attend(queries, weights, self.buffers, (self.k_idx, self.k_idx_scale), q_positions, lengths, layer,
                      None)

    def attend_latent(self, layer, q_lat, q_pe, q_positions, lengths, *, scale: float):
        """Absorbed attention of q_lat [b,s,h,R] / q_pe [b,s,h,r] at q_positions [b,s] over `layer`'s keys
        [0, lengths[b]) (the cache already holds the queries' own latents) -> o_lat [b,s,h,R] float32."""
        kw = dict(fmt=self.fmt, scale=scale, block=self.block)
        if self.layout is not None:
            def partial(queries, _, layer_cache, pos, lens):
                return mla_prefill_xla(*queries, *layer_cache, pos, lens, with_lse=True, **kw)
            return self.layout.attend(partial, (q_lat, q_pe), (), self.buffers, layer, q_positions, lengths)
        if self.attention is not None:
            out = self.attention.latent(self, layer, q_lat, q_pe, q_positions, lengths, scale=scale)
            if out is not None:
                return out
        return mla_prefill_xla(q_lat, q_pe, *self.buffers, q_positions, lengths, layer=layer, **kw)

    def attend_naive(self, layer, q_nope, q_pe, w_uk, w_uv, q_positions, lengths, *, scale: float):
        """Naive attention over `layer`: each key block expanded to per-head K and V by w_uk/w_uv and dropped
        after use -> o [b,s,h,d_v] float32. Always the XLA path."""
        kw = dict(fmt=self.fmt, scale=scale, block=self.block)
        if self.layout is not None:
            def partial(queries, weights, layer_cache, pos, lens):
                return naive_prefill(*queries, *layer_cache, pos, lens, *weights, with_lse=True, **kw)
            return self.layout.attend(partial, (q_nope, q_pe), (w_uk, w_uv), self.buffers, layer, q_positions,
                                      lengths)
        return naive_prefill(q_nope, q_pe, *self.buffers, q_positions, lengths, w_uk, w_uv, layer=layer, **kw)

    def layer(self, layer):
        """(c_kv, scales, k_pe) of one layer: [b, T, ...] each."""
        def take(x):
            return None if x is None else jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
        return take(self.c_kv), take(self.scales), take(self.k_pe)


def cache_bytes(cfg, fmt: CacheFormat, batch: int, cache_lens: int, extra_layers: int = 0) -> int:
    per_layer = fmt.bytes_per_token(cfg) // cfg.num_hidden_layers
    return batch * cache_lens * per_layer * (cfg.num_hidden_layers + extra_layers)
