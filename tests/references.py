"""Numpy references the tests hold ktjax's jnp code to, written independently of it."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from ktjax.kv.formats import FORMATS


def quantize_round_trip(fmt_name: str, x: np.ndarray) -> np.ndarray:
    """A latent cache format's round trip (quantize then dequantize) in float64 numpy."""
    fmt = FORMATS[fmt_name]
    x = np.asarray(x, np.float64)
    if not fmt.quantized:
        return x.astype(fmt.store_dtype).astype(np.float64)
    out = np.empty_like(x)
    for start in range(0, x.shape[-1], fmt.group):
        block = x[..., start:start + fmt.group]
        amax = np.abs(block).max(-1, keepdims=True)
        scale = np.where(amax > 0, amax / fmt.qmax, 1.0).astype(np.float32).astype(np.float64)
        if fmt_name == "fp8":
            q = (block / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        else:
            q = np.clip(np.round(block / scale), -fmt.qmax, fmt.qmax)
        out[..., start:start + fmt.group] = q * scale
    return out
