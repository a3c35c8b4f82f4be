"""Pallas (Triton) kernels for DeepSeek Sparse Attention's decode step: index scoring and attention over the
selected latent rows.

`index_scores_decode` scores one query per sequence against every cached index key: one program per (key
tile, sequence) loads the tile of keys [block_k, D] (bf16 / float32, or e4m3 with its per-token scales),
multiplies it by the query's heads [H, D], and reduces relu(dots) over the heads with their weights. The
index cache is 128 values per token against the latent cache's 576, so this pass is what remains of the
context-length cost of a sparse decode step. The top-k of the scores is XLA's (jax.lax.top_k).

`sparse_decode` attends over the selected tokens only: the selected rows (at most index_topk of them) are
gathered into a compact cache and the MLA kernel (mla_kernels.py) runs over that, every row seeing its
sequence's valid prefix (top_k returns the valid, finite scores first). The gather copies index_topk rows
(~1.3 MB per layer at V3.2's 2048 x 656 bytes), small beside the context the step no longer reads.

The references are ktjax.kv.sparse.index_scores and sparse_attend_gathered (same arguments, same values).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ktjax.kv.formats import CacheFormat, index_scaled, index_store_dtype
from ktjax.kv.quant import from_bits
from ktjax.kv.sparse import rotate_index
from ktjax.pallas import platform
from ktjax.pallas.layout import MIN_DOT, next_pow2, pad_last
from ktjax.pallas.mla_kernels import KernelConfig, _dot, decode_e4m3_bits, mla_attention

NEG_INF = float("-inf")


def _index_kernel(length_ref, q_ref, w_ref, k_ref, *rest, block_k: int, has_scale: bool, fp8_bits: bool):
    """One (key tile, sequence) program. q [Hp, Dp] (float32), w [Hp], k [block_k, Dp], scale [block_k]."""
    scale_ref, o_ref = rest if has_scale else (None, rest[0])
    raw = k_ref[...]
    k = decode_e4m3_bits(raw) if fp8_bits else raw.astype(jnp.float32)
    dots = _dot(q_ref[...], k, trans_b=True)                         # [Hp, block_k]
    scores = jnp.sum(w_ref[...][:, None] * jnp.maximum(dots, 0.0), axis=0)
    if has_scale:
        scores = scores * scale_ref[...]
    t = pl.program_id(0) * block_k + jnp.arange(block_k)
    o_ref[...] = jnp.where(t < length_ref[...], scores, NEG_INF)


def index_scores_decode(q_idx, weights, k_idx, k_scale, lengths, *, fmt: CacheFormat, block_k: int = 64,
                        interpret: bool | None = None, fp8_bits: bool | None = None):
    """One query per sequence: q_idx [b,H,D], weights [b,H] float32 over one layer's index cache k_idx [b,T,D]
    (stored bits), k_scale [b,T,1] or None, keys [0, lengths[b]) -> scores [b,T] float32 (-inf past the
    length). The Pallas twin of ktjax.kv.sparse.index_scores for one query at position lengths - 1."""
    interpret = platform.resolve_interpret(interpret)
    dtype = index_store_dtype(fmt)
    scaled = index_scaled(fmt)
    if fp8_bits is None:
        fp8_bits = platform.fp8_needs_bit_decode(interpret)
    fp8_bits = fp8_bits and scaled
    q_idx = rotate_index(fmt, q_idx)  # as the keys were stored (kv/sparse.py)
    b, heads, dim = q_idx.shape
    n_keys = k_idx.shape[1]
    block_k = min(block_k, n_keys & -n_keys)
    if block_k < MIN_DOT:
        raise ValueError(f"the index cache length {n_keys} needs a power-of-two factor of at least {MIN_DOT}")
    heads_p, dim_p = next_pow2(heads, MIN_DOT), next_pow2(dim, MIN_DOT)
    q = jnp.pad(pad_last(q_idx.astype(jnp.float32), dim_p), [(0, 0), (0, heads_p - heads), (0, 0)])
    w = pad_last(weights.astype(jnp.float32), heads_p)   # padded heads weigh 0
    k = k_idx if fp8_bits else from_bits(k_idx, dtype)
    k = pad_last(k, dim_p)
    inputs = [lengths.astype(jnp.int32), q, w, k]
    in_specs = [pl.BlockSpec((None,), lambda j, i: (i,)),
                pl.BlockSpec((None, heads_p, dim_p), lambda j, i: (i, 0, 0)),
                pl.BlockSpec((None, heads_p), lambda j, i: (i, 0)),
                pl.BlockSpec((None, block_k, dim_p), lambda j, i: (i, j, 0))]
    if scaled:
        inputs.append(k_scale[..., 0])
        in_specs.append(pl.BlockSpec((None, block_k), lambda j, i: (i, j)))
    kernel = functools.partial(_index_kernel, block_k=block_k, has_scale=scaled, fp8_bits=fp8_bits)
    return pl.pallas_call(
        kernel,
        grid=(n_keys // block_k, b),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_k), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((b, n_keys), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="dsa_index_scores",
    )(*inputs)


def sparse_decode(q_lat, q_pe, c_kv, scales, k_pe, indices, valid, *, fmt: CacheFormat, scale: float,
                  config: KernelConfig = KernelConfig(), interpret: bool | None = None,
                  fp8_bits: bool | None = None):
    """Pallas twin of ktjax.kv.sparse.sparse_attend_gathered: q_lat [b,h,R], q_pe [b,h,r] over the tokens
    indices [b,k] of one layer's cache (c_kv [b,T,W] stored values, scales [b,T,G] or None, k_pe [b,T,r]),
    valid [b,k] a prefix of each row (select_topk's order) -> o_lat [b,h,R] float32."""
    b, h, _ = q_lat.shape
    rows = jnp.arange(b)[:, None]
    k = indices.shape[1]
    pad = next_pow2(k, MIN_DOT) - k  # the kernel tiles the (compact) cache in powers of two
    indices = jnp.pad(indices, [(0, 0), (0, pad)])

    def gather(x):
        return None if x is None else x[rows, indices]

    last_key = jnp.broadcast_to((jnp.sum(valid, axis=1) - 1)[:, None], (b, h))
    return mla_attention(q_lat, q_pe, gather(c_kv), gather(scales), gather(k_pe), last_key, fmt=fmt, scale=scale,
                         config=config, interpret=interpret, fp8_bits=fp8_bits)
