"""Multi-head latent attention: one set of weights, two ways to attend.

Each token is compressed into a latent `c_kv` [kv_lora_rank] plus one rotary key `k_pe` shared by all heads;
`kv_b_proj` expands the latent into per-head keys (`w_uk`) and values (`w_uv`). The naive form expands every
cached token; the absorbed form folds `w_uk` into the query and `w_uv` into the output, so attention runs in
latent space and the cache never grows past (c_kv, k_pe). Axes: b batch, s query, t key, h head,
d head dim, c latent, r rope dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.model.config import ModelConfig
from ktjax.model.indexer import Indexer
from ktjax.kv.sparse import head_scores, is_sparse, topk_mask
from ktjax.model.layers import Linear, RMSNorm, _init, apply_rope
from ktjax.model.quantized import per_head

# The reference (transformers and DeepSeek's code) builds q_a_layernorm and kv_a_layernorm with the
# default epsilon, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        d, heads, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(d, cfg.q_lora_rank, bias=bias, dtype=dtype, rngs=rngs)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, dtype=dtype)
            self.q_b_proj = Linear(cfg.q_lora_rank, heads * cfg.qk_head_dim, dtype=dtype, rngs=rngs)
        else:
            self.q_proj = Linear(d, heads * cfg.qk_head_dim, dtype=dtype, rngs=rngs)
        self.kv_a_proj = Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias, dtype=dtype, rngs=rngs)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS, dtype=dtype)
        # kv_b_proj, split per head: keys [h, d_nope, c] and values [h, d_v, c].
        self.w_uk = nnx.Param(_init(rngs.params(), (heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank), dtype))
        self.w_uv = nnx.Param(_init(rngs.params(), (heads, cfg.v_head_dim, cfg.kv_lora_rank), dtype))
        self.o_proj = Linear(heads * cfg.v_head_dim, d, bias=bias, dtype=dtype, rngs=rngs)
        # DeepSeek Sparse Attention (V3.2): picks the keys each query attends to.
        self.indexer = Indexer(cfg, dtype=dtype, rngs=rngs) if cfg.has_indexer else None

    def q_resid(self, x):
        """The normalised q LoRA vector [b, s, q_lora_rank] (the queries' and the indexer's input)."""
        return self.q_a_norm(self.q_a_proj(x))

    def queries(self, x, cos, sin, q_resid=None):
        """x [b, s, d] -> q_nope [b, s, h, d_nope], q_pe [b, s, h, r] (rotated)."""
        cfg = self.cfg
        if cfg.q_lora_rank:
            q = self.q_b_proj(self.q_resid(x) if q_resid is None else q_resid)
        else:
            q = self.q_proj(x)
        q = q.reshape(*x.shape[:-1], cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, cos, sin, cfg.rope.interleave)

    def latents(self, x, cos, sin):
        """x [b, s, d] -> c_kv [b, s, c] (normalised) and k_pe [b, s, r] (rotated): what a cache keeps."""
        cfg = self.cfg
        kv = self.kv_a_proj(x)
        c_kv, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
        return self.kv_a_norm(c_kv), apply_rope(k_pe, cos, sin, cfg.rope.interleave)

    def sparse(self, index_topk: int, n_keys: int) -> bool:
        """Whether this layer's indexer drops keys out of n_keys with index_topk (0: no sparse attention)."""
        return self.indexer is not None and is_sparse(index_topk, n_keys)

    def __call__(self, x, cos, sin, mask, absorb: bool, index_topk: int = 0):
        """Self-attention over x alone. mask [b, s, t] is True where query s may see key t; with an indexer,
        each query sees only the index_topk best-scored of those."""
        q_resid = self.q_resid(x) if self.cfg.q_lora_rank else None
        q_nope, q_pe = self.queries(x, cos, sin, q_resid)
        c_kv, k_pe = self.latents(x, cos, sin)
        if self.sparse(index_topk, x.shape[1]):
            q_idx, w = self.indexer.queries(x, q_resid, cos, sin)
            k_idx = self.indexer.keys(x, cos, sin).astype(jnp.float32)
            mask = topk_mask(head_scores(q_idx, w, k_idx), mask, index_topk)
        attend = absorbed_attention if absorb else naive_attention
        o = attend(q_nope, q_pe, c_kv, k_pe, self.w_uk[...], self.w_uv[...], mask, self.cfg.softmax_scale)
        return self.o_proj(o.reshape(*x.shape[:-1], -1))

    def attend_cache(self, x, cos, sin, cache, layer, q_positions, lengths, *, absorb: bool, index_topk: int = 0):
        """Attention of x [b,s,d] at q_positions [b,s] over `layer` of a LatentCache (kv/cache.py), which
        already holds x's own latents (and index keys); keys [0, lengths[b]), the index_topk best-scored of
        them with an indexer. The cache decides how and where it attends."""
        q_resid = self.q_resid(x) if self.cfg.q_lora_rank else None
        q_nope, q_pe = self.queries(x, cos, sin, q_resid)
        w_uk, w_uv = self.w_uk[...], self.w_uv[...]
        scale = self.cfg.softmax_scale
        if self.sparse(index_topk, cache.cache_lens):
            index_queries = self.indexer.queries(x, q_resid, cos, sin)
            kw = dict(scale=scale, topk=index_topk)
            if absorb:
                o_lat = cache.attend_sparse(layer, absorb_query(q_nope, w_uk), q_pe, index_queries, q_positions,
                                            lengths, **kw)
                o = expand_output(o_lat.astype(x.dtype), w_uv)
            else:
                o = cache.attend_sparse(layer, q_nope, q_pe, index_queries, q_positions, lengths,
                                        naive_weights=(w_uk, w_uv), **kw)
        elif absorb:
            o_lat = cache.attend_latent(layer, absorb_query(q_nope, w_uk), q_pe, q_positions, lengths, scale=scale)
            o = expand_output(o_lat.astype(x.dtype), w_uv)
        else:
            o = cache.attend_naive(layer, q_nope, q_pe, w_uk, w_uv, q_positions, lengths, scale=scale)
        return self.o_proj(o.astype(x.dtype).reshape(*x.shape[:-1], -1))


def _softmax(scores, mask):
    scores = jnp.where(mask[:, :, None, :], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def naive_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, mask, scale):
    """Expand the latents into per-head keys and values, then attend: the readable reference."""
    k_nope = jnp.einsum("btc,hdc->bthd", c_kv, w_uk.astype(c_kv.dtype))
    v = jnp.einsum("btc,hdc->bthd", c_kv, w_uv.astype(c_kv.dtype))
    scores = jnp.einsum("bshd,bthd->bsht", q_nope, k_nope) + jnp.einsum("bshr,btr->bsht", q_pe, k_pe)
    p = _softmax(scores * scale, mask)
    return jnp.einsum("bsht,bthd->bshd", p.astype(v.dtype), v)


def absorbed_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, mask, scale):
    """Attend in latent space: q_lat = q_nope @ w_uk, o = (p @ c_kv) @ w_uv. No per-head K or V exists."""
    q_lat = absorb_query(q_nope, w_uk)
    scores = jnp.einsum("bshc,btc->bsht", q_lat, c_kv) + jnp.einsum("bshr,btr->bsht", q_pe, k_pe)
    p = _softmax(scores * scale, mask)
    o_lat = jnp.einsum("bsht,btc->bshc", p.astype(c_kv.dtype), c_kv)
    return expand_output(o_lat, w_uv)


def absorb_query(q_nope, w_uk):
    """q_lat [b,s,h,c] = q_nope [b,s,h,d] @ w_uk [h,d,c]: the key up-projection folded into the query."""
    return per_head(q_nope, w_uk, in_out=True)


def expand_output(o_lat, w_uv):
    """o [b,s,h,d_v] = o_lat [b,s,h,c] @ w_uv [h,d_v,c]: the value up-projection applied after attention."""
    return per_head(o_lat, w_uv, in_out=False)
