"""GPU kernels (Pallas, Triton backend) for absorbed MLA attention; on a CPU they run interpreted.

`mla_decode` / `mla_prefill` take the same arguments as ktjax.kv.attention.mla_decode_xla / mla_prefill_xla
(their references) and return the same values.
"""
from .mla_kernels import KernelConfig, merge_splits, mla_attention, mla_decode, mla_kernel, mla_prefill
from .platform import InterpretModeWarning

__all__ = ["InterpretModeWarning", "KernelConfig", "merge_splits", "mla_attention", "mla_decode", "mla_kernel",
           "mla_prefill"]
