"""GPU kernels (Pallas, Triton backend) for absorbed MLA attention; on a CPU they run interpreted.

`mla_decode` / `mla_prefill` take the same arguments as ktjax.kv.attention.mla_decode_xla / mla_prefill_xla
(their references) and return the same values; `index_scores_decode` / `sparse_decode` (sparse attention's
decode step) are the twins of ktjax.kv.sparse.index_scores / sparse_attend_gathered.
"""
from ktjax.pallas.mla_kernels import KernelConfig, merge_splits, mla_attention, mla_decode, mla_kernel, mla_prefill
from ktjax.pallas.platform import InterpretModeWarning
from ktjax.pallas.sparse_kernels import index_scores_decode, sparse_decode

__all__ = ["InterpretModeWarning", "KernelConfig", "index_scores_decode", "merge_splits", "mla_attention",
           "mla_decode", "mla_kernel", "mla_prefill", "sparse_decode"]
