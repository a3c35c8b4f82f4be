"""The built-in demo model of `python -m ktjax.generate`, how it was trained (ktjax/demo/train.py) and the
pass-key task it was trained and is measured on (ktjax/demo/passkey.py).

ktjax/demo_model/ holds a small DeepSeek-V3-architecture model trained by `python -m ktjax.train` (Hugging
Face format: config.json, model.safetensors, tokenizer.json). Where that folder is missing, a model of the
same architecture with random (seeded) weights and a byte-level tokenizer are built in memory instead, and
the output says so.
"""
from __future__ import annotations

import os

_KTJAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL_DIR = os.path.join(_KTJAX_DIR, "demo_model")
TRAINED_NOTICE = ("demo model: a 3.6M-parameter DeepSeek-V3-style model trained for an hour on a CPU on the Python "
                  "documentation and a pass-key task (pass --model DIR to run a real model)")
RANDOM_WEIGHTS_NOTICE = ("demo model with random weights: the text below is noise, not a bug "
                         "(pass --model DIR to run a real model)")
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                 "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


def demo_tokenizer():
    """Byte-level BPE with no merges: the special tokens first (ids 0..3, as in the trained tokenizer, whose
    ids the demo architecture's bos_token_id and eos_token_id name), then every byte (ids 4..259)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    from ..tokenizer import Tokenizer

    alphabet = ByteLevel.alphabet()
    vocab = {special: i for i, special in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + _byte_of(ch) for ch in alphabet})
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
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


def demo_model(dtype=None, seed: int = 0):
    """(config, model): the trained demo model's architecture (train.model_config, the one definition) with
    random weights, sized for demo_tokenizer's vocabulary; `dtype` defaults to float32."""
    import jax.numpy as jnp
    from flax import nnx

    from ..config import ModelConfig
    from ..model import DeepseekModel
    from .train import max_positions, model_config

    cfg = ModelConfig.from_hf_dict(model_config(vocab_size=len(SPECIALS) + 256, max_len=max_positions()))
    return cfg, DeepseekModel(cfg, dtype=dtype or jnp.float32, rngs=nnx.Rngs(seed))
