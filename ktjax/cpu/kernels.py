"""ktjax's C++ kernels for the CPU (ktjax/cpu/csrc/): built on first use, called through XLA's FFI.

matmul.cc: XLA's CPU dot turns an int8/int4 weight into a float32 copy before multiplying, and a decode step is
a few rows against every weight (benchmarks/log/2026.md, "CPU kernels"). The kernels read the stored bytes once,
from weights held [out, in] (weights.py, KernelQuantized), on XLA's own thread pool; float32 weights held
[out, in] (KernelOutIn) run the same loops, which read them faster than XLA's few-row dot.
attention.cc: a decode step's absorbed attention over the latent cache (dense or paged, every cache format),
where XLA copies and converts each key block before two small einsums.

The library is built at first use (ktjax/cpu/build.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.cpu.build import registered

TARGETS = {np.dtype(np.int8): "KtjaxMatmulInt8", np.dtype(np.uint8): "KtjaxMatmulInt4",
           np.dtype(np.float32): "KtjaxMatmulF32"}
# activation_quant int8: the rows quantized to int8 per block and multiplied in integers (matmul.cc, "int8
# activations"); int8 weights' blocks are Q8_BLOCK inputs, int4 weights' their groups
Q8_TARGETS = {np.dtype(np.int8): "KtjaxMatmulInt8Q8", np.dtype(np.uint8): "KtjaxMatmulInt4Q8"}
Q8_BLOCK = 128
ATTENTION_TARGET = "KtjaxDecodeAttention"
HEADS_TARGET = "KtjaxHeadsMatmulF32"  # the absorbed attention's per-head products (w_uk, w_uv)
GROUPED_TARGET = "KtjaxGroupedMatmul"  # the routed experts: each group of rows by its own weight
GROUPED_FORMATS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.uint8): 2}  # matmul.cc's; +2: int8 activations
CACHE_FORMATS = {"float32": 0, "bf16": 1, "fp8": 2, "int8": 3, "int4": 4}  # attention.cc's Format
# Up to this many rows the kernels beat XLA's dequantize-then-dot (decode steps, short prefill chunks; a chunk's
# routed experts take the grouped call at any row count): they run at ~115-165 GFLOP/s at any row count, XLA at
# 50-120 below 128 rows (benchmarks/log/2026.md, "Decode attention in C++, and prefill with int8 / int4 weights").
MAX_ROWS = 64


def fits(rows: int) -> bool:
    """Whether a matmul of `rows` rows goes to a kernel; longer ones (prefill chunks) run XLA's dot, except the
    routed experts' grouped call (grouped_matmul), which takes any row count."""
    return rows <= MAX_ROWS


def matmul(x, values, scale=None, *, int8_activations: bool = False):
    """x [T, K] float32 @ a float32 ([N, K], no scales), int8 ([N, K], scales [N, 1]) or int4 ([N, P/2], scales
    [N, P/g]; x zero-padded to P) weight held [out, in] -> [T, N] float32; int8_activations (int8 / int4 weights):
    x quantized to int8 per block first (the setting activation_quant int8)."""
    registered()  # a program traced here may be compiled or loaded from JAX's persistent cache: register first
    dtype = np.dtype(values.dtype)
    out = jax.ShapeDtypeStruct((x.shape[0], values.shape[0]), jnp.float32)
    if dtype == np.float32:
        return jax.ffi.ffi_call(TARGETS[dtype], out, vmap_method="sequential")(x, values)
    if not int8_activations:
        return jax.ffi.ffi_call(TARGETS[dtype], out, vmap_method="sequential")(x, values, scale)
    block = {"block": np.int64(Q8_BLOCK)} if dtype == np.int8 else {}
    return jax.ffi.ffi_call(Q8_TARGETS[dtype], out, vmap_method="sequential")(x, values, scale, **block)


def grouped_matmul(x, group_sizes, weights, *, int8_activations: bool = False):
    """x [M, K] float32 with its rows sorted by group, group_sizes [E] int32, and E weights (values, scale) held
    [out, in] as `matmul` takes them (scale None for float32), all of one format -> [M, N] float32: group e's rows
    times weight e, in one call (rows past the groups' total come out 0)."""
    registered()
    dtype = np.dtype(weights[0][0].dtype)
    if dtype not in GROUPED_FORMATS or any(np.dtype(v.dtype) != dtype or v.shape != weights[0][0].shape
                                           for v, _ in weights):
        raise ValueError(f"grouped_matmul: weights of one shape and one of {list(map(str, GROUPED_FORMATS))}")
    fmt = GROUPED_FORMATS[dtype] + (2 if int8_activations and dtype != np.float32 else 0)
    arrays = [a for values, scale in weights for a in (values,) + (() if scale is None else (scale,))]
    out = jax.ShapeDtypeStruct((x.shape[0], weights[0][0].shape[0]), jnp.float32)
    return jax.ffi.ffi_call(GROUPED_TARGET, out, vmap_method="sequential")(
        x, group_sizes.astype(jnp.int32), *arrays, format=np.int64(fmt), block=np.int64(Q8_BLOCK))


def heads_matmul(x, w, *, in_out: bool):
    """x [T, H, K] float32 by each head's float32 matrix: w [H, K, N] ([in, out] per head, as w_uk is stored) or
    [H, N, K] ([out, in], as w_uv is) -> [T, H, N] float32."""
    registered()
    n = w.shape[2] if in_out else w.shape[1]
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(HEADS_TARGET, out, vmap_method="sequential")(x, w, in_out=bool(in_out))


def decode_attention(q_lat, q_pe, c_kv, scales, k_pe, page_table, layer, visible, *, fmt, scale: float):
    """A decode step's absorbed attention (kv/attention.py mla_decode_xla's arithmetic): queries q_lat [b,h,R] /
    q_pe [b,h,r] over keys [0, visible[b]) of `layer` -> o_lat [b,h,R] float32. Several queries per sequence
    (q_lat [b,s,h,R], q_pe [b,s,h,r], visible [b,s]: query j sees keys [0, visible[b,j])) -> [b,s,h,R], in one
    pass over each sequence's keys (a speculative verify pass, a short prefill tail).

    The cache is a page pool c_kv [L, pages, page_size, W] (container bits of fmt.store_dtype), scales
    [L, pages, page_size, G] float32 (quantized formats, else None), k_pe [L, pages, page_size, r], with
    page_table [b, width] int32; a dense cache [L, B, T, ...] is B pages of T slots, page_table [[0], [1], ...]."""
    multi = q_lat.ndim == 4
    b, s, h, rank = q_lat.shape if multi else (q_lat.shape[0], 1, *q_lat.shape[1:])
    # The kernel trusts these shapes (it reads raw buffers): a mismatch is a caller's bug, caught here at trace time.
    width = fmt.stored_width(rank)
    if (q_lat.ndim not in (3, 4) or q_pe.shape[:-1] != q_lat.shape[:-1] or q_pe.ndim != q_lat.ndim or c_kv.ndim != 4
            or c_kv.shape[-1] != width or k_pe.shape[:3] != c_kv.shape[:3] or k_pe.shape[-1] != q_pe.shape[-1]
            or page_table.shape[0] != b or visible.shape != ((b, s) if multi else (b,))
            or (scales is None) == fmt.quantized
            or (scales is not None and scales.shape != (*c_kv.shape[:3], fmt.n_groups(rank)))):
        raise ValueError(f"decode_attention: inconsistent shapes q_lat {q_lat.shape}, q_pe {q_pe.shape}, c_kv "
                         f"{c_kv.shape}, scales {None if scales is None else scales.shape}, k_pe {k_pe.shape}, "
                         f"page_table {page_table.shape}, visible {visible.shape} for the {fmt.name} format")
    registered()
    # The s queries of a sequence are s times the heads of one pass (attention.cc); visible [b, s] says whose.
    call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct((b, s * h, rank), jnp.float32),
                            vmap_method="sequential")
    dummy = jnp.zeros((1, 1, 1, 1), jnp.float32)
    out = call(q_lat.reshape(b, s * h, rank).astype(jnp.float32), q_pe.reshape(b, s * h, -1).astype(jnp.float32),
               c_kv, dummy if scales is None else scales, k_pe, page_table.astype(jnp.int32),
               jnp.reshape(layer, (1,)).astype(jnp.int32), visible.reshape(b, s).astype(jnp.int32),
               fmt=np.int64(CACHE_FORMATS[fmt.name]), group=np.int64(fmt.group), scale=np.float32(scale))
    return out.reshape(q_lat.shape[:-1] + (rank,))
