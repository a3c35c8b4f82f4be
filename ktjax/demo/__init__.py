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
from ktjax.demo.tokens import CHAT_TEMPLATE, SPECIALS, demo_tokenizer  # noqa: E402,F401


def demo_model(dtype=None, seed: int = 0):
    """(config, model): the trained demo model's architecture (train.model_config, the one definition) with
    random weights, sized for demo_tokenizer's vocabulary; `dtype` defaults to float32."""
    import jax.numpy as jnp
    from flax import nnx

    from ktjax.model.config import ModelConfig
    from ktjax.model.decoder import DeepseekModel
    from ktjax.demo.train import max_positions, model_config

    cfg = ModelConfig.from_hf_dict(model_config(vocab_size=len(SPECIALS) + 256, max_len=max_positions()))
    return cfg, DeepseekModel(cfg, dtype=dtype or jnp.float32, rngs=nnx.Rngs(seed))
