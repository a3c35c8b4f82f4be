"""Token sampling inside the jitted decode loop: greedy, temperature, top-k and top-p.

The settings are traced values, not static ones, so changing them never compiles a new program. The top-k /
top-p filter sorts the vocabulary, which on the CPU costs more than a decode step's lm_head (7 ms for one row
of 32000 logits, 93 ms for 16 rows), so a step runs it only when some sampled row asks for it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampling:
    """Scalars (every row alike) or [b] arrays (one setting per row)."""
    temperature: jax.Array   # 0 = greedy
    top_k: jax.Array         # 0 = off
    top_p: jax.Array         # 1 = off

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> "Sampling":
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def _top_k_top_p(scaled, top_k, top_p):
    """Logits outside each row's top-k and top-p (smallest prefix of sorted tokens reaching top_p) -> -inf.
    scaled [b, vocab]; top_k, top_p [b, 1]."""
    vocab = scaled.shape[-1]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, k - 1, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_idx = jnp.sum(before < top_p, axis=-1, keepdims=True) - 1
    pth = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    return jnp.where((scaled >= kth) & (scaled >= pth), scaled, -jnp.inf)


def _scaled(logits, s: Sampling):
    """(temperature [b, 1], logits [b, vocab] scaled by it and filtered by each sampled row's top-k / top-p)."""
    b = logits.shape[0]
    row = lambda v: jnp.broadcast_to(jnp.asarray(v), (b,))[:, None]  # noqa: E731
    temperature, top_k, top_p = row(s.temperature), row(s.top_k), row(s.top_p)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    filtered = (temperature > 0) & ((top_k > 0) | (top_p < 1))
    return temperature, jax.lax.cond(filtered.any(), _top_k_top_p, lambda x, *_: x, scaled, top_k, top_p)


def sample(logits, key, s: Sampling):
    """logits [b, vocab] float32 -> token ids [b] int32. key: one key for the batch, or [b] keys (a random
    stream per row, as the server keeps)."""
    b = logits.shape[0]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature, scaled = _scaled(logits, s)

    def draw(scaled):
        if jnp.ndim(key) == 0:
            return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
        # each row from its own key, drawn as a batch of one (the same draw as sampling that row alone)
        return jax.vmap(lambda k, r: jax.random.categorical(k, r[None], axis=-1)[0])(key, scaled).astype(jnp.int32)

    # An all-greedy batch skips the draw: its random numbers over the vocabulary cost more than the argmax.
    sampled = jax.lax.cond((temperature > 0).any(), draw, lambda x: jnp.zeros((b,), jnp.int32), scaled)
    return jnp.where(temperature[:, 0] > 0, sampled, greedy)


def distribution(logits, s: Sampling):
    """The distribution `sample` draws each row from, as probabilities [b, vocab] float32: softmax of the scaled,
    filtered logits; one-hot at the argmax for a greedy row (speculative decoding's rejection rule then accepts
    exactly the argmax)."""
    temperature, scaled = _scaled(logits, s)
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    # an all-greedy batch skips the softmax over the vocabulary
    return jax.lax.cond((temperature > 0).any(),
                        lambda: jnp.where(temperature > 0, jax.nn.softmax(scaled, axis=-1), greedy), lambda: greedy)


def draw_from(probs, key, s: Sampling):
    """A token per row [b] int32 from probabilities [b, vocab] (as `distribution` gives): a random draw where
    some row samples, the argmax otherwise (a greedy row's distribution is one-hot)."""
    temperature = jnp.broadcast_to(jnp.asarray(s.temperature), probs.shape[:1])
    return jax.lax.cond((temperature > 0).any(),
                        lambda p: jax.random.categorical(key, jnp.log(p), axis=-1).astype(jnp.int32),
                        lambda p: jnp.argmax(p, axis=-1).astype(jnp.int32), probs)


def repeat_rows(s: Sampling, b: int, n: int) -> Sampling:
    """Settings for [b * n] rows: each of b rows' settings n times (row i's n positions, flattened)."""
    return jax.tree.map(lambda v: jnp.repeat(jnp.broadcast_to(jnp.asarray(v), (b,)), n), s)
