"""DeepSeek-V3.2 sparse attention (DSA) against transformers' DeepseekV32ForCausalLM (tiny random model,
index_topk 16, contexts either side of it) and the index cache against numpy references."""
import ml_dtypes
import numpy as np
import pytest

import ktjax
from hf_models import CONFIGS, hf_logits, rel_err
from ktjax.model.config import ModelConfig
from ktjax.errors import KtjaxError
from ktjax.kv.cache import LatentCache, cache_bytes
from ktjax.kv.formats import FORMATS

SHORT, LONG = 13, 40  # index_topk is 16: dense while shorter, sparse past it
TOPK = CONFIGS["v32"][1]["index_topk"]


@pytest.fixture(scope="module")
def v32(hf_folder):
    return hf_folder("v32")


@pytest.fixture(scope="module")
def engines(v32):
    """Engines by settings, loaded once per module (their compiled programs are reused across tests)."""
    made = {}

    def get(**settings):
        key = tuple(sorted(settings.items()))
        if key not in made:
            made[key] = ktjax.load(v32[0], **settings)
        return made[key]

    return get


def _ids(rng, seq, batch=2):
    return rng.integers(0, CONFIGS["v32"][1]["vocab_size"], size=(batch, seq))


@pytest.mark.parametrize("seq", [SHORT, LONG])
@pytest.mark.parametrize("absorb", [False, True], ids=["naive", "absorbed"])
def test_full_forward_matches_transformers(v32, engines, rng, seq, absorb):
    ids = _ids(rng, seq)
    out = engines(absorb_for_prefill=absorb).logits(ids)
    assert rel_err(out, hf_logits(v32[1], ids)) <= 1e-4


@pytest.mark.parametrize("absorb", [False, True], ids=["naive", "absorbed"])
def test_cached_logits_match_transformers(v32, engines, rng, absorb):
    """Chunked prefill (chunk 16 < context 40) through a float32 cache: selection over the cache, chunk by chunk."""
    ids = _ids(rng, LONG)
    out = engines(absorb_for_prefill=absorb, cache_dtype="float32", chunk_size=16).cached_logits(ids)
    assert rel_err(out, hf_logits(v32[1], ids)) <= 1e-4


def test_greedy_decode_matches_transformers_generate(v32, engines, rng):
    import torch

    prompt = _ids(rng, 10, batch=1)
    with torch.no_grad():
        ref = v32[1].generate(torch.as_tensor(prompt), do_sample=False, max_new_tokens=30, eos_token_id=None,
                              pad_token_id=0)[0, 10:].tolist()
    out = engines(cache_dtype="float32", chunk_size=16).generate([list(prompt[0])], max_new_tokens=30,
                                                                 ignore_eos=True)
    assert out.tokens[0] == ref
    # 40 queries see 1..40 keys each; the ones past 16 attend to 16.
    seen = np.arange(1, 41)
    assert out.stats["sparse_selected_fraction"] == pytest.approx(np.minimum(seen, TOPK).sum() / seen.sum())
    assert out.stats["index_topk"] == TOPK


def test_selected_indices_match_transformers(v32, rng):
    """Each layer's top-k, from transformers' own indexer inputs, equals the reference's where the k-th and
    (k+1)-th scores differ (no tie decides the selection)."""
    import jax.numpy as jnp
    import torch

    from ktjax.kv.sparse import head_scores, topk_mask
    from ktjax.model.layers import rope_cos_sin

    folder, oracle = v32
    engine = ktjax.load(folder)
    model = engine.model
    captured = {}
    hooks = []
    for i, layer in enumerate(oracle.model.layers):
        def hook(module, args, kwargs, out, i=i):
            captured[i] = ([a.numpy() for a in args[:2]], out.numpy())
        hooks.append(layer.self_attn.indexer.register_forward_hook(hook, with_kwargs=True))
    ids = _ids(rng, LONG)
    try:
        hf_logits(oracle, ids)
    finally:
        for h in hooks:
            h.remove()
    cfg = engine.cfg
    positions = jnp.broadcast_to(jnp.arange(LONG), (2, LONG))
    cos, sin = rope_cos_sin(cfg.rope, positions)
    causal = np.tril(np.ones((LONG, LONG), bool))[None]
    compared = 0
    for i, ((hidden, q_resid), ref_idx) in captured.items():
        indexer = _layer_indexer(model, cfg, i)
        q, w = indexer.queries(jnp.asarray(hidden), jnp.asarray(q_resid), cos, sin)
        scores = np.asarray(head_scores(q, w, indexer.keys(jnp.asarray(hidden), cos, sin)))
        mask = np.asarray(topk_mask(jnp.asarray(scores), jnp.asarray(np.broadcast_to(causal, scores.shape)), TOPK))
        for b in range(2):
            for s in range(TOPK, LONG):  # queries that see more than index_topk keys
                visible = np.sort(scores[b, s, :s + 1])[::-1]
                if visible[TOPK - 1] - visible[TOPK] < 1e-5 * np.abs(visible).max():
                    continue
                assert set(np.flatnonzero(mask[b, s])) == set(ref_idx[b, s].tolist()), (i, b, s)
                compared += 1
    assert compared > 0.9 * len(captured) * 2 * (LONG - TOPK)


def _layer_indexer(model, cfg, i):
    """Layer i's indexer, out of its stack."""
    from ktjax.model.decoder import layer_of

    stack, j = (model.dense_layers, i) if i < cfg.num_dense_layers else (model.moe_layers, i - cfg.num_dense_layers)
    return layer_of(stack.attn.indexer, j)


def test_index_topk_at_least_the_context_is_dense(engines, rng):
    """index_topk >= cache_lens runs the dense code; between the context and cache_lens the sparse code
    selects every visible token, which must give the same numbers."""
    ids = _ids(rng, LONG)
    kw = dict(absorb_for_prefill=True, cache_dtype="float32", chunk_size=16)
    dense = engines(index_topk=10**6, **kw).cached_logits(ids)
    every = engines(index_topk=LONG, **kw).cached_logits(ids)  # cache_lens 64
    np.testing.assert_allclose(every, dense, rtol=0, atol=1e-5 * np.abs(dense).max())
    assert rel_err(dense, engines(**kw).cached_logits(ids)) > 1e-2  # and sparse attention differs


def _index_round_trip(name, k):
    """numpy reference of the index cache: bf16/float32 as is, e4m3 rotated by the orthonormal Hadamard matrix
    (H[i,j] = (-1)^popcount(i & j) / sqrt(D)) with scale amax / 448 per token, read back rotated back."""
    if name == "float32":
        return k
    if name == "bf16":
        return k.astype(ml_dtypes.bfloat16).astype(np.float32)
    d = np.arange(k.shape[-1])
    h = np.where(np.vectorize(lambda x: bin(x).count("1") % 2)(d[:, None] & d[None]), -1.0, 1.0) / np.sqrt(len(d))
    k = k @ h
    amax = np.abs(k).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / 448.0, 1.0)
    return ((k / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale) @ h


@pytest.mark.parametrize("name", ["float32", "bf16", "fp8", "int4"])  # int8 keeps its index keys as fp8 does
def test_index_cache_and_scores_match_numpy(rng, name):
    """Index keys written through LatentCache.write read back as the numpy reference stores them, and the
    scores over the cache equal sum_h w relu(q . k) on those keys, causal and length-limited."""
    import jax.numpy as jnp

    from ktjax.kv.sparse import index_keys, index_scores

    cfg = ModelConfig.from_hf_dict(dict(CONFIGS["v32"][1], architectures=["DeepseekV32ForCausalLM"]))
    fmt = FORMATS[name]
    b, t, s, heads, dim = 2, 32, 3, cfg.index_n_heads, cfg.index_head_dim
    cache = LatentCache.create(cfg, fmt, b, t, block=16)
    k = (rng.normal(size=(b, t, dim)) * rng.uniform(0.1, 10, size=(b, t, 1))).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    zeros = jnp.zeros((b, t, cfg.kv_lora_rank)), jnp.zeros((b, t, cfg.qk_rope_head_dim))
    cache = cache.write(1, positions, *zeros, jnp.asarray(k))
    scale = None if cache.k_idx_scale is None else cache.k_idx_scale[1]
    stored = np.asarray(index_keys(fmt, cache.k_idx[1], scale))
    ref_k = _index_round_trip(name, k)
    # float32 rotations against float64 ones: rounding of the rotated-back sums only
    np.testing.assert_allclose(stored, ref_k, rtol=1e-5, atol=1e-6 * np.abs(ref_k).max())
    assert np.abs(cache.k_idx[0]).max() == 0  # other layers untouched

    q = rng.normal(size=(b, s, heads, dim)).astype(np.float32)
    w = rng.normal(size=(b, s, heads)).astype(np.float32)
    q_pos = np.array([[5, 20, 31], [0, 7, 40]])  # 40: a padding query (sees all of its sequence's keys)
    lengths = np.array([32, 25])
    got = np.asarray(index_scores(jnp.asarray(q), jnp.asarray(w), cache.k_idx, cache.k_idx_scale, jnp.asarray(q_pos),
                                  jnp.asarray(lengths), fmt=fmt, block=16, layer=1))
    ref = np.einsum("bsh,bsht->bst", w, np.maximum(np.einsum("bshd,btd->bsht", q, ref_k), 0))
    tt = np.arange(t)
    visible = (tt[None, None] < lengths[:, None, None]) & (tt[None, None] <= q_pos[:, :, None])
    assert np.array_equal(np.isfinite(got), visible)
    np.testing.assert_allclose(got[visible], ref[visible], rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_index_cache_bytes(rng):
    """The index cache is in the byte accounting: arrays held = the formula; 132 bytes per token and layer in
    fp8 at V3.2's index_head_dim (128 e4m3 + one float32 scale)."""
    cfg = ModelConfig.from_hf_dict(dict(CONFIGS["v32"][1], architectures=["DeepseekV32ForCausalLM"]))
    v3 = ModelConfig.from_hf_dict(dict(CONFIGS["v3"][1], architectures=["DeepseekV3ForCausalLM"]))
    for fmt in FORMATS.values():
        cache = LatentCache.create(cfg, fmt, 2, 48, block=16)
        assert cache.nbytes == cache_bytes(cfg, fmt, 2, 48)
        extra = fmt.bytes_per_token(cfg) - fmt.bytes_per_token(v3)
        width = {"float32": 4, "bf16": 2}.get(fmt.name)
        assert extra == cfg.num_hidden_layers * (cfg.index_head_dim * width if width else cfg.index_head_dim + 4)
    assert FORMATS["fp8"].index_bytes_per_token_per_layer(128) == 132


@pytest.mark.parametrize("change, message", [
    (dict(q_lora_rank=None), "q_lora_rank"),
    (dict(index_head_dim=4), "index_head_dim"),
    (dict(layer_types=["indexed_attention", "full_attention", "indexed_attention"]), "layer_types"),
    (dict(layer_types=["indexed_attention"]), "layer_types"),
    (dict(mlp_layer_types=["sparse", "sparse", "sparse"]), "mlp_layer_types"),
    (dict(index_topk=0), "index_topk"),
])
def test_bad_v32_configs_are_refused(change, message):
    raw = dict(CONFIGS["v32"][1], architectures=["DeepseekV32ForCausalLM"], **change)
    with pytest.raises(KtjaxError, match=message):
        ModelConfig.from_hf_dict(raw)


def test_v32_config_fields():
    raw = dict(CONFIGS["v32"][1], architectures=["DeepseekV32ForCausalLM"],
               layer_types=["deepseek_sparse_attention"] * 3, mlp_layer_types=["dense", "sparse", "sparse"])
    cfg = ModelConfig.from_hf_dict(raw)
    assert (cfg.arch, cfg.index_topk, cfg.index_head_dim, cfg.index_n_heads) == ("deepseek_v32", 16, 16, 32)
    assert cfg.has_indexer and cfg.rope.interleave and cfg.normalizes_then_scales
    assert not ModelConfig.from_hf_dict(dict(CONFIGS["v3"][1], architectures=["DeepseekV3ForCausalLM"])).has_indexer


def test_sequence_sharded_cache_merges_the_global_topk(v32, tmp_path):
    """8 forced CPU devices, 16 cached tokens each: every device scores its own tokens, the global top-k is
    merged across them, and cached logits (bf16 absorbed, int8 naive prefill) and greedy tokens (int8: e4m3
    index keys) equal one device's."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(here, ".."), here, env.get("PYTHONPATH", "")])
    out = str(tmp_path / "report.json")
    proc = subprocess.run([sys.executable, os.path.join(here, "dsa_sharding_check.py"), v32[0], out], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        report = json.load(f)
    for name, r in report.items():
        assert r["cached_error"] <= 1e-4, (name, r["cached_error"])
    decode = report["int8"]
    assert decode["devices"] == [1, 8]
    assert decode["tokens"][0] == decode["tokens"][1]
    assert decode["fraction"][0] == decode["fraction"][1] < 1.0


def _convert(folder, out, weights):
    from ktjax.weights.convert import main

    assert main(["--hf-dir", folder, "--out", str(out), "--quiet", "--weights", weights]) == 0
    return str(out)


def test_converted_checkpoint_matches_transformers(v32, tmp_path, rng):
    """The converter and the checkpoint know the indexer's parameters (the parameter table's rows)."""
    ids = _ids(rng, LONG)
    engine = ktjax.load(_convert(v32[0], tmp_path / "ckpt", "float32"), absorb_for_prefill=True)
    assert rel_err(engine.logits(ids), hf_logits(v32[1], ids)) <= 1e-4


def test_int8_weights_quantize_the_indexer_projections(v32, tmp_path):
    """--weights int8 quantizes wq_b and wk like every other kernel and keeps weights_proj float32."""
    from safetensors.numpy import load_file
    import glob

    from ktjax.model import quantized as weight_quant
    from ktjax.weights.checkpoint import read_manifest, read_tensor, scale_key

    out = _convert(v32[0], tmp_path / "ckpt", "int8")
    hf = {}
    for f in glob.glob(f"{v32[0]}/*.safetensors"):
        hf.update(load_file(f))
    manifest = read_manifest(out)["tensors"]
    for i in range(3):
        for name in ("wq_b", "wk"):
            key = f"layers/{i:03d}/attn.indexer.{name}.kernel"
            weight = hf[f"model.layers.{i}.self_attn.indexer.{name}.weight"].T
            values, scales = weight_quant.quantize_weight(weight, "int8")
            assert np.array_equal(read_tensor(out, key), values), key
            assert np.array_equal(read_tensor(out, scale_key(key)), scales), key
        assert manifest[f"layers/{i:03d}/attn.indexer.weights_proj.kernel"]["dtype"] == "float32"


def test_index_topk_setting():
    from ktjax.runtime.settings import resolve

    assert resolve(index_topk="64")[0].index_topk == 64
    assert resolve()[0].index_topk is None  # the config's
    for bad in (0, -3, "many", 1.5, True):
        with pytest.raises(KtjaxError, match="index_topk"):
            resolve(index_topk=bad)


def test_cli_index_topk_flag_is_validated(capsys):
    from ktjax.cli.generate import main

    assert main(["--index-topk", "0", "--prompt", "hi"]) == 2
    assert "index_topk" in capsys.readouterr().err


def test_sparse_steps_never_copy_the_cache(v32):
    """The compiled sparse prefill and decode programs read the index cache block by block and gather only the
    selected latent rows: no op outside a fusion makes a [.., batch, cache_lens, width] array (a layer's or
    the stack's copy). Inside a fusion, a layer's slice feeding the gather is never materialised: the fusion
    computes only the gathered rows. (Scores and the selection mask are [batch, queries, cache_lens]:
    context-sized, not cache-sized.)"""
    import re

    capacity = 4096
    engine = ktjax.load(v32[0], cache_dtype="fp8", cache_lens=capacity, max_new_tokens=2, ignore_eos=True,
                        chunk_size=16)
    out = engine.generate([list(range(5, 25))])  # 20 tokens: past index_topk, so selection is real
    assert out.stats["sparse_selected_fraction"] < 1.0
    copy = re.compile(r"= \S+\[(\d+,)?1," + str(capacity) + r",\d+\]\S* (copy|convert|transpose|concatenate|pad|"
                      r"broadcast|gather|dynamic-slice|slice)\(")
    programs = {key[0]: program for key, program in engine._compiled.items()}
    assert set(programs) == {"step", "decode"}  # runtime/batch.py's prefill step and decode loop
    for name, program in programs.items():
        found, fused = [], False
        for line in program.as_text().splitlines():
            if line.startswith(("%", "ENTRY")):  # a computation's header
                fused = line.startswith("%fused")
            elif not fused and copy.search(line):
                found.append(line.strip()[:160])
        assert found == [], name
