"""DeepSeek-V3's FP8 weight format: float8_e4m3fn values with one float32 scale per 128 x 128 block."""
from __future__ import annotations

import numpy as np

FP8_BLOCK = 128


def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK,
                      dtype=np.float32) -> np.ndarray:
    """W[i, j] = q[i, j] * scale_inv[i // block, j // block], partial edge blocks included."""
    rows, cols = q.shape
    want = (-(-rows // block), -(-cols // block))
    if scale_inv.shape != want:
        raise ValueError(f"scale shape {scale_inv.shape} does not match weight shape {q.shape} in {block}x{block} "
                         f"blocks (expected {want})")
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=0), block, axis=1)[:rows, :cols]
    return (q.astype(np.float32) * s).astype(dtype)
