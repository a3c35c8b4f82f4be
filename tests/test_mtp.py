"""The multi-token-prediction module (ktjax/model/mtp.py) against a reference written from its definition, and its
weights through the parameter table, the loader, the converter, checkpoints and the Engine's held weights.

The folder: transformers' tiny random V3 (tests/hf_models.py "v3") saved with num_nextn_predict_layers 1, plus the
MTP layer's tensors written here: transformers' own DeepseekV3DecoderLayer(layer_idx=3) for the block (so the block
is checked against code we did not write), and enorm, hnorm, eh_proj, shared_head.{norm,head}, random, in torch.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_models import build_hf_model, load_oracle, rel_err, save_hf_model
from ktjax.kv.cache import LatentCache, cache_bytes, plan_cache_lens
from ktjax.kv.formats import FORMATS
from ktjax.model.config import ModelConfig
from ktjax.model.decoder import DeepseekModel, RunOptions, unstack_layers
from ktjax.weights import params
from ktjax.weights.convert import main as convert_main
from ktjax.weights.loader import load_hf_model

SEQ = 11       # MTP positions 0..SEQ-1: main model over ids[:, :SEQ], MTP tokens ids[:, 1:SEQ+1]
CACHE = 16
TOL = 1e-4     # float32 against float32, as the parity tests


def _randomized_mtp_tensors(oracle, seed: int = 7) -> dict:
    """The MTP layer's tensors under their HF names (layer index num_hidden_layers), random; the block is
    transformers' DeepseekV3DecoderLayer, its state dict as transformers writes it."""
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    cfg = oracle.config
    n, d = cfg.num_hidden_layers, cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = DeepseekV3DecoderLayer(cfg, layer_idx=n).eval()
    tensors = {}
    with torch.no_grad():
        for name, p in list(block.named_parameters()) + list(block.named_buffers()):
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            tensors[name] = p.detach().clone()
    own = {"enorm.weight": 1.0 + 0.2 * torch.randn(d, generator=g),
           "hnorm.weight": 1.0 + 0.2 * torch.randn(d, generator=g),
           "eh_proj.weight": 0.1 * torch.randn(d, 2 * d, generator=g),
           "shared_head.norm.weight": 1.0 + 0.2 * torch.randn(d, generator=g),
           "shared_head.head.weight": 0.1 * torch.randn(cfg.vocab_size, d, generator=g),
           # DeepSeek-V3's folders hold the embedding again in the MTP layer; the model's own is used
           "embed_tokens.weight": oracle.model.embed_tokens.weight.detach().clone()}
    tensors.update(own)
    return block, {f"model.layers.{n}.{k}": v.contiguous() for k, v in tensors.items()}


def _add_tensors(folder: str, tensors: dict):
    """One more shard holding `tensors`, listed in the folder's index; config.json gains num_nextn_predict_layers."""
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(folder, "model-mtp.safetensors"))
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["weight_map"].update({k: "model-mtp.safetensors" for k in tensors})
    with open(index_path, "w") as f:
        json.dump(index, f)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        raw = json.load(f)
    raw["num_nextn_predict_layers"] = 1
    with open(config_path, "w") as f:
        json.dump(raw, f)


@pytest.fixture(scope="module")
def mtp_folder(tmp_path_factory):
    """(folder with the MTP layer, the oracle (main model), the MTP block in torch, the MTP tensors)."""
    folder = str(tmp_path_factory.mktemp("v3_mtp"))
    save_hf_model(build_hf_model("v3"), folder, "v3")
    oracle = load_oracle(folder)
    block, tensors = _randomized_mtp_tensors(oracle)
    _add_tensors(folder, tensors)
    return folder, oracle, block, tensors


def _reference(oracle, block, tensors, hidden, tokens):
    """The definition in torch float32: x = eh_proj([enorm(embed(t)); hnorm(h)]), x' = block(x) (transformers' layer,
    causal, RoPE positions 0..s-1), h' = shared_head.norm(x'), logits = shared_head.head(h') -> (logits, h')."""
    import torch

    n = oracle.config.num_hidden_layers
    eps = oracle.config.rms_norm_eps
    w = {k[len(f"model.layers.{n}."):]: v for k, v in tensors.items()}

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    with torch.no_grad():
        h = torch.as_tensor(np.asarray(hidden, np.float32))
        t = torch.as_tensor(np.asarray(tokens))
        e = oracle.model.embed_tokens(t)
        x = torch.cat([rms(e, w["enorm.weight"]), rms(h, w["hnorm.weight"])], -1) @ w["eh_proj.weight"].T
        b, s = t.shape
        positions = torch.arange(s)[None].expand(b, s)
        cos_sin = oracle.model.rotary_emb(x, positions)
        mask = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)[None, None].expand(b, 1, s, s)
        out = block(x, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        h_out = rms(out, w["shared_head.norm.weight"])
        return (h_out @ w["shared_head.head.weight"].T).numpy(), h_out.numpy()


def _ids(vocab, rng, batch=2):
    return rng.integers(0, vocab, size=(batch, SEQ + 1))


def _cache(cfg, batch, kernel=None):
    cache_lens, block = plan_cache_lens(CACHE)
    return LatentCache.create(cfg, FORMATS["float32"], batch, cache_lens, block=block, attention=kernel,
                              extra_layers=1)


@nnx.jit(static_argnames=("absorb", "with_index"))
def _mtp_cached(model, hidden, tokens, positions, cache, lengths, absorb, with_index):
    index = jnp.zeros((tokens.shape[0],), jnp.int32) if with_index else None
    return model.mtp_forward_cached(hidden, tokens, positions, cache, lengths, index, RunOptions(absorb))


@nnx.jit
def _main_cached(model, tokens, cache):
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    return model.forward_cached(tokens, positions, cache, jnp.full((b,), s, jnp.int32), None, RunOptions(True),
                                return_hidden=True)


def _chunk(model, hidden, tokens, absorb=True, cache=None):
    b, s = tokens.shape
    cache = _cache(model.cfg, b) if cache is None else cache
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    return _mtp_cached(model, jnp.asarray(hidden), jnp.asarray(tokens), positions, cache,
                       jnp.full((b,), s, jnp.int32), absorb, False)


def _step_by_step(model, hidden, tokens, cache=None):
    b, s = tokens.shape
    cache = _cache(model.cfg, b) if cache is None else cache
    logits, outs = [], []
    for p in range(s):
        lg, h, cache = _mtp_cached(model, jnp.asarray(hidden[:, p:p + 1]), jnp.asarray(tokens[:, p:p + 1]),
                                   jnp.full((b, 1), p, jnp.int32), cache, jnp.full((b,), p + 1, jnp.int32), True, True)
        logits.append(np.asarray(lg))
        outs.append(np.asarray(h))
    return np.stack(logits, 1), np.stack(outs, 1)


@pytest.fixture(scope="module")
def loaded(mtp_folder):
    folder, *_ = mtp_folder
    cfg = ModelConfig.from_file(os.path.join(folder, "config.json"))
    notes = []
    model = load_hf_model(folder, cfg, notes=notes)
    assert notes == [] and model.mtp is not None and model.cfg.mtp_layers == 1
    return model


# ---- the module against its definition -----------------------------------------------------------------------

def test_mtp_matches_the_definition_chunk_and_token_by_token(mtp_folder, loaded, rng):
    import torch

    _, oracle, block, tensors = mtp_folder
    ids = _ids(oracle.config.vocab_size, rng)
    with torch.no_grad():
        ref_hidden = oracle.model(torch.as_tensor(ids[:, :SEQ])).last_hidden_state.numpy()
    # forward_cached's hidden is the final-normed state the MTP module takes
    _, _, hidden = _main_cached(loaded, jnp.asarray(ids[:, :SEQ]), _cache(loaded.cfg, 2))
    assert hidden.shape == (2, SEQ, oracle.config.hidden_size) and rel_err(np.asarray(hidden), ref_hidden) <= TOL
    tokens = ids[:, 1:]
    ref_logits, ref_h = _reference(oracle, block, tensors, ref_hidden, tokens)
    for absorb in (True, False):
        logits, h_out, _ = _chunk(loaded, ref_hidden, tokens, absorb)
        assert logits.dtype == jnp.float32 and logits.shape == ref_logits.shape
        assert rel_err(np.asarray(logits), ref_logits) <= TOL, absorb
        assert rel_err(np.asarray(h_out), ref_h) <= TOL, absorb
    step_logits, step_h = _step_by_step(loaded, ref_hidden, tokens)
    assert rel_err(step_logits, ref_logits) <= TOL and rel_err(step_h, ref_h) <= TOL
    # without a cache (training's path)
    full_logits, full_h = nnx.jit(lambda m, h, t: m.mtp_forward(h, t, RunOptions(True)))(
        loaded, jnp.asarray(ref_hidden), jnp.asarray(tokens))
    assert rel_err(np.asarray(full_logits), ref_logits) <= TOL and rel_err(np.asarray(full_h), ref_h) <= TOL


def test_mtp_writes_only_its_own_cache_slice(loaded, rng):
    cfg = loaded.cfg
    hidden = rng.normal(size=(2, 4, cfg.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 4))
    cache = _cache(cfg, 2)
    assert cache.c_kv.shape[0] == cfg.num_hidden_layers + 1
    assert cache_bytes(cfg, FORMATS["float32"], 2, 16, extra_layers=1) == cache.nbytes
    _, _, after = _chunk(loaded, hidden, tokens, cache=cache)
    c = np.asarray(after.c_kv)
    assert not c[:cfg.num_hidden_layers].any() and c[cfg.num_hidden_layers, :, :4].any()
    assert not c[cfg.num_hidden_layers, :, 4:].any()


def test_mtp_over_the_paged_cache_matches_the_dense_one(loaded, rng):
    """LatentCache.pool(extra_layers=1): the MTP's slice in pages (scattered, out of order) drafts as the
    dense cache's does, token by token."""

    cfg = loaded.cfg
    hidden = rng.normal(size=(2, 5, cfg.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 5))
    paged = LatentCache.pool(cfg, FORMATS["float32"], 6, 4, batch=2, max_pages=4, extra_layers=1)
    paged = paged.with_table(jnp.asarray([[3, 0, 5, 1], [2, 4, 1, 0]], jnp.int32))  # 5 tokens: 2 pages, each its own
    assert paged.c_kv.shape[0] == cfg.num_hidden_layers + 1
    dense_logits, dense_h = _step_by_step(loaded, hidden, tokens)
    paged_logits, paged_h = _step_by_step(loaded, hidden, tokens, cache=paged)
    assert rel_err(paged_logits, dense_logits) <= TOL and rel_err(paged_h, dense_h) <= TOL


# ---- weights: the table, the loader's choices, the converter, checkpoints, held weights ----------------------

def test_parameter_table_rows_of_the_mtp_layer(loaded):
    cfg = loaded.cfg
    state = nnx.state(loaded).to_pure_dict()
    mtp_rows = [(row, shape) for row, stack, shape in params.model_params(cfg) if stack == params.MTP]
    own = {row.hf for row, _ in mtp_rows} - {row.hf for row, _ in params.stack_params(cfg, params.STACKS[1])}
    assert own == {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "shared_head.head.weight"}
    assert list(params.MTP.layers(cfg)) == [cfg.num_hidden_layers]
    # ours -> HF names -> ours, bit for bit, the MTP layer's tensors named as DeepSeek's folders name them
    hf = params.hf_tensors(cfg, state)
    n = cfg.num_hidden_layers
    assert {k for k in hf if k.startswith(f"model.layers.{n}.")} >= {f"model.layers.{n}.{h}" for h in own}
    for s in params.hf_sources(cfg, params.MTP, n, set(hf)):
        want = state["mtp"]
        for key in s.row.path:
            want = want[key]
        np.testing.assert_array_equal(s.convert(*[hf[name] for name in s.names]), np.asarray(want)[0])
    # sharding follows the table: the MTP head splits over the vocabulary like lm_head
    assert params.logical_axes(("mtp", "head", "kernel"), 3) == (None, None, "vocab")
    assert params.lookup(("mtp", "eh_proj", "kernel"))[0].quantize


def test_loader_without_the_layer_or_asked_to_drop_it(mtp_folder, tmp_path):
    folder, _, _, tensors = mtp_folder
    cfg = ModelConfig.from_file(os.path.join(folder, "config.json"))
    notes = []
    model = load_hf_model(folder, cfg, notes=notes, mtp=False)
    assert model.mtp is None and model.cfg.num_nextn_predict_layers == 0 and notes == []
    # a folder whose config says 1 but whose weights hold no MTP layer (the demo's before; many fine-tunes)
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    with open(bare / "model.safetensors.index.json") as f:
        index = json.load(f)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "model-mtp.safetensors"}
    with open(bare / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    os.remove(bare / "model-mtp.safetensors")
    notes = []
    model = load_hf_model(str(bare), cfg, notes=notes)
    assert model.mtp is None and notes == []  # as transformers saves V3: said by config.json, never written
    # part of the layer (a damaged folder): built without it, and a note says which tensor is missing
    n = cfg.num_hidden_layers
    shutil.copy(os.path.join(folder, "model-mtp.safetensors"), bare / "model-mtp.safetensors")
    index["weight_map"].update({k: "model-mtp.safetensors" for k in tensors if k != f"model.layers.{n}.hnorm.weight"})
    with open(bare / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    model = load_hf_model(str(bare), cfg, notes=notes)
    assert model.mtp is None and notes == [f"the multi-token-prediction layer (model.layers.{n}.*) is not loaded: "
                                           f"the weights lack some of its tensors, e.g. model.layers.{n}.hnorm.weight"]


def _convert(folder, out, *flags):
    return convert_main(["--hf-dir", folder, "--out", str(out), "--quiet", *flags])


def test_converter_keeps_the_layer_by_default_and_drops_it_when_asked(mtp_folder, loaded, tmp_path, capsys):
    from ktjax.weights.checkpoint import load_checkpoint, read_manifest

    folder, *_ = mtp_folder
    assert convert_main(["--hf-dir", folder, "--out", str(tmp_path / "plan"), "--dry-run"]) == 0
    assert "multi-token-prediction layer: kept" in capsys.readouterr().out
    assert _convert(folder, tmp_path / "kept") == 0
    manifest = read_manifest(str(tmp_path / "kept"))
    n = loaded.cfg.num_hidden_layers
    assert f"layers/{n:03d}/eh_proj.kernel" in manifest["tensors"]
    assert manifest["source_tensors_skipped"] == {"unused": 1}  # the MTP layer's copy of the embedding
    notes = []
    cfg, model = load_checkpoint(str(tmp_path / "kept"), notes=notes)
    assert cfg.mtp_layers == 1 and notes == []
    want, got = nnx.state(loaded.mtp).to_pure_dict(), nnx.state(model.mtp).to_pure_dict()
    jax.tree.map(np.testing.assert_array_equal, got, want)

    assert convert_main(["--hf-dir", folder, "--out", str(tmp_path / "plan"), "--dry-run", "--drop-mtp"]) == 0
    text = capsys.readouterr().out
    assert "skipping the multi-token-prediction layer" in text and f"model.layers.{n}." in text
    assert text.count("--drop-mtp") == 1 and "kept" not in text
    assert _convert(folder, tmp_path / "dropped", "--drop-mtp") == 0
    manifest = read_manifest(str(tmp_path / "dropped"))
    assert not any(k.startswith(f"layers/{n:03d}/") for k in manifest["tensors"])
    notes = []
    cfg, model = load_checkpoint(str(tmp_path / "dropped"), notes=notes)
    assert model.mtp is None and cfg.num_nextn_predict_layers == 0 and notes == []
    assert _convert(folder, tmp_path / "alias", "--keep-mtp") == 0  # the old flag: accepted, the default


def test_int8_checkpoint_mtp_under_the_engines_held_weights(mtp_folder, loaded, tmp_path, rng, cpu_kernels_built):
    """An int8 checkpoint's MTP layer (its eh_proj and block quantized, as the table says) survives the Engine's
    per-layer split and the CPU backend's holding, and drafts what the same weights do stacked under XLA."""
    import ktjax
    from ktjax.model.quantized import QuantizedArray
    from ktjax.weights.checkpoint import load_checkpoint

    folder, *_ = mtp_folder
    assert _convert(folder, tmp_path / "int8", "--weights", "int8") == 0
    _, stacked = load_checkpoint(str(tmp_path / "int8"))
    assert isinstance(stacked.mtp.eh_proj.kernel[...], QuantizedArray)
    engine = ktjax.load(str(tmp_path / "int8"), cpu_kernels="on", attention="cpu", cache_dtype="float32")
    assert engine.cfg.mtp_layers == 1
    assert "mtp" in engine.state and engine.backend.cpu_kernels
    held = nnx.merge(engine.graphdef, engine.state)
    cfg = loaded.cfg
    hidden = rng.normal(size=(2, 3, cfg.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 3))
    ref_logits, ref_h = _step_by_step(stacked, hidden, tokens)
    kernel = engine.backend.attention_kernel()
    got_logits, got_h = _step_by_step(held, hidden, tokens, cache=_cache(cfg, 2, kernel))
    assert rel_err(got_logits, ref_logits) <= TOL and rel_err(got_h, ref_h) <= TOL
    # and the int8 draft stays near the float32 one (int8 weights: one scale per output channel)
    float_logits, _ = _step_by_step(loaded, hidden, tokens)
    assert rel_err(ref_logits, float_logits) <= 0.05


def test_unstacked_state_keeps_the_mtp_layer(loaded):
    state = unstack_layers(nnx.state(loaded), split_experts=True)
    model = nnx.merge(nnx.graphdef(loaded), state)
    layer = model.mtp_layer()
    assert layer.eh_proj.kernel[...].shape == (2 * loaded.cfg.hidden_size, loaded.cfg.hidden_size)


def test_config_reads_num_nextn_predict_layers():
    from hf_models import CONFIGS

    raw = dict(CONFIGS["v3"][1], architectures=["DeepseekV3ForCausalLM"])
    assert ModelConfig.from_hf_dict(raw).mtp_layers == 0
    cfg = ModelConfig.from_hf_dict(dict(raw, num_nextn_predict_layers=2))
    assert cfg.num_nextn_predict_layers == 2 and cfg.mtp_layers == 1 and cfg.mtp_moe
    with pytest.raises(Exception, match="num_nextn_predict_layers"):
        ModelConfig.from_hf_dict(dict(raw, num_nextn_predict_layers=-1))
    abstract = nnx.eval_shape(lambda: DeepseekModel(cfg, rngs=nnx.Rngs(0)))
    assert abstract.mtp is not None


# ---- the demo's MTP training stage ---------------------------------------------------------------------------

@pytest.mark.slow  # ~90 s on the loaded 2-core machine: the demo model's training step and evaluation compile
def test_mtp_stage_trains_the_module_and_leaves_the_main_model_byte_identical(tmp_path, capsys):
    from safetensors.numpy import load_file

    from ktjax.demo import DEMO_MODEL_DIR, train
    from ktjax.demo.passkey import HELDOUT_TEXT

    (tmp_path / "text").mkdir()
    shutil.copy(HELDOUT_TEXT, tmp_path / "text" / "docs.txt")
    out = tmp_path / "model"
    model, raw = train.main(["--init", DEMO_MODEL_DIR, "--out", str(out), "--text-dir", str(tmp_path / "text"),
                             "--mtp-steps", "2", "--mtp-seq", "32", "--mtp-batch", "2", "--eval-every", "1"])
    log = capsys.readouterr().out
    assert "mtp step 2/2" in log and "draft accuracy" in log and "pass-key@" not in log  # no main stage
    assert raw["num_nextn_predict_layers"] == 1 and model.mtp is not None
    before, after = load_file(os.path.join(DEMO_MODEL_DIR, "model.safetensors")), load_file(out / "model.safetensors")
    n = raw["num_hidden_layers"]
    main = {k for k in after if not k.startswith(f"model.layers.{n}.")}
    assert main == {k for k in before if not k.startswith(f"model.layers.{n}.")}
    for k in main:
        assert after[k].dtype == before[k].dtype and after[k].tobytes() == before[k].tobytes(), k
    assert f"model.layers.{n}.eh_proj.weight" in after
    notes = []
    loaded = load_hf_model(str(out), ModelConfig.from_file(str(out / "config.json")), notes=notes)
    assert loaded.mtp is not None and notes == []
