"""Attention over the latent cache, blockwise with an online softmax (the XLA reference path).

`mla_prefill` attends a chunk of absorbed queries to the cache (which already holds the chunk's own
latents), causal by position; `mla_decode` is the one-query case. Both walk the cache in blocks of
`block` tokens up to the longest sequence (what is left after the last full block in smaller ones), so no
[query x context] score matrix and no per-head expansion of the whole prefix ever exists. Quantized formats
apply each group's scale to partial scores and to the probabilities. `naive_prefill` is the same loop with each block expanded to per-head K and V.

The cache arrays are one layer's ([b, T, ...]) or the whole stack ([L, b, T, ...]) with `layer` naming the
layer: each key block is then sliced straight out of the stack, so a step reads the blocks it attends to and
never copies a layer. These are the references of the backends' attention kernels (the GPU ones take the same
signatures, one layer); the cache's AttentionKernel (kv/cache.py) decides which one runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ktjax.kv.formats import CacheFormat
from ktjax.kv.quant import dequantize, from_bits, grouped, stored_values

NEG = -1e30
TAIL_BLOCK = 64
# Attention walks a cache in key blocks of at most this many tokens (a dense cache's capacity is a multiple of
# its block: kv/cache.py plan_cache_lens; a pool's blocks are whole pages: kv/paged.py pages_per_block).
MAX_KV_BLOCK = 512
MIN_KV_BLOCK = 16


def _block(x, start, size, layer=None):
    """Keys [start, start + size) of one layer: [b, size, ...] from [b, T, ...], or from [L, b, T, ...] at
    `layer`."""
    if x is None:
        return None
    if layer is None:
        return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
    return jax.lax.dynamic_slice(x, (layer, 0, start) + (0,) * (x.ndim - 3), (1, x.shape[1], size, *x.shape[3:]))[0]


def tail_block(block: int) -> int:
    """The small key block that walks what is left after the last full `block`, so that the keys read follow
    the fill rounded up to it, not to `block` (a 64k cache holding 80 tokens reads 128 keys, not 512). It
    divides `block` (a multiple of MIN_KV_BLOCK), so tail blocks never run past the cache."""
    return next(t for t in (TAIL_BLOCK, 32, 16, block) if block % t == 0)


def _latent_scores(q_lat, c_vals, scales, fmt: CacheFormat):
    """q_lat [b,s,h,R] . c [b,t,R] -> [b,s,h,t]; per group then scaled when quantized."""
    if not fmt.quantized:
        return jnp.einsum("bshc,btc->bsht", q_lat, c_vals)
    partial = jnp.einsum("bshgc,btgc->bshtg", grouped(q_lat, fmt.group), grouped(c_vals, fmt.group))
    return jnp.einsum("bshtg,btg->bsht", partial, scales)


def _latent_values(p, c_vals, scales, fmt: CacheFormat):
    """p [b,s,h,t] @ c [b,t,R] -> [b,s,h,R]; probabilities scaled per group when quantized."""
    if not fmt.quantized:
        return jnp.einsum("bsht,btc->bshc", p, c_vals)
    rank = c_vals.shape[-1]
    out = jnp.einsum("bsht,btg,btgc->bshgc", p, scales, grouped(c_vals, fmt.group))
    return out.reshape(*out.shape[:-2], -1)[..., :rank]


def _flash(q_positions, lengths, n_keys, block, keys_fn, scores_fn, values_fn, out_shape, with_lse: bool = False,
           key_positions=None, n_blocks=None, tail: int | None = None, selected=None, heads_first: bool = False):
    """Online softmax over the keys [0, max(lengths)): full blocks of `block` keys, then the rest in blocks of
    `tail` keys (default tail_block(block)), so that the keys read follow the fill. keys_fn(start, size) -> the
    block's keys (read once: XLA on the CPU copies each slice it takes); scores_fn(keys) -> [b,s,h,size]
    (scaled); values_fn(keys, p) -> [b,s,h,D]. Query i of sequence b sees key t iff
    t < lengths[b] and t <= q_positions[b,i], and, with `selected` [b,s,n_keys] (sparse attention's top-k),
    selected[b,i,t]. A paged cache whose key slots are not in position order (a device's own pages of a
    sequence) passes key_positions(start, size) -> [b, size] (a slot never visible: a position past every
    length) and the n_blocks of `block` slots to walk (no tail blocks then). with_lse also returns the log-sum-exp of the visible scores [b,s,h]
    (NEG where none is visible), so that results over disjoint key sets (the shards of a sequence-sharded
    cache) can be merged. heads_first: scores_fn gives [b,h,s,size] and values_fn [b,h,s,D] (batched products
    with no transposes in the loop); the result is [b,s,h,D] either way.

    A chunk of several queries first walks the full blocks that every query of every sequence sees whole (the
    prefix before the chunk) without building a mask, then the rest masked: on the CPU the masks and selects
    cost as much as the products over a prefix block (benchmarks/log/2026.md, "Prefill: attention without masks
    over the prefix")."""
    b, s, h, d_out = out_shape
    tail = tail or tail_block(block)
    if n_blocks is None:
        longest = jnp.clip(jnp.max(lengths), 0, n_keys)  # a shard's local lengths may be negative or past its keys
        n_full = longest // block
        n_tail = (longest - n_full * block + tail - 1) // tail
    else:
        n_full, n_tail = n_blocks, 0

    rows = (b, h, s) if heads_first else (b, s, h)

    def walk(start_of, size, masked: bool = True):
        def body(j, carry):
            m, l, acc = carry
            start = start_of(j)
            keys = keys_fn(start, size)
            scores = scores_fn(keys)
            if masked:
                t = start + jnp.arange(size) if key_positions is None else key_positions(start, size)
                t = jnp.broadcast_to(t, (b, size))[:, None, :]
                visible = (t < lengths[:, None, None]) & (t <= q_positions[:, :, None])
                if selected is not None:
                    visible = visible & jax.lax.dynamic_slice_in_dim(selected, start, size, axis=2)
                visible = visible[:, None] if heads_first else visible[:, :, None]  # [b,1,s,size] / [b,s,1,size]
                scores = jnp.where(visible, scores, NEG)
            m_new = jnp.maximum(m, scores.max(-1))
            p = jnp.exp(scores - m_new[..., None])
            if masked:
                p = jnp.where(visible, p, 0.0)
            corr = jnp.exp(m - m_new)
            return m_new, l * corr + p.sum(-1), acc * corr[..., None] + values_fn(keys, p)
        return body

    carry = (jnp.full(rows, NEG, jnp.float32), jnp.zeros(rows, jnp.float32), jnp.zeros((*rows, d_out), jnp.float32))
    n_clear = 0
    if s > 1 and key_positions is None and selected is None:
        seen = jnp.minimum(jnp.min(q_positions) + 1, jnp.min(lengths))  # keys [0, seen) visible to every query
        n_clear = jnp.clip(seen // block, 0, n_full)
        carry = jax.lax.fori_loop(0, n_clear, walk(lambda j: j * block, block, masked=False), carry)
    carry = jax.lax.fori_loop(n_clear, n_full, walk(lambda j: j * block, block), carry)
    m, l, acc = jax.lax.fori_loop(0, n_tail, walk(lambda j: n_full * block + j * tail, tail), carry)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), NEG)
    if heads_first:
        out, lse = out.transpose(0, 2, 1, 3), lse.transpose(0, 2, 1)
    return (out, lse) if with_lse else out


def _taker(take, layer):
    """take(x, start, size) -> keys [start, start + size) of x, None for None: a paged cache's gather
    (kv/paged.py), else a slice of the (stacked) cache."""
    if take is None:
        return lambda x, start, size: _block(x, start, size, layer)
    return lambda x, start, size: None if x is None else take(x, start, size)


def mla_prefill_xla(q_lat, q_pe, c_kv, scales, k_pe, q_positions, lengths, *, fmt: CacheFormat, scale: float,
                    block: int, with_lse: bool = False, layer=None, take=None, n_keys: int | None = None,
                    key_positions=None, n_blocks=None, tail: int | None = None, selected=None):
    """Absorbed attention of queries [b,s,h,R]/[b,s,h,r] over one layer's cache -> o_lat [b,s,h,R] float32
    (and its log-sum-exp [b,s,h] with_lse).

    c_kv [b,T,W] stored values, scales [b,T,G] (quantized formats) or None, k_pe [b,T,r]; T % block == 0.
    With `layer`, each is the whole stack ([L, b, T, ...]). With `take(x, start, size)` (a paged cache), the
    arrays are whatever take reads keys [start, start + size) from, n_keys the keys it can address, and `tail`
    a key block it can read (whole pages); key_positions and n_blocks as in _flash. `selected` [b,s,T]: sparse attention's keys.
    """
    rank = q_lat.shape[-1]
    q_lat, q_pe = q_lat.astype(jnp.float32), q_pe.astype(jnp.float32)
    take = _taker(take, layer)

    def blocks(start, size):
        return (stored_values(fmt, take(c_kv, start, size), rank), take(scales, start, size),
                from_bits(take(k_pe, start, size), fmt.k_pe_dtype).astype(jnp.float32))

    def scores_fn(keys):
        c, sc, kp = keys
        return (_latent_scores(q_lat, c, sc, fmt) + jnp.einsum("bshr,btr->bsht", q_pe, kp)) * scale

    def values_fn(keys, p):
        c, sc, _ = keys
        return _latent_values(p, c, sc, fmt)

    return _flash(q_positions, lengths, n_keys or c_kv.shape[-2], block, blocks, scores_fn, values_fn,
                  q_lat.shape, with_lse, key_positions, n_blocks, tail, selected)


def mla_decode_xla(q_lat, q_pe, c_kv, scales, k_pe, lengths, *, fmt: CacheFormat, scale: float, block: int):
    """One query per sequence ([b,h,R], [b,h,r]) over keys [0, lengths[b]) -> o_lat [b,h,R] float32."""
    out = mla_prefill_xla(q_lat[:, None], q_pe[:, None], c_kv, scales, k_pe, (lengths - 1)[:, None], lengths,
                          fmt=fmt, scale=scale, block=block)
    return out[:, 0]


def naive_prefill(q_nope, q_pe, c_kv, scales, k_pe, q_positions, lengths, w_uk, w_uv, *, fmt: CacheFormat,
                  scale: float, block: int, with_lse: bool = False, layer=None, take=None,
                  n_keys: int | None = None, key_positions=None, n_blocks=None, tail: int | None = None,
                  selected=None):
    """Naive attention over the cache: each key block is dequantized and expanded to per-head K and V
    ([b, h, block, d]) and dropped after use, so the expanded prefix is never held whole. -> [b,s,h,d_v].
    `take`, n_keys, key_positions, n_blocks, tail and selected as in mla_prefill_xla."""
    rank = w_uk.shape[-1]
    b, s, h, _ = q_nope.shape
    # heads first ([b, h, s, d]): every product in the loop is a plain batched matmul over the heads
    q_nope, q_pe = (q.astype(jnp.float32).transpose(0, 2, 1, 3) for q in (q_nope, q_pe))
    w_uk, w_uv = w_uk.astype(jnp.float32), w_uv.astype(jnp.float32)
    take = _taker(take, layer)

    def keys_fn(start, size):
        return (dequantize(fmt, take(c_kv, start, size), take(scales, start, size), rank),
                from_bits(take(k_pe, start, size), fmt.k_pe_dtype).astype(jnp.float32))

    def scores_fn(keys):
        latents, k_rope = keys
        k_nope = jnp.einsum("btc,hdc->bhtd", latents, w_uk)
        return (jnp.einsum("bhsd,bhtd->bhst", q_nope, k_nope) + jnp.einsum("bhsr,btr->bhst", q_pe, k_rope)) * scale

    def values_fn(keys, p):
        return jnp.einsum("bhst,bhtd->bhsd", p, jnp.einsum("btc,hdc->bhtd", keys[0], w_uv))

    return _flash(q_positions, lengths, n_keys or c_kv.shape[-2], block, keys_fn, scores_fn, values_fn,
                  (b, s, h, w_uv.shape[1]), with_lse, key_positions, n_blocks, tail, selected, heads_first=True)

