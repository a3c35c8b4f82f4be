"""DeepSeek-V3's FP8 weight format: float8_e4m3fn values with one float32 scale per 128 x 128 block, and the
products that keep both operands FP8 (DeepSeek's fp8_gemm: each input row quantized to e4m3 per block of 128
channels with its own scale, each 128-channel block's product scaled by the row's and the weight's scales)."""
from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_BLOCK = 128
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
ACT_AMAX_FLOOR = 1e-4


def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK,
                      dtype=np.float32) -> np.ndarray:
    """W[i, j] = q[i, j] * scale_inv[i // block, j // block], partial edge blocks included.

    Works one band of `block` rows at a time, so the only full-size array is the result. Leading axes (a
    stack of experts) are dequantized one matrix at a time.
    """
    if q.ndim > 2:
        return np.stack([dequantize_blocks(qi, si, block, dtype) for qi, si in zip(q, scale_inv)])
    rows, cols = q.shape
    want = (-(-rows // block), -(-cols // block))
    if scale_inv.shape != want:
        raise ValueError(f"scale shape {scale_inv.shape} does not match weight shape {q.shape} in {block}x{block} "
                         f"blocks (expected {want})")
    out = np.empty((rows, cols), dtype)
    for b, r0 in enumerate(range(0, rows, block)):
        s = np.repeat(scale_inv[b].astype(np.float32), block)[:cols]
        out[r0:r0 + block] = q[r0:r0 + block].astype(np.float32) * s
    return out


def block_scale_shape(shape: tuple, block: int = FP8_BLOCK) -> tuple:
    """The scale grid of a weight [..., rows, cols]: one scale per block x block tile of the last two axes."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block), -(-cols // block))


def dequantize(q, scale, dtype, block: int = FP8_BLOCK):
    """The same rule in jnp for weights [..., rows, cols] with scales [..., ceil(rows/block), ceil(cols/block)].

    Runs inside jit on the way into a matmul, so fp8 weights stay fp8 in memory.
    """
    import jax.numpy as jnp

    rows, cols = q.shape[-2:]
    s = jnp.repeat(jnp.repeat(scale.astype(jnp.float32), block, axis=-2)[..., :rows, :], block, axis=-1)[..., :cols]
    return (q.astype(jnp.float32) * s).astype(dtype)


def quantize_rows(x, block: int = FP8_BLOCK):
    """x [M, K] -> (e4m3 values [M, nk, block], float32 scales [M, nk]) with nk = ceil(K / block), the last
    block zero-padded: each block of a row scaled by amax / 448 (DeepSeek's act_quant), so that its largest
    value is e4m3's largest."""
    import jax.numpy as jnp

    m, k = x.shape
    nk = -(-k // block)
    blocks = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nk * block - k))).reshape(m, nk, block)
    # DeepSeek divides by 448 and then by the scale; here both are products with float32 reciprocals, which XLA
    # computes exactly as written (it turns a division by a constant or a broadcast into such a product anyway),
    # so the rounding to e4m3 is reproducible (tests/numpy_references.py fp8_act_quant). amax is floored at
    # ACT_AMAX_FLOOR as in DeepSeek-V3.2's act_quant: an all-zero block gives zeros, not 0 / 0.
    scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1), ACT_AMAX_FLOOR) * jnp.float32(1 / E4M3_MAX)
    return (blocks * (1 / scale)[..., None]).astype(jnp.float8_e4m3fn), scale


def block_scaled_matmul(x, q, scale, block: int = FP8_BLOCK):
    """x [M, K] @ the FP8 weight q [K, N] (e4m3, stored [in, out]) with its block scales [ceil(K/b), ceil(N/b)]
    -> [M, N] float32, as FP8 operands: x's rows quantized per block of 128 channels (quantize_rows), one
    FP8 product per 128-channel block (a batched dot: e4m3 x e4m3, float32 sums), each scaled by the row's and
    the weight's scales, then summed over the blocks. The batched products are an [nk, M, N] float32
    intermediate, 4 M / 128 of the weight's bytes: the reason quantized.matmul takes this path only for a few
    rows (FP8_PRODUCT_ROWS)."""
    import jax
    import jax.numpy as jnp

    k, n = q.shape
    x_q, x_scale = quantize_rows(x, block)
    nk = x_q.shape[1]
    if nk * block != k:  # a partial last block (small models): zero rows, as the activations' padding
        q = jnp.pad(q, ((0, nk * block - k), (0, 0)))
    products = jax.lax.dot_general(x_q, q.reshape(nk, block, n), (((2,), (1,)), ((1,), (0,))),
                                   preferred_element_type=jnp.float32)                     # [nk, M, N]
    w_scale = jnp.repeat(scale.astype(jnp.float32), block, axis=-1)[:, :n]                 # [nk, N]
    return jnp.sum(products * x_scale.T[:, :, None] * w_scale[:, None, :], axis=0)  # one fused reduction
