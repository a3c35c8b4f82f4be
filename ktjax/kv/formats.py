"""Latent-cache formats: how c_kv and k_pe are stored per token, their names, and what they cost.

Plain constants and numpy dtypes only, no JAX: the CLI validates `--cache-dtype` and prints byte figures
before JAX starts. This is the one place that knows the format names, their aliases and the bytes formula;
the settings (ktjax/runtime/settings.py), the memory planner, the cache and the statistics all read it.

c_kv is quantized symmetrically in groups of channels, one float32 scale per group and token; the last group
is shorter when kv_lora_rank is not a multiple of the group size. int4 packs channel j in the low nibble and
channel j + R/2 in the high nibble of byte j (R = kv_lora_rank, padded to even), so a kernel unpacks two
contiguous halves with no interleaving. k_pe stays bf16 (float32 in the float32 format): it carries position.

A model with DeepSeek Sparse Attention (V3.2) also caches each token's index key (kv/sparse.py): in float32
or bf16 for those formats, in float8 e4m3 with one float32 scale per token for the quantized ones.
"""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from ktjax.errors import KtjaxError

SCALE_DTYPE = np.dtype(np.float32)
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


@dataclasses.dataclass(frozen=True)
class CacheFormat:
    name: str
    store_dtype: np.dtype            # dtype of stored c_kv elements (uint8 for packed int4)
    group: int = 0                   # channels per scale; 0 = unquantized (no scales)
    qmax: float = 0.0                # largest quantized magnitude
    k_pe_dtype: np.dtype = np.dtype(ml_dtypes.bfloat16)

    @property
    def quantized(self) -> bool:
        return self.group > 0

    @property
    def packed(self) -> bool:
        return self.name == "int4"

    def n_groups(self, rank: int) -> int:
        return -(-rank // self.group) if self.quantized else 0

    def stored_width(self, rank: int) -> int:
        """Elements per token in the stored c_kv array."""
        return (rank + 1) // 2 if self.packed else rank

    def bytes_per_token_per_layer(self, kv_lora_rank: int, rope_dim: int) -> int:
        """Stored bytes for one token in one layer: c_kv, its scales, and k_pe."""
        c_kv = self.stored_width(kv_lora_rank) * self.store_dtype.itemsize
        scales = self.n_groups(kv_lora_rank) * SCALE_DTYPE.itemsize
        return c_kv + scales + rope_dim * self.k_pe_dtype.itemsize

    def index_bytes_per_token_per_layer(self, index_head_dim: int) -> int:
        """Stored bytes of one token's index key (and its scale) in one layer; 0 without an indexer."""
        dtype = index_store_dtype(self)
        return index_head_dim * dtype.itemsize + (SCALE_DTYPE.itemsize if index_scaled(self) and index_head_dim else 0)

    def bytes_per_token(self, cfg) -> int:
        """All layers of a model config: what sizes memory everywhere (latents and, with an indexer, index keys)."""
        index_dim = getattr(cfg, "index_head_dim", 0) if getattr(cfg, "index_topk", 0) else 0
        return cfg.num_hidden_layers * (self.bytes_per_token_per_layer(cfg.kv_lora_rank, cfg.qk_rope_head_dim)
                                        + self.index_bytes_per_token_per_layer(index_dim))


def index_store_dtype(fmt: CacheFormat) -> np.dtype:
    """The dtype of the index cache for a latent-cache format: a quantized latent cache gets e4m3 index keys
    (with a per-token scale), an unquantized one its own dtype."""
    return _E4M3 if fmt.quantized else fmt.k_pe_dtype


def index_scaled(fmt: CacheFormat) -> bool:
    return fmt.quantized


def container(dtype: np.dtype) -> np.dtype:
    """The dtype a cache array is held in: a narrow float (bf16, e4m3) as unsigned integers of its width, its
    bit patterns. XLA on the CPU widens a bf16 or fp8 array to float32 around an in-place update, copying the
    whole cache at every step; integer arrays are updated in place."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu" or dtype.itemsize >= 4:
        return dtype
    return np.dtype(f"uint{8 * dtype.itemsize}")


FORMATS = {
    "float32": CacheFormat("float32", np.dtype(np.float32), k_pe_dtype=np.dtype(np.float32)),
    "bf16": CacheFormat("bf16", np.dtype(ml_dtypes.bfloat16)),
    "fp8": CacheFormat("fp8", _E4M3, group=128, qmax=float(ml_dtypes.finfo(_E4M3).max)),
    "int8": CacheFormat("int8", np.dtype(np.int8), group=128, qmax=127.0),
    "int4": CacheFormat("int4", np.dtype(np.uint8), group=64, qmax=7.0),
}
NAMES = tuple(FORMATS)
ALIASES = {"bfloat16": "bf16", "fp32": "float32", "float8": "fp8", "e4m3": "fp8"}


def resolve_format(name) -> CacheFormat:
    """A format by name or alias (any case), or one clear error; a CacheFormat passes through."""
    if isinstance(name, CacheFormat):
        return name
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise KtjaxError(f"unknown cache format {name!r}; one of {', '.join(NAMES)} "
                         f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return FORMATS[key]
