"""activation_quant int8: the CPU kernels' int8-activation matmuls (ktjax/cpu/csrc/matmul.cc, "int8 activations")
against a numpy model of the same quantization with exact integer products, the activations' rounding bound
against the float product, rows independent of their batch, and the setting in the Engine."""
import jax
import numpy as np
import pytest

import ktjax
from ktjax.cpu import kernels as cpu_kernels
from ktjax.cpu import weights as cw
from ktjax.model import quantized as wq
from ktjax.errors import KtjaxError

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")  # built at first use, not at collection

U = 2.0**-24  # float32 unit roundoff
# (format, int4 group): the int8 weights' block is cpu_kernels.Q8_BLOCK; int4's the weight's group (128 takes the
# one-vector-per-group path, 64 and 32 the masked one)
FORMATS = [("int8", None), ("int4", 128), ("int4", 64), ("int4", 32)]
# (K, N): K a whole number of 128-blocks, K with a short last block (and a tail under one vector), N with tails
SHAPES = [(256, 9), (300, 7), (2048 + 72, 4096 + 3)]


def _weight(rng, fmt, group, k, n):
    """(the held KernelQuantized with int8 activations, the weight as int64 values [N, P] (P: K, or int4's padded
    inputs), its scales float64 [N, P / block] per activation block, the activation block, offset)."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    values, scales = wq.quantize_weight(w, fmt, group or wq.INT4_GROUP)
    held = cw.kernel_layout(wq.QuantizedArray(jax.numpy.asarray(values), jax.numpy.asarray(scales)), True)
    if fmt == "int8":
        block = cpu_kernels.Q8_BLOCK
        q = values.T.astype(np.int64)
        per_block = np.repeat(scales.T.astype(np.float64), -(-k // block), axis=1)
    else:
        block = group
        q = wq.unpack_weight_int4(values, group).T.astype(np.int64) - 8
        per_block = scales.T.astype(np.float64)
    return held, q, per_block, block


def _quantized_rows(x, block):
    """numpy's version of the kernels' quantization: per row and block, scale = amax / 127 and
    a = rint(x * (127 / amax)) in float32 (a block of zeros: scale 0, a = 0; an amax so small that 127 / amax
    overflows: x * 127 / amax in float64)."""
    rows, k = x.shape
    a = np.zeros((rows, k), np.int64)
    s = np.zeros((rows, -(-k // block)), np.float32)
    for b in range(s.shape[1]):
        xb = x[:, b * block:(b + 1) * block]
        amax = np.abs(xb).max(axis=1)
        with np.errstate(divide="ignore", over="ignore"):
            inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
            tiny = np.isinf(inv)
            a[:, b * block:(b + 1) * block] = np.where(
                tiny[:, None], np.rint(xb.astype(np.float64) * 127 / np.where(tiny, amax, 1)[:, None]),
                np.rint(xb * inv[:, None]))
        s[:, b] = amax / np.float32(127)
    return a, s


def _reference(x, q, per_block, block, offset):
    """(y exact in float64 from the integer block sums, the float32 error bound of the kernel's sum)."""
    a, s = _quantized_rows(x, block)
    y = np.zeros((x.shape[0], q.shape[0]))
    size = np.zeros_like(y)
    for b in range(s.shape[1]):
        cols = slice(b * block, (b + 1) * block)
        scale = s[:, b, None].astype(np.float64) * per_block[None, :, b]
        y += scale * (a[:, cols] @ q[:, cols].T)
        # each of the block's 16 integer lanes is at most sum (|q| + 2 offset) |a| (the unsigned weight bytes and
        # the -offset * sum(a) start), exact; rounded once times the scales, then added over blocks and lanes
        size += np.abs(scale) * (np.abs(a[:, cols]) @ (np.abs(q[:, cols]) + 2 * offset).T)
    return y, (s.shape[1] + 8) * U * size


matmul = jax.jit(wq.matmul)


@pytest.mark.parametrize("fmt, group", FORMATS)
@pytest.mark.parametrize("k, n", SHAPES)
def test_int8_activations_match_the_integer_model(rng, fmt, group, k, n):
    """Every row count (one, a batch, more than cpu_kernels.MAX_ROWS: a prefill chunk stays in the kernel): the
    block sums are exact integers, so the result is numpy's within the float32 rounding of the scaled sum."""
    held, q, per_block, block = _weight(rng, fmt, group, k, n)
    p = q.shape[1]
    offset = 128 if fmt == "int8" else 8
    for rows in (1, 5, cpu_kernels.MAX_ROWS + 3):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        x[0, :block] *= 40  # a block of outliers: its own scale
        assert cpu_kernels.Q8_TARGETS[np.dtype(held.values.dtype)] in matmul.lower(x, held).as_text()
        got = np.asarray(matmul(x, held), np.float64)
        exact, bound = _reference(np.pad(x, ((0, 0), (0, p - k))), q, per_block, block, offset)
        assert np.all(np.abs(got - exact) <= bound), (fmt, group, rows, float(np.max(np.abs(got - exact) - bound)))


@pytest.mark.parametrize("fmt, group", FORMATS)
def test_int8_activations_are_within_their_rounding_of_the_float_product(rng, fmt, group):
    """Against the unquantized rows: each input moves by at most half its block's step (scale / 2), so
    |y - x W| <= sum_b scale_b / 2 sum_(k in b) |W_k| (plus float32 rounding): the setting's whole cost."""
    k, n = SHAPES[1]
    held, q, per_block, block = _weight(rng, fmt, group, k, n)
    p = q.shape[1]
    x = rng.standard_normal((4, k)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (0, p - k))).astype(np.float64)
    w = q.astype(np.float64) * np.repeat(per_block, block, axis=1)[:, :p]  # the dequantized weight [N, P]
    _, s = _quantized_rows(xp.astype(np.float32), block)
    rounding = sum(s[:, b, None] / 2 * np.abs(w[:, b * block:(b + 1) * block]).sum(axis=1)[None]
                   for b in range(s.shape[1]))
    got = np.asarray(matmul(x, held), np.float64)
    exact = xp @ w.T
    assert np.all(np.abs(got - exact) <= rounding + (p + 8) * U * (np.abs(xp) @ np.abs(w.T))), fmt


@pytest.mark.parametrize("fmt, group", FORMATS[:2])
def test_odd_blocks(rng, fmt, group):
    """A block of zeros (scale 0) and one so small that 127 / amax overflows float32 give numpy's result; a NaN
    or an infinity makes its row's outputs NaN, as the float product's (never finite garbage), and leaves the
    other rows alone."""
    k, n = SHAPES[0]
    held, q, per_block, block = _weight(rng, fmt, group, k, n)
    x = rng.standard_normal((5, k)).astype(np.float32)
    x[0, :block] = 0
    x[1, block:] *= np.float32(1e-38)
    x[2, 3], x[3, -1] = np.nan, np.inf
    got = np.asarray(matmul(x, held), np.float64)
    exact, bound = _reference(x[[0, 1, 4]], q, per_block, block, 128 if fmt == "int8" else 8)
    assert np.all(np.abs(got[[0, 1, 4]] - exact) <= bound)
    assert np.isnan(got[2:4]).all()


@pytest.mark.parametrize("fmt, group", FORMATS)
def test_a_row_result_does_not_depend_on_its_batch(rng, fmt, group):
    """Rows are quantized on their own and each output is summed in one order: a server row gives the bits a
    single request gives."""
    k, n = SHAPES[-1]
    held, *_ = _weight(rng, fmt, group, k, n)
    x = rng.standard_normal((16, k)).astype(np.float32)
    batch = np.asarray(matmul(x, held))
    for i in (0, 7, 15):
        np.testing.assert_array_equal(np.asarray(matmul(x[i:i + 1], held))[0], batch[i])
    np.testing.assert_array_equal(np.asarray(matmul(x[3:8], held)), batch[3:8])


@pytest.fixture(scope="module")
def int4_model(hf_folder, tmp_path_factory):
    from ktjax.weights.convert import main as convert_main

    src, _ = hf_folder("v2_lite")
    folder = str(tmp_path_factory.mktemp("q8") / "int4")
    assert convert_main(["--hf-dir", src, "--out", folder, "--weights", "int4", "--lm-head", "int8", "--quiet"]) == 0
    return folder


def test_engine_runs_every_quantized_matmul_with_int8_activations(int4_model, rng):
    """The tiny v2_lite model (int4, lm_head int8) under activation_quant int8: its prefill chunks (more rows
    than cpu_kernels.MAX_ROWS) and decode steps call the int8-activation kernels and no float-activation one,
    and a prompt's greedy tokens are the same alone and in a batch."""
    engine = ktjax.load(int4_model, activation_quant="int8", cache_dtype="float32", chunk_size=128)
    prompts = rng.integers(0, 97, size=(3, cpu_kernels.MAX_ROWS + 6)).tolist()
    together = engine.generate(prompts, max_new_tokens=5, temperature=0).tokens
    assert engine.generate(prompts[1:2], max_new_tokens=5, temperature=0).tokens[0] == together[1]
    texts = [p.as_text() for p in engine._compiled.values()]
    assert texts and all("KtjaxMatmulInt4Q8" in t and "KtjaxMatmulInt8Q8" in t for t in texts)
    assert not any('"KtjaxMatmulInt4"' in t or '"KtjaxMatmulInt8"' in t for t in texts)


def test_weights_outside_the_kernels_are_named(int4_model):
    """Stacked experts (moe_impl ragged) are not held for the kernels: they keep float32 activations, and the
    load notes say so rather than leaving it silent."""
    engine = ktjax.load(int4_model, activation_quant="int8", moe_impl="ragged")
    assert any("keep float32 activations" in note for note in engine.notes), engine.notes


# (what is wrong, the settings, what the message says)
REFUSALS = [
    ("float weights", "float", {}, r"weights are not int8 / int4"),
    ("kernels off", "int4", {"cpu_kernels": "off"}, r"cpu_kernels off"),
    ("no such value", "int4", {"activation_quant": "int4"}, r"activation_quant='int4': one of off, int8"),
]


@pytest.mark.parametrize("case, weights, settings, message", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_activation_quant_where_it_cannot_run_is_refused(hf_folder, int4_model, case, weights, settings, message):
    """One KtjaxError naming the reason (the CLI's exit 2), never a silent float run."""
    folder = hf_folder("v2_lite")[0] if weights == "float" else int4_model
    with pytest.raises(KtjaxError, match=message):
        ktjax.load(folder, **{"activation_quant": "int8", **settings})
