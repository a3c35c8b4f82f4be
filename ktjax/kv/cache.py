"""The latent KV cache, one type for Engine.generate and the server: LatentCache.

Its buffers are pools of pages, all layers stacked on a leading axis, preallocated once: c_kv [L, n_pages,
page_size, R] (stored in its format, with group scales) and k_pe [L, n_pages, page_size, r]. A model with DeepSeek
Sparse Attention also caches each token's index key k_idx [.., D] (kv/sparse.py: bf16/float32, or e4m3 with a
per-token scale under a quantized format), laid out like the latents. Sequence b's position p lies in page
page_table[b, p // page_size] at slot p % page_size. Two cases:

- a dense cache (`LatentCache.create`, what Engine.generate runs over) is the one-page case: no table, sequence b's
  one page is page b, of cache_lens slots ([L, B, T, ...]); on a mesh each page is split along the sequence
  (kv/layout.py);
- a page pool (`LatentCache.pool`, the server's) has a traced page table and pages of page_size slots, shared
  between sequences (kv/paged.py); on a mesh the pages are split over the devices.

The model asks the cache to `write` a layer's new latents and to `attend` (absorbed, naive or sparse) over a
layer; the cache knows its format, where it lies and which attention runs over it: its `attention` field holds a
backend's AttentionKernel, chosen by the backend door (ktjax/runtime/backend.py), or None for the XLA path of
kv/attention.py, which is also every kernel's reference.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax.sharding import NamedSharding

from ktjax.errors import KtjaxError
from ktjax.kv import paged
from ktjax.kv.attention import MAX_KV_BLOCK, MIN_KV_BLOCK, mla_prefill_xla, naive_prefill
from ktjax.kv.formats import SCALE_DTYPE, CacheFormat, container, index_scaled, index_store_dtype
from ktjax.kv.layout import CacheLayout, sequence_pages, store_rows
from ktjax.kv.quant import quantize, to_bits
from ktjax.kv.sparse import (index_scores, quantize_index_keys, select_topk, select_topk_sharded,
                             selection_mask, sparse_attend_gathered)


def plan_cache_lens(requested: int, shards: int = 1) -> tuple[int, int]:
    """Round a dense cache's requested capacity up to what attention needs (a whole number of key blocks);
    returns (cache_lens, kv_block). A cache sharded along the sequence over `shards` devices gets an equal whole
    number of blocks on each device."""
    local = -(-max(int(requested), 1) // shards)
    if local >= MAX_KV_BLOCK:
        block = MAX_KV_BLOCK
    else:
        block = -(-local // MIN_KV_BLOCK) * MIN_KV_BLOCK
    return -(-local // block) * block * shards, block


class AttentionKernel:
    """Attention over a cache by a backend's kernels. A cache's static `attention` field holds one (so it must be
    hashable: a frozen dataclass), or None for the XLA path. The cache calls it only where it lies on one device,
    dense or paged (`cache.dense`); each method returns the output, or None to decline, and the cache then runs
    its XLA path."""
    name = "xla"  # the value the settings table declares for it (the setting attention)

    def latent(self, cache, layer, q_lat, q_pe, q_positions, lengths, *, scale: float):
        """LatentCache.attend_latent -> o_lat [b,s,h,R] float32, or None."""
        return None

    def sparse_decode(self, cache, layer, q_lat, q_pe, q_idx, weights, lengths, *, topk: int, scale: float):
        """A decode step's sparse attention (DSA): q_lat [b,h,R], q_pe [b,h,r], index queries q_idx [b,H,D] and
        weights [b,H] -> o_lat [b,h,R] float32, or None."""
        return None


def _empty_buffers(cfg, fmt: CacheFormat, lead: tuple, sharding=None):
    """Zeroed (c_kv, scales, k_pe, k_idx, k_idx_scale) of leading shape `lead`; with a sharding, each device
    allocates its own share, never the whole cache."""
    r = cfg.kv_lora_rank
    indexed = getattr(cfg, "has_indexer", False)

    def zeros():
        scales = jnp.ones(lead + (fmt.n_groups(r),), SCALE_DTYPE) if fmt.quantized else None
        k_idx = jnp.zeros(lead + (cfg.index_head_dim,), container(index_store_dtype(fmt))) if indexed else None
        k_idx_scale = jnp.ones(lead + (1,), SCALE_DTYPE) if indexed and index_scaled(fmt) else None
        return (jnp.zeros(lead + (fmt.stored_width(r),), container(fmt.store_dtype)), scales,
                jnp.zeros(lead + (cfg.qk_rope_head_dim,), container(fmt.k_pe_dtype)), k_idx, k_idx_scale)

    return (zeros if sharding is None else jax.jit(zeros, out_shardings=sharding))()


_BUFFERS = ("c_kv", "scales", "k_pe", "k_idx", "k_idx_scale")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
    c_kv: jax.Array            # [L, n_pages, page_size, stored_width]: fmt.store_dtype values, held as container() bits
    scales: jax.Array | None   # [L, n_pages, page_size, n_groups] float32, quantized formats only
    k_pe: jax.Array            # [L, n_pages, page_size, r]: fmt.k_pe_dtype values, held as container() bits
    fmt: CacheFormat = dataclasses.field(metadata=dict(static=True))
    rank: int = dataclasses.field(metadata=dict(static=True))
    attention: AttentionKernel | None = dataclasses.field(metadata=dict(static=True))  # None: the XLA path
    # None: one device. A dense cache's pages (sequences) split along the sequence over layout.seq_axis and by
    # page over layout.batch_axis (kv/layout.py); a pool's pages split over layout.seq_axis (kv/paged.py).
    layout: CacheLayout | None = dataclasses.field(default=None, metadata=dict(static=True))
    block: int = dataclasses.field(default=0, metadata=dict(static=True))  # a dense cache's attention key block
    page_table: jax.Array | None = None   # [B, max_pages] int32; None: a dense cache (sequence b's page is page b)
    k_idx: jax.Array | None = None        # [L, n_pages, page_size, D]: index keys (index_store_dtype bits)
    k_idx_scale: jax.Array | None = None  # [L, n_pages, page_size, 1] float32, e4m3 index keys only

    @classmethod
    def create(cls, cfg, fmt: CacheFormat, batch: int, cache_lens: int, *, block: int,
               attention: AttentionKernel | None = None, layout: CacheLayout | None = None,
               extra_layers: int = 0) -> "LatentCache":
        """An empty dense cache: `batch` sequences of cache_lens positions (a multiple of `block`:
        plan_cache_lens), one page each, in cfg.num_hidden_layers + extra_layers layer slots (extra_layers=1: the
        slice of the multi-token-prediction module, layer num_hidden_layers; model/mtp.py)."""
        lead = (cfg.num_hidden_layers + extra_layers, batch, cache_lens)
        buffers = _empty_buffers(cfg, fmt, lead, None if layout is None else layout.sharding)
        return cls(**dict(zip(_BUFFERS, buffers)), fmt=fmt, rank=cfg.kv_lora_rank, attention=attention,
                   layout=layout, block=block)

    @classmethod
    def pool(cls, cfg, fmt: CacheFormat, n_pages: int, page_size: int = paged.DEFAULT_PAGE_SIZE, *,
             batch: int = 1, max_pages: int = 1, attention: AttentionKernel | None = None,
             layout: CacheLayout | None = None, extra_layers: int = 0) -> "LatentCache":
        """An empty page pool of n_pages pages of page_size slots, in cfg.num_hidden_layers + extra_layers layer
        slots, with a zero page table [batch, max_pages] (the server sets one per step: with_table)."""
        if layout is not None and layout.seq_axis is None:
            layout = None
        if layout is not None and n_pages % layout.mesh.shape[layout.seq_axis]:
            raise KtjaxError(f"{n_pages} pages do not split evenly over the {layout.mesh.shape[layout.seq_axis]} "
                             f"devices of mesh axis '{layout.seq_axis}'")
        lead = (cfg.num_hidden_layers + extra_layers, n_pages, page_size)
        sharding = None if layout is None else NamedSharding(layout.mesh, paged.pool_spec(layout))
        buffers = _empty_buffers(cfg, fmt, lead, sharding)
        return cls(**dict(zip(_BUFFERS, buffers)), fmt=fmt, rank=cfg.kv_lora_rank, attention=attention,
                   layout=layout, page_table=jnp.zeros((batch, max_pages), jnp.int32))

    @property
    def dense(self) -> bool:
        return self.page_table is None

    @property
    def n_pages(self) -> int:
        return self.c_kv.shape[1]

    @property
    def page_size(self) -> int:
        return self.c_kv.shape[2]

    @property
    def cache_lens(self) -> int:
        """Positions one sequence can address (padding positions are >= this)."""
        return self.page_size if self.dense else self.page_table.shape[1] * self.page_size

    @property
    def buffers(self) -> tuple:
        """The latent buffers, what attention reads: (c_kv, scales, k_pe)."""
        return self.c_kv, self.scales, self.k_pe

    @property
    def all_buffers(self) -> tuple:
        """Every buffer, what a write updates: the latents', then the index cache's (None without one)."""
        return tuple(getattr(self, name) for name in _BUFFERS)

    @property
    def nbytes(self) -> int:
        """The buffers' bytes (a page table is not counted)."""
        return sum(x.nbytes for x in self.all_buffers if x is not None)

    def with_table(self, page_table) -> "LatentCache":
        return dataclasses.replace(self, page_table=page_table)

    def locate(self, positions):
        """positions [b, s] (>= 0) -> (page [b, s], slot [b, s]); a position past what the sequence addresses
        (padding: >= cache_lens) gets a page or slot past the buffers, which a write drops."""
        if self.dense:
            return sequence_pages(positions), positions
        return paged.locate(self.page_table, self.page_size, self.n_pages, positions)

    def write(self, layer, positions, c_kv, k_pe, k_idx=None) -> "LatentCache":
        """Store new latents c_kv [b,s,R] / k_pe [b,s,r] (and index keys k_idx [b,s,D] when the cache has an
        index cache) of `layer` at positions [b,s]; positions >= cache_lens (padding) are dropped."""
        q, scales = quantize(self.fmt, c_kv)
        k_q, k_scale = quantize_index_keys(self.fmt, k_idx) if self.k_idx is not None else (None, None)
        new = (to_bits(q), scales, to_bits(k_pe.astype(self.fmt.k_pe_dtype)),
               None if k_q is None else to_bits(k_q), k_scale)
        if self.layout is None:
            out = store_rows(self.all_buffers, layer, *self.locate(positions), new)
        elif self.dense:
            out = self.layout.write(self.all_buffers, layer, positions, new)
        else:
            out = paged.write_sharded(self.layout, self.all_buffers, layer, *self.locate(positions), new)
        return dataclasses.replace(self, **dict(zip(_BUFFERS, out)))

    def _reads(self, layer) -> dict:
        """Keyword arguments that make kv/attention.py read `layer`'s key blocks on one device."""
        if self.dense:
            return dict(block=self.block, layer=layer)
        return paged.page_reads(layer, self.page_table, self.page_size)

    def _rows(self, layer):
        """gather(buffer, positions [b,k]) -> the rows [b,k,...] of `layer` at those positions of each sequence.
        The layer's slice, then the rows: XLA fuses both and reads only the rows. Gathering from the stack
        straight away let XLA fuse the step's in-place write into the gather and copy the float32 scales buffer
        at every step (tests/test_dsa.py checks the compiled programs)."""
        def gather(buf, positions):
            if buf is None:
                return None
            page, slot = self.locate(positions)
            return jax.lax.dynamic_index_in_dim(buf, layer, 0, keepdims=False)[page, slot]
        return gather

    def _attend(self, partial_fn, queries, weights, buffers, layer, q_positions, lengths):
        """partial_fn(queries, weights, buffers, q_positions, lengths, reads, with_lse) -> o, or (o, lse) with
        with_lse, over the keys `reads` make attention read. On a mesh each device computes it over its own share
        of the cache (`buffers`: a layer's slices of a dense cache, a pool's own pages) and the shares merge by
        log-sum-exp."""
        if self.layout is None:
            return partial_fn(queries, weights, buffers, q_positions, lengths, self._reads(layer), False)
        if self.dense:
            def share(queries, weights, layer_cache, pos, lens):
                return partial_fn(queries, weights, layer_cache, pos, lens, dict(block=self.block), True)
            return self.layout.attend(share, queries, weights, buffers, layer, q_positions, lengths)
        return paged.attend_sharded(self.layout, partial_fn, queries, weights, buffers, self.page_table, layer,
                                    q_positions, lengths)

    def attend_latent(self, layer, q_lat, q_pe, q_positions, lengths, *, scale: float):
        """Absorbed attention of q_lat [b,s,h,R] / q_pe [b,s,h,r] at q_positions [b,s] over `layer`'s keys
        [0, lengths[b]) (the cache already holds the queries' own latents) -> o_lat [b,s,h,R] float32."""
        if self.layout is None and self.attention is not None:
            out = self.attention.latent(self, layer, q_lat, q_pe, q_positions, lengths, scale=scale)
            if out is not None:
                return out

        def partial(queries, _, buffers, pos, lens, reads, with_lse):
            return mla_prefill_xla(*queries, *buffers, pos, lens, fmt=self.fmt, scale=scale, with_lse=with_lse,
                                   **reads)
        return self._attend(partial, (q_lat, q_pe), (), self.buffers, layer, q_positions, lengths)

    def attend_naive(self, layer, q_nope, q_pe, w_uk, w_uv, q_positions, lengths, *, scale: float):
        """Naive attention over `layer`: each key block expanded to per-head K and V by w_uk/w_uv and dropped
        after use -> o [b,s,h,d_v] float32. Always the XLA path."""
        def partial(queries, weights, buffers, pos, lens, reads, with_lse):
            return naive_prefill(*queries, *buffers, pos, lens, *weights, fmt=self.fmt, scale=scale,
                                 with_lse=with_lse, **reads)
        return self._attend(partial, (q_nope, q_pe), (w_uk, w_uv), self.buffers, layer, q_positions, lengths)

    def attend_sparse(self, layer, q_lat, q_pe, index_queries, q_positions, lengths, *, scale: float,
                      topk: int, naive_weights=None):
        """Sparse attention (DSA) over `layer`: index_queries (q_idx [b,s,H,D], weights [b,s,H]) select the
        topk best-scored visible tokens per query, then queries attend over those only. Absorbed (q_lat
        [b,s,h,R]) unless naive_weights (w_uk, w_uv) are given (q_lat is then q_nope). -> [b,s,h,R or d_v]
        float32. A decode step gathers the selected rows; a prefill chunk masks the blockwise attention."""
        if self.layout is not None and not self.dense:
            raise KtjaxError("sparse attention (DeepSeek-V3.2) over a page pool split over devices is not "
                             "supported yet: serve the model on one device")
        gathered = q_lat.shape[1] == 1 and naive_weights is None
        if gathered and self.layout is None and self.attention is not None:
            q_idx, w = index_queries
            out = self.attention.sparse_decode(self, layer, q_lat[:, 0], q_pe[:, 0], q_idx[:, 0], w[:, 0], lengths,
                                               topk=topk, scale=scale)
            if out is not None:
                return out[:, None]
        on_mesh = self.layout is not None
        axis = self.layout.seq_axis if on_mesh else None
        gather = None if on_mesh else self._rows(layer)  # on a mesh: the device's slice of one layer

        def partial(queries, weights, buffers, pos, lens, reads, with_lse):
            q_lat, q_pe, q_idx, w = queries
            latent, index = buffers[:3], buffers[3:]
            scored = {k: v for k, v in reads.items() if k in ("block", "layer", "take", "n_keys")}
            scores = index_scores(q_idx, w, *index, pos, lens, fmt=self.fmt, **scored)
            indices, valid = select_topk(scores, topk) if axis is None else select_topk_sharded(scores, topk, axis)
            if gathered:
                out = sparse_attend_gathered(q_lat[:, 0], q_pe[:, 0], *latent, indices[:, 0], valid[:, 0],
                                             fmt=self.fmt, scale=scale, with_lse=with_lse, gather=gather)
                return jax.tree.map(lambda x: x[:, None], out)
            selected = selection_mask(indices, valid, reads.get("n_keys", latent[0].shape[-2]))
            kw = dict(reads, fmt=self.fmt, scale=scale, with_lse=with_lse, selected=selected)
            if naive_weights is not None:
                return naive_prefill(q_lat, q_pe, *latent, pos, lens, *weights, **kw)
            return mla_prefill_xla(q_lat, q_pe, *latent, pos, lens, **kw)

        weights = () if naive_weights is None else tuple(naive_weights)
        return self._attend(partial, (q_lat, q_pe, *index_queries), weights, self.all_buffers, layer, q_positions,
                            lengths)

    def layer(self, layer):
        """(c_kv, scales, k_pe) of one layer: [n_pages, page_size, ...] each ([b, T, ...] for a dense cache)."""
        def take(x):
            return None if x is None else jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
        return take(self.c_kv), take(self.scales), take(self.k_pe)


def cache_bytes(cfg, fmt: CacheFormat, batch: int, cache_lens: int, extra_layers: int = 0) -> int:
    per_layer = fmt.bytes_per_token(cfg) // cfg.num_hidden_layers
    return batch * cache_lens * per_layer * (cfg.num_hidden_layers + extra_layers)
