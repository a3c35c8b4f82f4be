"""The latent KV cache: per layer, c_kv [batch, cache_lens, R] (stored in its format, with group scales)
and k_pe [batch, cache_lens, r], all layers stacked on a leading axis, preallocated once.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .cache_format import SCALE_DTYPE, CacheFormat, bytes_per_token, get_format, quantize
from .config import ModelConfig

# Attention walks the cache in blocks of this many tokens; cache_lens is a multiple of the block.
MAX_KV_BLOCK = 512
MIN_KV_BLOCK = 16


def plan_cache_lens(requested: int) -> tuple[int, int]:
    """Round a requested capacity up to what attention needs; returns (cache_lens, kv_block)."""
    requested = max(int(requested), 1)
    if requested >= MAX_KV_BLOCK:
        block = MAX_KV_BLOCK
    else:
        block = -(-requested // MIN_KV_BLOCK) * MIN_KV_BLOCK
    return -(-requested // block) * block, block


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
    c_kv: jax.Array            # [L, B, T, stored_width] in fmt.store_dtype
    scales: jax.Array | None   # [L, B, T, n_groups] float32, quantized formats only
    k_pe: jax.Array            # [L, B, T, r]
    fmt: CacheFormat = dataclasses.field(metadata=dict(static=True))
    rank: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def create(cls, cfg: ModelConfig, fmt: CacheFormat | str, batch: int, cache_lens: int) -> "LatentCache":
        fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        lead = (cfg.num_hidden_layers, batch, cache_lens)
        r = cfg.kv_lora_rank
        scales = jnp.ones(lead + (fmt.n_groups(r),), SCALE_DTYPE) if fmt.quantized else None
        return cls(c_kv=jnp.zeros(lead + (fmt.stored_width(r),), fmt.store_dtype), scales=scales,
                   k_pe=jnp.zeros(lead + (cfg.qk_rope_head_dim,), fmt.k_pe_dtype), fmt=fmt, rank=r)

    @property
    def cache_lens(self) -> int:
        return self.c_kv.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def write(self, layer, positions, c_kv, k_pe) -> "LatentCache":
        """Store new latents c_kv [b,s,R] / k_pe [b,s,r] of `layer` at positions [b,s]; positions >= cache_lens
        (padding) are dropped."""
        b = jnp.arange(positions.shape[0])[:, None]
        q, scales = quantize(self.fmt, c_kv)

        def put(buf, new):
            return buf.at[layer, b, positions].set(new.astype(buf.dtype), mode="drop")

        return dataclasses.replace(self, c_kv=put(self.c_kv, q), k_pe=put(self.k_pe, k_pe),
                                   scales=None if scales is None else put(self.scales, scales))

    def layer(self, layer):
        """(c_kv, scales, k_pe) of one layer: [b, T, ...] each."""
        def take(x):
            return None if x is None else jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
        return take(self.c_kv), take(self.scales), take(self.k_pe)


def cache_bytes(cfg: ModelConfig, fmt: CacheFormat | str, batch: int, cache_lens: int) -> int:
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    return batch * cache_lens * bytes_per_token(fmt, cfg)
