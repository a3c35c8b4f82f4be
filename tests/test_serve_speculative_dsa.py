"""Speculative decoding in the server (speculative mtp) on DeepSeek-V3.2: sparse attention (DSA) whose index keys
live in the pages (the MTP module's slice has its own), drafts verified over contexts longer than index_topk.

The model: transformers' tiny random V3.2 (tests/hf_models.py "v32", index_topk 16) with its layers' outputs
damped (so that a prediction depends mostly on the last token and the MTP module can draft it), plus an MTP layer
built here: transformers' own DeepseekV32DecoderLayer for the block (indexer included), eh_proj passing the next
token's embedding through, the model's lm_head plus noise as its head. Drafts are then both accepted and
rejected. The oracle is transformers' DeepseekV32 greedy generate (which never uses the MTP layer): the server's
greedy tokens with speculation equal it and the server's without, and a follow-up request reading pages written
by passes with rejected drafts (latents and index keys) from the prefix cache equals it too.
"""
from __future__ import annotations

import pytest

from hf_models import build_hf_model, load_oracle, save_hf_model
from ktjax.serve.scheduler import Scheduler
from test_mtp import _add_tensors
from test_serve_dsa import PAGE, VOCAB, _add_char_tokenizer, _hf_greedy
from test_serve_speculative import run

K = 2          # draft_tokens
MIX = 0.1      # the attention and MLP outputs' scale in every layer (the MTP's block too)
N_NEW = 12


def _damp_outputs(model, mix: float) -> None:
    """Scale every o_proj and down_proj weight (attention and MLP outputs) of a torch module by mix."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):  # experts: fused
                p.mul_(mix)


def _mtp_tensors(oracle, seed: int = 7, head_noise: float = 0.2) -> dict:
    """The MTP layer's tensors under their HF names (layer num_hidden_layers): a random DeepseekV32DecoderLayer
    block (built as layer num_hidden_layers - 1, which is MoE as the MTP layer is: transformers' config lists no
    type for layer num_hidden_layers), damped; eh_proj [I | noise] (the next token's embedding through);
    shared_head = the model's final norm and lm_head + noise."""
    import torch
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32DecoderLayer

    cfg = oracle.config
    n, d = cfg.num_hidden_layers, cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = DeepseekV32DecoderLayer(cfg, layer_idx=n - 1).eval()
    with torch.no_grad():
        for name, p in list(block.named_parameters()) + list(block.named_buffers()):
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    _damp_outputs(block, MIX)
    tensors = {name: p.detach().clone() for name, p in block.state_dict().items()}
    eh = 0.01 * torch.randn(d, 2 * d, generator=g)
    eh[:, :d] = torch.eye(d)
    head = oracle.lm_head.weight.detach()
    tensors.update({"enorm.weight": torch.ones(d), "hnorm.weight": torch.ones(d), "eh_proj.weight": eh,
                    "shared_head.norm.weight": oracle.model.norm.weight.detach().clone(),
                    "shared_head.head.weight": head + head_noise * head.std() * torch.randn(head.shape, generator=g),
                    "embed_tokens.weight": oracle.model.embed_tokens.weight.detach().clone()})
    return {f"model.layers.{n}.{k}": v.contiguous() for k, v in tensors.items()}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """(the folder, transformers' oracle of its main model)."""
    folder = str(tmp_path_factory.mktemp("v32_mtp") / "model")
    model = build_hf_model("v32")
    _damp_outputs(model, MIX)
    save_hf_model(model, folder, "v32")
    oracle = load_oracle(folder)
    _add_tensors(folder, _mtp_tensors(oracle))
    _add_char_tokenizer(folder)
    return folder, oracle


def scheduler(engine) -> Scheduler:
    """A running scheduler: pages of 8 tokens, one batch bucket (2 rows) and one prefill chunk (16): two programs
    to compile."""
    sched = Scheduler(engine, max_batch=2, page_size=PAGE, n_pages=24)
    sched.programs.batches = [2]
    sched.start()
    return sched


@pytest.fixture(scope="module")
def servers(model_folder):
    """fmt -> (plain scheduler, speculating scheduler): the folder served by ktjax in that cache format."""
    import ktjax

    built = {}

    def get(fmt):
        if fmt not in built:
            built[fmt] = []
            for settings in ({}, dict(speculative="mtp", draft_tokens=K)):
                engine = ktjax.load(model_folder[0], cache_dtype=fmt, chunk_size=16, **settings)
                assert engine.cfg.has_indexer and engine.model.mtp is not None
                built[fmt].append(scheduler(engine))
        return built[fmt]

    yield get
    for pair in built.values():
        for sched in pair:
            sched.shutdown(10)


@pytest.fixture(scope="module")
def prompts():
    import numpy as np

    rng = np.random.default_rng(1234)
    return rng.integers(2, VOCAB, size=21).tolist(), rng.integers(2, VOCAB, size=27).tolist()


@pytest.mark.parametrize("fmt", ["float32", pytest.param("int8", marks=pytest.mark.slow)])  # int8: ~50 s to compile
def test_greedy_tokens_equal_serving_without_speculation_and_transformers(model_folder, servers, prompts, fmt):
    """Two prompts (21 and 27 tokens) in one batch, 12 greedy tokens each: queries see up to 38 keys, of which
    sparse attention keeps 16. Token for token the server's without speculation, with drafts accepted and
    rejected; in float32 transformers' generate too (int8: quantized latents, e4m3 index keys with scales)."""
    plain_sched, spec_sched = servers(fmt)
    got = run(spec_sched, list(prompts), max_tokens=N_NEW)
    ref = run(plain_sched, list(prompts), max_tokens=N_NEW)
    for prompt, s, r in zip(prompts, got, ref):
        assert s.tokens == r.tokens
        if fmt == "float32":
            assert s.tokens == _hf_greedy(model_folder[1], prompt, N_NEW)
        assert s.finished.reason == "length" and s.finished.completion_tokens == N_NEW
    drafted = sum(s.finished.speculative["drafted"] for s in got)
    accepted = sum(s.finished.speculative["accepted"] for s in got)
    assert 0 < accepted < drafted, (accepted, drafted)


def test_pages_written_after_rejections_serve_a_follow_up(model_folder, servers, prompts):
    """A request whose passes rejected drafts, then a follow-up (its prompt, its completion and more) that reads
    its pages (latents, index keys, the MTP slice's) from the prefix cache: transformers' greedy tokens for the
    follow-up, as if the pages held only the accepted tokens, and the drafts a fresh server (whose prefill wrote
    every page itself) makes: the same acceptance."""
    oracle, (_, spec_sched) = model_folder[1], servers("float32")
    prompt = prompts[1]
    first = run(spec_sched, [prompt], max_tokens=N_NEW)[0]
    assert first.finished.speculative["accepted"] < first.finished.speculative["drafted"]
    follow = prompt + first.tokens + [5, 9]
    again = run(spec_sched, [follow], max_tokens=N_NEW)[0]
    assert again.finished.cached_tokens >= (len(prompt) + N_NEW - K - 2) // PAGE * PAGE > len(prompt)
    assert again.tokens == _hf_greedy(oracle, follow, N_NEW)
    fresh_sched = scheduler(spec_sched.engine)  # the same pool shape: the same programs, an empty prefix cache
    try:
        fresh = run(fresh_sched, [follow], max_tokens=N_NEW)[0]
    finally:
        fresh_sched.shutdown(10)
    assert fresh.finished.cached_tokens == 0 and fresh.tokens == again.tokens
    assert fresh.finished.speculative == again.finished.speculative
