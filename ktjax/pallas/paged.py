"""The Pallas MLA kernel over a page pool of the latent cache (LatentCache.pool, ktjax/kv/paged.py): the dense
kernel (mla_kernels.mla_kernel) with each key tile a whole page, found through the sequence's page table.

Each program gets its sequence's page-table row and the layer index as small inputs and the whole pool stack
[L, n_pages, page_size, W] as one ref; tile t of sequence b reads pool[layer, table[b, t]], so no layer or
sequence is ever copied out of the pool. Splits, the online softmax, the per-group scales and the merge are the
dense kernel's. The reference is the paged XLA path (a pool with attention None).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ktjax.kv.quant import from_bits
from ktjax.pallas import platform
from ktjax.pallas.layout import MIN_DOT, latent_layout, next_pow2, pad_last, stored_for_kernel
from ktjax.pallas.mla_kernels import (KernelConfig, _kernel_with_optional_scales, _pad_rows, dot_dtype_of, kernel_config,
                          merge_splits)


def kernel_fits(page_size: int) -> bool:
    """Triton tiles are powers of two >= MIN_DOT: a page is one key tile."""
    return page_size >= MIN_DOT and page_size & (page_size - 1) == 0


def paged_attention(q_lat, q_pe, cache, layer, q_positions, lengths, *, scale: float,
                    config: KernelConfig = KernelConfig(), interpret: bool | None = None,
                    fp8_bits: bool | None = None, poison_outputs: bool = False):
    """LatentCache.attend_latent over a page pool through the kernel: q_lat [b,s,h,R], q_pe [b,s,h,r] at
    q_positions [b,s] over keys [0, lengths[b]) of `layer` -> o_lat [b,s,h,R] float32."""
    b, s, h, rank = q_lat.shape
    last_key = jnp.minimum(q_positions, lengths[:, None] - 1)
    last_key = jnp.broadcast_to(last_key[:, :, None], (b, s, h)).reshape(b, s * h)
    out = paged_mla_attention(q_lat.reshape(b, s * h, rank), q_pe.reshape(b, s * h, -1), cache, layer, last_key,
                              scale=scale, config=config, interpret=interpret, fp8_bits=fp8_bits,
                              poison_outputs=poison_outputs)
    return out.reshape(b, s, h, rank)


def paged_mla_attention(q_lat, q_pe, cache, layer, last_key, *, scale: float, config: KernelConfig = KernelConfig(),
                        interpret: bool | None = None, fp8_bits: bool | None = None, poison_outputs: bool = False):
    """Rows q_lat [b, n, R] / q_pe [b, n, r], each seeing keys [0, last_key[b, i]] of sequence b -> [b, n, R]."""
    fmt, ps = cache.fmt, cache.page_size
    if not kernel_fits(ps):
        raise ValueError(f"page_size {ps}: the kernel needs a power of two >= {MIN_DOT}")
    interpret = platform.resolve_interpret(interpret)
    if fp8_bits is None:
        fp8_bits = platform.fp8_needs_bit_decode(interpret)
    fp8_bits = fp8_bits and fmt.name == "fp8"
    batch, rows, rank = q_lat.shape
    lay = latent_layout(fmt, rank)
    rope_p = next_pow2(q_pe.shape[-1], MIN_DOT)
    table = cache.page_table.astype(jnp.int32)
    dot_dtype = dot_dtype_of(q_lat)
    cfg = kernel_config(dataclasses.replace(config, block_k=ps), rows=rows, batch=batch,
                        cache_len=table.shape[1] * ps, rank_p=lay.rank_p, fmt=fmt, dot_dtype=dot_dtype)
    row_blocks = pl.cdiv(rows, cfg.block_m)
    rows_p = row_blocks * cfg.block_m

    c_kv, scales = stored_for_kernel(lay, fmt, from_bits(cache.c_kv, fmt.store_dtype), cache.scales)
    if fp8_bits:
        c_kv = jax.lax.bitcast_convert_type(c_kv, jnp.uint8)
    k_pe = pad_last(from_bits(cache.k_pe, fmt.k_pe_dtype), rope_p)
    q_lat = _pad_rows(pad_last(q_lat, lay.rank_p), rows_p)
    q_pe = _pad_rows(pad_last(q_pe, rope_p), rows_p)
    last_key = _pad_rows(last_key.astype(jnp.int32), rows_p, value=-1)

    kernel = functools.partial(
        _paged_kernel, has_scales=scales is not None, n_poisoned=3 if poison_outputs else 0, layout=lay,
        softmax_scale=float(scale), block_k=ps, num_splits=cfg.num_splits, dot_dtype=dot_dtype, fp8_bits=fp8_bits)

    rows_spec = lambda *tail: pl.BlockSpec((None, cfg.block_m, *tail), lambda i, j, b: (b, i) + (0,) * len(tail))  # noqa: E731
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, j, b: (0,) * x.ndim)  # noqa: E731
    part_spec = lambda *tail: pl.BlockSpec((None, None, cfg.block_m, *tail),  # noqa: E731
                                           lambda i, j, b: (b, j, i) + (0,) * len(tail))
    pools = [c_kv] + ([scales] if scales is not None else []) + [k_pe]
    layer_arr = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    inputs = [table, layer_arr, last_key, q_lat, q_pe] + pools
    in_specs = [pl.BlockSpec((None, table.shape[1]), lambda i, j, b: (b, 0)), whole(layer_arr),
                rows_spec(), rows_spec(lay.rank_p), rows_spec(rope_p)] + [whole(x) for x in pools]
    out_shape = [jax.ShapeDtypeStruct((batch, cfg.num_splits, rows_p, lay.rank_p), jnp.float32),
                 jax.ShapeDtypeStruct((batch, cfg.num_splits, rows_p), jnp.float32),
                 jax.ShapeDtypeStruct((batch, cfg.num_splits, rows_p), jnp.float32)]
    out_specs = [part_spec(lay.rank_p), part_spec(), part_spec()]
    aliases = {}
    if poison_outputs:  # as the dense kernel: an element never written stays NaN
        aliases = {len(inputs) + k: k for k in range(3)}
        inputs += [jnp.full(x.shape, jnp.nan, x.dtype) for x in out_shape]
        in_specs += out_specs

    o, m, l = pl.pallas_call(
        kernel, grid=(row_blocks, cfg.num_splits, batch), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret, name="paged_mla_attention",
    )(*inputs)
    return merge_splits(o, m, l)[:, :rows, :rank]


def _paged_kernel(table_ref, layer_ref, *refs, block_k: int, **kw):
    layer = layer_ref[0]

    def tile_index(tile):  # key tile `tile` is page table[tile] of this layer's pool
        return layer, table_ref[tile], pl.ds(0, block_k)

    _kernel_with_optional_scales(*refs, block_k=block_k, tile_index=tile_index, **kw)
