"""The model config, read from a Hugging Face `config.json` of DeepseekV2ForCausalLM, DeepseekV3ForCausalLM or
DeepseekV32ForCausalLM (V3 plus DeepSeek Sparse Attention: a lightning indexer in every layer).

Every field that changes the math is read here and nowhere else; a value ktjax does not implement is a
KtjaxError that names it, never a silently different model.
"""
from __future__ import annotations

import dataclasses
import math

from ktjax.errors import KtjaxError
from ktjax.util.jsonio import json_type_name, read_json
from ktjax.util.text import short_repr

ARCHITECTURES = {"DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3",
                 "DeepseekV32ForCausalLM": "deepseek_v32"}
# transformers' names for a layer with the DSA indexer (configuration_utils maps the second to the first).
INDEXED_LAYER_TYPES = ("indexed_attention", "deepseek_sparse_attention")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float
    dim: int                      # qk_rope_head_dim
    interleave: bool              # DeepSeek's (x0, x1), (x2, x3) pair layout
    yarn: bool = False
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0  # multiplies cos and sin: yarn_mscale(f, mscale) / yarn_mscale(f, mscale_all_dim)
    mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str                     # "deepseek_v2", "deepseek_v3" or "deepseek_v32"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool
    mlp_bias: bool
    rope: RopeConfig
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    scoring_func: str
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # DeepSeek Sparse Attention (V3.2): each layer's indexer keeps the index_topk best-scored tokens per
    # query. index_topk 0: no indexer (V2/V3).
    index_topk: int = 0
    index_head_dim: int = 0
    index_n_heads: int = 0
    # Multi-token prediction: config.json's num_nextn_predict_layers (DeepSeek-V3/R1/V3.2: 1), the MTP layers
    # stored after the decoder layers (model.layers.{num_hidden_layers}.*). ktjax runs the first (mtp_layers);
    # a loader sets it to 0 where the weights lack the layer or it is dropped (model/mtp.py).
    num_nextn_predict_layers: int = 0

    @property
    def mtp_layers(self) -> int:
        """MTP layers the model holds: 1 when config.json has any (ktjax runs the first), else 0."""
        return min(self.num_nextn_predict_layers, 1)

    @property
    def mtp_moe(self) -> bool:
        """Whether the MTP layer's feed-forward is MoE: its index (num_hidden_layers) is past the dense ones."""
        return bool(self.n_routed_experts) and self.first_k_dense_replace <= self.num_hidden_layers

    @property
    def has_indexer(self) -> bool:
        return self.index_topk > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers) if self.n_routed_experts else self.num_hidden_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.rope.yarn and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def normalizes_then_scales(self) -> bool:
        """DeepSeek-V2's gate scales the weights only when it does not normalise them; V3's always scales."""
        return self.arch in ("deepseek_v3", "deepseek_v32")

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        raw = read_json(path, "model config",
                        missing_hint="point at a Hugging Face model folder or a converted checkpoint")
        try:
            return cls.from_hf_dict(raw)
        except KtjaxError as e:
            raise KtjaxError(f"{path}: {e}") from None

    @classmethod
    def from_hf_dict(cls, raw: dict) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise KtjaxError(f"config.json must hold a JSON object of settings, not a {json_type_name(raw)}")
        arch = _architecture(raw)
        g = _Getter(raw)
        n_routed = g.int("n_routed_experts", 0) or 0
        if g.int("moe_layer_freq", 1) != 1:
            raise KtjaxError(f"moe_layer_freq={short_repr(raw['moe_layer_freq'])} is not supported (only 1: every "
                             "layer after first_k_dense_replace is an MoE layer)")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise KtjaxError(f"hidden_act={short_repr(act)} is not supported (only 'silu')")
        if arch in ("deepseek_v3", "deepseek_v32"):
            # transformers' V3 and DeepSeek's own V3 code gate with sigmoid + noaux_tc; other values follow
            # DeepSeek's inference/model.py (softmax or sigmoid scores, bias only for noaux_tc).
            scoring, topk_method = raw.get("scoring_func", "sigmoid"), raw.get("topk_method", "noaux_tc")
        else:
            scoring, topk_method = raw.get("scoring_func", "softmax"), raw.get("topk_method", "greedy")
        if scoring not in SCORING_FUNCS:
            raise KtjaxError(f"scoring_func={short_repr(scoring)} is not supported (one of {SCORING_FUNCS})")
        if topk_method not in TOPK_METHODS:
            raise KtjaxError(f"topk_method={short_repr(topk_method)} is not supported (one of {TOPK_METHODS})")
        n_group = g.int("n_group", 1) or 1
        topk_group = g.int("topk_group", n_group) or n_group
        top_k = g.int("num_experts_per_tok", 0) or 0
        if n_routed * g.int("num_hidden_layers") > _MAX_EXPERT_TENSORS:  # before any per-layer table is built
            raise KtjaxError(f"n_routed_experts={n_routed} x num_hidden_layers={raw['num_hidden_layers']} experts is "
                             f"more than ktjax supports ({_MAX_EXPERT_TENSORS}); the config is damaged")
        if n_routed:
            if n_routed % n_group:
                raise KtjaxError(f"n_routed_experts={n_routed} is not divisible by n_group={n_group}")
            if topk_method != "greedy" and not 1 <= topk_group <= n_group:
                raise KtjaxError(f"topk_group={topk_group} must be between 1 and n_group={n_group}")
            if not 1 <= top_k <= n_routed:
                raise KtjaxError(f"num_experts_per_tok={top_k} must be between 1 and n_routed_experts={n_routed}")
        heads = g.int("num_attention_heads")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise KtjaxError(f"pretraining_tp={raw['pretraining_tp']} is not supported (only 1)")
        return cls(
            arch=arch,
            vocab_size=g.int("vocab_size"),
            hidden_size=g.int("hidden_size"),
            intermediate_size=g.int("intermediate_size"),
            moe_intermediate_size=g.int("moe_intermediate_size", 0) or 0,
            num_hidden_layers=g.int("num_hidden_layers"),
            num_attention_heads=heads,
            q_lora_rank=g.int("q_lora_rank", None),
            kv_lora_rank=g.int("kv_lora_rank"),
            qk_nope_head_dim=g.int("qk_nope_head_dim"),
            qk_rope_head_dim=g.int("qk_rope_head_dim"),
            v_head_dim=g.int("v_head_dim"),
            attention_bias=g.bool("attention_bias", False),
            mlp_bias=g.bool("mlp_bias", False) if arch == "deepseek_v2" else False,
            rope=_rope(g, arch, g.int("qk_rope_head_dim")),
            n_routed_experts=n_routed,
            n_shared_experts=g.int("n_shared_experts", 0) or 0,
            num_experts_per_tok=top_k,
            scoring_func=scoring,
            topk_method=topk_method,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=g.bool("norm_topk_prob", arch == "deepseek_v3"),
            routed_scaling_factor=g.float("routed_scaling_factor", 1.0) or 1.0,
            first_k_dense_replace=g.int("first_k_dense_replace", 0) or 0,
            rms_norm_eps=g.float("rms_norm_eps", 1e-6),
            tie_word_embeddings=g.bool("tie_word_embeddings", False),
            max_position_embeddings=g.int("max_position_embeddings", 4096),
            bos_token_id=g.int("bos_token_id", None),
            eos_token_ids=tuple(token_ids(raw, "eos_token_id")),
            num_nextn_predict_layers=g.int("num_nextn_predict_layers", 0) or 0,
            **(_indexer(g, heads) if arch == "deepseek_v32" else {}),
        )


def _indexer(g: "_Getter", heads: int) -> dict:
    """V3.2's indexer fields, checked as transformers' DeepseekV32 model builds them: every layer has an
    indexer (layer_types all indexed), its queries come from the q LoRA vector, rope covers its first
    qk_rope_head_dim dimensions, and mlp_layer_types, if given, is first_k_dense_replace's pattern."""
    raw = g.raw
    n_layers = g.int("num_hidden_layers")
    if not g.int("q_lora_rank", None):
        raise KtjaxError("q_lora_rank must be set for DeepseekV32ForCausalLM (the indexer reads the q LoRA vector)")
    fields = dict(index_topk=g.int("index_topk", 2048), index_head_dim=g.int("index_head_dim", 128),
                  index_n_heads=g.int("index_n_heads", 64))
    for key, value in fields.items():
        if value < 1:
            raise KtjaxError(f"{key}={value} must be a positive integer")
    if fields["index_head_dim"] < g.int("qk_rope_head_dim"):
        raise KtjaxError(f"index_head_dim={fields['index_head_dim']} must be at least qk_rope_head_dim="
                         f"{raw['qk_rope_head_dim']} (the indexer rotates its first qk_rope_head_dim dimensions)")
    types = raw.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != n_layers
                              or any(t not in INDEXED_LAYER_TYPES for t in types)):
        raise KtjaxError(f"layer_types={repr(types)[:60]} is not supported: DeepseekV32ForCausalLM needs a list of "
                         f"{n_layers} 'indexed_attention' entries (every layer has an indexer)")
    mlp_types = raw.get("mlp_layer_types")
    if mlp_types is not None:
        n_dense = min(g.int("first_k_dense_replace", 0) or 0, n_layers)
        if mlp_types != ["dense"] * n_dense + ["sparse"] * (n_layers - n_dense):
            raise KtjaxError(f"mlp_layer_types={repr(mlp_types)[:60]} is not supported (only first_k_dense_replace "
                             f"dense layers, then MoE layers)")
    return fields


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _architecture(raw: dict) -> str:
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs) or \
            not isinstance(model_type, (str, type(None))):
        raise KtjaxError("architectures must be a list of names and model_type a name")
    if not archs and model_type in ARCHITECTURES.values():
        return model_type
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    raise KtjaxError(f"architectures={short_repr(archs)} (model_type={short_repr(model_type)}) is not supported; "
                     f"ktjax runs {', '.join(ARCHITECTURES)}")


def _rope(g: "_Getter", arch: str, dim: int) -> RopeConfig:
    # Two spellings: newer `rope_parameters` (theta inside), older `rope_scaling` + top-level `rope_theta`.
    raw = g.raw
    spelling = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    params = raw.get(spelling) or {}
    if not isinstance(params, dict):
        raise KtjaxError(f"{spelling} must be a JSON object, not a {json_type_name(params)}")
    p = _Getter(params, prefix=spelling + ".")
    theta = p.float("rope_theta", g.float("rope_theta", 10000.0), positive=True)
    rope_type = params.get("rope_type", params.get("type", "default"))
    # transformers' V2 and V3.2 always use the interleaved rotation in MLA; V3 reads rope_interleave.
    interleave = True if arch != "deepseek_v3" else g.bool("rope_interleave", True)
    if rope_type == "default":
        return RopeConfig(theta=theta, dim=dim, interleave=interleave)
    if rope_type not in ("yarn", "deepseek_yarn"):
        raise KtjaxError(f"rope type {str(rope_type)[:40]!r} is not supported (only the default rope and 'yarn')")
    max_pos = g.int("max_position_embeddings", 4096)
    original = p.int("original_max_position_embeddings", g.int("original_max_position_embeddings", max_pos))
    if not original:
        raise KtjaxError(f"{spelling}.original_max_position_embeddings must be a positive integer")
    factor = p.float("factor", None, positive=True)
    factor = factor if factor is not None else max_pos / original
    mscale, mscale_all_dim = p.float("mscale", None), p.float("mscale_all_dim", None)
    attention_factor = p.float("attention_factor", None)
    if attention_factor is None:  # as transformers' _compute_yarn_parameters
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    if params.get("truncate", True) is not True:
        raise KtjaxError("rope_parameters.truncate=false is not supported")
    return RopeConfig(theta=theta, dim=dim, interleave=interleave, yarn=True, factor=factor,
                      original_max_position_embeddings=original,
                      beta_fast=p.float("beta_fast", None) or 32.0, beta_slow=p.float("beta_slow", None) or 1.0,
                      attention_factor=attention_factor, mscale_all_dim=mscale_all_dim or 0.0)


# Sizes past these are a damaged or hostile config.json, refused before anything is built (DeepSeek-V3: 61 layers,
# 256 experts, vocabulary 129280, hidden 7168): a loop over 10**7 layers or a 10**12-row embedding never starts.
_MAX_INT = {"num_hidden_layers": 4096, "vocab_size": 2**24, "max_position_embeddings": 2**26,
            "original_max_position_embeddings": 2**26, "n_routed_experts": 8192}
_MAX_SIZE = 2**20  # any other size: widths, ranks, head dims, heads, group counts
_MAX_EXPERT_TENSORS = 2**18  # layers x routed experts: per-layer tables stay small
_MAX_TOKEN_ID = 2**31 - 1


class _Getter:
    """Reads typed fields of one JSON object, naming the field when it is missing, of the wrong type or out of
    range (`prefix` names a nested object, such as "rope_parameters.")."""

    _MISSING = object()

    def __init__(self, raw: dict, prefix: str = ""):
        self.raw = raw
        self.prefix = prefix

    def _get(self, key: str, default):
        value = self.raw.get(key, default)
        if value is self._MISSING:
            raise KtjaxError(f"config.json has no {self.prefix + key!r}")
        return value

    def int(self, key: str, default=_MISSING):
        value = self._get(key, default)
        required = default is self._MISSING
        if value is None and not required:
            return None
        limit = _MAX_TOKEN_ID if key.endswith("_token_id") else _MAX_INT.get(key, _MAX_SIZE)
        if isinstance(value, bool) or not isinstance(value, int) or not (1 if required else 0) <= value <= limit:
            raise KtjaxError(f"{self.prefix}{key}={short_repr(value, 40)} must be a "
                             f"{'positive' if required else 'non-negative'} integer of at most {limit}")
        return value

    def float(self, key: str, default=_MISSING, positive: bool = False):
        value = self._get(key, default)
        if value is None or value is default:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                (positive and value <= 0) or abs(value) > 1e12:
            raise KtjaxError(f"{self.prefix}{key}={short_repr(value, 40)} must be a finite "
                             f"{'positive ' if positive else ''}number")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise KtjaxError(f"{self.prefix}{key}={short_repr(value, 40)} must be true or false")
        return value


def token_ids(raw: dict, key: str, prefix: str = "") -> list[int]:
    """`raw[key]` as a list of token ids: one id, a list of them, or nothing (as config.json and
    generation_config.json spell eos_token_id)."""
    value = raw.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    for v in values:
        _Getter({key: v}, prefix).int(key, None)
    return values

