"""The paged latent cache: one pool of fixed-size pages per layer stack, and a page table per sequence.

Pools are c_kv [L, n_pages, page_size, W] (stored in the cache format, with group scales) and k_pe
[L, n_pages, page_size, r], like LatentCache's [L, B, T, ...] with (B, T) replaced by (page, slot). Sequence b's
position p lives in page page_table[b, p // page_size] at slot p % page_size, so sequences of any lengths
share one pool and a page full of a common prefix can be shared between sequences (ktjax/serve/pages.py
decides which page goes where). The page table is a traced field: one compiled program serves every
assignment of pages, and its width (pages per sequence) bounds what attention reads.

A model with DeepSeek Sparse Attention (V3.2) also keeps each token's index key in pools k_idx [L, n_pages,
page_size, D] (and k_idx_scale [.., 1] for e4m3 keys), laid out like the latents, so a page shared through the
prefix cache shares its index keys too.

PagedLatentCache has LatentCache's methods (write, attend_latent, attend_naive, attend_sparse), so the model
runs over it unchanged. Attention walks each sequence's pages in key blocks of whole pages (gathered per block,
never the whole prefix at once) with kv/attention.py's online softmax, or a backend's kernel that reads the page table
(the cache's `attention`, an AttentionKernel: kv/cache.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ktjax.errors import KtjaxError
from ktjax.kv.attention import mla_prefill_xla, naive_prefill, tail_block
from ktjax.kv.cache import MAX_KV_BLOCK, AttentionKernel
from ktjax.kv.formats import SCALE_DTYPE, CacheFormat, container, index_scaled, index_store_dtype
from ktjax.kv.layout import CacheLayout, merge_partials
from ktjax.kv.quant import quantize, to_bits
from ktjax.kv.sparse import (index_scores, quantize_index_keys, select_topk, selection_mask,
                             sparse_attend_gathered)

DEFAULT_PAGE_SIZE = 64


def pages_per_block(page_size: int, table_width: int) -> int:
    """Pages gathered per attention key block: up to MAX_KV_BLOCK tokens, dividing the table width."""
    k = max(1, MAX_KV_BLOCK // page_size)
    while table_width % k:
        k //= 2
    return max(k, 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedLatentCache:
    c_kv: jax.Array            # [L, n_pages, page_size, stored_width]: container() bits of fmt.store_dtype
    scales: jax.Array | None   # [L, n_pages, page_size, n_groups] float32, quantized formats only
    k_pe: jax.Array            # [L, n_pages, page_size, r]
    page_table: jax.Array      # [B, max_pages] int32: page of each sequence's p // page_size-th page
    fmt: CacheFormat = dataclasses.field(metadata=dict(static=True))
    rank: int = dataclasses.field(metadata=dict(static=True))
    attention: AttentionKernel | None = dataclasses.field(metadata=dict(static=True))  # None: the XLA path
    # None: one device. Else the pool's pages are split over layout.seq_axis (device k holds pages
    # [k n_pages/N, (k+1) n_pages/N)), everything else replicated; attention merges the devices' partials.
    layout: CacheLayout | None = dataclasses.field(default=None, metadata=dict(static=True))
    k_idx: jax.Array | None = None        # [L, n_pages, page_size, D]: index keys, models with an indexer
    k_idx_scale: jax.Array | None = None  # [L, n_pages, page_size, 1] float32, e4m3 index keys only

    @classmethod
    def create(cls, cfg, fmt: CacheFormat, n_pages: int, page_size: int = DEFAULT_PAGE_SIZE, *,
               batch: int = 1, max_pages: int = 1, attention: AttentionKernel | None = None,
               layout: CacheLayout | None = None, extra_layers: int = 0) -> "PagedLatentCache":
        """Pools of cfg.num_hidden_layers + extra_layers layer slots (extra_layers=1: the multi-token-prediction
        module's, layer num_hidden_layers)."""
        lead = (cfg.num_hidden_layers + extra_layers, n_pages, page_size)
        r = cfg.kv_lora_rank
        indexed = getattr(cfg, "has_indexer", False)
        if layout is not None and layout.seq_axis is None:
            layout = None
        if layout is not None and n_pages % layout.mesh.shape[layout.seq_axis]:
            raise KtjaxError(f"{n_pages} pages do not split evenly over the {layout.mesh.shape[layout.seq_axis]} "
                             f"devices of mesh axis '{layout.seq_axis}'")

        def zeros():
            scales = jnp.ones(lead + (fmt.n_groups(r),), SCALE_DTYPE) if fmt.quantized else None
            k_idx = jnp.zeros(lead + (cfg.index_head_dim,), container(index_store_dtype(fmt))) if indexed else None
            k_idx_scale = jnp.ones(lead + (1,), SCALE_DTYPE) if indexed and index_scaled(fmt) else None
            return (jnp.zeros(lead + (fmt.stored_width(r),), container(fmt.store_dtype)), scales,
                    jnp.zeros(lead + (cfg.qk_rope_head_dim,), container(fmt.k_pe_dtype)), k_idx, k_idx_scale)

        if layout is not None:  # each device allocates its own pages, never the whole pool
            zeros = jax.jit(zeros, out_shardings=NamedSharding(layout.mesh, pool_spec(layout)))
        c_kv, scales, k_pe, k_idx, k_idx_scale = zeros()
        return cls(c_kv=c_kv, scales=scales, k_pe=k_pe, page_table=jnp.zeros((batch, max_pages), jnp.int32),
                   fmt=fmt, rank=r, attention=attention, layout=layout, k_idx=k_idx, k_idx_scale=k_idx_scale)

    @property
    def n_pages(self) -> int:
        return self.c_kv.shape[1]

    @property
    def page_size(self) -> int:
        return self.c_kv.shape[2]

    @property
    def cache_lens(self) -> int:
        """Positions one sequence can address through its page table (padding positions are >= this)."""
        return self.page_table.shape[1] * self.page_size

    @property
    def buffers(self) -> tuple:
        return self.c_kv, self.scales, self.k_pe

    @property
    def all_buffers(self) -> tuple:
        """Every pool, what a write updates: the latents', then the index keys' (None without an indexer)."""
        return self.c_kv, self.scales, self.k_pe, self.k_idx, self.k_idx_scale

    @property
    def pool_bytes(self) -> int:
        return sum(x.nbytes for x in self.all_buffers if x is not None)

    def with_table(self, page_table) -> "PagedLatentCache":
        return dataclasses.replace(self, page_table=page_table)

    def locate(self, positions):
        """positions [b, s] -> (page [b, s], slot [b, s]); a position past the table (padding) gets page
        n_pages, which a write with mode='drop' skips."""
        ps, width = self.page_size, self.page_table.shape[1]
        index = jnp.clip(positions // ps, 0, width - 1)
        page = jnp.take_along_axis(self.page_table, index, axis=1)
        valid = (positions >= 0) & (positions < width * ps)
        return jnp.where(valid, page, self.n_pages), positions % ps

    def write(self, layer, positions, c_kv, k_pe, k_idx=None) -> "PagedLatentCache":
        """Store new latents c_kv [b,s,R] / k_pe [b,s,r] of `layer` at positions [b,s] through the page table;
        positions >= cache_lens (padding) are dropped. With index pools, also the index keys k_idx [b,s,D]."""
        q, scales = quantize(self.fmt, c_kv)
        k_q, k_scale = quantize_index_keys(self.fmt, k_idx) if self.k_idx is not None else (None, None)
        page, slot = self.locate(positions)
        new = (to_bits(q), scales, to_bits(k_pe.astype(self.fmt.k_pe_dtype)), None if k_q is None else to_bits(k_q),
               k_scale)

        def store(buffers, layer, page, slot, new):
            page, _ = self._local(page, buffers[0].shape[1])  # another device's page: dropped
            return tuple(None if buf is None else buf.at[layer, page, slot].set(x.astype(buf.dtype), mode="drop")
                         for buf, x in zip(buffers, new))

        if self.layout is None:
            out = store(self.all_buffers, layer, page, slot, new)
        else:
            specs = self._specs(self.all_buffers)
            out = jax.shard_map(store, mesh=self.layout.mesh, in_specs=(specs, P(), P(), P(), P()),
                                out_specs=specs, check_vma=False)(self.all_buffers, layer, page, slot, new)
        return dataclasses.replace(self, **dict(zip(("c_kv", "scales", "k_pe", "k_idx", "k_idx_scale"), out)))

    def _local(self, pages, n_local: int):
        """Global page ids -> (ids in this device's shard of the pool, n_local where not held; held mask)."""
        if self.layout is None:
            return pages, jnp.ones(pages.shape, jnp.bool_)
        local = pages - jax.lax.axis_index(self.layout.seq_axis) * n_local
        held = (local >= 0) & (local < n_local)
        return jnp.where(held, local, n_local), held

    def _specs(self, buffers):
        return tuple(None if b is None else pool_spec(self.layout) for b in buffers)

    def _paged(self, layer, table, held=None, lengths=None):
        """Keyword arguments that make kv/attention.py read key blocks of whole pages through the table. With
        `held` (on a mesh: which of the table's pages this device holds), the device walks only its own pages:
        they are moved to the front of each row, with their positions, and the walk stops after the most
        any row needs."""
        width, ps = table.shape[1], self.page_size
        k = pages_per_block(ps, width)
        # Key blocks of k pages; what is left after the last full one in the dense cache's tail blocks where those
        # are whole pages (the same summation order as a dense cache with this block), else page by page.
        tail = tail_block(k * ps)
        kw = dict(block=k * ps, n_keys=width * ps, tail=tail if tail % ps == 0 else ps)
        if held is not None:
            order = jnp.argsort(~held, axis=1, stable=True)                  # held pages first, in order
            table = jnp.take_along_axis(table, order, axis=1)
            held_sorted = jnp.take_along_axis(held, order, axis=1)
            needed = held & (jnp.arange(width)[None, :] * ps < lengths[:, None])
            never = jnp.int32(2**30)                                          # past every length

            def key_positions(start, size):
                index = jax.lax.dynamic_slice_in_dim(order, start // ps, size // ps, axis=1)
                mine = jax.lax.dynamic_slice_in_dim(held_sorted, start // ps, size // ps, axis=1)
                pos = index[:, :, None] * ps + jnp.arange(ps)
                return jnp.where(mine[:, :, None], pos, never).reshape(pos.shape[0], size)

            kw.update(key_positions=key_positions, n_blocks=(jnp.max(jnp.sum(needed, axis=1)) + k - 1) // k)

        def take(x, start, size):  # whole pages: start and size are multiples of page_size
            pages = jax.lax.dynamic_slice_in_dim(table, start // ps, size // ps, axis=1)   # [b, n]
            blk = x[layer, pages]                                                          # [b, n, page_size, ...]
            return blk.reshape(blk.shape[0], size, *blk.shape[3:])

        return dict(kw, take=take)

    def _attend(self, partial_fn, queries, weights, layer, q_positions, lengths):
        """partial_fn(queries, weights, buffers, paged kwargs, with_lse) over this device's pages; on a mesh the
        devices' partial results merge by log-sum-exp (kv/layout.py)."""
        def local(queries, weights, buffers, table, layer, q_positions, lengths):
            if self.layout is None:
                kw = self._paged(layer, table)
                return partial_fn(queries, weights, buffers, q_positions, lengths, kw, False)
            table, held = self._local(table, buffers[0].shape[1])
            kw = self._paged(layer, jnp.where(held, table, 0), held, lengths)
            o, lse = partial_fn(queries, weights, buffers, q_positions, lengths, kw, True)
            return merge_partials(o, lse, self.layout.seq_axis)

        if self.layout is None:
            return local(queries, weights, self.buffers, self.page_table, layer, q_positions, lengths)
        rep = lambda xs: tuple(P() for _ in xs)  # noqa: E731
        return jax.shard_map(local, mesh=self.layout.mesh,
                             in_specs=(rep(queries), rep(weights), self._specs(self.buffers), P(), P(), P(), P()),
                             out_specs=P(), check_vma=False)(queries, weights, self.buffers, self.page_table, layer,
                                                             q_positions, lengths)

    def attend_latent(self, layer, q_lat, q_pe, q_positions, lengths, *, scale: float):
        """Absorbed attention of q_lat [b,s,h,R] / q_pe [b,s,h,r] at q_positions [b,s] over `layer`'s keys
        [0, lengths[b]) -> o_lat [b,s,h,R] float32."""
        if self.layout is None and self.attention is not None:
            out = self.attention.paged_latent(self, layer, q_lat, q_pe, q_positions, lengths, scale=scale)
            if out is not None:
                return out

        def partial(queries, _, buffers, pos, lens, kw, with_lse):
            return mla_prefill_xla(*queries, *buffers, pos, lens, fmt=self.fmt, scale=scale, with_lse=with_lse,
                                   **kw)
        return self._attend(partial, (q_lat, q_pe), (), layer, q_positions, lengths)

    def attend_naive(self, layer, q_nope, q_pe, w_uk, w_uv, q_positions, lengths, *, scale: float):
        """Naive attention over `layer` (the XLA path) -> o [b,s,h,d_v] float32."""
        def partial(queries, weights, buffers, pos, lens, kw, with_lse):
            return naive_prefill(*queries, *buffers, pos, lens, *weights, fmt=self.fmt, scale=scale,
                                 with_lse=with_lse, **kw)
        return self._attend(partial, (q_nope, q_pe), (w_uk, w_uv), layer, q_positions, lengths)

    def attend_sparse(self, layer, q_lat, q_pe, index_queries, q_positions, lengths, *, scale: float,
                      topk: int, naive_weights=None):
        """Sparse attention (DSA) over `layer`, as LatentCache.attend_sparse: index_queries (q_idx [b,s,H,D],
        weights [b,s,H]) score the index pools through the page table, the topk best-scored visible positions
        per query are kept, and queries attend over those only (a decode step gathers their rows; a prefill
        chunk masks the paged blockwise attention). Absorbed unless naive_weights (w_uk, w_uv) are given."""
        if self.layout is not None:
            raise KtjaxError("sparse attention (DeepSeek-V3.2) over a page pool split over devices is not "
                             "supported yet: serve the model on one device")
        gathered = q_lat.shape[1] == 1 and naive_weights is None
        q_idx, w = index_queries
        if gathered and self.attention is not None:
            out = self.attention.paged_sparse_decode(self, layer, q_lat[:, 0], q_pe[:, 0], q_idx[:, 0], w[:, 0],
                                                     lengths, topk=topk, scale=scale)
            if out is not None:
                return out[:, None]
        kw = self._paged(layer, self.page_table)
        scores = index_scores(q_idx, w, self.k_idx, self.k_idx_scale, q_positions, lengths, fmt=self.fmt,
                              block=kw["block"], take=kw["take"], n_keys=kw["n_keys"])
        indices, valid = select_topk(scores, topk)
        if gathered:
            out = sparse_attend_gathered(q_lat[:, 0], q_pe[:, 0], *self.buffers, indices[:, 0], valid[:, 0],
                                         fmt=self.fmt, scale=scale, gather=self._rows(layer))
            return out[:, None]
        kw.update(fmt=self.fmt, scale=scale, selected=selection_mask(indices, valid, kw["n_keys"]))
        if naive_weights is not None:
            return naive_prefill(q_lat, q_pe, *self.buffers, q_positions, lengths, *naive_weights, **kw)
        return mla_prefill_xla(q_lat, q_pe, *self.buffers, q_positions, lengths, **kw)

    def _rows(self, layer):
        """gather(pool, positions [b,k]) -> the rows [b,k,...] of `layer` at those positions of each sequence."""
        table, ps = self.page_table, self.page_size

        def gather(pool, positions):
            if pool is None:
                return None
            page = jnp.take_along_axis(table, positions // ps, axis=1)
            # The layer's slice, then the rows (as kv/sparse.py's gather_rows: XLA reads only the rows).
            return jax.lax.dynamic_index_in_dim(pool, layer, 0, keepdims=False)[page, positions % ps]
        return gather


def pool_spec(layout: CacheLayout) -> P:
    """A pool [L, n_pages, page_size, W] split by pages over the layout's sequence axis."""
    return P(None, layout.seq_axis, None, None)
