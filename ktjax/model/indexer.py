"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2): which cached tokens each query attends to.

Each layer scores every visible token t for query s with a few small heads:
    score(s, t) = sum_h w[s, h] * relu(q[s, h] . k[t]),   w = weights_proj(x) * n_heads^-0.5 * head_dim^-0.5
(the reference's softmax scale inside the relu is positive, so it folds into w). q = wq_b(q LoRA vector),
k = LayerNorm(wk(x)), one key head shared by all heads; rope rotates the first qk_rope_head_dim dimensions
of both with the half-split (non-interleaved) layout, unlike MLA's. Attention then runs over the index_topk
best-scored tokens only (kv/sparse.py); the cache keeps k per token (the index cache, kv/cache.py).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ktjax.model.config import ModelConfig
from ktjax.model.layers import LayerNorm, Linear, apply_rope

# transformers builds the key norm with nn.LayerNorm(eps=1e-6), whatever rms_norm_eps is.
INDEX_NORM_EPS = 1e-6


class Indexer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        heads, dim = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = Linear(cfg.q_lora_rank, heads * dim, dtype=dtype, rngs=rngs)
        self.wk = Linear(cfg.hidden_size, dim, dtype=dtype, rngs=rngs)
        self.k_norm = LayerNorm(dim, INDEX_NORM_EPS, dtype=dtype)
        # Kept in float32 by the reference (_keep_in_fp32_modules): the head weights of every score.
        self.weights_proj = Linear(cfg.hidden_size, heads, dtype=jnp.float32, rngs=rngs)

    def _rope(self, x, cos, sin):
        r = self.cfg.qk_rope_head_dim
        return jnp.concatenate([apply_rope(x[..., :r], cos, sin, interleave=False), x[..., r:]], axis=-1)

    def queries(self, x, q_resid, cos, sin):
        """x [b,s,d], q_resid [b,s,q_lora_rank] -> q [b,s,H,D] (rotated) and head weights w [b,s,H], float32."""
        cfg = self.cfg
        q = self.wq_b(q_resid).reshape(*x.shape[:-1], cfg.index_n_heads, cfg.index_head_dim)
        w = self.weights_proj(x.astype(jnp.float32)) * (cfg.index_n_heads ** -0.5 * cfg.index_head_dim ** -0.5)
        return self._rope(q, cos, sin).astype(jnp.float32), w

    def keys(self, x, cos, sin):
        """x [b,s,d] -> k [b,s,D] (normalised, rotated): what the index cache keeps."""
        return self._rope(self.k_norm(self.wk(x)), cos, sin)
