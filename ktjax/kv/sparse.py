"""DeepSeek Sparse Attention over the latent cache (the XLA path): score the index cache, keep the top-k
tokens per query, attend over those only.

`index_scores` walks the index cache in key blocks (so no [query x head x context] array exists) and gives
each query's scores over every cached token, -inf where the token is not visible (causal, past the length).
`select_topk` keeps the index_topk best of them: while fewer are visible, all visible ones (the rest come
back marked invalid). A decode step then gathers the selected latent rows and attends over them alone
(`sparse_attend_gathered`: its cost no longer grows with the context, apart from scoring the 128-wide
index keys); a prefill chunk turns the selection into a key mask for the blockwise attention of
kv/attention.py (`selection_mask`), which it walks anyway. The full (no cache) forward uses `topk_mask`.

Index-cache formats (`index_store_dtype`): float32 and bf16 caches keep the index keys in their own dtype;
quantized latent caches (fp8, int8, int4) keep them in float8 e4m3 with one float32 scale per token (128 + 4
bytes per token and layer at V3.2's index_head_dim), the scale factored out of the score: relu(s q.k) =
s relu(q.k) for s > 0. Before quantizing to e4m3, keys are rotated by the orthonormal Hadamard matrix H (as
DeepSeek-V3.2's own inference code does, `rotate_activation`), and queries by the same H when scored: (Hq).(Hk)
= q.k, while the rotation spreads a few outlier channels over all of them, so the per-token scale no longer
crushes the small ones (tests/test_serve_dsa.py measures the top-k overlap against float scores).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.kv.attention import NEG, _taker
from ktjax.kv.formats import CacheFormat, index_scaled, index_store_dtype
from ktjax.kv.quant import dequantize, from_bits

E4M3_MAX = 448.0


def is_sparse(index_topk: int, n_keys: int) -> bool:
    """Whether selection can drop anything: with index_topk >= the keys there are, attention is dense (and
    runs the dense code, so it equals the dense path exactly)."""
    return 0 < index_topk < n_keys


def hadamard(dim: int) -> np.ndarray:
    """The orthonormal Hadamard matrix [dim, dim] (Sylvester's order, as fast_hadamard_transform's, scaled by
    dim^-0.5: symmetric and its own inverse); dim a power of two."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    if h.shape[0] != dim:
        raise ValueError(f"a Hadamard rotation needs a power-of-two width, got {dim}")
    return h * np.float32(dim ** -0.5)


def rotates(fmt: CacheFormat, dim: int) -> bool:
    """Whether index keys of width dim are Hadamard-rotated in this format: e4m3 index keys of a power-of-two
    width (V3.2's 128)."""
    return index_scaled(fmt) and dim > 0 and dim & (dim - 1) == 0


def rotate_index(fmt: CacheFormat, x):
    """x [..., D] (index queries or keys) rotated as the format stores index keys: H x, or x as is."""
    if not rotates(fmt, x.shape[-1]):
        return x
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), jnp.asarray(hadamard(x.shape[-1])),
                      precision=jax.lax.Precision.HIGHEST)


def quantize_index_keys(fmt: CacheFormat, k):
    """k [..., D] -> (stored [..., D] in the format's index dtype, scale [..., 1] float32 or None); e4m3 keys are
    rotated first (rotate_index)."""
    dtype = index_store_dtype(fmt)
    if not index_scaled(fmt):
        return k.astype(dtype), None
    k = rotate_index(fmt, k.astype(jnp.float32))
    amax = jnp.max(jnp.abs(k), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    return (k / scale).astype(dtype), scale


def index_keys(fmt: CacheFormat, stored, scale):
    """The inverse, for references and tests: [..., D] float32 (rotated back: H is its own inverse)."""
    k = from_bits(stored, index_store_dtype(fmt)).astype(jnp.float32)
    return k if scale is None else rotate_index(fmt, k * scale)


def head_scores(q_idx, weights, k_vals):
    """sum_h w[b,s,h] relu(q[b,s,h] . k[b,t]) -> [b,s,t]."""
    dots = jnp.einsum("bshd,btd->bsht", q_idx, k_vals)
    return jnp.einsum("bsh,bsht->bst", weights, jax.nn.relu(dots))


def index_scores(q_idx, weights, k_idx, k_scale, q_positions, lengths, *, fmt: CacheFormat, block: int,
                 layer=None, take=None, n_keys: int | None = None):
    """q_idx [b,s,H,D], weights [b,s,H] (float32) over one layer's index cache k_idx [b,T,D] (stored bits),
    k_scale [b,T,1] or None (with `layer`: the stacks [L,b,T,...]) -> scores [b,s,T] float32, -inf where
    query i of sequence b may not see token t (t >= lengths[b] or t > q_positions[b,i]). With take(x, start,
    size) (a paged cache, kv/paged.py), the keys are whatever take reads and n_keys (T) the positions it
    can address, as in kv/attention.py. Queries are rotated here as the keys were stored (rotate_index)."""
    b, s = q_idx.shape[:2]
    q_idx = rotate_index(fmt, q_idx)
    n_keys = k_idx.shape[-2] if n_keys is None else n_keys
    take = _taker(take, layer)
    dtype = index_store_dtype(fmt)
    n_blocks = jnp.minimum((jnp.max(lengths) + block - 1) // block, n_keys // block)

    def body(j, out):
        k = from_bits(take(k_idx, j * block, block), dtype).astype(jnp.float32)
        scores = head_scores(q_idx, weights, k)
        if k_scale is not None:
            scores = scores * take(k_scale, j * block, block)[..., 0][:, None, :]
        t = j * block + jnp.arange(block)
        visible = (t[None, None, :] < lengths[:, None, None]) & (t[None, None, :] <= q_positions[:, :, None])
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(visible, scores, -jnp.inf), j * block, axis=2)

    return jax.lax.fori_loop(0, n_blocks, body, jnp.full((b, s, n_keys), -jnp.inf, jnp.float32))


def select_topk(scores, k: int):
    """The k best tokens per query: (indices [b,s,k'] int32, valid [b,s,k']) with k' = min(k, T); a token is
    invalid where its score is -inf (not visible: fewer than k were)."""
    values, indices = jax.lax.top_k(scores, min(k, scores.shape[-1]))
    return indices.astype(jnp.int32), values > -jnp.inf


def selection_mask(indices, valid, n_keys: int):
    """indices/valid [b,s,k] -> [b,s,n_keys] True at the selected visible tokens. An index may repeat (a
    sharded selection's entries of other devices point anywhere, invalid): a max, so no invalid entry
    overwrites a valid one."""
    b, s, _ = indices.shape
    rows = (jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None], indices)
    return jnp.zeros((b, s, n_keys), jnp.int8).at[rows].max(valid.astype(jnp.int8)) > 0


def topk_mask(scores, mask, k: int):
    """The full forward's selection: scores [b,s,t] of every token, mask [b,s,t] causal -> mask & top-k."""
    if not is_sparse(k, scores.shape[-1]):
        return mask
    indices, valid = select_topk(jnp.where(mask, scores, -jnp.inf), k)
    return mask & selection_mask(indices, valid, scores.shape[-1])


def gather_rows(buf, indices):
    """Rows of one layer's cache buffer [b,T,...] at indices [b,k] -> [b,k,...]: only the selected rows are
    read."""
    if buf is None:
        return None
    return buf[jnp.arange(indices.shape[0])[:, None], indices]


def sparse_attend_gathered(q_lat, q_pe, c_kv, scales, k_pe, indices, valid, *, fmt: CacheFormat, scale: float,
                           with_lse: bool = False, gather=None):
    """Absorbed attention of one query per sequence (q_lat [b,h,R], q_pe [b,h,r]) over the selected tokens
    indices/valid [b,k] of one layer's cache -> o_lat [b,h,R] float32 (and the log-sum-exp [b,h], NEG where
    nothing is selected, for merging shards). gather(buf, indices) -> rows [b,k,...]: by default gather_rows
    over one layer's buffers; LatentCache._rows reads them from the stacks, through a pool's page table."""
    rank = q_lat.shape[-1]
    if gather is None:
        gather = gather_rows
    c = dequantize(fmt, gather(c_kv, indices), gather(scales, indices), rank)
    kp = from_bits(gather(k_pe, indices), fmt.k_pe_dtype).astype(jnp.float32)
    scores = (jnp.einsum("bhc,bkc->bhk", q_lat.astype(jnp.float32), c)
              + jnp.einsum("bhr,bkr->bhk", q_pe.astype(jnp.float32), kp)) * scale
    scores = jnp.where(valid[:, None, :], scores, NEG)
    m = scores.max(-1)
    p = jnp.where(valid[:, None, :], jnp.exp(scores - m[..., None]), 0.0)
    l = p.sum(-1)
    out = jnp.einsum("bhk,bkc->bhc", p, c) / jnp.where(l > 0, l, 1.0)[..., None]
    if not with_lse:
        return out
    return out, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), NEG)


def selected_fraction(query_lengths: np.ndarray, index_topk: int) -> float:
    """Of the (query, visible key) pairs of queries that see query_lengths[i] keys each, the fraction that
    sparse attention attends to (1.0 when dense)."""
    seen = np.asarray(query_lengths, np.float64)
    if index_topk <= 0 or seen.sum() == 0:
        return 1.0
    return float(np.minimum(seen, index_topk).sum() / seen.sum())


def select_topk_sharded(scores, k: int, axis: str):
    """select_topk across a sequence-sharded cache: scores [b,s,T_local] of this device's tokens -> this
    device's share of the global top-k, (local indices [b,s,k'], valid [b,s,k']), valid only where the
    token is among the global k best. Each device offers its own best k; every device sees all offers (an
    all-gather of k scores per query and device, in device = position order, so ties break as on one device)
    and keeps the ones that win."""
    values, indices = jax.lax.top_k(scores, min(k, scores.shape[-1]))
    k_local = values.shape[-1]
    offers = jax.lax.all_gather(values, axis, axis=2, tiled=True)  # [b, s, devices * k_local]
    best, where = jax.lax.top_k(offers, min(k, offers.shape[-1]))
    mine = (where // k_local == jax.lax.axis_index(axis)) & (best > -jnp.inf)
    return jnp.take_along_axis(indices, where % k_local, axis=-1).astype(jnp.int32), mine
