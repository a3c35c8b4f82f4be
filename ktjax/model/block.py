"""One decoder block (MLA then a dense MLP or MoE, each behind its RMSNorm and residual), what a forward pass is
specialised on (RunOptions), and a stack of blocks with every parameter stacked along a leading layer axis. The
decoder (decoder.py) stacks the model's layers from it; the multi-token-prediction module (mtp.py) is one more."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from ktjax.model.config import ModelConfig
from ktjax.model.layers import MLP, RMSNorm
from ktjax.model.mla import MLA
from ktjax.model.moe import MoE


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What a forward pass is specialised on (static under jax.jit)."""
    absorb: bool                    # absorbed (latent-space) or naive attention for these queries
    moe_impl: str = "auto"          # routed experts: auto, gather, ragged or blocked (moe.py)
    dtype: Any = jnp.float32        # compute dtype
    mesh: Any = None                # with expert_axis: the mesh whose axis splits the expert stacks
    expert_axis: str | None = None
    index_topk: int = 0             # sparse attention (DSA): keys kept per query; 0 = dense (no indexer)
    grouped_impl: str = "blocked"   # what moe_impl auto runs for many selections (the Engine: the backend door's)
    defer_experts: int = 0          # expert deferral: each token's k lowest-weight routed experts enter one MoE
                                    # layer later (DecoderLayer.deferring_ffn); 0 = off


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.attn = MLA(cfg, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = (MoE(cfg, dtype=dtype, rngs=rngs) if moe else
                    MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs))

    def feed_forward(self, x, opts: RunOptions):
        h = self.post_attn_norm(x)
        if isinstance(self.mlp, MoE):
            return x + self.mlp(h, opts.moe_impl, opts.mesh, opts.expert_axis, opts.grouped_impl)
        return x + self.mlp(h)

    def deferring_ffn(self, x, pending, opts: RunOptions):
        """An MoE block's feed_forward under expert deferral (opts.defer_experts = k > 0): -> (x + the MoE output
        less each token's k lowest-weight routed experts + pending, those k experts' weighted sum). `pending` is
        the previous MoE layer's deferred sum, added after this layer's MoE output as ktransformers adds it
        (computed by the CPU meanwhile, it never enters this layer's attention or router); the sum returned is
        the next MoE layer's pending."""
        now, later = self.mlp(self.post_attn_norm(x), opts.moe_impl, opts.mesh, opts.expert_axis, opts.grouped_impl,
                              defer=opts.defer_experts)
        return x + now + pending, later.astype(pending.dtype)  # a layer loop's carry keeps its dtype

    def attend(self, x, cos, sin, mask, opts: RunOptions):
        """x plus the block's attention over x itself (no cache)."""
        return x + self.attn(self.input_norm(x), cos, sin, mask, opts.absorb, opts.index_topk)

    def __call__(self, x, cos, sin, mask, opts: RunOptions):
        return self.feed_forward(self.attend(x, cos, sin, mask, opts), opts)

    def attend_cached(self, index, x, cache, cos, sin, positions, lengths, opts: RunOptions):
        """Writes the block's latents of x [b,s,d] at positions [b,s] into cache layer `index`, attends over that
        layer's keys [0, lengths[b]) -> (x plus the attention [b,s,d], cache)."""
        h = self.input_norm(x)
        c_kv, k_pe = self.attn.latents(h, cos, sin)
        k_idx = None if self.attn.indexer is None else self.attn.indexer.keys(h, cos, sin)
        cache = cache.write(index, positions, c_kv, k_pe, k_idx)
        x = x + self.attn.attend_cache(h, cos, sin, cache, index, positions, lengths, absorb=opts.absorb,
                                       index_topk=opts.index_topk)
        return x, cache

    def cached(self, index, x, cache, cos, sin, positions, lengths, opts: RunOptions):
        """The block over a latent cache (attend_cached, then feed_forward) -> (x [b,s,d], cache)."""
        x, cache = self.attend_cached(index, x, cache, cos, sin, positions, lengths, opts)
        return self.feed_forward(x, opts), cache


def make_stack(cfg: ModelConfig, moe: bool, n: int, *, dtype, rngs: nnx.Rngs, layer=DecoderLayer):
    """n layers of one kind (`layer`(cfg, moe, dtype=, rngs=)) with every parameter stacked along a leading layer
    axis; None for n = 0."""
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
        return layer(cfg, moe, dtype=dtype, rngs=r)

    return create(rngs)
