"""Tiny random DeepSeek models written by Hugging Face transformers: the oracle for ktjax's parity tests."""
from __future__ import annotations

import json
import os

import numpy as np

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}

_COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=20,
               qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, max_position_embeddings=512,
               initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)

# Each config covers a different combination of the architecture's options (noted above it).
CONFIGS = {
    # V3: q_lora, noaux_tc with a random correction bias, 4 groups, normalised top-k, YaRN with
    # mscale != mscale_all_dim, one dense layer first.
    "v3": ("v3", dict(_COMMON, q_lora_rank=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                      n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                      first_k_dense_replace=1, rope_parameters=dict(YARN))),
    # V3 with norm_topk_prob off, the non-interleaved rope layout, attention biases, no q_lora, plain rope.
    "v3_nonorm": ("v3", dict(_COMMON, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
                             num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=False,
                             routed_scaling_factor=1.5, first_k_dense_replace=2, rope_interleave=False,
                             attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    # V2-Lite: no q_lora, softmax + greedy, YaRN in the old rope_scaling spelling, two shared experts.
    "v2_lite": ("v2", dict(_COMMON, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
                           num_experts_per_tok=2, topk_method="greedy", n_group=1, topk_group=1,
                           routed_scaling_factor=1.0, first_k_dense_replace=1, rope_parameters=dict(YARN))),
    # V2: q_lora, group_limited_greedy, scaled weights, MLP biases, no dense layer.
    "v2": ("v2", dict(_COMMON, q_lora_rank=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                      topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0,
                      first_k_dense_replace=0, mlp_bias=True, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 10000.0})),
    # V3.2: V3 plus DeepSeek Sparse Attention, a small index_topk (the tests run contexts either side of it),
    # YaRN, one dense layer first. 32 index heads: a token's score is exactly 0 (a tie that transformers and
    # ktjax may break differently) only when all 32 relu(q.k) are, which random weights make improbable.
    "v32": ("v32", dict(_COMMON, q_lora_rank=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                        first_k_dense_replace=1, rope_parameters=dict(YARN), index_topk=16, index_head_dim=16,
                        index_n_heads=32)),
}

OLD_ROPE_SPELLING = {"v2_lite"}



def rel_err(a, b) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def build_hf_model(name: str, seed: int = 0):
    import torch
    from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                              DeepseekV3ForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM)

    kind, kwargs = CONFIGS[name]
    torch.manual_seed(seed)
    cls_cfg, cls_model = {"v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
                          "v32": (DeepseekV32Config, DeepseekV32ForCausalLM),
                          "v2": (DeepseekV2Config, DeepseekV2ForCausalLM)}[kind]
    cfg = cls_cfg(**kwargs)
    model = cls_model(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms start at one and the correction bias at zero: randomise them
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def save_hf_model(model, folder: str, name: str, max_shard_size: str = "40KB") -> str:
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if name in OLD_ROPE_SPELLING:  # older DeepSeek configs: rope_scaling + top-level rope_theta
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            raw = json.load(f)
        rope = raw.pop("rope_parameters")
        raw["rope_theta"] = rope.pop("rope_theta")
        rope["type"] = rope.pop("rope_type")
        raw["rope_scaling"] = rope
        with open(path, "w") as f:
            json.dump(raw, f, indent=2)
    return folder


def load_oracle(folder: str):
    """Read the folder back with transformers, eager attention and experts, float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                experts_implementation="eager", dtype="float32").eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()
