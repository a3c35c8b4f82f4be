"""Pages: how a page pool of the latent cache (kv/cache.py, LatentCache.pool) is read and written through its
page table, on one device or with its pages split over a mesh.

Pools are c_kv [L, n_pages, page_size, W] (stored in the cache format, with group scales) and k_pe
[L, n_pages, page_size, r]. Sequence b's position p lives in page page_table[b, p // page_size] at slot
p % page_size, so sequences of any lengths share one pool and a page full of a common prefix can be shared
between sequences (ktjax/serve/pages.py decides which page goes where). The page table is a traced field: one
compiled program serves every assignment of pages, and its width (pages per sequence) bounds what attention
reads. A model with DeepSeek Sparse Attention (V3.2) keeps its index keys in pools laid out like the latents, so a
page shared through the prefix cache shares its index keys too.

Attention walks each sequence's pages in key blocks of whole pages (gathered per block, never the whole prefix at
once) with kv/attention.py's online softmax. On a mesh, device k holds pages [k n_pages/N, (k+1) n_pages/N) and
everything else is replicated; each device walks its own pages and the partial results merge by log-sum-exp.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ktjax.kv.attention import MAX_KV_BLOCK, tail_block
from ktjax.kv.layout import CacheLayout, merge_partials, store_rows

DEFAULT_PAGE_SIZE = 64


def pages_per_block(page_size: int, table_width: int) -> int:
    """Pages gathered per attention key block: up to MAX_KV_BLOCK tokens, dividing the table width."""
    k = max(1, MAX_KV_BLOCK // page_size)
    while table_width % k:
        k //= 2
    return max(k, 1)


def pool_spec(layout: CacheLayout) -> P:
    """A pool [L, n_pages, page_size, W] split by pages over the layout's sequence axis."""
    return P(None, layout.seq_axis, None, None)


def locate(page_table, page_size: int, n_pages: int, positions):
    """positions [b, s] -> (page [b, s], slot [b, s]); a position past the table (padding) gets page n_pages,
    which a write with mode='drop' skips."""
    width = page_table.shape[1]
    index = jnp.clip(positions // page_size, 0, width - 1)
    page = jnp.take_along_axis(page_table, index, axis=1)
    valid = (positions >= 0) & (positions < width * page_size)
    return jnp.where(valid, page, n_pages), positions % page_size


def local_pages(pages, n_local: int, axis: str):
    """Global page ids -> (ids in this device's share of the pool, n_local where not held; held mask). Inside
    shard_map over `axis`."""
    local = pages - jax.lax.axis_index(axis) * n_local
    held = (local >= 0) & (local < n_local)
    return jnp.where(held, local, n_local), held


def page_reads(layer, table, page_size: int, held=None, lengths=None) -> dict:
    """Keyword arguments that make kv/attention.py read `layer`'s key blocks of whole pages through `table`.
    With `held` (on a mesh: which of the table's pages this device holds), the device walks only its own pages:
    they are moved to the front of each row, with their positions, and the walk stops after the most any row
    needs."""
    width, ps = table.shape[1], page_size
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


def _specs(layout: CacheLayout, buffers):
    return tuple(None if b is None else pool_spec(layout) for b in buffers)


def write_sharded(layout: CacheLayout, buffers, layer, page, slot, new):
    """store_rows over a pool split by pages: each device stores the rows of the pages it holds."""
    def store(buffers, layer, page, slot, new):
        page, _ = local_pages(page, buffers[0].shape[1], layout.seq_axis)  # another device's page: dropped
        return store_rows(buffers, layer, page, slot, new)

    specs = _specs(layout, buffers)
    return jax.shard_map(store, mesh=layout.mesh, in_specs=(specs, P(), P(), P(), P()), out_specs=specs,
                         check_vma=False)(buffers, layer, page, slot, new)


def attend_sharded(layout: CacheLayout, partial_fn, queries, weights, buffers, table, layer, q_positions, lengths):
    """partial_fn(queries, weights, buffers, q_positions, lengths, reads, with_lse=True) -> (o, lse) over each
    device's own pages, merged across devices by log-sum-exp."""
    def local(queries, weights, buffers, table, layer, q_positions, lengths):
        table, held = local_pages(table, buffers[0].shape[1], layout.seq_axis)
        reads = page_reads(layer, jnp.where(held, table, 0), buffers[0].shape[2], held, lengths)
        o, lse = partial_fn(queries, weights, buffers, q_positions, lengths, reads, True)
        return merge_partials(o, lse, layout.seq_axis)

    rep = lambda xs: tuple(P() for _ in xs)  # noqa: E731
    return jax.shard_map(local, mesh=layout.mesh,
                         in_specs=(rep(queries), rep(weights), _specs(layout, buffers), P(), P(), P(), P()),
                         out_specs=P(), check_vma=False)(queries, weights, buffers, table, layer, q_positions,
                                                         lengths)
