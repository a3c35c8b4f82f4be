"""Token sampling inside the jitted decode loop: greedy, temperature, top-k and top-p.

The settings are traced values, not static ones, so changing them never compiles a new program.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampling:
    temperature: jax.Array   # 0 = greedy
    top_k: jax.Array         # 0 = off
    top_p: jax.Array         # 1 = off

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> "Sampling":
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def sample(logits, key, s: Sampling):
    """logits [b, vocab] float32 -> token ids [b] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(s.temperature, 1e-6)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    vocab = logits.shape[-1]
    # top-k: keep logits at least as large as the k-th largest
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
    # top-p: keep the smallest prefix of sorted tokens whose probability reaches top_p
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_idx = jnp.sum(before < s.top_p, axis=-1, keepdims=True) - 1
    pth = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    keep = (scaled >= kth) & (scaled >= pth)
    sampled = jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1).astype(jnp.int32)
    return jnp.where(s.temperature > 0, sampled, greedy)
