"""ktjax's full forward against Hugging Face transformers on tiny random models (the correctness oracle)."""
import numpy as np
import pytest

import ktjax
from hf_models import CONFIGS, hf_logits, rel_err

SEQ = 13  # not a bucket size: padding is exercised too


def _ids(vocab, rng, batch=2, seq=SEQ):
    return rng.integers(0, vocab, size=(batch, seq))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("absorb", [False, True], ids=["naive", "absorbed"])
def test_logits_match_transformers(hf_folder, rng, name, absorb):
    folder, oracle = hf_folder(name)
    ids = _ids(oracle.config.vocab_size, rng)
    assert not np.array_equal(ids[0], ids[1])
    ref = hf_logits(oracle, ids)
    out = ktjax.load(folder, absorb_for_prefill=absorb).logits(ids)
    assert out.shape == ref.shape == (2, SEQ, oracle.config.vocab_size)
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("moe_impl", ["gather", "ragged", "blocked"])
def test_each_expert_implementation_matches_transformers(hf_folder, rng, moe_impl):
    folder, oracle = hf_folder("v3")
    ids = _ids(oracle.config.vocab_size, rng)
    out = ktjax.load(folder, absorb_for_prefill=True, moe_impl=moe_impl).logits(ids)
    assert rel_err(out, hf_logits(oracle, ids)) <= 1e-4


@pytest.mark.parametrize("name", ["v3", "v2_lite"])
def test_greedy_continuation_matches_generate(hf_folder, rng, name):
    import torch

    folder, oracle = hf_folder(name)
    prompt = _ids(oracle.config.vocab_size, rng, batch=1, seq=7)
    with torch.no_grad():
        ref = oracle.generate(torch.as_tensor(prompt), do_sample=False, max_new_tokens=16, eos_token_id=None,
                              pad_token_id=0)[0, 7:].tolist()
    engine = ktjax.load(folder, absorb_for_prefill=True)
    seq = list(prompt[0])
    for _ in range(16):
        seq.append(int(engine.logits([seq])[0, -1].argmax()))
    assert seq[7:] == ref
