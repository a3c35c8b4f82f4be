"""The Engine: a loaded model plus its runtime settings, with jitted entry points."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig
from .errors import KtjaxError
from .model import DeepseekModel
from .runtime import RuntimeConfig

MIN_BUCKET = 16


def seq_bucket(n: int) -> int:
    """Pad lengths to powers of two (at least 16), so that many lengths share a few compiled programs."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "absorb", "moe_impl", "dtype"))
def _forward(graphdef, state, tokens, *, absorb, moe_impl, dtype):
    return nnx.merge(graphdef, state)(tokens, absorb=absorb, moe_impl=moe_impl, dtype=dtype)


class Engine:
    def __init__(self, cfg: ModelConfig, model: DeepseekModel, runtime: RuntimeConfig):
        self.cfg = cfg
        self.runtime = runtime
        self.graphdef, self.state = nnx.split(model)  # split once; the jitted functions take the pure state

    @property
    def model(self) -> DeepseekModel:
        return nnx.merge(self.graphdef, self.state)

    def logits(self, token_ids) -> np.ndarray:
        """Full-forward logits [batch, seq, vocab] (float32) for token ids [batch, seq] (or one sequence [seq])."""
        try:
            tokens = np.asarray(token_ids)
        except ValueError:
            raise KtjaxError("token_ids must be rectangular: every sequence of the batch the same length") from None
        if tokens.ndim == 1:
            return self.logits(tokens[None])[0]
        if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise KtjaxError(f"token_ids must be integers of shape [batch, seq] with seq >= 1, got {tokens.shape} "
                             f"{tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
            raise KtjaxError(f"token ids must lie in [0, {self.cfg.vocab_size}); got {tokens.min()}..{tokens.max()}")
        b, s = tokens.shape
        padded = np.zeros((b, seq_bucket(s)), np.int32)
        padded[:, :s] = tokens  # causal: padding after the sequence cannot change its logits
        out = _forward(self.graphdef, self.state, jnp.asarray(padded),
                       absorb=self.runtime.absorb(self.cfg, b, padded.shape[1]),
                       moe_impl=self.runtime.moe_impl, dtype=self.runtime.jnp_dtype)
        return np.asarray(out[:, :s])
