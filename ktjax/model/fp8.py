"""DeepSeek-V3's FP8 weight format: float8_e4m3fn values with one float32 scale per 128 x 128 block."""
from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_BLOCK = 128
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


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

