"""Expert deferral (the setting defer_experts k; ktransformers, SOSP'25): each token's k lowest-weight routed experts
of an MoE layer are summed from that layer's MoE input with its weights and routing weights, and their sum enters
the residual stream one MoE layer later, after the next MoE layer's output; the last MoE layer defers nothing.

The reference is transformers' DeepSeek-V3 (CPU torch float32) with each MoE layer's forward replaced by that
definition, written here: ktjax's logits equal it to float32 rounding without a cache and through the cache
(chunked prefill, decode steps), on the XLA expert paths (gather, ragged, blocked) and with experts host.
defer_experts 0 is the model without the setting, exactly; hostile values are one KtjaxError (exit 2 in the CLI).
"""
from __future__ import annotations

import contextlib
import shutil
from unittest import mock

import numpy as np
import pytest

import ktjax
import hf_models
from hf_models import CONFIGS, build_hf_model, hf_logits, load_oracle, rel_err, save_hf_model
from ktjax.errors import KtjaxError

# V3 (noaux_tc routing: a token's routing weights come in no particular order) with one dense layer first and
# three MoE layers, 3 experts per token: deferral 1 and 2 are both possible.
NAME = "v3_three_moe_layers"
KWARGS = dict(CONFIGS["v3"][1], num_hidden_layers=4)
TOP_K = KWARGS["num_experts_per_tok"]
SEQ = 13  # not a bucket size
TOL = 1e-4  # as tests/test_parity.py


@pytest.fixture(scope="module")
def deep_v3(tmp_path_factory):
    """(folder, transformers oracle) of the tiny 4-layer V3 model, built once."""
    folder = str(tmp_path_factory.mktemp(NAME))
    with mock.patch.dict(hf_models.CONFIGS, {NAME: ("v3", KWARGS)}):
        save_hf_model(build_hf_model(NAME), folder, NAME)
    return folder, load_oracle(folder)


@contextlib.contextmanager
def deferring(oracle, k: int):
    """transformers' model with expert deferral, from the definition: MoE layer l's output is its shared experts
    plus its tokens' top_k - k highest-weight routed experts plus the k lowest-weight ones of the MoE layer before
    (none before the first); the last MoE layer sums all its experts at once."""
    import torch

    moes = [layer.mlp for layer in oracle.model.layers if hasattr(layer.mlp, "gate")]
    pending = []

    def forward_of(moe, last: bool):
        def forward(hidden):
            shape, flat = hidden.shape, hidden.reshape(-1, hidden.shape[-1])
            _, weights, idx = moe.gate(hidden)
            order = torch.argsort(weights, dim=-1, stable=True)  # ascending: the first k are deferred
            now, later = (order, order[:, :0]) if last else (order[:, k:], order[:, :k])

            def routed(cols):
                return moe.experts(flat, idx.gather(1, cols), weights.gather(1, cols)).view(shape)

            out = routed(now) + moe.shared_experts(hidden) + (pending.pop() if pending else 0)
            if not last:
                pending.append(routed(later))
            return out
        return forward

    for i, moe in enumerate(moes):
        moe.forward = forward_of(moe, last=i == len(moes) - 1)
    try:
        yield
    finally:
        for moe in moes:
            del moe.forward  # the class's forward again


def _reference(oracle, ids, k: int):
    with deferring(oracle, k):
        return hf_logits(oracle, ids)


def _greedy_reference(oracle, prompt, k: int, n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(_reference(oracle, np.asarray([seq]), k)[0, -1].argmax()))
    return seq[len(prompt):]


def _ids(oracle, rng, batch=2, seq=SEQ):
    return rng.integers(0, oracle.config.vocab_size, size=(batch, seq))


@pytest.mark.parametrize("k", [1, 2])
def test_deferral_matches_the_reference_uncached_and_cached(deep_v3, rng, k):
    """Full forward, chunked prefill through the cache (chunks of 4) and greedy decode steps: the reference's
    logits and tokens (a float32 cache: the bf16 one rounds). The reference moves far from the model without
    deferral, so the test can tell."""
    folder, oracle = deep_v3
    ids = _ids(oracle, rng)
    ref = _reference(oracle, ids, k)
    assert rel_err(hf_logits(oracle, ids), ref) > 100 * TOL
    engine = ktjax.load(folder, defer_experts=k, chunk_size=4, cache_dtype="float32")
    assert rel_err(engine.logits(ids), ref) <= TOL
    assert rel_err(engine.cached_logits(ids), ref) <= TOL
    prompt = ids[0, :7].tolist()
    out = engine.generate([prompt], max_new_tokens=6, temperature=0, ignore_eos=True).tokens[0]
    assert out == _greedy_reference(oracle, prompt, k, 6)


@pytest.mark.parametrize("moe_impl", ["gather", "ragged", "blocked"])
def test_each_expert_implementation_defers(deep_v3, rng, moe_impl):
    folder, oracle = deep_v3
    ids = _ids(oracle, rng)
    out = ktjax.load(folder, defer_experts=2, moe_impl=moe_impl).logits(ids)
    assert rel_err(out, _reference(oracle, ids, 2)) <= TOL


@pytest.mark.slow
def test_the_scanned_layer_stack_defers_alike(deep_v3, rng):
    """A stacked model (its layers run by jax.lax.scan, as training runs it; the Engine unrolls per-layer arrays)
    carries the deferred sum through the scan."""
    folder, oracle = deep_v3
    ids = _ids(oracle, rng)
    engine = ktjax.load(folder, defer_experts=1)
    out = np.asarray(engine.model(ids, engine.run_options(True)))
    assert rel_err(out, _reference(oracle, ids, 1)) <= TOL


@pytest.mark.usefixtures("cpu_kernels_built")
@pytest.mark.parametrize("k, gpu_experts", [(1, 0), pytest.param(2, 3, marks=pytest.mark.slow)])
def test_experts_host_defers(deep_v3, rng, k, gpu_experts):
    """The host expert store's call over each part's assignments (and the experts kept on the device), without a
    cache and through it."""
    folder, oracle = deep_v3
    ids = _ids(oracle, rng)
    ref = _reference(oracle, ids, k)
    engine = ktjax.load(folder, experts="host", gpu_experts=gpu_experts, defer_experts=k, chunk_size=4,
                        cache_dtype="float32")
    assert rel_err(engine.logits(ids), ref) <= TOL
    assert rel_err(engine.cached_logits(ids), ref) <= TOL
    prompt = ids[1, :5].tolist()
    out = engine.generate([prompt], max_new_tokens=4, temperature=0, ignore_eos=True).tokens[0]
    assert out == _greedy_reference(oracle, prompt, k, 4)


def test_defer_zero_is_the_model_without_the_setting(deep_v3, rng):
    """The same compiled programs (the same RunOptions: the programs' key) and bit-identical logits and tokens."""
    folder, oracle = deep_v3
    ids = _ids(oracle, rng)
    plain, zero = ktjax.load(folder), ktjax.load(folder, defer_experts=0)
    assert zero.run_options(True) == plain.run_options(True)
    np.testing.assert_array_equal(zero.logits(ids), plain.logits(ids))
    np.testing.assert_array_equal(zero.cached_logits(ids), plain.cached_logits(ids))
    assert rel_err(plain.logits(ids), hf_logits(oracle, ids)) <= TOL


# ---- hostile values --------------------------------------------------------------------------------------

HOSTILE = [-1, 256, 10**50, 1.5, float("nan"), "one", "", "2.0", True, [1]]


@pytest.mark.parametrize("value", HOSTILE, ids=[repr(v)[:12] for v in HOSTILE])
def test_hostile_values_are_refused_by_the_settings_table(value):
    from ktjax.runtime.settings import RuntimeConfig

    with pytest.raises(KtjaxError, match="defer_experts=.*must be a whole number from 0 to 255"):
        RuntimeConfig.from_overrides(defer_experts=value)


@pytest.mark.parametrize("k", [TOP_K, TOP_K + 5])
def test_deferring_every_expert_is_refused_against_the_model(deep_v3, k, monkeypatch):
    import ktjax.weights.checkpoint as checkpoint
    import ktjax.weights.loader as loader

    def no_weights(*args, **kwargs):
        raise AssertionError("weights read before the settings were checked against config.json")

    monkeypatch.setattr(loader, "load_hf_model", no_weights)
    monkeypatch.setattr(checkpoint, "load_checkpoint", no_weights)
    folder, _ = deep_v3
    with pytest.raises(KtjaxError, match=f"defer_experts={k}: must be from 0 to {TOP_K - 1}"):
        ktjax.load(folder, defer_experts=k)


@pytest.mark.parametrize("flag", ["-1", "1.5", "x", str(TOP_K)])
def test_the_cli_refuses_a_bad_defer_experts_with_exit_2(deep_v3, tmp_path, capsys, flag):
    from ktjax.cli.generate import main
    from tokenizer_fixture import write_tokenizer

    folder = str(tmp_path / "model")
    shutil.copytree(deep_v3[0], folder)
    write_tokenizer(folder)
    assert main(["--model", folder, "--prompt", "the fox", "--max-new-tokens", "2", f"--defer-experts={flag}"]) == 2
    assert "defer_experts" in capsys.readouterr().err
