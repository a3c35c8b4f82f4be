"""ktjax's C++ CPU matmul kernels (ktjax/csrc/matmul.cc) against numpy on the dequantized weight, row results
that do not depend on the batch, the model with and without them, and the setting's resolution."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import ktjax
from ktjax import cpu_kernels
from ktjax import weight_quant as wq
from ktjax.errors import KtjaxError

pytestmark = pytest.mark.skipif(cpu_kernels.available() is not None, reason=f"{cpu_kernels.available()}")

# (format, int4 group): every stored format the kernels read
FORMATS = [("float32", None), ("bfloat16", None), ("int8", None), ("int4", 128), ("int4", 64), ("int4", 32)]
# (K, N): N with a tail of < 16 outputs, N split over two threads, K not a multiple of the int4 group
SHAPES = [(96, 1000 + 7), (300, 4096 + 16 + 3)]


def _weight(rng, fmt, group, k, n):
    """(the weight as weight_quant.matmul takes it, the float64 [K, N] it stands for)."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    if fmt == "float32":
        return jnp.asarray(w), w.astype(np.float64)
    if fmt == "bfloat16":
        b = w.astype(ml_dtypes.bfloat16)
        return jnp.asarray(b), b.astype(np.float64)
    values, scales = wq.quantize(w, fmt, group or wq.INT4_GROUP)
    dense = wq.dequantize_np(values, scales, k).astype(np.float64)
    return wq.QuantizedArray(jnp.asarray(values), jnp.asarray(scales)), dense


def _kernel_matmul(x, w):
    with wq.cpu_kernels(True):
        return wq.matmul(x, w)


@pytest.mark.parametrize("fmt, group", FORMATS)
@pytest.mark.parametrize("k, n", SHAPES)
def test_kernels_match_numpy(rng, fmt, group, k, n):
    """y = x @ W within float32 summation error of the exact product: |err| <= K u (|x| @ |W|), the bound for
    a sum of K products in float32 (u = 2^-24; int4 sums each group then scales it, the same bound)."""
    w, dense = _weight(rng, fmt, group, k, n)
    for rows in (1, 5, 16):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        fn = jax.jit(_kernel_matmul)
        assert "KtjaxMatmul" in fn.lower(x, w).as_text(), "the kernel did not run"
        got = np.asarray(fn(x, w), np.float64)
        exact = x.astype(np.float64) @ dense
        bound = (k + 2) * 2.0**-24 * (np.abs(x.astype(np.float64)) @ np.abs(dense))
        assert np.all(np.abs(got - exact) <= bound), (fmt, group, rows, float(np.max(np.abs(got - exact) - bound)))


@pytest.mark.parametrize("fmt, group", FORMATS)
def test_a_row_result_does_not_depend_on_its_batch(rng, fmt, group):
    """Each output is summed in one order whatever the batch and the split over threads: the server's rows
    give the bits a single request gives (greedy tokens equal the CLI's)."""
    k, n = SHAPES[1]
    w, _ = _weight(rng, fmt, group, k, n)
    x = rng.standard_normal((16, k)).astype(np.float32)
    fn = jax.jit(_kernel_matmul)
    batch = np.asarray(fn(x, w))
    for i in (0, 7, 15):
        np.testing.assert_array_equal(np.asarray(fn(x[i:i + 1], w))[0], batch[i])
    np.testing.assert_array_equal(np.asarray(fn(x[3:8], w)), batch[3:8])


def test_rows_past_the_limit_run_xla(rng):
    """More rows than cpu_kernels.MAX_ROWS (prefill chunks) go to XLA's dot."""
    w, _ = _weight(rng, "int8", None, 64, 128)
    x = rng.standard_normal((cpu_kernels.MAX_ROWS + 1, 64)).astype(np.float32)
    assert "KtjaxMatmul" not in jax.jit(_kernel_matmul).lower(x, w).as_text()


@pytest.mark.parametrize("weights", ["float32", "int8", "int4"])
def test_engine_with_kernels_gives_the_xla_logits_and_tokens(hf_folder, tmp_path, rng, weights):
    """The tiny v2_lite model (lm_head int8 as well) with cpu_kernels on and off: logits through the cache in
    chunks of 4 tokens x 2 rows (kernel-sized) within float32 rounding, and the same greedy tokens."""
    from ktjax.convert import main as convert_main

    src, _ = hf_folder("v2_lite")
    folder = str(tmp_path / weights)
    assert convert_main(["--hf-dir", src, "--out", folder, "--weights", weights, "--lm-head", "int8", "--quiet"]) == 0
    engines = {s: ktjax.load(folder, cpu_kernels=s, cache_dtype="float32", chunk_size=4) for s in ("on", "off")}
    assert engines["on"].cpu_kernels and not engines["off"].cpu_kernels
    ids = rng.integers(0, 97, size=(2, 12))
    np.testing.assert_allclose(engines["on"].cached_logits(ids), engines["off"].cached_logits(ids), rtol=1e-4,
                               atol=1e-4)
    out = {s: e.generate(ids.tolist(), max_new_tokens=6, temperature=0).tokens for s, e in engines.items()}
    assert out["on"] == out["off"]


def test_setting_resolution(hf_folder, monkeypatch):
    """auto runs XLA's dot, with a note, where the kernels cannot be built; on refuses, with the reason."""
    folder, _ = hf_folder("v2_lite")
    monkeypatch.setattr(cpu_kernels, "available", lambda: "cpu_kernels: no C++ compiler found")
    engine = ktjax.load(folder, cpu_kernels="auto")
    assert not engine.cpu_kernels and any("no C++ compiler" in n for n in engine.notes)

    def refuse():
        raise KtjaxError("cpu_kernels: no C++ compiler found")
    monkeypatch.setattr(cpu_kernels, "require", refuse)
    with pytest.raises(KtjaxError, match=r"no C\+\+ compiler"):
        ktjax.load(folder, cpu_kernels="on")
    assert not ktjax.load(folder, cpu_kernels="off").cpu_kernels


def test_build_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("KTJAX_KERNEL_DIR", str(tmp_path / "kernels"))
    with pytest.raises(KtjaxError, match=r"no C\+\+ compiler found"):
        cpu_kernels.build()
    assert not (tmp_path / "kernels").exists()
