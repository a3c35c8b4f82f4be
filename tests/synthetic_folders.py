"""Hugging Face folders of any size with made-up weights, for what depends on sizes and not on values: the
converter's peak memory (tests/test_convert.py; the README's measurement) and its --dry-run plans.
`python benchmarks/bench_weights.py folder DIR --layers N [--sparse]` writes one of DeepSeek-V2-Lite's
dimensions from the command line.
"""
from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

# DeepSeek-V2-Lite's config.json (27 layers, 64 routed experts, vocab 102400; 31.4 GB in bf16).
V2_LITE = dict(architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=2048,
               intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
               num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
               n_shared_experts=2, num_experts_per_tok=6, topk_method="greedy", n_group=1, topk_group=1,
               routed_scaling_factor=1.0, first_k_dense_replace=1, norm_topk_prob=False, rms_norm_eps=1e-6,
               max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
               tie_word_embeddings=False, torch_dtype="bfloat16",
               rope_theta=10000, rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                               "mscale": 0.707, "mscale_all_dim": 0.707,
                                               "original_max_position_embeddings": 4096})
# Wide experts and many layers, small everything else: the model is ~25 times its largest tensor.
WIDE_EXPERTS = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=512, hidden_size=256,
                    intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                    q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                    n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1,
                    first_k_dense_replace=0, rms_norm_eps=1e-6, max_position_embeddings=64,
                    tie_word_embeddings=False)

_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def hf_tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a Hugging Face folder of `config` holds, in ktjax's loading order."""
    from ktjax.model.config import ModelConfig
    from ktjax.weights.loader import layer_entries, top_entries

    cfg = ModelConfig.from_hf_dict(config)
    specs = [(n, s) for e in top_entries(cfg) for n, s in zip(e.sources, e.shapes)]
    for i in range(cfg.num_hidden_layers):
        entries = layer_entries(cfg, i, i >= cfg.num_dense_layers, set())
        specs += list(dict.fromkeys((n, s) for e in entries for n, s in zip(e.sources, e.shapes)))
    return specs


def write_synthetic_folder(folder: str, config: dict, shard_bytes: int, dtype: str = "float32",
                           sparse: bool = False) -> int:
    """config.json, shards of at most `shard_bytes` (or one tensor) and their index; returns the weight bytes.
    Weights are random like an initialisation (norms near one), written a tensor at a time, so memory stays
    at one tensor. `sparse`: headers and holes only, for a converter --dry-run without the disk space."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    itemsize = np.dtype(np_dtype).itemsize
    rng = np.random.default_rng(0)
    weight_map, shard, size, total = {}, [], 0, 0
    for name, shape in hf_tensor_specs(config) + [(None, None)]:  # None: flush the last shard
        nbytes = 0 if name is None else int(np.prod(shape)) * itemsize
        if shard and (name is None or size + nbytes > shard_bytes):
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            _write_shard(os.path.join(folder, file), shard, rng, np_dtype, sparse)
            weight_map.update({n: file for n, _ in shard})
            shard, size = [], 0
        if name is not None:
            shard.append((name, shape))
            size += nbytes
            total += nbytes
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _write_shard(path: str, tensors, rng, np_dtype, sparse: bool):
    """safetensors by hand: an 8-byte header length, the JSON header, then each tensor's bytes in order."""
    itemsize, code = np.dtype(np_dtype).itemsize, _SAFETENSORS_DTYPES[np.dtype(np_dtype).name]
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        if sparse:
            f.truncate(8 + len(raw) + offset)  # a hole: a dry run reads headers only
            return
        for name, shape in tensors:
            values = rng.standard_normal(shape, dtype=np.float32) * 0.02  # weights like an initialisation
            if name.endswith("norm.weight"):
                values = 1.0 + values * 5  # norms near one
            f.write(values.astype(np_dtype).tobytes())
