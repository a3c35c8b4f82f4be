"""Quantizing latents into a cache format and reading them back (jnp); the formats are in formats.py.

A scale factors out of a dot product, so attention works on the stored values and applies the scales to
partial scores and to probabilities (kv/attention.py), never to every cached element; `dequantize` is for
references and tests.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ktjax.kv.formats import SCALE_DTYPE, CacheFormat, container


def to_bits(x):
    """x as the cache holds it (formats.container): narrow floats as their bit patterns."""
    bits = container(x.dtype)
    return x if bits == x.dtype else jax.lax.bitcast_convert_type(x, bits)


def from_bits(x, dtype):
    """The inverse of to_bits (a no-op on an array already of `dtype`)."""
    return x if x is None or x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def grouped(x, group: int):
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
    g = grouped(c_kv.astype(jnp.float32), fmt.group)
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
    """The stored c_kv (values or their bits) as numbers (int4 unpacked), without applying scales: [..., R]."""
    if fmt.packed:
        return unpack_int4(stored, rank).astype(dtype)
    return from_bits(stored, fmt.store_dtype).astype(dtype)


def dequantize(fmt: CacheFormat, stored, scales, rank: int, dtype=jnp.float32):
    """(stored, scales) -> c_kv [..., R]. For references and tests; attention applies scales per group instead."""
    values = stored_values(fmt, stored, rank, jnp.float32)
    if fmt.quantized:
        values = (grouped(values, fmt.group) * scales[..., None]).reshape(*values.shape[:-1], -1)[..., :rank]
    return values.astype(dtype)
