"""A converted ktjax checkpoint with random weights, written straight in the converter's layout (int8 or int4
matmul weights), one tensor at a time: DeepSeek-V2-Lite's 27 layers on a machine's disk in the time it takes
to write them, with host memory bounded by the largest tensor (the embedding, 0.42 GB in bf16 at V2-Lite's
size; a MoE layer's int8 expert stack is 0.18 GB per weight).

    from random_checkpoint import write_random_checkpoint, v2_lite_config
    write_random_checkpoint("/tmp/v2lite-int4", v2_lite_config(27), "int4")

The quantized weights are drawn as their stored bytes (uniform bytes: int8 values -128..127, int4 nibbles
-8..7), with float32 scales that give each weight a standard deviation near WEIGHT_STD; drawing floats and
quantizing them would cost ~10x the time for values nobody reads. The padded inputs of an int4 weight
(inputs not a multiple of the group) are zero, as the converter writes them. Everything else (embeddings,
norms, the router, w_uk / w_uv, lm_head unless int8) is drawn as uniform bytes mapped to values of `kept_dtype`
(bf16: a bf16 source converted with --weights int8 / int4 keeps them so; the router float32). Each tensor's values
come from its own generator, seeded by (seed, key): the same seed writes the same checkpoint.

The folder is written under a hidden temporary name beside it and renamed when complete; the manifest
records the spec, so that a later run can reuse a checkpoint written with the same spec (`existing_spec`).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "tests")) if p not in sys.path]
from synthetic_folders import V2_LITE  # noqa: E402  (tests/synthetic_folders.py: V2-Lite's config.json)

WEIGHT_STD = 0.02      # like an initialisation
NORM_STD = 0.05        # norms drawn near one
INT8_SPREAD = float(np.sqrt((256**2 - 1) / 12))  # std of a uniform byte read as int8 (-128..127)
INT4_SPREAD = float(np.sqrt((16**2 - 1) / 12))   # std of a uniform nibble minus 8 (-8..7)
SOURCE = "random weights (benchmarks/random_checkpoint.py)"

# A small model of V2-Lite's shape (no q_lora, 2 shared experts, one dense layer first, YaRN in the old
# spelling) for tests: every dimension small, inputs that are not a multiple of the int4 group included.
SMOKE = dict(V2_LITE, vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
             qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
             max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
             rope_scaling=dict(V2_LITE["rope_scaling"], factor=4, original_max_position_embeddings=1024))


# DeepSeek-V3's config.json (deepseek-ai/DeepSeek-V3; R1 has the same dimensions), less its FP8
# quantization_config: random weights are written int4 / int8. 61 layers, the first 3 dense; MTP dropped.
V3 = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
          intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
          num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
          v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, topk_method="noaux_tc",
          scoring_func="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
          first_k_dense_replace=3, rms_norm_eps=1e-6, max_position_embeddings=163840, bos_token_id=0,
          eos_token_id=1, tie_word_embeddings=False, torch_dtype="bfloat16", rope_theta=10000,
          rope_scaling=dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
                            original_max_position_embeddings=4096))

# V3's routing (sigmoid scores, a correction bias, groups), every dimension small.
SMOKE_V3 = dict(V3, vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                topk_group=2, max_position_embeddings=4096,
                rope_scaling=dict(V3["rope_scaling"], factor=4, original_max_position_embeddings=1024))


def v3_config(layers: int = 61, dense: int = 3) -> dict:
    """DeepSeek-V3's config.json with `layers` decoder layers, the first `dense` of them dense."""
    return dict(V3, num_hidden_layers=layers, first_k_dense_replace=min(dense, layers))


def smoke_v3_config(layers: int = 3) -> dict:
    return dict(SMOKE_V3, num_hidden_layers=layers, first_k_dense_replace=1)


def v2_lite_config(layers: int = 27) -> dict:
    """DeepSeek-V2-Lite's config.json with `layers` decoder layers (the first dense, the rest MoE)."""
    return dict(V2_LITE, num_hidden_layers=layers)


def smoke_config(layers: int = 2) -> dict:
    return dict(SMOKE, num_hidden_layers=layers)


def spec_of(config: dict, weights: str, *, seed: int = 0, lm_head: str = "kept", kept_dtype: str = "bfloat16",
            group: int | None = None) -> dict:
    """What a checkpoint is written from (recorded in its manifest as random_spec)."""
    from ktjax.model import quantized as wq

    return {"config": config, "weights": weights, "seed": seed, "lm_head": lm_head, "kept_dtype": kept_dtype,
            "int4_group": group or wq.INT4_GROUP}


def existing_spec(folder: str) -> dict | None:
    """The spec a folder was written with by this module, or None (not a checkpoint, or not ours)."""
    from ktjax.errors import KtjaxError
    from ktjax.weights.checkpoint import is_checkpoint, read_manifest

    try:
        return read_manifest(folder).get("random_spec") if is_checkpoint(folder) else None
    except KtjaxError:  # a damaged manifest: not one to reuse
        return None


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def random_quantized(rng: np.random.Generator, fmt: str, shape: tuple, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, float32 scales) of a weight [..., in, out] stored as `fmt` (ktjax/model/quantized.py's layout),
    drawn as bytes; the scales give a weight a standard deviation of WEIGHT_STD (x 0.5-1.5 per channel)."""
    from ktjax.model import quantized as wq

    values_shape, dtype, scales_shape = wq.stored_shapes(fmt, shape, group)
    n = int(np.prod(values_shape, dtype=np.int64))
    values = np.frombuffer(rng.bytes(n), np.uint8).reshape(values_shape)  # read-only: written as it is
    spread = INT8_SPREAD if fmt == "int8" else INT4_SPREAD
    scales = (WEIGHT_STD / spread * rng.uniform(0.5, 1.5, scales_shape)).astype(np.float32)
    if fmt == "int8":
        return values.view(np.int8), scales
    d_in = shape[-2]
    if d_in % group:  # zero the padded inputs of the last group (nibble 8 = 0), as quantize() leaves them
        values = values.copy()
        last = values[..., -(group // 2):, :]
        nibbles = wq.unpack_weight_int4(last, group)
        nibbles[..., d_in % group:, :] = 8
        last[...] = wq.pack_weight_int4(nibbles, group)
    return values, scales


def _random_float(rng: np.random.Generator, row, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Uniform bytes mapped (one table look-up, straight into `dtype`) to a standard deviation of WEIGHT_STD
    (norms: NORM_STD about one): Gaussian draws and float32 arithmetic over V2-Lite's 420M embedding and
    lm_head values took most of the build."""
    unit = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32) / INT8_SPREAD  # byte -> value
    norm = row.path[-1] == "weight" and any("norm" in p for p in row.path)
    table = (1.0 + NORM_STD * unit if norm else WEIGHT_STD * unit).astype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    return table[np.frombuffer(rng.bytes(n), np.uint8)].reshape(shape)


def _write_param(writer, key: str, row, shape: tuple, spec: dict) -> int:
    """One parameter of one layer (or the top level) -> bytes written."""
    from ktjax.model import quantized as wq
    from ktjax.weights.checkpoint import scale_key

    rng = _rng(spec["seed"], key)
    fmt = spec["weights"] if row.quantize and spec["weights"] in wq.WEIGHT_FORMATS else None
    if fmt is None and spec["lm_head"] == "int8" and row.path == ("lm_head", "kernel"):
        fmt = "int8"
    if fmt:
        values, scales = random_quantized(rng, fmt, shape, spec["int4_group"])
        writer.write(key, values)
        writer.write(scale_key(key), scales)
        return values.nbytes + scales.nbytes
    dtype = np.dtype(np.float32) if row.float32 else _np_dtype(spec["kept_dtype"])
    values = _random_float(rng, row, shape, dtype)
    writer.write(key, values)
    return values.nbytes


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name in ("bf16", "bfloat16") else np.dtype(name)


def write_random_checkpoint(folder: str, config: dict, weights: str, progress=None, **options) -> dict:
    """Write the checkpoint into `folder` (which must not exist) -> {"bytes", "seconds"}.
    `weights`: int8 or int4 (the converter's --weights); `options`: spec_of's (lm_head: kept or int8, the
    converter's --lm-head); `progress(layer)` is called after each decoder layer."""
    from ktjax.model import quantized as wq
    from ktjax.model.config import ModelConfig
    from ktjax.util.version import __version__
    from ktjax.weights import params
    from ktjax.weights.checkpoint import CheckpointWriter, tensor_key

    if weights not in wq.WEIGHT_FORMATS:
        raise ValueError(f"weights {weights!r}: one of {wq.WEIGHT_FORMATS}")
    spec = spec_of(config, weights, **options)
    group = spec["int4_group"]
    cfg = ModelConfig.from_hf_dict(config)
    t0 = time.perf_counter()
    folder = os.path.abspath(folder)
    if os.path.lexists(folder):  # a rename would replace an empty folder: refuse anything already there
        raise FileExistsError(f"{folder} already exists")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.partial-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        writer = CheckpointWriter(tmp)
        total = sum(_write_param(writer, tensor_key(row.path), row, shape, spec)
                    for row, shape in params.stack_params(cfg, None))
        for i in range(cfg.num_hidden_layers):
            stack = params.STACKS[0] if i < cfg.num_dense_layers else params.STACKS[1]
            total += sum(_write_param(writer, tensor_key(row.path, i), row, shape, spec)
                         for row, shape in params.stack_params(cfg, stack))
            if progress is not None:
                progress(i)
        writer.write_manifest(
            ktjax_version=__version__, source=SOURCE, weights=weights,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **({"int4_group": group} if weights == "int4" else {}), bytes=total, random_spec=spec)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"bytes": total, "seconds": time.perf_counter() - t0}
