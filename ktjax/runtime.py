"""Runtime settings: how to run a model (not what the model is). Names match the YAML keys and CLI flags."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .errors import KtjaxError
from .moe import MOE_IMPLS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
ABSORB = {True: True, False: False, "true": True, "false": False, "auto": "auto"}
# `auto` attends naively (cheaper arithmetic) while one layer's expanded keys and values stay under this.
NAIVE_EXPANSION_LIMIT_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    dtype: str = "float32"             # compute dtype: float32 or bfloat16
    absorb_for_prefill: bool | str = "auto"  # true, false or auto (by memory)
    moe_impl: str = "auto"              # auto, gather, ragged or blocked

    @classmethod
    def from_overrides(cls, **overrides) -> "RuntimeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise KtjaxError(f"unknown runtime setting(s) {unknown}; known: {sorted(known)}")
        rc = cls(**overrides)
        if rc.dtype not in DTYPES:
            raise KtjaxError(f"dtype={rc.dtype!r} is not supported; one of {sorted(DTYPES)}")
        absorb = rc.absorb_for_prefill
        if (absorb.lower() if isinstance(absorb, str) else absorb) not in ABSORB:
            raise KtjaxError(f"absorb_for_prefill={absorb!r} must be true, false or auto")
        if rc.moe_impl not in MOE_IMPLS:
            raise KtjaxError(f"moe_impl={rc.moe_impl!r} is not supported; one of {MOE_IMPLS}")
        return dataclasses.replace(rc, absorb_for_prefill=ABSORB[absorb.lower() if isinstance(absorb, str) else absorb])

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def absorb(self, cfg, batch: int, seq: int) -> bool:
        """Whether to attend in latent space for `seq` new tokens attending to `seq` keys."""
        if self.absorb_for_prefill != "auto":
            return self.absorb_for_prefill
        itemsize = jnp.dtype(self.jnp_dtype).itemsize
        expanded = batch * seq * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * itemsize
        return expanded > NAIVE_EXPANSION_LIMIT_BYTES
