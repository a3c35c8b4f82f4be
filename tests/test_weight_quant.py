"""Weight-only int8 / int4: the formats against numpy, the matmuls against dequantized weights, the model's
logits against the unquantized model, the converter's bytes against the formula."""
import os

import ml_dtypes
import numpy as np
import pytest
import jax.numpy as jnp
from flax import nnx

import ktjax
from ktjax.model import quantized as wq
from ktjax.weights import quantize as surgery
from ktjax.weights.checkpoint import read_manifest, read_tensor
from ktjax.weights.convert import main as convert_main, make_plan
from ktjax.model.moe import routed_experts

# Logits error against the unquantized model on the tiny random "v3" model (48-wide, MoE top-3 of 8 with
# group routing, q_lora, YaRN), 2 x 24 positions: the median over positions of |dlogits| / |logits|, and
# the relative Frobenius norm over all of them. Measured (docs/long-context.md): int8 median 0.017, all 0.083; int4
# median 0.38, all 0.47. The gap between median and all is positions whose top-k expert choice flips;
# int4's size is round-to-nearest on 48-wide random layers (~11% RMS error per weight).
INT8_LOGITS_ERR = {"median": 0.03, "all": 0.12}
INT4_LOGITS_ERR = {"median": 0.5, "all": 0.6}
MATMUL_EXACT = 2e-6  # the tiled matmul against numpy on the dequantized weight: float32 summation order only


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def logits_error(got, ref) -> dict:
    per_position = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    return {"median": float(np.median(per_position)), "all": _rel(got, ref),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}


# ---- the formats -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, weight_err", [("int8", 0.5 / 127), ("int4", 0.5 / 7)])
def test_quantize_roundtrip_within_half_a_step(rng, fmt, weight_err):
    w = rng.standard_normal((3, 300, 30)).astype(np.float32)  # a stack; 300 inputs pad to three int4 groups
    values, scales = wq.quantize_weight(w, fmt)
    back = wq.dequantize_weight_np(values, scales, 300)
    # Symmetric rounding: every weight within half a step of its channel's (or group's) absmax / qmax.
    assert np.all(np.abs(back - w) <= weight_err * np.abs(w).max(axis=-2, keepdims=True) + 1e-7)
    shape, dtype, scale_shape = wq.stored_shapes(fmt, w.shape)
    assert values.shape == shape and values.dtype == dtype and scales.shape == scale_shape


def test_int4_packs_each_group_in_two_contiguous_halves(rng):
    nibbles = rng.integers(0, 16, (256, 3)).astype(np.uint8)
    packed = wq.pack_weight_int4(nibbles, 128)
    assert packed.shape == (128, 3)
    np.testing.assert_array_equal(packed[:64] & 15, nibbles[:64])        # group 0, first half: low nibble
    np.testing.assert_array_equal(packed[:64] >> 4, nibbles[64:128])     # group 0, second half: high nibble
    np.testing.assert_array_equal(packed[64:] & 15, nibbles[128:192])
    np.testing.assert_array_equal(wq.unpack_weight_int4(packed, 128), nibbles)


def test_zero_channel_stays_zero():
    w = np.zeros((128, 2), np.float32)
    w[:, 1] = 1.0
    for fmt in wq.WEIGHT_FORMATS:
        values, scales = wq.quantize_weight(w, fmt)
        np.testing.assert_array_equal(wq.dequantize_weight_np(values, scales, 128), w)


@pytest.mark.parametrize("shape", [(2048, 1408), (1408, 2048), (48, 24), (3, 100, 30)])
def test_bytes_equal_the_formula_and_int4_is_under_0_3_of_bf16(shape):
    bf16 = int(np.prod(shape)) * 2
    for fmt in wq.WEIGHT_FORMATS:
        values, scales = wq.quantize_weight(np.ones(shape, np.float32), fmt)
        assert values.nbytes + scales.nbytes == wq.stored_bytes(fmt, shape)
    if shape[-2] % wq.INT4_GROUP == 0:  # real dims; tiny odd ones pad up to a group
        assert wq.stored_bytes("int4", shape) <= 0.3 * bf16
        assert wq.stored_bytes("int8", shape) <= 0.51 * bf16


# ---- the matmuls -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", wq.WEIGHT_FORMATS)
@pytest.mark.parametrize("tokens", [1, 5, wq.PREFILL_ROWS + 3])
def test_tiled_matmul_equals_the_dequantized_weight(rng, monkeypatch, fmt, tokens):
    """Decode-sized tiles, and from PREFILL_ROWS rows on the prefill tiles of whole input rows (whole groups)."""
    monkeypatch.setattr(wq, "TILE_BYTES", 64 * 30 * 4)  # several tiles (and int4 groups) for a small weight
    monkeypatch.setattr(wq, "PREFILL_TILE_BYTES", 64 * 30 * 4)
    group = 32  # 200 inputs: 7 groups, the last one padded
    w = rng.standard_normal((200, 30)).astype(np.float32)
    x = rng.standard_normal((tokens, 200)).astype(np.float32)
    values, scales = wq.quantize_weight(w, fmt, group)
    want = x @ wq.dequantize_weight_np(values, scales, 200)
    weight = wq.QuantizedArray(jnp.asarray(values), jnp.asarray(scales))
    got = np.asarray(wq.matmul(jnp.asarray(x), weight))
    assert np.abs(got - want).max() <= MATMUL_EXACT * np.abs(want).max()
    whole = np.asarray(wq.dequantize_weight(weight, jnp.float32))[:200]
    np.testing.assert_allclose(whole, wq.dequantize_weight_np(values, scales, 200), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", wq.WEIGHT_FORMATS)
@pytest.mark.parametrize("impl", ["gather", "blocked", "ragged"])
def test_expert_paths_multiply_the_stored_experts(rng, fmt, impl):
    e, d, f, t, k = 4, 40, 24, 6, 2
    dense = [rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((e, d, f), (e, d, f), (e, f, d))]
    quantized = [wq.quantize_weight(w, fmt) for w in dense]
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
    weights = jnp.asarray(rng.random((t, k)), jnp.float32)
    deq = tuple(jnp.asarray(wq.dequantize_weight_np(v, s, w.shape[-2])) for (v, s), w in zip(quantized, dense))
    want = routed_experts(x, weights, idx, deq, "gather")
    got = routed_experts(x, weights, idx, tuple(wq.QuantizedArray(jnp.asarray(v), jnp.asarray(s))
                                                for v, s in quantized), impl)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ---- the model ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v3_engines(hf_folder):
    folder, _ = hf_folder("v3")
    base = ktjax.load(folder)
    quantized = {fmt: ktjax.engine_for(base.cfg, surgery.quantize_model(base.model, fmt), base.runtime, base.defaults)
                 for fmt in wq.WEIGHT_FORMATS}
    return folder, base, quantized


def test_quantized_logits_error_is_bounded(v3_engines, rng):
    _, base, quantized = v3_engines
    ids = rng.integers(0, base.cfg.vocab_size, (2, 24))
    ref = base.logits(ids)
    errs = {fmt: logits_error(e.logits(ids), ref) for fmt, e in quantized.items()}
    print(f"logits error vs float32: {errs}")
    for fmt, bound in (("int8", INT8_LOGITS_ERR), ("int4", INT4_LOGITS_ERR)):
        assert errs[fmt]["median"] <= bound["median"] and errs[fmt]["all"] <= bound["all"], (fmt, errs[fmt])
    assert errs["int8"]["all"] < errs["int4"]["all"] / 3


def test_greedy_agreement_over_32_steps(v3_engines, rng):
    _, base, quantized = v3_engines
    prompts = rng.integers(2, base.cfg.vocab_size, (2, 7)).tolist()
    opts = dict(max_new_tokens=32, temperature=0, ignore_eos=True)
    ref = np.array(base.generate(prompts, **opts).tokens)
    full = np.concatenate([np.array(prompts), ref], axis=1)
    agree = {}
    for fmt, e in quantized.items():
        got = np.array(e.generate(prompts, **opts).tokens)
        # Free-running, one difference changes everything after it (a random model's top logits are close),
        # so also the teacher-forced rate: the quantized argmax along the reference's own continuation.
        forced = e.logits(full)[:, len(prompts[0]) - 1:-1].argmax(-1)
        agree[fmt] = dict(first_divergence=[int(np.argmax(np.append(g != r, True))) for g, r in zip(got, ref)],
                          teacher_forced=float((forced == ref).mean()))
    print(f"greedy agreement over 32 steps: {agree}")
    assert agree["int8"]["teacher_forced"] >= 0.8  # measured 0.89 (57 of 64)
    assert min(agree["int8"]["first_divergence"]) >= 1


def test_quantized_parameter_bytes(v3_engines):
    _, base, quantized = v3_engines
    state = dict(__import__("flax").nnx.state(base.model).flat_state())
    want = {fmt: 0 for fmt in wq.WEIGHT_FORMATS}
    kept = 0
    for path, var in state.items():
        path = tuple(map(str, path))
        if surgery.quantized_paths(path):
            for fmt in wq.WEIGHT_FORMATS:
                want[fmt] += wq.stored_bytes(fmt, var.shape)
        else:
            kept += var.nbytes
    for fmt, e in quantized.items():
        assert e.weight_bytes == want[fmt] + kept


# ---- the converter ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", wq.WEIGHT_FORMATS)
def test_converted_checkpoint_equals_quantizing_in_memory(v3_engines, tmp_path, rng, fmt):
    folder, base, quantized = v3_engines
    out = tmp_path / fmt
    plan = make_plan(folder, str(out), fmt)
    assert convert_main(["--hf-dir", folder, "--out", str(out), "--weights", fmt, "--quiet"]) == 0
    manifest = read_manifest(str(out))
    assert set(manifest["dtypes"]) == {"float32", "int8" if fmt == "int8" else "uint8"}
    assert manifest["bytes"] == plan.bytes_out  # the dry run's figure is what was written
    stored = sum(np.prod(t["shape"]) * np.dtype(t["dtype"]).itemsize for t in manifest["tensors"].values())
    files = sum(os.path.getsize(os.path.join(folder, f)) for f in plan.copied_files)
    assert stored + files == plan.bytes_out
    engine = ktjax.load(str(out))
    assert engine.weight_bytes == quantized[fmt].weight_bytes
    ids = rng.integers(0, base.cfg.vocab_size, (1, 9))
    np.testing.assert_array_equal(engine.logits(ids), quantized[fmt].logits(ids))  # the same arrays


@pytest.mark.parametrize("weights", ["float32", "int4"])
def test_lm_head_int8(v3_engines, tmp_path, weights):
    """--lm-head int8 stores lm_head as weight_quant.quantize_weight makes it (one scale per vocabulary entry), with any
    --weights; the plan's bytes are what is written, and the plan says lm_head is quantized."""
    from ktjax.weights.convert import describe

    folder, base, _ = v3_engines
    out = tmp_path / weights
    plan = make_plan(folder, str(out), weights, lm_head="int8")
    assert "lm_head (int8)" in describe(plan) and "lm_head, " not in describe(plan).split("kept:")[1]
    assert convert_main(["--hf-dir", folder, "--out", str(out), "--weights", weights, "--lm-head", "int8",
                         "--quiet"]) == 0
    assert read_manifest(str(out))["bytes"] == plan.bytes_out
    want_values, want_scales = wq.quantize_weight(np.asarray(base.model.lm_head.kernel[...]), "int8")
    np.testing.assert_array_equal(read_tensor(str(out), "lm_head.kernel"), want_values)
    np.testing.assert_array_equal(read_tensor(str(out), "lm_head.kernel_scale"), want_scales)


def test_int4_from_bf16_keeps_the_rest_bf16(hf_folder, tmp_path):
    folder, _ = hf_folder("v2_lite")
    bf16 = tmp_path / "bf16"
    assert convert_main(["--hf-dir", folder, "--out", str(bf16), "--weights", "bf16", "--quiet"]) == 0
    # the bf16 checkpoint is not a Hugging Face folder: quantize from a bf16 source the way a user would
    src = tmp_path / "src"
    _bf16_hf_copy(folder, str(src))
    out = tmp_path / "int4"
    assert convert_main(["--hf-dir", str(src), "--out", str(out), "--weights", "int4", "--quiet"]) == 0
    tensors = read_manifest(str(out))["tensors"]
    assert tensors["embed"]["dtype"] == "bfloat16"
    assert tensors["layers/001/attn.w_uk"]["dtype"] == "bfloat16"
    assert tensors["layers/001/mlp.router"]["dtype"] == "bfloat16"
    assert tensors["layers/001/mlp.w_gate"]["dtype"] == "uint8"
    assert tensors["layers/001/mlp.w_gate_scale"]["dtype"] == "float32"
    want = wq.quantize_weight(read_tensor(str(bf16), "layers/001/mlp.w_gate").astype(np.float32), "int4")[0]
    np.testing.assert_array_equal(read_tensor(str(out), "layers/001/mlp.w_gate"), want)


def _bf16_hf_copy(folder, out):
    """The Hugging Face folder with every tensor cast to bf16 (as real V2 checkpoints ship)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    os.makedirs(out)
    for f in os.listdir(folder):
        path = os.path.join(folder, f)
        if f.endswith(".safetensors"):
            save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(path).items()}, os.path.join(out, f))
        elif os.path.isfile(path):
            shutil.copy(path, out)


def test_weight_layout_out_in_gives_the_in_out_logits(hf_folder, rng):
    """weight_layout out-in holds float matmul weights transposed (weight_quant.OutIn): the same
    logits as in-out, through the full forward and the cache, and Engine.model gives back the [in, out] stacks."""
    import jax

    import ktjax
    from ktjax.model.quantized import OutIn

    folder, _ = hf_folder("v3")
    # a float32 cache: a bf16 one would round two nearly equal latents apart
    # cpu_kernels off: with them on, float32 weights are held [out, in] for the kernels whatever the layout
    held = {layout: ktjax.load(folder, weight_layout=layout, cache_dtype="float32", cpu_kernels="off")
            for layout in ("in-out", "out-in")}
    is_out_in = lambda x: isinstance(x, OutIn)  # noqa: E731
    counts = {k: sum(map(is_out_in, jax.tree.leaves(e.state, is_leaf=is_out_in))) for k, e in held.items()}
    assert counts["in-out"] == 0 and counts["out-in"] > 0
    ids = rng.integers(0, 97, size=(2, 40))  # 80 rows: the weight-on-the-left form; experts run one row
    for fn in ("logits", "cached_logits"):
        np.testing.assert_allclose(getattr(held["out-in"], fn)(ids), getattr(held["in-out"], fn)(ids),
                                   rtol=1e-5, atol=1e-5, err_msg=fn)
    for a, b in zip(jax.tree.leaves(nnx.state(held["out-in"].model)), jax.tree.leaves(nnx.state(held["in-out"].model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
