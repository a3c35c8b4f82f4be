"""Runtime settings: how to run a model, not what the model is.

One flat table of keys, shared by `ktjax.load(path, **overrides)`, YAML presets (configs/*.yaml) and the
CLI flags of `python -m ktjax.generate` (a key `cache_dtype` is the flag `--cache-dtype`). SETTINGS is the
single place where every key is documented; README.md's table is generated from the same text.
"""
from __future__ import annotations

import dataclasses
import os
import re

from .errors import KtjaxError

# This module imports no JAX, so the CLI can check its flags before JAX starts.
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
CACHE_DTYPES = ("float32", "bf16", "fp8", "int8", "int4")
CACHE_DTYPE_ALIASES = {"bfloat16": "bf16", "fp32": "float32", "float8": "fp8", "e4m3": "fp8"}
ATTENTION_IMPLS = ("auto", "xla", "pallas")
MOE_IMPLS = ("auto", "gather", "ragged", "blocked")
_BOOL = {True: True, False: False, "true": True, "false": False, "yes": True, "no": False}

# key: (default, help). The CLI and README are built from this table.
SETTINGS = {
    "dtype": ("float32", "compute dtype: float32 or bfloat16 (weights are cast to it at load; the router stays "
                         "float32)"),
    "cache_dtype": ("bf16", "latent cache format: float32, bf16, fp8, int8 or int4 (DESIGN.md section 2)"),
    "cache_lens": (None, "cache capacity per sequence in tokens: a number, `auto` (the largest that fits "
                         "memory_budget) or unset (just what the prompt plus max_new_tokens need); rounded up "
                         "to the attention block"),
    "memory_budget": (None, "memory for weights + cache + activations, e.g. 20GB or 512MiB; default: free "
                            "device memory on a GPU, available RAM on a CPU"),
    "chunk_size": (512, "prefill chunk length in tokens: memory and compile count stay bounded at any prompt "
                        "length"),
    "absorb_for_prefill": ("auto", "true: attend in latent space; false: expand per-head K/V blockwise; auto: "
                                   "the one with less arithmetic for the chunk, within memory"),
    "attention": ("auto", "auto, xla or pallas (auto = pallas on a GPU, xla elsewhere; pallas on a CPU runs "
                          "the kernels in interpret mode, slowly)"),
    "moe_impl": ("auto", "routed experts: auto, gather, ragged or blocked (see benchmarks/RESULTS.md)"),
    "max_new_tokens": (128, "tokens to generate per prompt"),
    "temperature": (None, "0 = greedy; default from generation_config.json, else 0"),
    "top_k": (None, "sample among the k most likely tokens (0 = off); default from generation_config.json"),
    "top_p": (None, "nucleus sampling threshold (1 = off); default from generation_config.json"),
    "seed": (0, "random seed for sampling; the same seed gives the same tokens"),
    "ignore_eos": (False, "keep generating past end-of-sequence tokens (for benchmarks)"),
    "truncate_left": (False, "drop the oldest prompt tokens when prompt + max_new_tokens exceed the cache, "
                             "instead of refusing"),
    "mesh": (None, "devices to shard over: N (N devices on one axis: heads, experts, MLP, vocabulary and the "
                   "cache's sequence) or AxB (A over the batch x B as with N); default: all local devices on one "
                   "axis"),
}


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    dtype: str = SETTINGS["dtype"][0]
    cache_dtype: str = SETTINGS["cache_dtype"][0]
    cache_lens: int | str | None = SETTINGS["cache_lens"][0]
    memory_budget: str | int | None = SETTINGS["memory_budget"][0]
    chunk_size: int = SETTINGS["chunk_size"][0]
    absorb_for_prefill: bool | str = SETTINGS["absorb_for_prefill"][0]
    attention: str = SETTINGS["attention"][0]
    moe_impl: str = SETTINGS["moe_impl"][0]
    max_new_tokens: int = SETTINGS["max_new_tokens"][0]
    temperature: float | None = SETTINGS["temperature"][0]
    top_k: int | None = SETTINGS["top_k"][0]
    top_p: float | None = SETTINGS["top_p"][0]
    seed: int = SETTINGS["seed"][0]
    ignore_eos: bool = SETTINGS["ignore_eos"][0]
    truncate_left: bool = SETTINGS["truncate_left"][0]
    mesh: str | None = SETTINGS["mesh"][0]

    @classmethod
    def from_overrides(cls, base: "RuntimeConfig | None" = None, **overrides) -> "RuntimeConfig":
        unknown = sorted(set(overrides) - set(SETTINGS))
        if unknown:
            raise KtjaxError(f"unknown runtime setting(s) {unknown}; known: {sorted(SETTINGS)}")
        overrides = {k: v for k, v in overrides.items() if v is not None or SETTINGS[k][0] is None}
        rc = dataclasses.replace(base or cls(), **overrides)
        return rc.validated()

    def validated(self) -> "RuntimeConfig":
        if self.dtype not in DTYPES:
            raise KtjaxError(f"dtype={self.dtype!r} is not supported; one of {sorted(DTYPES)}")
        cache_dtype = cache_dtype_name(self.cache_dtype)
        absorb = _as_bool_or_auto("absorb_for_prefill", self.absorb_for_prefill)
        if self.attention not in ATTENTION_IMPLS:
            raise KtjaxError(f"attention={self.attention!r} is not supported; one of {ATTENTION_IMPLS}")
        if self.moe_impl not in MOE_IMPLS:
            raise KtjaxError(f"moe_impl={self.moe_impl!r} is not supported; one of {MOE_IMPLS}")
        cache_lens = self.cache_lens
        if cache_lens is not None and cache_lens != "auto":
            cache_lens = _positive_int("cache_lens", cache_lens, "a positive number of tokens or auto")
        budget = None if self.memory_budget is None else parse_bytes(self.memory_budget)
        if self.temperature is not None and float(self.temperature) < 0:
            raise KtjaxError(f"temperature={self.temperature} must be >= 0")
        if self.top_p is not None and not 0 < float(self.top_p) <= 1:
            raise KtjaxError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and int(self.top_k) < 0:
            raise KtjaxError(f"top_k={self.top_k} must be >= 0")
        shape = parse_mesh(self.mesh)
        return dataclasses.replace(
            self, mesh=None if shape is None else "x".join(map(str, shape)), cache_dtype=cache_dtype,
            absorb_for_prefill=absorb, cache_lens=cache_lens, memory_budget=budget,
            chunk_size=_positive_int("chunk_size", self.chunk_size),
            max_new_tokens=_positive_int("max_new_tokens", self.max_new_tokens),
            ignore_eos=_as_bool_or_auto("ignore_eos", self.ignore_eos, auto=False),
            truncate_left=_as_bool_or_auto("truncate_left", self.truncate_left, auto=False))

    @property
    def jnp_dtype(self):
        import jax.numpy as jnp
        return jnp.dtype(DTYPES[self.dtype])

    def absorb(self, cfg, q_len: int) -> bool:
        """Absorbed or naive attention for q_len queries. Per query and key, absorbed costs ~(2R + r) flops per
        head, naive ~(d_nope + r + d_v) plus the re-expansion of each key (R (d_nope + d_v) per head), which
        q_len queries share: naive pays off only for long chunks."""
        if self.absorb_for_prefill != "auto":
            return self.absorb_for_prefill
        r, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        absorbed = 2 * r + rope
        naive = cfg.qk_head_dim + cfg.v_head_dim + r * (cfg.qk_nope_head_dim + cfg.v_head_dim) / q_len
        return absorbed <= naive


def parse_mesh(spec) -> tuple[int, ...] | None:
    """'8' -> (8,), '2x4' -> (2, 4), None or 'auto' -> None (all local devices on one axis)."""
    if spec is None or str(spec).strip().lower() in ("", "auto", "none"):
        return None
    text = str(spec).strip().lower()
    if not re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*)?", text):
        raise KtjaxError(f"mesh={spec!r} is not understood; write N (N devices on one axis) or AxB "
                         "(A devices over the batch x B over the model and the cache's sequence)")
    return tuple(int(n) for n in text.split("x"))


def cache_dtype_name(name) -> str:
    key = CACHE_DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in CACHE_DTYPES:
        raise KtjaxError(f"unknown cache dtype {name!r}; one of {', '.join(CACHE_DTYPES)}")
    return key


def _positive_int(key, value, what="a positive integer"):
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n):
        raise KtjaxError(f"{key}={value!r} must be {what}")
    return n


def _as_bool_or_auto(key, value, auto=True):
    v = value.lower() if isinstance(value, str) else value
    if auto and v == "auto":
        return "auto"
    if v not in _BOOL:
        raise KtjaxError(f"{key}={value!r} must be true or false" + (" or auto" if auto else ""))
    return _BOOL[v]


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_bytes(value) -> int:
    """'20GB' -> 20e9, '512MiB' -> 512 * 2**20, 1e9 -> 1e9."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num):]
    try:
        n = float(num)
    except ValueError:
        n = -1
    if unit not in _UNITS or n <= 0:
        raise KtjaxError(f"memory size {value!r} is not understood; write it like 20GB, 512MiB or 1e9")
    return int(n * _UNITS[unit])


def load_yaml(path: str) -> dict:
    """A YAML preset: runtime keys plus optional `model`. Unknown keys are an error that names them."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise KtjaxError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise KtjaxError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise KtjaxError(f"{path}: expected a mapping of settings")
    unknown = sorted(set(data) - set(SETTINGS) - {"model"})
    if unknown:
        raise KtjaxError(f"{path}: unknown setting(s) {unknown}; known: model, {', '.join(sorted(SETTINGS))}")
    if "model" in data and data["model"] is not None:
        data["model"] = os.path.expanduser(str(data["model"]))
    return data
