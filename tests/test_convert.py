"""The weight converter (convert/hf_to_ktjax.py): parity after conversion, FP8, bad input, streaming memory."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from hf_models import _COMMON, hf_logits, rel_err
import ktjax
from folder_edits import BAD_INPUTS, shards
from ktjax.weights.checkpoint import LAYOUT_VERSION, MANIFEST, is_checkpoint, load_checkpoint, read_manifest, read_tensor
from ktjax.weights.convert import main
from ktjax.errors import KtjaxError
from numpy_references import (E4M3, FP8_BLOCK, FP8_QUANTIZATION_CONFIG, FP8_SHIPPED, fp8_dequantize_blocks, fp8_gemm,
                              fp8_quantize_blocks)
from synthetic_folders import WIDE_EXPERTS, write_synthetic_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "convert", "hf_to_ktjax.py")
PARITY = 1e-4        # the README's bound against transformers: max|ktjax - hf| <= 1e-4 * max|hf|
FP8_VS_DEQUANT = 1e-5  # fp8 kept vs dequantized: identical weights, so only float32 summation order differs


def _engine(folder, **runtime):
    engine = ktjax.load(folder, **runtime)
    assert is_checkpoint(folder)  # ktjax.load took the converted layout, not the copied config.json
    return engine


def _convert(hf_dir, out, *flags):
    return main(["--hf-dir", str(hf_dir), "--out", str(out), "--quiet", *flags])


def _leftovers(parent):
    return [f for f in os.listdir(parent) if ".partial-" in f or ".old-" in f]


# ---- bf16 / float32 sources: parity with transformers ------------------------------------------------

@pytest.mark.parametrize("name", ["v3", "v2_lite"])
def test_converted_model_matches_transformers(hf_folder, tmp_path, rng, name):
    folder, oracle = hf_folder(name)
    out = tmp_path / "ckpt"
    assert _convert(folder, out) == 0
    assert is_checkpoint(str(out)) and not is_checkpoint(folder)
    manifest = read_manifest(str(out))
    assert manifest["layout_version"] == LAYOUT_VERSION
    assert manifest["source"] == os.path.abspath(folder)
    assert manifest["dtypes"] == {"float32": manifest["tensor_count"]}
    assert manifest["tensor_count"] == len(manifest["tensors"])
    assert manifest["source_tensor_count"] == manifest["source_tensors_used"]  # nothing skipped here
    ids = rng.integers(0, oracle.config.vocab_size, size=(2, 13))
    ref = hf_logits(oracle, ids)
    for absorb in (False, True):
        assert rel_err(_engine(str(out), absorb_for_prefill=absorb).logits(ids), ref) <= PARITY
    assert _leftovers(tmp_path) == []


def test_dry_run_prints_the_plan_and_writes_nothing(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("v2_lite")
    out = tmp_path / "ckpt"
    assert main(["--hf-dir", folder, "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    for word in ("tensors out", "bytes in", "bytes out", "peak memory", "dry run: nothing written"):
        assert word in text
    assert os.listdir(tmp_path) == []
    planned = int(re.search(r"tensors out:\s+(\d+)", text).group(1))
    assert main(["--hf-dir", folder, "--out", str(out)]) == 0
    assert read_manifest(str(out))["tensor_count"] == planned
    progress = capsys.readouterr().err
    assert f"{planned}/{planned} tensors" in progress and "B/s" in progress  # the progress bar: tensors and bytes


def test_overwrite_replaces_only_when_asked(hf_folder, tmp_path):
    folder, _ = hf_folder("v2_lite")
    out = tmp_path / "ckpt"
    assert _convert(folder, out, "--weights", "bf16") == 0
    assert _convert(folder, out, "--overwrite") == 0
    assert set(read_manifest(str(out))["dtypes"]) == {"float32"}
    assert _leftovers(tmp_path) == []


def test_bf16_weights_keep_the_router_in_float32(hf_folder, tmp_path):
    folder, _ = hf_folder("v3")
    out = tmp_path / "ckpt"
    assert _convert(folder, out, "--weights", "bf16") == 0
    tensors = read_manifest(str(out))["tensors"]
    assert tensors["layers/001/mlp.w_gate"]["dtype"] == "bfloat16"
    assert tensors["layers/001/mlp.router"]["dtype"] == "float32"


def test_unknown_layout_version_says_to_reconvert(hf_folder, tmp_path):
    folder, _ = hf_folder("v2_lite")
    out = tmp_path / "ckpt"
    assert _convert(folder, out) == 0
    path = out / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["layout_version"] = LAYOUT_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(KtjaxError, match=f"layout version {LAYOUT_VERSION + 1}.*re-convert"):
        load_checkpoint(str(out))


# ---- FP8: a tiny checkpoint in DeepSeek-V3's official format, built here --------------------------------

FP8_CONFIG = dict(_COMMON, hidden_size=160, intermediate_size=200, qk_nope_head_dim=24, v_head_dim=20,
                  q_lora_rank=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4,
                  topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _fp8_tensors(folder):
    """Float32 random weights from transformers, rewritten as the official FP8 format plus an MTP layer."""
    import torch
    from safetensors.numpy import load_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**FP8_CONFIG))
    model.save_pretrained(folder)
    tensors = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, f)))
            os.remove(os.path.join(folder, f))
    rng = np.random.default_rng(0)
    layers = FP8_CONFIG["num_hidden_layers"]
    tensors[f"model.layers.{layers}.eh_proj.weight"] = rng.normal(0, 0.1, (160, 320)).astype(np.float32)
    tensors[f"model.layers.{layers}.enorm.weight"] = np.ones(160, np.float32)
    out = {}
    for name, w in tensors.items():
        if FP8_SHIPPED.search(name):
            out[name], out[name + "_scale_inv"] = fp8_quantize_blocks(w)
        elif name.endswith("e_score_correction_bias"):
            out[name] = rng.normal(0, 0.1, w.shape).astype(np.float32)  # float32 in the official checkpoint
        else:
            out[name] = w.astype(ml_dtypes.bfloat16)
    return out


def _write_shards(folder, tensors, n_shards=4):
    from safetensors.numpy import save_file

    names = sorted(tensors)
    weight_map = {}
    for k in range(n_shards):
        shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::n_shards]}
        save_file(part, os.path.join(folder, shard))
        weight_map.update({n: shard for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fp8_hf"))
    tensors = _fp8_tensors(folder)
    _write_shards(folder, tensors)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(quantization_config=FP8_QUANTIZATION_CONFIG, num_nextn_predict_layers=1, torch_dtype="bfloat16")
    with open(path, "w") as f:
        json.dump(raw, f)
    return folder, tensors


@pytest.fixture(scope="module")
def fp8_converted(fp8_folder, tmp_path_factory):
    """weights -> converted folder, each converted once per module."""
    folder, _ = fp8_folder
    cache = {}

    def get(weights):
        if weights not in cache:
            out = tmp_path_factory.mktemp(f"fp8_{weights}") / "ckpt"
            assert _convert(folder, out, "--weights", weights) == 0
            cache[weights] = str(out)
        return cache[weights]

    return get


def _reference_tensors(tensors, dtype=np.float32):
    """Converted key -> the value a dequantizing conversion must store, from the source by hand."""
    h, dn, dv = FP8_CONFIG["num_attention_heads"], FP8_CONFIG["qk_nope_head_dim"], FP8_CONFIG["v_head_dim"]
    ours = {"self_attn.q_a_proj": "attn.q_a_proj.kernel", "self_attn.q_b_proj": "attn.q_b_proj.kernel",
            "self_attn.kv_a_proj_with_mqa": "attn.kv_a_proj.kernel", "self_attn.o_proj": "attn.o_proj.kernel",
            "mlp.gate_proj": "mlp.gate_proj.kernel", "mlp.up_proj": "mlp.up_proj.kernel",
            "mlp.down_proj": "mlp.down_proj.kernel", "mlp.shared_experts.gate_proj": "mlp.shared.gate_proj.kernel",
            "mlp.shared_experts.up_proj": "mlp.shared.up_proj.kernel",
            "mlp.shared_experts.down_proj": "mlp.shared.down_proj.kernel"}
    experts = {"gate_proj": "mlp.w_gate", "up_proj": "mlp.w_up", "down_proj": "mlp.w_down"}
    ref, stacks = {}, {}
    for name, q in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)\.weight$", name)
        if not m or not FP8_SHIPPED.search(name) or int(m.group(1)) >= FP8_CONFIG["num_hidden_layers"]:
            continue
        layer, rest = f"layers/{int(m.group(1)):03d}/", m.group(2)
        w = fp8_dequantize_blocks(q, tensors[name + "_scale_inv"]).astype(dtype)
        if rest == "self_attn.kv_b_proj":
            per_head = fp8_dequantize_blocks(q, tensors[name + "_scale_inv"]).reshape(h, dn + dv, -1)
            ref[layer + "attn.w_uk"], ref[layer + "attn.w_uv"] = per_head[:, :dn], per_head[:, dn:]
        elif rest.startswith("mlp.experts."):
            _, _, j, proj = rest.split(".")
            stacks.setdefault(layer + experts[proj], {})[int(j)] = w.T
        else:
            ref[layer + ours[rest]] = w.T
    for key, parts in stacks.items():
        ref[key] = np.stack([parts[j] for j in range(len(parts))])
    return ref


def test_fp8_to_float32_equals_numpy_dequantization(fp8_folder, fp8_converted):
    _, tensors = fp8_folder
    out = fp8_converted("float32")
    ref = _reference_tensors(tensors)
    assert len(ref) == 33  # 9 in the dense layer, 12 in each MoE layer (w_uk and w_uv included): all of them
    for key, want in ref.items():
        got = read_tensor(out, key)
        assert got.dtype == np.float32 and np.array_equal(got, want), key
    embed = read_tensor(out, "embed")
    assert np.array_equal(embed, tensors["model.embed_tokens.weight"].astype(np.float32))
    assert set(read_manifest(out)["dtypes"]) == {"float32"}


def test_fp8_to_bf16_rounds_the_dequantized_weights(fp8_folder, fp8_converted):
    _, tensors = fp8_folder
    out = fp8_converted("bf16")
    for key, want in _reference_tensors(tensors).items():
        got = read_tensor(out, key)
        assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got, want.astype(ml_dtypes.bfloat16)), key


def test_fp8_kept_as_e4m3_with_block_scales(fp8_folder, fp8_converted):
    _, tensors = fp8_folder
    out = fp8_converted("fp8")
    manifest = read_manifest(out)["tensors"]
    kernel = "layers/001/attn.q_a_proj.kernel"  # [160, 16] in ktjax's [in, out] layout: a partial edge block
    assert manifest[kernel]["dtype"] == "float8_e4m3fn"
    q = tensors["model.layers.1.self_attn.q_a_proj.weight"]
    s = tensors["model.layers.1.self_attn.q_a_proj.weight_scale_inv"]
    assert np.array_equal(read_tensor(out, kernel).view(np.uint8), q.T.view(np.uint8))
    assert np.array_equal(read_tensor(out, kernel + "_scale"), s.T)
    w_up = read_tensor(out, "layers/002/mlp.w_up")
    assert w_up.dtype == E4M3 and w_up.shape == (8, 160, 24)
    assert read_tensor(out, "layers/002/mlp.w_up_scale").shape == (8, 2, 1)
    # kv_b_proj's 176 rows cross a block edge inside head 2: it is always dequantized before the split.
    assert manifest["layers/000/attn.w_uk"]["dtype"] == "float32"
    assert np.array_equal(read_tensor(out, "layers/000/attn.w_uk"),
                          _reference_tensors(tensors)["layers/000/attn.w_uk"])
    assert read_manifest(out)["weights"] == "fp8"


@pytest.mark.parametrize("moe_impl", ["gather", "ragged", "blocked"])
def test_fp8_logits_match_the_dequantized_model(fp8_converted, rng, moe_impl):
    import jax

    kept = _engine(fp8_converted("fp8"), moe_impl=moe_impl, absorb_for_prefill=True)
    from ktjax.model.decoder import PerLayer
    from ktjax.model.moe import PerExpert

    def first(x):  # a parameter's first array: per-layer arrays, and per-expert ones under them on the CPU
        return first(x.arrays[0]) if isinstance(x, (PerLayer, PerExpert)) else x

    # One entry per parameter: the engine holds a stacked parameter as per-layer arrays (model.PerLayer).
    params = jax.tree_util.tree_leaves(kept.state, is_leaf=lambda x: isinstance(x, PerLayer))
    fp8_leaves = [x for x in params if first(x).dtype == E4M3]
    assert len(fp8_leaves) == 17  # every linear of both stacks (kv_b_proj excepted), held in e4m3
    dequantized = _engine(fp8_converted("float32"), moe_impl=moe_impl, absorb_for_prefill=True)
    ids = rng.integers(0, FP8_CONFIG["vocab_size"], size=(2, 13))
    ref = dequantized.logits(ids)
    err = rel_err(kept.logits(ids), ref)
    print(f"fp8 kept vs dequantized ({moe_impl}): max relative error {err:.2e}")
    assert err <= FP8_VS_DEQUANT
    if moe_impl == "gather":  # the decode path too: chunked prefill through the latent cache
        assert rel_err(kept.cached_logits(ids), dequantized.cached_logits(ids)) <= FP8_VS_DEQUANT


@pytest.mark.parametrize("moe_impl", ["gather", "blocked"])
def test_fp8_products_in_the_model_equal_deepseeks_fp8_gemm(fp8_converted, rng, moe_impl, monkeypatch):
    """fp8_matmul fp8: every FP8 weight's product of up to 8 rows takes FP8 operands, and each product the model
    makes (its own inputs, weights and scales, recorded from inside the compiled programs) equals the numpy
    transcription of DeepSeek's act_quant + fp8_gemm. Checked product by product, not on the logits: e4m3
    rounding is a step function, so a float32-versus-float64 difference of 1e-7 in one product can round a
    later activation a whole e4m3 step apart (seen here: logits 5% apart from position 2 on)."""
    import jax
    from ktjax.model import quantized
    from ktjax.model.decoder import PerLayer

    kept = _engine(fp8_converted("fp8"), moe_impl=moe_impl, fp8_matmul="fp8", chunk_size=1)
    params = jax.tree_util.tree_leaves(kept.state, is_leaf=lambda x: isinstance(x, (PerLayer, quantized.QuantizedArray)))
    assert sum(isinstance(x, quantized.Fp8Products) for x in params) == 17  # every FP8 weight (see above)
    assert kept.backend.stats(None)["fp8_matmul"] == "fp8"
    products, real = [], quantized.block_scaled_matmul

    def recorded(x, q, scale):
        y = real(x, q, scale)
        jax.debug.callback(lambda *a: products.append([np.asarray(v) for v in a]), x, q, scale, y)
        return y

    monkeypatch.setattr(quantized, "block_scaled_matmul", recorded)
    ids = rng.integers(0, FP8_CONFIG["vocab_size"], size=(2, 8))
    fp8_cached = kept.cached_logits(ids)  # a chunk of one position, batch 2: decode-sized steps
    rows = {x.shape[0] for x, *_ in products}  # the batch's 2 rows; routed experts 1 (gather) or a block of 6
    assert 2 in rows and max(rows) <= quantized.FP8_PRODUCT_ROWS
    monkeypatch.setattr(quantized, "FP8_PRODUCT_ROWS", 64)  # a full forward pads 8 positions to 16 rows
    jax.clear_caches()  # the layer function is traced once per structure (model/decoder.py): trace it again
    fp8_full = kept.logits(ids[:1])
    assert 16 in {x.shape[0] for x, *_ in products}
    errors = [rel_err(y, fp8_gemm(x, q, scale)) for x, q, scale, y in products]
    print(f"{len(products)} FP8 products against DeepSeek's fp8_gemm: max relative error {max(errors):.2e}")
    assert max(errors) <= FP8_VS_DEQUANT
    dequantized = _engine(fp8_converted("fp8"), moe_impl=moe_impl, fp8_matmul="dequantize")
    assert rel_err(fp8_full, dequantized.logits(ids[:1])) > 100 * FP8_VS_DEQUANT  # the e4m3 rounding shows
    assert rel_err(fp8_cached, dequantized.cached_logits(ids)) > 100 * FP8_VS_DEQUANT


def test_fp8_matmul_auto_dequantizes_on_a_cpu(fp8_converted):
    engine = _engine(fp8_converted("fp8"), fp8_matmul="auto")
    assert engine.backend.fp8_matmul == "dequantize"
    assert engine.backend.stats(None)["fp8_matmul"] == "dequantize"


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_fp8_to_int8_int4_quantizes_the_dequantized_weights(fp8_folder, fp8_converted, weights):
    from ktjax.model import quantized as weight_quant

    _, tensors = fp8_folder
    out = fp8_converted(weights)
    manifest = read_manifest(out)["tensors"]
    for key, want in _reference_tensors(tensors).items():
        if key.endswith(("w_uk", "w_uv")):  # kept: float32, exactly dequantized as with --weights source
            assert manifest[key]["dtype"] == "float32" and np.array_equal(read_tensor(out, key), want), key
            continue
        values, scales = weight_quant.quantize_weight(want, weights)
        assert np.array_equal(read_tensor(out, key), values), key
        assert np.array_equal(read_tensor(out, key + "_scale"), scales), key
    assert manifest["embed"]["dtype"] == np.dtype(tensors["model.embed_tokens.weight"].dtype).name  # kept
    engine = _engine(out, moe_impl="gather")
    dequantized = _engine(fp8_converted("float32"), moe_impl="gather")
    ids = np.arange(2, 15)[None]
    err = rel_err(engine.logits(ids), dequantized.logits(ids))
    print(f"fp8 -> {weights} vs fp8 dequantized: max relative logits error {err:.3f}")
    assert err <= {"int8": 0.1, "int4": 1.5}[weights]  # measured 0.032 and 0.82 on this tiny random model


def test_source_weights_keep_fp8(fp8_folder, fp8_converted, tmp_path):
    folder, _ = fp8_folder
    assert _convert(folder, tmp_path / "ckpt") == 0
    assert read_manifest(str(tmp_path / "ckpt"))["tensors"] == read_manifest(fp8_converted("fp8"))["tensors"]


def test_incomplete_mtp_layer_skipped_and_said_so(fp8_folder, tmp_path, capsys):
    """This folder holds only part of an MTP layer (eh_proj, enorm): it is skipped, saying why. A whole one is kept
    by default (tests/test_mtp.py); --keep-mtp, once needed to keep it, is still accepted."""
    folder, _ = fp8_folder
    assert main(["--hf-dir", folder, "--out", str(tmp_path / "a"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "multi-token-prediction" in text and "model.layers.3." in text and "lack some of its tensors" in text
    assert _convert(folder, tmp_path / "b", "--keep-mtp") == 0
    manifest = read_manifest(str(tmp_path / "b"))
    assert not any(k.startswith("layers/003/") for k in manifest["tensors"])
    assert manifest["source_tensors_skipped"] == {"mtp": 3}  # eh_proj, its scale, enorm


# ---- bad input: exit code 2, one clear message, nothing at --out ----------------------------------------

def _assert_refused(rc, capsys, pattern):
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


@pytest.mark.parametrize("damage", BAD_INPUTS)
def test_bad_input_is_refused_cleanly(v2_lite_copy, tmp_path, capsys, damage):
    pattern = BAD_INPUTS[damage](v2_lite_copy)
    out = tmp_path / "out" / "ckpt"
    _assert_refused(_convert(v2_lite_copy, out), capsys, pattern)
    assert not out.exists() and (not out.parent.exists() or os.listdir(out.parent) == [])


def test_existing_output_is_refused_and_left_alone(v2_lite_copy, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    _assert_refused(_convert(v2_lite_copy, out), capsys, r"already exists.*--overwrite")
    assert os.listdir(out) == ["mine.txt"] and _leftovers(tmp_path) == []


def test_not_enough_disk_space_is_refused_with_the_numbers(v2_lite_copy, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    out = tmp_path / "ckpt"
    _assert_refused(_convert(v2_lite_copy, out), capsys, r"not enough disk space.*needs [\d.]+ MiB.*97\.7 KiB free")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_fp8_weights_need_an_fp8_source(v2_lite_copy, tmp_path, capsys):
    out = tmp_path / "ckpt"
    _assert_refused(_convert(v2_lite_copy, out, "--weights", "fp8"), capsys, r"no FP8 weights")
    assert not out.exists()


@pytest.mark.parametrize("failure,code,message", [(OSError(28, "No space left on device"), 1, "No space left"),
                                                   (KeyboardInterrupt(), 130, "interrupted")])
def test_failure_while_writing_leaves_nothing(v2_lite_copy, tmp_path, capsys, monkeypatch, failure, code, message):
    from ktjax.weights.checkpoint import CheckpointWriter

    calls = []
    real_write = CheckpointWriter.write

    def failing_write(self, key, array, dtype=None):
        calls.append(key)
        if len(calls) == 10:
            raise failure
        return real_write(self, key, array, dtype)

    monkeypatch.setattr(CheckpointWriter, "write", failing_write)
    out = tmp_path / "ckpt"
    assert _convert(v2_lite_copy, out) == code
    assert message in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_bad_flag_is_one_line(v2_lite_copy, tmp_path, capsys):
    _assert_refused(_convert(v2_lite_copy, tmp_path / "ckpt", "--weights", "int3"), capsys, r"invalid choice: 'int3'")


def test_script_exits_2_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, SCRIPT, "--hf-dir", str(tmp_path / "nowhere"), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "no such folder" in run.stderr and not (tmp_path / "out").exists()


# ---- streaming: peak memory far below the model's size --------------------------------------------------

_MEASURE = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, {root!r})
    import jax, flax, tensorstore, tqdm, ml_dtypes  # imported before the baseline: not the conversion's memory
    from ktjax.weights.convert import main

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    before = status("VmRSS:")
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
    except OSError:
        pass
    rc = main(["--hf-dir", sys.argv[1], "--out", sys.argv[2], "--quiet"])
    print(json.dumps({{"rc": rc, "before": before, "peak": status("VmHWM:")}}))
""")


def test_peak_memory_stays_far_below_the_model_size(tmp_path):
    hf, out = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    model_bytes = write_synthetic_folder(hf, WIDE_EXPERTS, shard_bytes=64 * 2**20)
    largest = 64 * 256 * 256 * 4  # one layer's w_gate stack, float32
    assert model_bytes > 20 * largest and len(shards(hf)) > 5
    run = subprocess.run([sys.executable, "-c", _MEASURE.format(root=ROOT), hf, out], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout.strip().splitlines()[-1])
    assert m["rc"] == 0
    growth = m["peak"] - m["before"]
    print(f"model {model_bytes / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB, process RSS before "
          f"{m['before'] / 1e6:.0f} MB, peak {m['peak'] / 1e6:.0f} MB, growth {growth / 1e6:.0f} MB")
    assert growth < model_bytes / 4  # generous: streaming needs a few tensors' worth, not the model
    tensors = read_manifest(out)["tensors"]
    assert all(f"layers/{i:03d}/mlp.w_gate" in tensors for i in range(WIDE_EXPERTS["num_hidden_layers"]))
