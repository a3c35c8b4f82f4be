"""The built-in demo model of `python -m ktjax.generate`.

ktjax/demo_model/ holds a small DeepSeek-V3-architecture model trained by ktjax/train.py (Hugging Face
format: config.json, model.safetensors, tokenizer.json). Where that folder is missing, a model of random
(seeded) weights and a byte-level tokenizer are built in memory instead, and the output says so.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig

DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")
TRAINED_NOTICE = ("demo model: a 3.6M-parameter DeepSeek-V3-style model trained for an hour on a CPU on the Python "
                  "documentation and a pass-key task (pass --model DIR to run a real model)")
RANDOM_WEIGHTS_NOTICE = ("demo model with random weights: the text below is noise, not a bug "
                         "(pass --model DIR to run a real model)")
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]

DEMO_CONFIG = dict(
    architectures=["DeepseekV3ForCausalLM"], vocab_size=256 + len(SPECIALS), hidden_size=256,
    intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
    q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, rms_norm_eps=1e-6,
    max_position_embeddings=8192, bos_token_id=256, eos_token_id=257,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 2048, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                 "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


def demo_tokenizer():
    """Byte-level BPE with no merges: every byte is a token, then the special tokens (ids 256..)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    from .tokenizer import Tokenizer

    alphabet = ByteLevel.alphabet()
    byte_vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=_byte_of))}
    tok = HFTokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return Tokenizer(tok, {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "add_bos_token": True,
                           "chat_template": CHAT_TEMPLATE})


def _byte_of(ch: str) -> int:
    """GPT-2's byte-to-unicode map, inverted: printable bytes map to themselves, the rest to 256 + n."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def demo_model(dtype=jnp.float32, seed: int = 0):
    from .model import DeepseekModel

    cfg = ModelConfig.from_hf_dict(DEMO_CONFIG)
    return cfg, DeepseekModel(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
