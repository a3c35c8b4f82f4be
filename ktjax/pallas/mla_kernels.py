"""Pallas (Triton) kernels for absorbed MLA attention over a quantized latent cache.

All heads of a sequence share one latent cache, so attention is multi-query in latent space: the rows of
the score matmul are (query, head) pairs and every row reads the same c_kv / k_pe tiles. One kernel serves
decode and prefill: each row carries the position of the last key it may see (`last_key`; decode:
length - 1, prefill: min(q_position, length - 1), -1 for padding rows).

Split-K flash decoding: the grid runs over (row blocks, splits, batch). Split j of a sequence takes its
share of that row block's visible key tiles (the share is computed in the kernel from the real length,
so a short sequence in a long cache still spreads over all splits), runs an fp32 online softmax, and
writes an unnormalised partial output with its running max and sum; `merge_splits` combines them.

Quantized caches stay quantized in memory: each chunk of stored values (one scale group; see layout.py)
is dequantized in registers, its partial score q_chunk . c_chunk is multiplied by the group's scale, and
the probabilities are multiplied by the same scale before p @ c_chunk. The dots run in the queries' dtype
(bf16 queries: bf16 tensor-core operands, exact for every stored format but float32; float32 queries: true
float32 products) and always accumulate in float32.

The references are ktjax.kv.attention.mla_prefill_xla / mla_decode_xla (same signatures, same math).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ktjax.kv.formats import CacheFormat
from ktjax.pallas import platform
from ktjax.pallas.layout import MIN_DOT, LatentLayout, latent_layout, next_pow2, pad_last, stored_for_kernel

NEG = -1e30               # finite "minus infinity": keeps exp(m_old - m_new) free of inf - inf
MIN_TOKENS_PER_SPLIT = 256


# ---------------------------------------------------------------------------------------------- kernel

def decode_e4m3_bits(raw):
    """uint8 bits of float8_e4m3fn -> float32, for GPUs without Triton's e4m3 type (before Ada).
    Finite values only: the cache never stores NaN (quantize clips to +-448)."""
    bits = raw.astype(jnp.int32)
    sign = jnp.where((bits >> 7) != 0, -1.0, 1.0)
    exponent = (bits >> 3) & 15
    mantissa = bits & 7
    # A normal e4m3 number is a float32 with the exponent rebiased (7 -> 127) and the mantissa moved up.
    normal = jax.lax.bitcast_convert_type(((exponent + 120) << 23) | (mantissa << 20), jnp.float32)
    subnormal = mantissa.astype(jnp.float32) * (2.0 ** -9)
    return sign * jnp.where(exponent == 0, subnormal, normal)


def _chunk_values(raw, part: str, fp8_bits: bool):
    """A loaded tile of stored values -> the numbers it holds (scales not applied)."""
    if part == "low":
        return (raw.astype(jnp.int32) & 15) - 8
    if part == "high":
        return (raw.astype(jnp.int32) >> 4) - 8
    if fp8_bits:
        return decode_e4m3_bits(raw)
    return raw


def _dot(a, b, *, trans_b=False):
    # float32 operands get true float32 products (not tf32): the tests hold the kernel to the f32 reference.
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_b=trans_b, precision=precision)


def mla_kernel(last_key_ref, q_lat_ref, q_pe_ref, c_kv_ref, scales_ref, k_pe_ref, o_ref, m_ref, l_ref, *,
               layout: LatentLayout, softmax_scale: float, block_k: int, num_splits: int, dot_dtype,
               fp8_bits: bool, tile_index=None):
    """One (row block, split, sequence) program. Refs: last_key [bm], q_lat [bm, Rp], q_pe [bm, rp],
    c_kv [T, Wp], scales [T, Gp] or None, k_pe [T, rp]; out: o [bm, Rp] (unnormalised), m [bm], l [bm].
    tile_index(tile) -> the leading indices of key tile `tile` in the cache refs (default: rows
    [tile * block_k, +block_k)); the paged kernel (paged.py) points them at a page of the pool instead."""
    split = pl.program_id(1)
    last_key = last_key_ref[...]
    q_pe = q_pe_ref[...].astype(dot_dtype)
    q_chunks = [q_lat_ref[:, pl.ds(c.out, c.width)].astype(dot_dtype) for c in layout.chunks]

    # This split's share of the key tiles that any row of the block can see.
    n_tiles = pl.cdiv(jnp.max(last_key) + 1, block_k)
    tiles_per_split = pl.cdiv(n_tiles, num_splits)
    first_tile = split * tiles_per_split
    end_tile = jnp.minimum(first_tile + tiles_per_split, n_tiles)

    def body(tile, carry):
        m, l, accs = carry
        start = pl.multiple_of(tile * block_k, block_k)
        keys = (pl.ds(start, block_k),) if tile_index is None else tile_index(tile)
        raw_tiles = {}  # an int4 byte tile feeds its low and its high chunk

        def values(c):
            if c.col not in raw_tiles:
                raw_tiles[c.col] = c_kv_ref[(*keys, pl.ds(c.col, c.width))]
            return _chunk_values(raw_tiles[c.col], c.part, fp8_bits).astype(dot_dtype)

        chunk_values = [values(c) for c in layout.chunks]
        chunk_scales = [None if scales_ref is None else scales_ref[(*keys, c.group)] for c in layout.chunks]

        scores = _dot(q_pe, k_pe_ref[(*keys, slice(None))].astype(dot_dtype), trans_b=True)
        for q_c, v_c, s_c in zip(q_chunks, chunk_values, chunk_scales):
            partial = _dot(q_c, v_c, trans_b=True)
            scores += partial if s_c is None else partial * s_c[None, :]
        visible = (start + jnp.arange(block_k))[None, :] <= last_key[:, None]
        scores = jnp.where(visible, scores * softmax_scale, NEG)

        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        p = jnp.where(visible, jnp.exp(scores - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        l_new = l * correction + jnp.sum(p, axis=1)
        accs_new = []
        for acc, v_c, s_c in zip(accs, chunk_values, chunk_scales):
            p_c = p if s_c is None else p * s_c[None, :]
            accs_new.append(acc * correction[:, None] + _dot(p_c.astype(dot_dtype), v_c))
        return m_new, l_new, tuple(accs_new)

    rows = last_key.shape[0]
    init = (jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
            tuple(jnp.zeros((rows, c.width), jnp.float32) for c in layout.chunks))
    m, l, accs = jax.lax.fori_loop(first_tile, end_tile, body, init)

    # Every program writes all of its outputs, also when its split has no keys (m = NEG, l = 0, o = 0).
    m_ref[...] = m
    l_ref[...] = l
    for c, acc in zip(layout.chunks, accs):
        o_ref[:, pl.ds(c.out, c.width)] = acc


def merge_splits(o, m, l):
    """Partials o [b, splits, rows, Rp], m / l [b, splits, rows] -> normalised [b, rows, Rp].
    Rows that saw no key (l = 0) give 0; an unwritten (NaN) partial stays NaN."""
    m_max = jnp.max(m, axis=1, keepdims=True)
    weight = jnp.exp(m - m_max)
    l_total = jnp.sum(l * weight, axis=1)
    o_total = jnp.sum(o * weight[..., None], axis=1)
    return o_total * jnp.where(l_total == 0, 0.0, 1.0 / l_total)[..., None]


# --------------------------------------------------------------------------------------------- wrapper

@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tiling. None means: chosen from the shapes and the device (see `kernel_config`)."""
    block_m: int | None = None      # rows ((query, head) pairs) per program
    block_k: int | None = None      # keys per tile
    num_splits: int | None = None   # splits of the key range per sequence
    num_warps: int | None = None
    num_stages: int | None = None


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def choose_num_splits(programs_per_split: int, cache_len: int, cores: int, waves: int = 2) -> int:
    """Enough programs to fill the GPU `waves` times over (two for the Triton kernels; one for the Mosaic kernel,
    whose program takes a whole SM's shared memory), but no split shorter than MIN_TOKENS_PER_SPLIT tokens."""
    wanted = pl.cdiv(waves * cores, programs_per_split)
    return int(max(1, min(wanted, cache_len // MIN_TOKENS_PER_SPLIT)))


def dot_dtype_of(q_lat):
    """The dots' operand dtype for these queries: bf16 queries give bf16 tensor-core operands, anything else float32."""
    return jnp.bfloat16 if q_lat.dtype == jnp.bfloat16 else jnp.float32


def kernel_config(config: KernelConfig, *, rows: int, batch: int, cache_len: int, rank_p: int,
                  fmt: CacheFormat, dot_dtype) -> KernelConfig:
    """The tiling for one call: `config`'s fields where set, else the defaults measured on an H200 (docs/results.md,
    "GPU"; benchmarks/sweep_mla_kernels.py). With bf16 queries on a GPU whose shared memory holds them
    (platform.wide_tiles: Hopper), blocks of 64 rows (V3's 128 heads in two blocks sharing each cache tile through
    L2) and 8 warps, and tiles of 64 keys for 1- and 2-byte caches, 32 for int4 and float32 (a float32 tile of 64
    keys does not fit shared memory twice). Elsewhere 32 rows and 32 keys; float32 queries keep 32 rows, as their
    64 x 512 accumulator and query chunks would not fit 8 warps' registers."""
    wide = jnp.dtype(dot_dtype) == jnp.bfloat16 and platform.wide_tiles()
    block_m = config.block_m or min(64 if wide else 32, next_pow2(rows, MIN_DOT))
    wide_keys = wide and fmt.name in ("bf16", "fp8", "int8")
    block_k = config.block_k or (64 if wide_keys or rank_p < 256 else 32)
    block_k = min(block_k, _largest_pow2_divisor(cache_len))
    row_blocks = pl.cdiv(rows, block_m)
    num_splits = config.num_splits or choose_num_splits(row_blocks * batch, cache_len, platform.core_count())
    num_warps = config.num_warps or (8 if block_m * rank_p >= 32 * 512 else 4)
    for name, size in (("block_m", block_m), ("block_k", block_k)):
        if size < MIN_DOT or size & (size - 1):
            raise ValueError(f"{name}={size}: Triton tiles need a power of two >= {MIN_DOT}")
    return KernelConfig(block_m, block_k, num_splits, num_warps, config.num_stages or 2)


def _pad_cache_len(x, multiple: int):
    """Pad the token axis (1) to a multiple; only caches whose length has no power-of-two factor >= 16."""
    if x is None or x.shape[1] % multiple == 0:
        return x
    extra = -x.shape[1] % multiple
    return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _pad_rows(x, rows_p: int, value=0):
    extra = rows_p - x.shape[1]
    return x if extra == 0 else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def mla_attention(q_lat, q_pe, c_kv, scales, k_pe, last_key, *, fmt: CacheFormat, scale: float,
                  config: KernelConfig = KernelConfig(), interpret: bool | None = None,
                  fp8_bits: bool | None = None, poison_outputs: bool = False):
    """Rows q_lat [b, n, R] / q_pe [b, n, r], each seeing keys [0, last_key[b, i]] -> o_lat [b, n, R] f32."""
    interpret = platform.resolve_interpret(interpret)
    if fp8_bits is None:
        fp8_bits = platform.fp8_needs_bit_decode(interpret)
    fp8_bits = fp8_bits and fmt.name == "fp8"
    batch, rows, rank = q_lat.shape
    layout = latent_layout(fmt, rank)
    rope_p = next_pow2(q_pe.shape[-1], MIN_DOT)

    if c_kv.shape[1] % MIN_DOT:
        c_kv, scales, k_pe = (_pad_cache_len(x, MIN_DOT) for x in (c_kv, scales, k_pe))
    cache_len = c_kv.shape[1]
    dot_dtype = dot_dtype_of(q_lat)
    cfg = kernel_config(config, rows=rows, batch=batch, cache_len=cache_len, rank_p=layout.rank_p, fmt=fmt,
                        dot_dtype=dot_dtype)
    row_blocks = pl.cdiv(rows, cfg.block_m)
    rows_p = row_blocks * cfg.block_m

    c_kv, scales = stored_for_kernel(layout, fmt, c_kv, scales)
    if fp8_bits:
        c_kv = jax.lax.bitcast_convert_type(c_kv, jnp.uint8)  # free: same bytes, read as integers
    q_lat = _pad_rows(pad_last(q_lat, layout.rank_p), rows_p)
    q_pe = _pad_rows(pad_last(q_pe, rope_p), rows_p)
    k_pe = pad_last(k_pe, rope_p)
    last_key = _pad_rows(last_key.astype(jnp.int32), rows_p, value=-1)

    kernel = functools.partial(
        _kernel_with_optional_scales, has_scales=scales is not None, n_poisoned=3 if poison_outputs else 0,
        layout=layout, softmax_scale=float(scale), block_k=cfg.block_k, num_splits=cfg.num_splits,
        dot_dtype=dot_dtype, fp8_bits=fp8_bits)

    rows_spec = lambda *tail: pl.BlockSpec((None, cfg.block_m, *tail), lambda i, j, b: (b, i) + (0,) * len(tail))
    cache_spec = lambda width: pl.BlockSpec((None, cache_len, width), lambda i, j, b: (b, 0, 0))
    part_spec = lambda *tail: pl.BlockSpec((None, None, cfg.block_m, *tail),
                                           lambda i, j, b: (b, j, i) + (0,) * len(tail))
    inputs = [last_key, q_lat, q_pe, c_kv] + ([scales] if scales is not None else []) + [k_pe]
    in_specs = [rows_spec(), rows_spec(layout.rank_p), rows_spec(rope_p), cache_spec(layout.width_p)]
    in_specs += [cache_spec(layout.n_groups_p)] if scales is not None else []
    in_specs += [cache_spec(rope_p)]
    out_shape = [jax.ShapeDtypeStruct((batch, cfg.num_splits, rows_p, layout.rank_p), jnp.float32),
                 jax.ShapeDtypeStruct((batch, cfg.num_splits, rows_p), jnp.float32),
                 jax.ShapeDtypeStruct((batch, cfg.num_splits, rows_p), jnp.float32)]
    out_specs = [part_spec(layout.rank_p), part_spec(), part_spec()]

    aliases = {}
    if poison_outputs:
        # Pass NaN-filled buffers as the outputs: an element the kernel never writes stays NaN.
        aliases = {len(inputs) + k: k for k in range(3)}
        inputs += [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
        in_specs += out_specs

    o, m, l = pl.pallas_call(
        kernel,
        grid=(row_blocks, cfg.num_splits, batch),  # row blocks vary fastest: programs sharing a cache slice run together
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="mla_attention",
    )(*inputs)
    return merge_splits(o, m, l)[:, :rows, :rank]


def _kernel_with_optional_scales(*refs, has_scales: bool, n_poisoned: int, **kw):
    """pallas_call passes refs positionally; unquantized caches have no scales input."""
    if not has_scales:
        refs = refs[:4] + (None,) + refs[4:]
    ins, outs = refs[:6], refs[6 + n_poisoned:]
    mla_kernel(*ins, *outs, **kw)


# ------------------------------------------------------------------------------------ public functions

def mla_prefill(q_lat, q_pe, c_kv, scales, k_pe, q_positions, lengths, *, fmt: CacheFormat, scale: float,
                block: int, config: KernelConfig = KernelConfig(), interpret: bool | None = None,
                fp8_bits: bool | None = None, poison_outputs: bool = False):
    """Pallas twin of ktjax.kv.attention.mla_prefill_xla: q_lat [b,s,h,R], q_pe [b,s,h,r] -> o_lat [b,s,h,R] f32.
    Query i of sequence b sees key t iff t < lengths[b] and t <= q_positions[b, i]. (`block` is the XLA
    path's tile; the kernel picks its own, see KernelConfig.)"""
    del block
    b, s, h, rank = q_lat.shape
    last_key = jnp.minimum(q_positions, lengths[:, None] - 1)                     # [b, s]
    last_key = jnp.broadcast_to(last_key[:, :, None], (b, s, h)).reshape(b, s * h)
    out = mla_attention(q_lat.reshape(b, s * h, rank), q_pe.reshape(b, s * h, -1), c_kv, scales, k_pe,
                        last_key, fmt=fmt, scale=scale, config=config, interpret=interpret, fp8_bits=fp8_bits,
                        poison_outputs=poison_outputs)
    return out.reshape(b, s, h, rank)


def mla_decode(q_lat, q_pe, c_kv, scales, k_pe, lengths, *, fmt: CacheFormat, scale: float, block: int,
               config: KernelConfig = KernelConfig(), interpret: bool | None = None,
               fp8_bits: bool | None = None, poison_outputs: bool = False):
    """Pallas twin of ktjax.kv.attention.mla_decode_xla: q_lat [b,h,R], q_pe [b,h,r] over keys
    [0, lengths[b]) -> o_lat [b,h,R] f32."""
    del block
    b, h, _ = q_lat.shape
    last_key = jnp.broadcast_to((lengths - 1)[:, None], (b, h))
    return mla_attention(q_lat, q_pe, c_kv, scales, k_pe, last_key, fmt=fmt, scale=scale, config=config,
                         interpret=interpret, fp8_bits=fp8_bits, poison_outputs=poison_outputs)
