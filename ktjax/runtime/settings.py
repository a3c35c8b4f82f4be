"""Runtime settings: how to run a model, not what the model is.

One table, SETTINGS, defines every key once: its default, its help text, its choices and the one function
that validates and normalises a value. `ktjax.load(path, **settings)`, YAML presets (configs/*.yaml) and the
CLI flags of `python -m ktjax.generate` (key `cache_dtype` = flag `--cache-dtype`) all pass their values
through it, so they accept exactly the same values and aliases; docs/settings.md's table is generated
from it (docs/settings_table.py; a test compares).

Load-time settings (RuntimeConfig) shape the compiled programs and the memory plan; per-call settings
(CallSettings: sampling, lengths, seed, stop handling) change from one `Engine.generate` call to the next
without recompiling. This module imports no JAX, so the CLI checks its flags before JAX starts.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable

from ktjax.errors import KtjaxError
from ktjax.kv import formats as cache_formats
from ktjax.util.text import short_repr

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
ATTENTION_IMPLS = ("auto", "xla", "pallas", "cpu")
MOE_IMPLS = ("auto", "gather", "ragged", "blocked")
WEIGHT_LAYOUTS = ("in-out", "out-in")
CPU_KERNELS = ("auto", "on", "off")
ACTIVATION_QUANTS = ("off", "int8")
FP8_MATMULS = ("auto", "dequantize", "fp8")
SPECULATIVE = ("off", "mtp")
EXPERT_PLACES = ("device", "host")
_BOOL = {True: True, False: False, "true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
MAX_INT32 = 2**31 - 1
MAX_DEFERRED = 255  # defer_experts' bound before a model is known (then: its experts per token less 1)


# ---- value parsers: (key, raw value) -> canonical value, or one KtjaxError that names the key --------------

def _fail(key, value, what):
    raise KtjaxError(f"{key}={short_repr(value)}: {what}")


def _int(key, value, lo: int = 1, hi: int = MAX_INT32) -> int:
    n = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,40}\s*", value):  # more digits: out of range
        n = int(value)
    if n is None or not lo <= n <= hi:
        _fail(key, value, f"must be a whole number from {lo} to {hi}")
    return n


def _float(key, value, lo: float, hi: float, lo_open: bool = False) -> float:
    x = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            x = float(value)
        except (ValueError, OverflowError):  # an int past float's range
            pass
    ok = x is not None and math.isfinite(x) and (x > lo if lo_open else x >= lo) and x <= hi
    if not ok:
        _fail(key, value, f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return x


def _choice(options: dict | tuple):
    table = options if isinstance(options, dict) else {o: o for o in options}

    def parse(key, value):
        text = (value if isinstance(value, str) else short_repr(value)).strip().lower()  # str(10**5000) raises
        if isinstance(value, bool) or text not in table:
            _fail(key, value, f"one of {', '.join(dict.fromkeys(table.values()))}")
        return table[text]
    return parse


def _bool(key, value, auto: bool = False):
    v = value.strip().lower() if isinstance(value, str) else value
    if auto and v == "auto":
        return "auto"
    if not isinstance(v, (bool, int, str)) or v not in _BOOL:
        _fail(key, value, "must be true or false" + (" or auto" if auto else ""))
    return _BOOL[v]


def _on_off_auto(key, value):
    """auto, on or off; YAML reads a bare on / off as a boolean, which means the same."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _choice(CPU_KERNELS)(key, value)


def _cache_lens(key, value):
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _int(key, value, 1, 2**40)


def _cache_format(key, value):
    long = not isinstance(value, cache_formats.CacheFormat) and len(short_repr(value)) > 20
    try:  # a value too long for any name is passed cut, so that the message shows it cut
        return cache_formats.resolve_format(short_repr(value) if long else value)
    except KtjaxError as e:
        raise KtjaxError(f"{key}={short_repr(value)}: {e}") from None


def parse_mesh(spec) -> tuple[int, ...] | None:
    """'8' -> (8,), '2x4' -> (2, 4), None or 'auto' -> None (all local devices on one axis)."""
    if isinstance(spec, tuple):
        spec = "x".join(map(str, spec))
    text = (spec if isinstance(spec, str) else short_repr(spec)).strip().lower()  # str(10**5000) raises
    if spec is None or text in ("", "auto", "none"):
        return None
    if isinstance(spec, bool) or not re.fullmatch(r"[1-9][0-9]{0,5}(x[1-9][0-9]{0,5})?", text):
        raise KtjaxError(f"mesh={short_repr(spec)} is not understood; write N (N devices on one axis) or AxB "
                         "(A devices over the batch x B over the model and the cache's sequence)")
    return tuple(int(n) for n in text.split("x"))


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}
MAX_BYTES = 2**60


def parse_bytes(value) -> int:
    """'20GB' -> 20e9, '512MiB' -> 512 * 2**20, 1e9 -> 1e9."""
    huge = isinstance(value, int) and value.bit_length() > 256  # str() refuses past 4300 digits
    text = "inf" if huge else str(value).strip().lower().replace(" ", "")
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num):]
    try:
        n = float(num) if not isinstance(value, bool) else -1.0
    except ValueError:
        n = -1.0
    if unit not in _UNITS or not math.isfinite(n) or not 0 < n * _UNITS[unit] <= MAX_BYTES:
        raise KtjaxError(f"memory size {short_repr(value)} is not understood; write it like 20GB, 512MiB or 1e9 "
                         "(positive, at most an exbibyte)")
    return int(n * _UNITS[unit])


class ExpertIds(tuple):
    """gpu_experts given as a list: these expert ids stay on the device in every MoE layer (sorted, unique)."""


def _gpu_experts(key, value):
    """A count (the most-routed experts of each layer) or a list of expert ids: YAML [0, 5, 7], CLI 0,5,7."""
    if isinstance(value, str) and "," in value:
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        if not value or len(value) > 1 << 16:
            _fail(key, value, "a list of expert ids must name from 1 to 65536 experts")
        try:
            return ExpertIds(sorted({_int(key, v, 0, 1 << 16) for v in value}))
        except KtjaxError:
            _fail(key, value, "expert ids must be whole numbers from 0 to 65536")
    return _int(key, value, 0, 1 << 16)


def _optional(parse: Callable) -> Callable:
    return lambda key, value: None if value is None else parse(key, value)


# ---- the table -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setting:
    default: Any
    help: str
    parse: Callable[[str, Any], Any]
    choices: tuple = ()       # canonical values, for --help and docs/settings.md
    per_call: bool = False    # changes per Engine.generate call (no recompilation), not per loaded engine
    switch: bool = False      # a CLI flag without a value (--ignore-eos)


SETTINGS: dict[str, Setting] = {
    "dtype": Setting("float32", "compute dtype (weights are cast to it at load; the router stays float32); "
                                "aliases fp32, bf16", _choice(DTYPES), ("float32", "bfloat16")),
    "cache_dtype": Setting("bf16", "latent cache format (docs/long-context.md); aliases "
                                   + ", ".join(f"{a}={b}" for a, b in cache_formats.ALIASES.items()),
                           _cache_format, cache_formats.NAMES),
    "cache_lens": Setting(None, "cache capacity per sequence in tokens: a number, `auto` (the largest that fits "
                                "memory_budget) or unset (what the prompt plus max_new_tokens need); rounded up "
                                "to the attention block", _optional(_cache_lens)),
    "memory_budget": Setting(None, "memory for weights + cache + activations, e.g. 20GB or 512MiB; unset: free "
                                   "device memory on a GPU, available RAM on a CPU",
                             _optional(lambda k, v: parse_bytes(v))),
    "chunk_size": Setting(512, "longest prefill chunk in tokens (a short prompt runs as one chunk of its own "
                               "power-of-two length): memory and compile count stay bounded at any length",
                          lambda k, v: _int(k, v, 1, 2**20)),
    "absorb_for_prefill": Setting("auto", "true: attend in latent space; false: expand per-head K/V blockwise; "
                                          "auto: the one with less arithmetic for the chunk (a one-token pass, a "
                                          "decode step or a 1-token chunk, always attends in latent space)",
                                  lambda k, v: _bool(k, v, auto=True), ("true", "false", "auto")),
    "attention": Setting("auto", "attention over the cache: xla = XLA's blockwise attention (the reference); "
                                 "pallas = the Pallas GPU kernels (on a CPU they run in interpret mode, slowly); "
                                 "cpu = decode steps in ktjax's C++ kernel, prefill chunks in xla (refused where "
                                 "cpu_kernels cannot run); auto = pallas on a GPU, cpu on a CPU where cpu_kernels "
                                 "run, else xla. A sequence-sharded cache always runs xla; the value that ran is "
                                 "reported", _choice(ATTENTION_IMPLS), ATTENTION_IMPLS),
    "moe_impl": Setting("auto", "routed experts: gather, ragged or blocked (where cpu_kernels hold the "
                                "experts, blocked runs each expert's exact rows in one kernel call per weight); "
                                "auto picks per step (docs/results.md)", _choice(MOE_IMPLS), MOE_IMPLS),
    "weight_layout": Setting("in-out", "how float matmul weights are held where cpu_kernels do not run (where "
                                       "they do, float32 ones are held out-in for them): in-out ([in, out], as "
                                       "stored) or out-in (a transposed copy made at load; on a CPU, one-row "
                                       "decode steps run ~1.15x faster, prefill ~1.1x slower, 4-16-row batches "
                                       "slower: "
                                       "docs/results.md, 'Decode step')",
                             _choice(WEIGHT_LAYOUTS), WEIGHT_LAYOUTS),
    "cpu_kernels": Setting("auto", "ktjax's C++ kernels on a CPU: matmuls of up to 64 rows over int8/int4 "
                                   "weights (held [out, in]; decode steps 2-3x faster than XLA's dot) and over "
                                   "float32 weights (then held [out, in] whatever weight_layout says; 1 row about "
                                   "level with XLA's product over [in, out], 4-64 rows 1.05-1.5x), a prefill "
                                   "chunk's routed experts (each expert's rows in one call per weight) and, under "
                                   "attention auto or cpu, decode attention over the cache: auto = on a CPU with one "
                                   "device, when a C++ compiler builds them (once, into $KTJAX_KERNEL_DIR, default "
                                   "~/.cache/ktjax/kernels), else XLA; on = require them; off = XLA",
                           _on_off_auto, CPU_KERNELS),
    "activation_quant": Setting("off", "int8: matmuls over int8/int4 weights quantize their input rows to int8 per "
                                       "block (128 inputs; int4: the weight's group) and multiply in integers, as "
                                       "llama.cpp's Q8_0 / Q4_0 do: with AVX-512 VNNI about 2x the multiply rate "
                                       "(int4 decode, batches, prefill: docs/results.md), but the logits then "
                                       "carry the activations' rounding as well. Needs int8/int4 weights and "
                                       "cpu_kernels; off = float32 activations, as the reference",
                                _choice(ACTIVATION_QUANTS), ACTIVATION_QUANTS),
    "fp8_matmul": Setting("auto", "products over FP8 weights (a checkpoint converted with --weights fp8): fp8 = "
                                  "FP8 operands, as DeepSeek's fp8_gemm (each input row quantized to e4m3 per "
                                  "128 channels, each block's product scaled by the row's and the weight's block "
                                  "scales) for steps of up to 8 rows, larger ones dequantized; dequantize = the "
                                  "weight dequantized to the compute dtype before each product (the reference); "
                                  "auto = fp8 on a GPU of compute capability 8.9 or later, else dequantize (a CPU "
                                  "emulates FP8 products: correct, slower). The logits then carry the "
                                  "activations' e4m3 rounding (docs/results.md)",
                          _choice(FP8_MATMULS), FP8_MATMULS),
    "experts": Setting("device", "where the routed experts live: device = with the other weights; host = in host "
                                 "RAM, computed by the CPU (ktransformers' layout: attention, dense layers, shared "
                                 "experts and the cache stay on the device). memory_budget then budgets the device "
                                 "side; the experts are counted as host memory (on a CPU-only machine both are the "
                                 "same RAM, budgeted together)", _choice(EXPERT_PLACES), EXPERT_PLACES),
    "gpu_experts": Setting(0, "with experts host: the routed experts of each MoE layer kept on the device, either a "
                              "count N (each layer's N most-routed experts) or a list of expert ids (YAML [0, 5, 7], "
                              "flag 0,5,7) kept in every layer; 0 = none. Ignored with experts device",
                           _gpu_experts),
    "defer_experts": Setting(0, "expert deferral (ktransformers, SOSP'25): each token's k lowest-weight routed experts "
                                "of an MoE layer enter the residual stream one MoE layer later (after the next MoE "
                                "layer's output), so that a CPU may compute them while the next layer's attention "
                                "runs (ktjax does not overlap them yet); the last MoE layer defers nothing. With "
                                "experts device or host. Changes the output slightly (its cost on "
                                "the demo model: docs/running.md); from 0 to the model's experts per token less 1; "
                                "0 = off", lambda k, v: _int(k, v, 0, MAX_DEFERRED)),
    "index_topk": Setting(None, "sparse attention (DeepSeek-V3.2's DSA): keys each query attends to, picked by the "
                                "layer's indexer; unset: the model's index_topk; at least the context: dense. "
                                "Models without an indexer ignore it", _optional(lambda k, v: _int(k, v, 1))),
    "mesh": Setting(None, "devices to shard over: N (one axis: heads, experts, MLP, vocabulary and the cache's "
                          "sequence) or AxB (A over the batch x B as with N); unset: all local devices",
                    lambda k, v: parse_mesh(v)),
    "speculative": Setting("off", "speculative decoding: mtp = the model's MTP module (multi token prediction) drafts "
                                  "draft_tokens tokens, one pass of the model verifies them (greedy: by exact "
                                  "match; sampling: by the rejection rule, which keeps the model's own output "
                                  "distribution); the same tokens, fewer passes. Needs a model with an MTP module "
                                  "(num_nextn_predict_layers); off = one token per pass",
                           _choice(SPECULATIVE), SPECULATIVE),
    "draft_tokens": Setting(1, "with speculative mtp: tokens the MTP module drafts per verifying pass (1 to 3; "
                               "docs/results.md, 'Speculative decoding')", lambda k, v: _int(k, v, 1, 3)),
    "max_new_tokens": Setting(128, "tokens to generate per prompt", lambda k, v: _int(k, v, 1, 2**30),
                              per_call=True),
    "temperature": Setting(None, "0 = greedy; unset: generation_config.json's, else 0",
                           _optional(lambda k, v: _float(k, v, 0.0, 1e6)), per_call=True),
    "top_k": Setting(None, "sample among the k most likely tokens (0 = off); unset: generation_config.json's",
                     _optional(lambda k, v: _int(k, v, 0)), per_call=True),
    "top_p": Setting(None, "nucleus sampling threshold (1 = off); unset: generation_config.json's",
                     _optional(lambda k, v: _float(k, v, 0.0, 1.0, lo_open=True)), per_call=True),
    "seed": Setting(0, "random seed for sampling; the same seed gives the same tokens",
                    lambda k, v: _int(k, v, 0, 2**32 - 1), per_call=True),
    "ignore_eos": Setting(False, "keep generating past end-of-sequence tokens (for benchmarks)", _bool,
                          per_call=True, switch=True),
    "truncate_left": Setting(False, "drop the oldest prompt tokens when prompt + max_new_tokens exceed the cache "
                                    "or the model's window, instead of refusing", _bool, per_call=True,
                             switch=True),
}
LOAD_KEYS = tuple(k for k, s in SETTINGS.items() if not s.per_call)
CALL_KEYS = tuple(k for k, s in SETTINGS.items() if s.per_call)


def _validated(cls, base, keys: tuple, values: dict):
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise KtjaxError(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    misplaced = sorted(set(values) - set(keys))
    if misplaced:
        where = ("a per-call setting: pass it to Engine.generate" if cls is RuntimeConfig else
                 "a load-time setting: pass it to ktjax.load")
        raise KtjaxError(f"{', '.join(misplaced)}: {where}")
    # None keeps the base value of a setting whose default is not None (a CLI flag left unset).
    values = {k: v for k, v in values.items() if v is not None or SETTINGS[k].default is None}
    out = base or cls()
    return dataclasses.replace(out, **{k: SETTINGS[k].parse(k, v) for k, v in values.items()})


def _default(key):
    setting = SETTINGS[key]
    return None if setting.default is None else setting.parse(key, setting.default)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Load-time settings, validated: dtype a name, cache_dtype a CacheFormat, mesh a shape tuple or None,
    memory_budget bytes or None."""
    dtype: str = _default("dtype")
    cache_dtype: cache_formats.CacheFormat = _default("cache_dtype")
    cache_lens: int | str | None = _default("cache_lens")
    memory_budget: int | None = _default("memory_budget")
    chunk_size: int = _default("chunk_size")
    absorb_for_prefill: bool | str = _default("absorb_for_prefill")
    attention: str = _default("attention")
    moe_impl: str = _default("moe_impl")
    weight_layout: str = _default("weight_layout")
    cpu_kernels: str = _default("cpu_kernels")
    activation_quant: str = _default("activation_quant")
    fp8_matmul: str = _default("fp8_matmul")
    experts: str = _default("experts")
    gpu_experts: int | tuple = _default("gpu_experts")
    defer_experts: int = _default("defer_experts")
    index_topk: int | None = _default("index_topk")
    mesh: tuple[int, ...] | None = _default("mesh")
    speculative: str = _default("speculative")
    draft_tokens: int = _default("draft_tokens")

    @classmethod
    def from_overrides(cls, base: "RuntimeConfig | None" = None, **values) -> "RuntimeConfig":
        return _validated(cls, base, LOAD_KEYS, values)

    @property
    def out_in(self) -> bool:
        """Whether the Engine holds float matmul weights [out, in] (weight_quant.OutIn)."""
        return self.weight_layout == "out-in"

    @property
    def jnp_dtype(self):
        import jax.numpy as jnp
        return jnp.dtype(self.dtype)

    def check_for_model(self, cfg):
        """The settings whose bounds are the model's, checked against its config: one KtjaxError."""
        top_k = cfg.num_experts_per_tok if cfg.num_moe_layers else 0
        if self.defer_experts >= max(top_k, 1):
            why = (f"the model routes each token to {top_k} experts (num_experts_per_tok), of which at least one "
                   f"is summed at once" if top_k else "the model has no MoE layers")
            _fail("defer_experts", self.defer_experts, f"must be from 0 to {max(top_k - 1, 0)}: {why}")

    def absorb(self, cfg, q_len: int) -> bool:
        """Absorbed or naive attention for q_len queries. Per query and key, absorbed costs ~(2R + r) flops per
        head, naive ~(d_nope + r + d_v) plus the re-expansion of each key (R (d_nope + d_v) per head), which
        q_len queries share: naive pays off only for long chunks. One query (a decode step, a 1-token chunk)
        always absorbs: the setting absorb_for_prefill is for longer chunks. The one rule for Engine.generate and
        the server."""
        if q_len == 1:
            return True
        if self.absorb_for_prefill != "auto":
            return self.absorb_for_prefill
        r, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        absorbed = 2 * r + rope
        naive = cfg.qk_head_dim + cfg.v_head_dim + r * (cfg.qk_nope_head_dim + cfg.v_head_dim) / q_len
        return absorbed <= naive


@dataclasses.dataclass(frozen=True)
class CallSettings:
    """Per-call settings of Engine.generate, validated (values traced into the compiled programs)."""
    max_new_tokens: int = _default("max_new_tokens")
    temperature: float | None = _default("temperature")
    top_k: int | None = _default("top_k")
    top_p: float | None = _default("top_p")
    seed: int = _default("seed")
    ignore_eos: bool = _default("ignore_eos")
    truncate_left: bool = _default("truncate_left")

    @classmethod
    def from_overrides(cls, base: "CallSettings | None" = None, **values) -> "CallSettings":
        return _validated(cls, base, CALL_KEYS, values)


def resolve(**values) -> tuple[RuntimeConfig, CallSettings]:
    """Any mix of settings -> (load-time, per-call), each value checked by its one parser."""
    load = {k: v for k, v in values.items() if k not in CALL_KEYS}  # an unknown key is refused there, by name
    call = {k: v for k, v in values.items() if k in CALL_KEYS}
    return RuntimeConfig.from_overrides(**load), CallSettings.from_overrides(**call)


def describe(value) -> str:
    """A setting's value as a user writes it (stats, help, README)."""
    if isinstance(value, cache_formats.CacheFormat):
        return value.name
    if isinstance(value, ExpertIds):
        return ",".join(map(str, value)) + ("," if len(value) == 1 else "")  # "5," is the list [5], "5" a count
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return "unset" if value is None else str(value)


def load_yaml(path: str) -> dict:
    """A YAML preset: setting keys plus optional `model`, validated here. Unknown keys are an error that
    names them. Read within bounds (ktjax/util/yamlio.py): a FIFO, an alias bomb or deep nesting is refused."""
    from ktjax.util.yamlio import read_yaml

    if os.path.isdir(path):
        raise KtjaxError(f"{path}: a folder, not a YAML config file")
    data = read_yaml(path, "config file")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise KtjaxError(f"{path}: expected a mapping of settings")
    unknown = sorted(set(map(str, data)) - set(SETTINGS) - {"model"})
    if unknown:
        raise KtjaxError(f"{path}: unknown setting(s) {short_repr(unknown, 200)}; known: model, "
                         f"{', '.join(SETTINGS)}")
    try:
        resolve(**{k: v for k, v in data.items() if k != "model"})
    except KtjaxError as e:
        raise KtjaxError(f"{path}: {e}") from None
    if data.get("model") is not None:
        if not isinstance(data["model"], str):
            raise KtjaxError(f"{path}: model must be a folder path")
        data["model"] = os.path.expanduser(data["model"])
    return data
