"""Latent-cache storage formats: how c_kv and k_pe are stored per token, and what that costs.

c_kv is quantized symmetrically in groups of channels, one float32 scale per group and token; the last
group is shorter when kv_lora_rank is not a multiple of the group size. A scale factors out of a dot
product, so attention works on the stored values and applies the scales to partial scores and to
probabilities (ktjax/attention.py), never to every cached element.

int4 packs channel j in the low nibble and channel j + R/2 in the high nibble of byte j (R = kv_lora_rank,
padded to even), so a kernel unpacks two contiguous halves with no interleaving.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .runtime import cache_dtype_name


@dataclasses.dataclass(frozen=True)
class CacheFormat:
    name: str
    store_dtype: object           # dtype of stored c_kv elements (uint8 for packed int4)
    group: int = 0                # channels per scale; 0 = unquantized (no scales)
    qmax: float = 0.0             # largest quantized magnitude
    k_pe_dtype: object = jnp.bfloat16

    @property
    def quantized(self) -> bool:
        return self.group > 0

    @property
    def packed(self) -> bool:
        return self.name == "int4"

    def n_groups(self, rank: int) -> int:
        return -(-rank // self.group) if self.quantized else 0

    def stored_width(self, rank: int) -> int:
        """Elements per token in the stored c_kv array."""
        return (rank + 1) // 2 if self.packed else rank


FORMATS = {
    "float32": CacheFormat("float32", jnp.float32, k_pe_dtype=jnp.float32),
    "bf16": CacheFormat("bf16", jnp.bfloat16),
    "fp8": CacheFormat("fp8", jnp.float8_e4m3fn, group=128, qmax=float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)),
    "int8": CacheFormat("int8", jnp.int8, group=128, qmax=127.0),
    "int4": CacheFormat("int4", jnp.uint8, group=64, qmax=7.0),
}
SCALE_DTYPE = jnp.float32


def get_format(name: str) -> CacheFormat:
    return FORMATS[cache_dtype_name(name)]


def bytes_per_token_per_layer(fmt: CacheFormat, kv_lora_rank: int, rope_dim: int) -> int:
    """Stored bytes for one token in one layer: c_kv, its scales, and k_pe. Everything that sizes memory uses this."""
    c_kv = fmt.stored_width(kv_lora_rank) * jnp.dtype(fmt.store_dtype).itemsize
    scales = fmt.n_groups(kv_lora_rank) * jnp.dtype(SCALE_DTYPE).itemsize
    return c_kv + scales + rope_dim * jnp.dtype(fmt.k_pe_dtype).itemsize


def bytes_per_token(fmt: CacheFormat, cfg) -> int:
    """All layers of a model config."""
    return cfg.num_hidden_layers * bytes_per_token_per_layer(fmt, cfg.kv_lora_rank, cfg.qk_rope_head_dim)


def _grouped(x, group: int):
    """[..., R] -> [..., n_groups, group], zero-padding the last group."""
    r = x.shape[-1]
    n = -(-r // group)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * group - r)])
    return x.reshape(*x.shape[:-1], n, group)


def quantize(fmt: CacheFormat, c_kv):
    """c_kv [..., R] (float) -> (stored [..., stored_width], scales [..., n_groups] or None)."""
    if not fmt.quantized:
        return c_kv.astype(fmt.store_dtype), None
    r = c_kv.shape[-1]
    g = _grouped(c_kv.astype(jnp.float32), fmt.group)
    amax = jnp.max(jnp.abs(g), axis=-1)
    scale = jnp.where(amax > 0, amax / fmt.qmax, 1.0)
    q = g / scale[..., None]
    if fmt.name == "fp8":
        q = q.astype(fmt.store_dtype)
    else:
        q = jnp.clip(jnp.round(q), -fmt.qmax, fmt.qmax)
    q = q.reshape(*q.shape[:-2], -1)[..., :r]
    if fmt.packed:
        q = pack_int4(q.astype(jnp.int32))
    else:
        q = q.astype(fmt.store_dtype)
    return q, scale.astype(SCALE_DTYPE)


def pack_int4(q):
    """int values in [-7, 7], [..., R] -> uint8 [..., ceil(R/2)]: channel j low nibble, j + half high nibble."""
    r = q.shape[-1]
    half = (r + 1) // 2
    q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, 2 * half - r)]) + 8
    return (q[..., :half] | (q[..., half:] << 4)).astype(jnp.uint8)


def unpack_int4(packed, rank: int):
    """uint8 [..., ceil(R/2)] -> int8 [..., R]."""
    p = packed.astype(jnp.int32)
    return jnp.concatenate([(p & 15) - 8, (p >> 4) - 8], axis=-1)[..., :rank].astype(jnp.int8)


def stored_values(fmt: CacheFormat, stored, rank: int, dtype=jnp.float32):
    """The stored c_kv as numbers (int4 unpacked), without applying scales: [..., R]."""
    if fmt.packed:
        return unpack_int4(stored, rank).astype(dtype)
    return stored.astype(dtype)


def dequantize(fmt: CacheFormat, stored, scales, rank: int, dtype=jnp.float32):
    """(stored, scales) -> c_kv [..., R]. For references and tests; attention applies scales per group instead."""
    values = stored_values(fmt, stored, rank, jnp.float32)
    if fmt.quantized:
        values = (_grouped(values, fmt.group) * scales[..., None]).reshape(*values.shape[:-1], -1)[..., :rank]
    return values.astype(dtype)


def numpy_quantize_reference(fmt_name: str, x: np.ndarray) -> np.ndarray:
    """Round trip (quantize then dequantize) in plain numpy, written independently of the jnp code above."""
    fmt = FORMATS[fmt_name]
    x = np.asarray(x, np.float64)
    if not fmt.quantized:
        return x.astype(np.dtype(fmt.store_dtype)).astype(np.float64)
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
