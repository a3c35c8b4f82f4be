"""The latent KV cache: per layer, c_kv [batch, cache_lens, R] (stored in its format, with group scales)
and k_pe [batch, cache_lens, r], all layers stacked on a leading axis, preallocated once.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .cache_format import SCALE_DTYPE, CacheFormat, bytes_per_token, get_format, quantize
from .config import ModelConfig
from .sharding import CacheLayout, per_device_bytes, write_sharded

# Attention walks the cache in blocks of this many tokens; cache_lens is a multiple of the block.
MAX_KV_BLOCK = 512
MIN_KV_BLOCK = 16


def plan_cache_lens(requested: int, shards: int = 1) -> tuple[int, int]:
    """Round a requested capacity up to what attention needs; returns (cache_lens, kv_block). A cache sharded
    along the sequence over `shards` devices gets an equal whole number of blocks on each device."""
    local = -(-max(int(requested), 1) // shards)
    if local >= MAX_KV_BLOCK:
        block = MAX_KV_BLOCK
    else:
        block = -(-local // MIN_KV_BLOCK) * MIN_KV_BLOCK
    return -(-local // block) * block * shards, block


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
    c_kv: jax.Array            # [L, B, T, stored_width] in fmt.store_dtype
    scales: jax.Array | None   # [L, B, T, n_groups] float32, quantized formats only
    k_pe: jax.Array            # [L, B, T, r]
    fmt: CacheFormat = dataclasses.field(metadata=dict(static=True))
    rank: int = dataclasses.field(metadata=dict(static=True))
    # How the arrays lie on a mesh (ktjax/sharding.py); None: one device.
    layout: CacheLayout | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def create(cls, cfg: ModelConfig, fmt: CacheFormat | str, batch: int, cache_lens: int,
               layout: CacheLayout | None = None) -> "LatentCache":
        fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        lead = (cfg.num_hidden_layers, batch, cache_lens)
        r = cfg.kv_lora_rank

        def zeros():
            scales = jnp.ones(lead + (fmt.n_groups(r),), SCALE_DTYPE) if fmt.quantized else None
            return (jnp.zeros(lead + (fmt.stored_width(r),), fmt.store_dtype), scales,
                    jnp.zeros(lead + (cfg.qk_rope_head_dim,), fmt.k_pe_dtype))

        if layout is not None:  # each device allocates its own shard, never the whole cache
            zeros = jax.jit(zeros, out_shardings=layout.sharding)
        c_kv, scales, k_pe = zeros()
        return cls(c_kv=c_kv, scales=scales, k_pe=k_pe, fmt=fmt, rank=r, layout=layout)

    @property
    def cache_lens(self) -> int:
        return self.c_kv.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @property
    def nbytes_per_device(self) -> int:
        """What the most loaded device actually holds (its shards)."""
        return per_device_bytes(self)

    def write(self, layer, positions, c_kv, k_pe) -> "LatentCache":
        """Store new latents c_kv [b,s,R] / k_pe [b,s,r] of `layer` at positions [b,s]; positions >= cache_lens
        (padding) are dropped."""
        q, scales = quantize(self.fmt, c_kv)
        if self.layout is not None:
            c, sc, kp = write_sharded(self.layout, (self.c_kv, self.scales, self.k_pe), layer, positions,
                                      (q, scales, k_pe))
            return dataclasses.replace(self, c_kv=c, scales=sc, k_pe=kp)
        b = jnp.arange(positions.shape[0])[:, None]

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
