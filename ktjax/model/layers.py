"""Building blocks shared by attention and MLPs: Linear, RMSNorm, rotary embedding (with YaRN), SwiGLU MLP."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.model.config import RopeConfig
from ktjax.model import quantized as weight_quant

_init = nnx.initializers.normal(0.02)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out] (Hugging Face stores [out, in]; the loader transposes).

    A quantized checkpoint sets `kernel` to a weight_quant.QuantizedArray: FP8 values with their 128 x 128
    block scales [ceil(in/128), ceil(out/128)], dequantized on the way into the matmul, or int8/int4 values
    with per-channel or group scales (ktjax/model/quantized.py), which the matmul reads tile by tile.
    """

    def __init__(self, d_in: int, d_out: int, *, bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(rngs.params(), (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x):
        y = weight_quant.matmul(x, self.kernel[...])
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        # Normalise in float32 whatever the compute dtype, as the reference does.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    """Mean-centred norm with weight and bias (the DSA indexer's key norm), in float32 as the reference."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        self.gate_proj = Linear(d_model, d_ff, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d_model, d_ff, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(d_ff, d_model, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(rope: RopeConfig) -> np.ndarray:
    """Inverse frequencies, [dim // 2]; YaRN blends interpolated and extrapolated ones with a linear ramp."""
    dim = rope.dim
    pos_freqs = rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    if not rope.yarn:
        return extrapolation
    interpolation = 1.0 / (rope.factor * pos_freqs)

    def correction_dim(rotations):
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep_extrapolated = 1.0 - ramp
    return (interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated).astype(np.float32)


def rope_cos_sin(rope: RopeConfig, positions):
    """cos and sin, [..., dim // 2], for integer positions [...]; YaRN's attention factor is folded in."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(rope))
    return jnp.cos(angles) * rope.attention_factor, jnp.sin(angles) * rope.attention_factor


def apply_rope(x, cos, sin, interleave: bool):
    """Rotate x [..., seq, (heads,) dim] by cos/sin [batch, seq, dim // 2].

    DeepSeek's layout rotates interleaved pairs (x0, x1), (x2, x3), ...; the other layout pairs x_i with
    x_{i + dim/2}. Both come out as [first of each pair, second of each pair]: queries and keys share the
    layout, so their dot products equal the reference's whichever order the rotated vectors are kept in.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    if x.ndim == cos.ndim + 1:  # a heads axis
        cos, sin = cos[..., None, :], sin[..., None, :]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
