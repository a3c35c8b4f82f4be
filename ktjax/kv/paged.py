"""The paged latent cache: one pool of fixed-size pages per layer stack, and a page table per sequence.

Pools are c_kv [L, n_pages, page_size, W] (stored in the cache format, with group scales) and k_pe
[L, n_pages, page_size, r], like LatentCache's [L, B, T, ...] with (B, T) replaced by (page, slot). Sequence b's
position p lives in page page_table[b, p // page_size] at slot p % page_size, so sequences of any lengths
share one pool and a page full of a common prefix can be shared between sequences (ktjax/serve/pages.py
decides which page goes where). The page table is a traced field: one compiled program serves every
assignment of pages, and its width (pages per sequence) bounds what attention reads.

PagedLatentCache has LatentCache's methods (write, attend_latent, attend_naive), so the model runs over it
unchanged. Attention walks each sequence's pages in key blocks of whole pages (gathered per block, never the
whole prefix at once) with kv/attention.py's online softmax, or the Pallas kernel that reads the page table
(kv/pallas/paged.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .attention import mla_prefill_xla, naive_prefill
from .cache import MAX_KV_BLOCK, attention_path
from .formats import SCALE_DTYPE, CacheFormat, container
from .quant import quantize, to_bits

DEFAULT_PAGE_SIZE = 64
_HAVE_KERNEL = False


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
    attention: str = dataclasses.field(metadata=dict(static=True))    # "xla" or "pallas"

    @classmethod
    def create(cls, cfg, fmt: CacheFormat, n_pages: int, page_size: int = DEFAULT_PAGE_SIZE, *,
               batch: int = 1, max_pages: int = 1, attention: str = "auto") -> "PagedLatentCache":
        lead = (cfg.num_hidden_layers, n_pages, page_size)
        r = cfg.kv_lora_rank
        scales = jnp.ones(lead + (fmt.n_groups(r),), SCALE_DTYPE) if fmt.quantized else None
        return cls(c_kv=jnp.zeros(lead + (fmt.stored_width(r),), container(fmt.store_dtype)), scales=scales,
                   k_pe=jnp.zeros(lead + (cfg.qk_rope_head_dim,), container(fmt.k_pe_dtype)),
                   page_table=jnp.zeros((batch, max_pages), jnp.int32), fmt=fmt, rank=r,
                   attention="xla" if attention_path(attention, None) == "pallas" and not _HAVE_KERNEL
                   else attention_path(attention, None))

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
    def pool_bytes(self) -> int:
        return sum(x.nbytes for x in self.buffers if x is not None)

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

    def write(self, layer, positions, c_kv, k_pe) -> "PagedLatentCache":
        """Store new latents c_kv [b,s,R] / k_pe [b,s,r] of `layer` at positions [b,s] through the page table;
        positions >= cache_lens (padding) are dropped."""
        q, scales = quantize(self.fmt, c_kv)
        page, slot = self.locate(positions)
        new = (to_bits(q), scales, to_bits(k_pe.astype(self.fmt.k_pe_dtype)))
        c, sc, kp = (None if buf is None else buf.at[layer, page, slot].set(x.astype(buf.dtype), mode="drop")
                     for buf, x in zip(self.buffers, new))
        return dataclasses.replace(self, c_kv=c, scales=sc, k_pe=kp)

    def _paged(self, layer):
        """Keyword arguments that make kv/attention.py read key blocks of whole pages through the table."""
        width = self.page_table.shape[1]
        k = pages_per_block(self.page_size, width)
        table = self.page_table

        def take(x, j):
            pages = jax.lax.dynamic_slice_in_dim(table, j * k, k, axis=1)   # [b, k]
            blk = x[layer, pages]                                             # [b, k, page_size, ...]
            return blk.reshape(blk.shape[0], k * blk.shape[2], *blk.shape[3:])

        return dict(block=k * self.page_size, take=take, n_keys=width * self.page_size)

    def attend_latent(self, layer, q_lat, q_pe, q_positions, lengths, *, scale: float):
        """Absorbed attention of q_lat [b,s,h,R] / q_pe [b,s,h,r] at q_positions [b,s] over `layer`'s keys
        [0, lengths[b]) -> o_lat [b,s,h,R] float32."""
        if self.attention == "pallas":
            from .pallas.paged import paged_attention
            return paged_attention(q_lat, q_pe, self, layer, q_positions, lengths, scale=scale)
        return mla_prefill_xla(q_lat, q_pe, *self.buffers, q_positions, lengths, fmt=self.fmt, scale=scale,
                               **self._paged(layer))

    def attend_naive(self, layer, q_nope, q_pe, w_uk, w_uv, q_positions, lengths, *, scale: float):
        """Naive attention over `layer` (the XLA path) -> o [b,s,h,d_v] float32."""
        return naive_prefill(q_nope, q_pe, *self.buffers, q_positions, lengths, w_uk, w_uv, fmt=self.fmt,
                             scale=scale, **self._paged(layer))
