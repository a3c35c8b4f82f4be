"""DeepSeek's multi-token-prediction (MTP) module: a draft of the token after next, from the main model's hidden state.

DeepSeek-V3/R1/V3.2 store it as decoder layer num_hidden_layers (config.json num_nextn_predict_layers: 1):
`enorm`, `hnorm`, `eh_proj` (2d -> d, no bias), a full decoder block (its attention, its MLP or MoE, its two
norms), `shared_head.norm` and `shared_head.head` (vocab x d); the embedding is the main model's. As vLLM and
SGLang run it, for position p with h_p the main model's final-normed hidden state (what lm_head reads) and
t_{p+1} the next token:

    x  = eh_proj(concat([enorm(embed(t_{p+1})), hnorm(h_p)], -1))
    x' = block(x)                        at RoPE position p, over its own slice of the latent cache
    h' = shared_head.norm(x')            the hidden state a further draft step takes as its h
    logits(t_{p+2}) = shared_head.head(h')

MTPLayer is a DecoderLayer (block.py) with those five parameters more; the model holds it as a stack of one layer
(a leading layer axis of 1, like its other stacks: the parameter table, loaders, checkpoints, sharding and the
Engine's per-layer arrays treat it as one more stack, `mtp`, of the layer num_hidden_layers). Its cache slice is
layer num_hidden_layers of a cache made with extra_layers=1 (kv/cache.py). DeepseekModel.mtp_forward_cached
(decoder.py) runs it.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ktjax.model.block import DecoderLayer, RunOptions, make_stack
from ktjax.model.config import ModelConfig
from ktjax.model.layers import Linear, RMSNorm


class MTPLayer(DecoderLayer):
    """The MTP module of one layer: the fusion of the next token's embedding with the hidden state, the block
    (DecoderLayer's parameters), and its own output norm and head."""

    def __init__(self, cfg: ModelConfig, moe: bool, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, moe, dtype=dtype, rngs=rngs)
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm = RMSNorm(d, eps, dtype=dtype)
        self.hnorm = RMSNorm(d, eps, dtype=dtype)
        self.eh_proj = Linear(2 * d, d, dtype=dtype, rngs=rngs)
        self.head_norm = RMSNorm(d, eps, dtype=dtype)
        self.head = Linear(d, cfg.vocab_size, dtype=dtype, rngs=rngs)

    def fuse(self, embedded, hidden):
        """x = eh_proj([enorm(embed(t_{p+1})); hnorm(h_p)]): embedded and hidden [..., d] -> [..., d]."""
        e = self.enorm(embedded)
        return self.eh_proj(jnp.concatenate([e, self.hnorm(hidden.astype(e.dtype))], axis=-1))

    def output(self, x):
        """(logits [..., vocab] float32, normed hidden [..., d]) of the block's output x."""
        h = self.head_norm(x)
        return self.head(h).astype(jnp.float32), h

    def draft(self, embedded, hidden, cos, sin, mask, opts: RunOptions):
        """Without a cache (training, references): embedded / hidden [b,s,d] -> (logits, hidden out)."""
        return self.output(self(self.fuse(embedded, hidden), cos, sin, mask, opts))

    def draft_cached(self, index, embedded, hidden, cache, cos, sin, positions, lengths, logits_index,
                     opts: RunOptions):
        """Over cache layer `index` (DecoderLayer.cached) -> (logits float32, hidden out, cache); logits_index
        [b] picks one of the s positions (as DeepseekModel.forward_cached), None keeps all."""
        x, cache = self.cached(index, self.fuse(embedded, hidden), cache, cos, sin, positions, lengths, opts)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]
        logits, h = self.output(x)
        return logits, h, cache


def make_mtp(cfg: ModelConfig, *, dtype, rngs: nnx.Rngs) -> MTPLayer | None:
    """The MTP module as a stack of cfg.mtp_layers (0 or 1) layers; None without one."""
    return make_stack(cfg, cfg.mtp_moe, cfg.mtp_layers, dtype=dtype, rngs=rngs, layer=MTPLayer)
