"""Products of FP8 weights with FP8 operands (fp8_matmul fp8): DeepSeek's act_quant and fp8_gemm against their
numpy transcriptions (tests/numpy_references.py), the row rule that picks them, and the door's choice. The
whole model under fp8_matmul fp8 is checked product by product in tests/test_convert.py."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hf_models import rel_err
from ktjax.model import quantized
from ktjax.model.decoder import PerLayer
from ktjax.model.fp8 import block_scaled_matmul, dequantize, quantize_rows
from ktjax.runtime import backend
from ktjax.runtime.settings import RuntimeConfig
from numpy_references import E4M3, fp8_act_quant, fp8_dequantize_blocks, fp8_gemm, fp8_quantize_blocks

FLOAT32_SUMS = 1e-6  # float32 sums against numpy's float64 over the same e4m3 products


def _activations(rng, rows: int, k: int, kind: str):
    x = rng.standard_normal((rows, k)).astype(np.float32)
    if kind == "bf16":      # few mantissa bits: many values land exactly between two e4m3 values
        x = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    elif kind == "zero":    # an all-zero row: zeros, not 0 / 0
        x[0] = 0
    elif kind == "tiny":    # below the amax floor
        x *= 1e-7
    elif kind == "outlier":  # one channel far above the rest of its block
        x[:, 3] = 3e4
    return x


@pytest.mark.parametrize("rows, k", [(1, 128), (3, 300), (16, 160), (8, 7168)])
@pytest.mark.parametrize("kind", ["normal", "bf16", "zero", "tiny", "outlier"])
def test_quantize_rows_is_deepseeks_act_quant(rng, rows, k, kind):
    x = _activations(rng, rows, k, kind)
    values, scales = quantize_rows(jnp.asarray(x))
    want_values, want_scales = fp8_act_quant(x)
    assert values.dtype == jnp.float8_e4m3fn and np.isfinite(np.asarray(values, np.float32)).all()
    assert np.array_equal(np.asarray(values).reshape(rows, -1).view(np.uint8), want_values.view(np.uint8))
    assert np.array_equal(np.asarray(scales), want_scales)


@pytest.mark.parametrize("rows, k, n", [(1, 128, 128), (3, 300, 200), (8, 160, 24), (2, 16, 128), (5, 512, 1536)])
def test_block_scaled_matmul_is_deepseeks_fp8_gemm(rng, rows, k, n):
    """Partial edge blocks on both axes included (300 inputs, 200 and 24 outputs)."""
    q, scale = fp8_quantize_blocks(rng.normal(0, 0.05, (k, n)).astype(np.float32))
    x = _activations(rng, rows, k, "bf16")
    got = np.asarray(block_scaled_matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(scale)))
    assert got.shape == (rows, n) and got.dtype == np.float32
    assert rel_err(got, fp8_gemm(x, q, scale)) <= FLOAT32_SUMS


def _fp8_weight(rng, k=300, n=200):
    q, scale = fp8_quantize_blocks(rng.normal(0, 0.05, (k, n)).astype(np.float32))
    return jnp.asarray(q), jnp.asarray(scale)


@pytest.mark.parametrize("lead", [(1,), (8,), (2, 4), (9,), (3, 5)])
def test_matmul_takes_fp8_operands_up_to_the_row_limit(rng, lead):
    """Up to FP8_PRODUCT_ROWS rows (leading axes flattened) an Fp8Products weight multiplies FP8 operands; more
    rows, or an FP8 weight not held for it, multiply the dequantized weight."""
    q, scale = _fp8_weight(rng)
    x = jnp.asarray(rng.standard_normal((*lead, 300)).astype(np.float32))
    rows = int(np.prod(lead))
    dequantized = np.asarray(x @ dequantize(q, scale, jnp.float32))
    fp8 = np.asarray(block_scaled_matmul(x.reshape(rows, 300), q, scale)).reshape(*lead, 200)
    held = np.asarray(quantized.matmul(x, quantized.Fp8Products(q, scale)))
    assert held.shape == (*lead, 200)
    assert np.array_equal(held, fp8 if rows <= quantized.FP8_PRODUCT_ROWS else dequantized)
    assert np.array_equal(np.asarray(quantized.matmul(x, quantized.QuantizedArray(q, scale))), dequantized)
    assert rel_err(fp8, dequantized) > 100 * FLOAT32_SUMS  # the activations' rounding is there to see


def test_hold_fp8_products_wraps_fp8_weights_only(rng):
    q, scale = _fp8_weight(rng)
    per_layer = quantized.QuantizedArray(PerLayer((q, q)), PerLayer((scale, scale)))
    held = quantized.hold_fp8_products(per_layer)
    assert isinstance(held, quantized.Fp8Products) and held.values.arrays[0] is q  # the same arrays, no copy
    stack = quantized.hold_fp8_products(quantized.QuantizedArray(jnp.stack([q, q]), jnp.stack([scale, scale])))
    assert isinstance(stack[1], quantized.Fp8Products)  # an expert of a stack stays FP8-multiplied
    int8 = quantized.QuantizedArray(jnp.zeros((4, 3), jnp.int8), jnp.ones((1, 3)))
    assert quantized.hold_fp8_products(int8) is int8
    dense = jnp.zeros((4, 3))
    assert quantized.hold_fp8_products(dense) is dense


@pytest.mark.parametrize("setting, platform, expected", [
    ("auto", "cpu", "dequantize"),   # a CPU emulates FP8 products
    ("fp8", "cpu", "fp8"),
    ("dequantize", "gpu", "dequantize"),
    ("fp8", "gpu", "fp8"),
])
def test_fp8_matmul_resolves_per_device(setting, platform, expected):
    assert backend._fp8_matmul(setting, platform) == expected


def test_fp8_matmul_fp8_without_fp8_weights_notes_it():
    chosen = backend.choose(RuntimeConfig.from_overrides(fp8_matmul="fp8", cpu_kernels="off"),
                            {"layer": {"kernel": jnp.zeros((4, 3))}}, 1)
    assert chosen.fp8_matmul == "fp8"
    chosen.hold({"layer": {"kernel": jnp.zeros((4, 3))}})
    assert chosen.stats(None)["fp8_matmul"] == "dequantize" and "no FP8 weights" in chosen.notes[-1]
    fp8_state = {"layer": {"kernel": quantized.QuantizedArray(*_fp8_weight(np.random.default_rng(0)))}}
    chosen = backend.choose(RuntimeConfig.from_overrides(fp8_matmul="fp8", cpu_kernels="off"), fp8_state, 1)
    held = chosen.hold(fp8_state)
    assert isinstance(held["layer"]["kernel"], quantized.Fp8Products) and chosen.stats(None)["fp8_matmul"] == "fp8"


def test_e4m3_products_of_the_reference_are_what_they_claim():
    """The numpy oracle itself: DeepSeek's block layout (one scale per 128 x 128 tile) and e4m3 values."""
    w = np.linspace(-1, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    q, scale = fp8_quantize_blocks(w)
    assert q.dtype == E4M3 and scale.shape == (3, 2)
    assert np.abs(fp8_dequantize_blocks(q, scale) - w).max() <= np.abs(w).max() * 2.0 ** -4


def test_the_speed_benchmark_reports_both_formulations():
    """benchmarks/bench_fp8.py speed --smoke (what a GPU lease runs at V3's shapes): its fields are the formulas."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_fp8.py")
    spec = importlib.util.spec_from_file_location("bench_fp8", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["speed", "--smoke", "--rows", "1", "8"])
    assert [(r["matmul"], r["rows"]) for r in rows] == [(m, n) for m in bench.SMOKE_SHAPES for n in (1, 8)]
    for r in rows:
        assert r["fp8_speedup"] == round(r["dequantize_ms"] / r["fp8_ms"], 3)
        assert r["fp8_weight_gb_per_s"] == round(r["in"] * r["out"] / r["fp8_ms"] / 1e6, 1)
