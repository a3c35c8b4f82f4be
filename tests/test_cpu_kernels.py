"""ktjax's C++ CPU matmul kernels (ktjax/cpu/csrc/matmul.cc) against numpy on the dequantized weight, row results
that do not depend on the batch, the model with and without them, and the setting's resolution."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ktjax
from ktjax.cpu import build as cpu_build
from ktjax.cpu import kernels as cpu_kernels
from ktjax.cpu import weights as cw
from ktjax.model import quantized as wq
from ktjax.errors import KtjaxError

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")  # built at first use, not at collection

# (format, int4 group): the stored formats the kernels read
QUANTIZED = [("int8", None), ("int4", 128), ("int4", 64), ("int4", 32)]
FORMATS = QUANTIZED + [("float32", None)]
# (K, N): K with a tail of < 16 inputs (int8) and not a multiple of the group (int4), N not a multiple of the
# 4-output block (and N under one block); the last two split over two threads; weight rows of 4 KiB or more
# (the last) are read 4 at a time even for one row of x
SHAPES = [(40, 3), (100, 7), (300, 4096 + 3), (4100, 1024 + 1)]


def _weight(rng, fmt, group, k, n):
    """(the weight held for the kernels, the same as weight_quant stores it, the float64 [K, N] both stand for)."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    if fmt == "float32":
        return cw.KernelOutIn(jnp.asarray(w.T)), jnp.asarray(w), w.astype(np.float64)
    values, scales = wq.quantize_weight(w, fmt, group or wq.INT4_GROUP)
    stored = wq.QuantizedArray(jnp.asarray(values), jnp.asarray(scales))
    assert cw.kernel_reads(stored.values, stored.scale)
    return cw.kernel_layout(stored), stored, wq.dequantize_weight_np(values, scales, k).astype(np.float64)


matmul = jax.jit(wq.matmul)


@pytest.mark.parametrize("fmt, group", FORMATS)
@pytest.mark.parametrize("k, n", SHAPES)
def test_kernels_match_numpy(rng, fmt, group, k, n):
    """y = x @ W within float32 summation error of the exact product: |err| <= (K + 2) u (|x| @ |W|), the bound
    for a sum of K products in float32 in any order (u = 2^-24; one more rounding for the scale)."""
    w, _, dense = _weight(rng, fmt, group, k, n)
    for rows in (1, 5, 16, wq.OUT_IN_ROWS - 1):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        assert "KtjaxMatmul" in matmul.lower(x, w).as_text(), "the kernel did not run"
        got = np.asarray(matmul(x, w), np.float64)
        exact = x.astype(np.float64) @ dense
        bound = (k + 2) * 2.0**-24 * (np.abs(x.astype(np.float64)) @ np.abs(dense))
        assert np.all(np.abs(got - exact) <= bound), (fmt, group, rows, float(np.max(np.abs(got - exact) - bound)))


@pytest.mark.parametrize("fmt, group", FORMATS)
def test_a_row_result_does_not_depend_on_its_batch(rng, fmt, group):
    """Each output is summed in one order whatever the batch and the thread that computes it: the server's rows
    give the bits a single request gives (its greedy tokens equal the CLI's)."""
    w, _, _ = _weight(rng, fmt, group, *SHAPES[-1])
    x = rng.standard_normal((16, SHAPES[-1][0])).astype(np.float32)
    batch = np.asarray(matmul(x, w))
    for i in (0, 7, 15):
        np.testing.assert_array_equal(np.asarray(matmul(x[i:i + 1], w))[0], batch[i])
    np.testing.assert_array_equal(np.asarray(matmul(x[3:8], w)), batch[3:8])


@pytest.mark.parametrize("fmt, group", QUANTIZED)
def test_more_rows_run_xla_on_the_held_weight(rng, fmt, group, monkeypatch):
    """More rows than cpu_kernels.MAX_ROWS (prefill chunks) take XLA's dot over the held [out, in] weight,
    dequantized in tiles of whole output rows (one tile; eight; and one again for a prime number of outputs,
    rather than thousands): within the same float32 bound of the exact product, with no transposed copy of the
    stored bytes."""
    k = SHAPES[2][0]
    x = rng.standard_normal((cpu_kernels.MAX_ROWS + 1, k)).astype(np.float32)
    for n, tiles in ((4096, 1), (4096, 8), (4099, 8)):
        w, _, dense = _weight(rng, fmt, group, k, n)
        d_in = w.values.shape[1] * (2 if fmt == "int4" else 1)
        monkeypatch.setattr(wq, "PREFILL_TILE_BYTES", 4 * d_in * -(-n // tiles))
        run = jax.jit(lambda x, w: wq.matmul(x, w))
        hlo = run.lower(x, w).as_text()
        assert "KtjaxMatmul" not in hlo and not re.search(r"transpose .*: \(tensor<[0-9x]*(i8|ui8)>", hlo)
        got = np.asarray(run(x, w), np.float64)
        exact = x.astype(np.float64) @ dense
        bound = (k + 2) * 2.0**-24 * (np.abs(x.astype(np.float64)) @ np.abs(dense))
        assert np.all(np.abs(got - exact) <= bound), (fmt, group, n, tiles)


def _weight_conversions(hlo: str) -> list[str]:
    """Instructions that convert an int8 / uint8 (int4) array to a float type: XLA's way into a dot (the cache is
    bf16 here, so nothing else is narrow)."""
    types = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (f32|bf16)\[[0-9,]*\]\S* convert\(%([^,)\s]+)", line)
        if m and types.get(m.group(2)) in ("s8", "u8"):
            found.append(line.strip()[:160])
    return found


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_engine_with_kernels_gives_the_xla_logits_and_tokens(hf_folder, tmp_path, rng, weights):
    """The tiny v2_lite model (lm_head int8 as well) with cpu_kernels on and off: logits through the cache in
    chunks of 4 tokens x 2 rows (kernel-sized) within float32 rounding, the same greedy tokens, Engine.model
    gives back the weights as stored, and the compiled decode step converts no int8 / int4 weight to float
    with the kernels (the same check finds XLA's conversions with them off)."""
    from flax import nnx

    from ktjax.weights.convert import main as convert_main

    src, _ = hf_folder("v2_lite")
    folder = str(tmp_path / weights)
    assert convert_main(["--hf-dir", src, "--out", folder, "--weights", weights, "--lm-head", "int8", "--quiet"]) == 0
    engines = {s: ktjax.load(folder, cpu_kernels=s, cache_dtype="float32", chunk_size=4) for s in ("on", "off")}
    held = [x for x in jax.tree.leaves(engines["on"].state, is_leaf=lambda x: isinstance(x, cw.KernelQuantized))
            if isinstance(x, cw.KernelQuantized)]
    assert engines["on"].backend.cpu_kernels and not engines["off"].backend.cpu_kernels and held
    ids = rng.integers(0, 97, size=(2, 12))
    np.testing.assert_allclose(engines["on"].cached_logits(ids), engines["off"].cached_logits(ids), rtol=1e-4,
                               atol=1e-4)
    out = {s: e.generate(ids.tolist(), max_new_tokens=6, temperature=0).tokens for s, e in engines.items()}
    assert out["on"] == out["off"]
    conversions = {s: _weight_conversions(next(p for key, p in e._compiled.items() if key[0] == "decode").as_text())
                   for s, e in engines.items()}
    assert conversions["on"] == [] and conversions["off"], conversions
    for a, b in zip(jax.tree.leaves(nnx.state(engines["on"].model)), jax.tree.leaves(nnx.state(engines["off"].model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("int8_activations", [False, True], ids=["float", "q8"])
@pytest.mark.parametrize("fmt, group", FORMATS)
def test_grouped_products_equal_each_groups_own_product(rng, fmt, group, int8_activations):
    """quantized.grouped_matmul (the routed experts' rows sorted by expert, every group by its own weight in one
    call) gives, bit for bit, what the single-weight kernel gives each group's rows alone (test_kernels_match_numpy
    holds that to numpy): groups empty, of one row, of more than cpu_kernels.MAX_ROWS rows, and rows past the
    groups' total (padding) as zeros; for int8 / int4 weights with float and int8 activations alike."""
    if int8_activations and fmt == "float32":
        pytest.skip("int8 activations apply to int8 / int4 weights")
    k, n = SHAPES[2]
    sizes = [3, 0, 1, cpu_kernels.MAX_ROWS + 6, 0, 17]
    weights = []
    for _ in sizes:
        w, _, _ = _weight(rng, fmt, group, k, n)
        weights.append(cw.KernelQuantized(w.values, w.scale, int8_activations) if fmt != "float32" else w)
    assert wq.grouped(weights)
    x = rng.standard_normal((sum(sizes) + 5, k)).astype(np.float32)
    run = jax.jit(lambda x, sizes, ws: wq.grouped_matmul(x, sizes, ws))
    group_sizes = jnp.asarray(sizes, jnp.int32)
    assert cpu_kernels.GROUPED_TARGET in run.lower(x, group_sizes, weights).as_text()
    got = np.asarray(run(x, group_sizes, weights))
    start = np.cumsum([0] + sizes)
    for e, w in enumerate(weights):
        rows = x[start[e]:start[e + 1]]
        if len(rows):
            alone = np.asarray(cw.kernel_matmul(rows, w) if fmt != "float32" else cpu_kernels.matmul(rows, w.values))
            np.testing.assert_array_equal(got[start[e]:start[e + 1]], alone, err_msg=f"group {e}")
    np.testing.assert_array_equal(got[start[-1]:], 0.0)


def _grouped_call(x, sizes, arrays, fmt, n):
    return jax.ffi.ffi_call(cpu_kernels.GROUPED_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(
        x, sizes, *arrays, format=np.int64(fmt), block=np.int64(cpu_kernels.Q8_BLOCK))


def _int8_weight(rng, k, n):
    w, _, _ = _weight(rng, "int8", None, k, n)
    return w.values, w.scale


# (case, call arguments from rng -> (x, sizes, arrays, format, n), what the error says): the handler refuses a
# malformed call before it reads a buffer (cpu_kernels.grouped_matmul builds valid ones)
GROUPED_REFUSALS = [
    ("unknown format", lambda rng: (np.ones((4, 40), np.float32), np.array([4], np.int32),
                                    [np.ones((3, 40), np.float32)], 7, 3), "unknown format"),
    ("negative size", lambda rng: (np.ones((4, 40), np.float32), np.array([3, -1], np.int32),
                                   [np.ones((3, 40), np.float32)] * 2, 0, 3), "negative group size"),
    ("sizes past the rows", lambda rng: (np.ones((4, 40), np.float32), np.array([3, 2], np.int32),
                                         [np.ones((3, 40), np.float32)] * 2, 0, 3), "exceed the rows"),
    ("one size past the rows", lambda rng: (np.ones((4, 40), np.float32), np.array([9], np.int32),
                                            [np.ones((3, 40), np.float32)], 0, 3), "exceed the rows"),
    ("weight count", lambda rng: (np.ones((4, 40), np.float32), np.array([2, 2], np.int32),
                                  [np.ones((3, 40), np.float32)], 0, 3), "one weight"),
    ("x width", lambda rng: (np.ones((4, 41), np.float32), np.array([4], np.int32),
                             [np.ones((3, 40), np.float32)], 0, 3), "x must be"),
    ("weight shapes differ", lambda rng: (np.ones((4, 40), np.float32), np.array([2, 2], np.int32),
                                          [np.ones((3, 40), np.float32), np.ones((2, 40), np.float32)], 0, 3),
     "type and shape"),
    ("weight types differ", lambda rng: (np.ones((4, 40), np.float32), np.array([2, 2], np.int32),
                                         [*_int8_weight(rng, 40, 3), np.ones((3, 40), np.float32),
                                          np.ones((3, 1), np.float32)], 1, 3), "type and shape"),
    ("int8 scales", lambda rng: (np.ones((4, 40), np.float32), np.array([4], np.int32),
                                 [_int8_weight(rng, 40, 3)[0], np.ones((3, 2), np.float32)], 1, 3), "type and shape"),
]


@pytest.mark.parametrize("case, make, message", GROUPED_REFUSALS, ids=[c[0] for c in GROUPED_REFUSALS])
def test_grouped_call_refuses_malformed_arguments(rng, case, make, message):
    cpu_build.require()
    x, sizes, arrays, fmt, n = make(rng)
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(_grouped_call(x, sizes, arrays, fmt, n))


def test_groups_in_kernel_wants_one_format_and_shape(rng):
    i8 = _weight(rng, "int8", None, 40, 3)[0]
    i4 = _weight(rng, "int4", 32, 64, 3)[0]
    f32 = _weight(rng, "float32", None, 40, 3)[0]
    assert wq.grouped([i8, i8]) and wq.grouped([f32, f32])
    for mixed in ([i8, i4], [i8, cw.KernelQuantized(i8.values, i8.scale, True)], [i8, f32],
                  [f32, _weight(rng, "float32", None, 40, 5)[0]], [f32, wq.OutIn(f32.values)]):
        assert not wq.grouped(mixed)


@pytest.mark.parametrize("int8_activations", [False, True], ids=["float", "q8"])
@pytest.mark.parametrize("fmt, group", [("int8", None), ("int4", 32), ("float32", None)])
def test_routed_experts_grouped_match_gather(rng, fmt, group, int8_activations):
    """moe.routed_experts with kernel-held PerExpert weights: `blocked` (one grouped call per weight, each expert's
    rows) against `gather` (one pair at a time through the single-weight kernel): the same products, so the same
    outputs up to the order in which a token's experts are added."""
    from ktjax.model import moe

    if int8_activations and fmt == "float32":
        pytest.skip("int8 activations apply to int8 / int4 weights")
    n_exp, d, f, t, k = 5, 64, 48, 9, 2

    def stack(d_in, d_out):
        held = []
        for _ in range(n_exp):
            w, _, _ = _weight(rng, fmt, group, d_in, d_out)
            held.append(cw.KernelQuantized(w.values, w.scale, int8_activations) if fmt != "float32" else w)
        return moe.PerExpert(tuple(held))

    experts = (stack(d, f), stack(d, f), stack(f, d))
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(n_exp - 1, size=k, replace=False) for _ in range(t)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)
    run = jax.jit(moe.routed_experts, static_argnums=4)
    assert cpu_kernels.GROUPED_TARGET in run.lower(x, weights, idx, experts, "blocked").as_text()
    grouped = np.asarray(run(x, weights, idx, experts, "blocked"))
    gathered = np.asarray(run(x, weights, idx, experts, "gather"))
    np.testing.assert_allclose(grouped, gathered, rtol=1e-5, atol=1e-5 * np.abs(gathered).max())


@pytest.mark.parametrize("in_out", [True, False], ids=["w_uk", "w_uv"])
@pytest.mark.parametrize("heads, k, n", [(3, 40, 85), (4, 128, 515)])
def test_per_head_products_match_numpy(rng, in_out, heads, k, n):
    """quantized.per_head through the kernel (a KernelHeads weight, [in, out] per head as w_uk is stored or
    [out, in] as w_uv is): within the float32 bound of the exact product for 1, 5 and 16 rows, outputs past the
    kernel's groups of 64 included (the second shape splits over two threads), and a row's result does not depend
    on its batch."""
    w = rng.standard_normal((heads, k, n) if in_out else (heads, n, k)).astype(np.float32)
    dense = (w if in_out else np.swapaxes(w, 1, 2)).astype(np.float64)  # [h, k, n]
    held = cw.KernelHeads(jnp.asarray(w))
    run = jax.jit(lambda x, w: wq.per_head(x, w, in_out))
    for rows in (1, 5, 16):
        x = rng.standard_normal((rows, 1, heads, k)).astype(np.float32)
        assert cpu_kernels.HEADS_TARGET in run.lower(x, held).as_text(), "the kernel did not run"
        got = np.asarray(run(x, held), np.float64)
        exact = np.einsum("bshk,hkn->bshn", x.astype(np.float64), dense)
        bound = (k + 2) * 2.0**-24 * np.einsum("bshk,hkn->bshn", np.abs(x.astype(np.float64)), np.abs(dense))
        assert np.all(np.abs(got - exact) <= bound), (rows, float(np.max(np.abs(got - exact) - bound)))
    batch = np.asarray(run(x, held))
    for i in (0, 9, 15):
        np.testing.assert_array_equal(np.asarray(run(x[i:i + 1], held))[0], batch[i])


def test_float32_engine_with_kernels_gives_the_xla_logits_and_tokens(hf_folder, rng):
    """The tiny v2_lite model in float32 with cpu_kernels on (matmul weights held [out, in], KernelOutIn) and off:
    logits through the cache in chunks of 4 tokens x 2 rows within float32 rounding, the same greedy tokens, the
    decode step's matmuls and per-head products (w_uk, w_uv) in the kernels, and Engine.model gives back the
    weights as stored."""
    from flax import nnx

    src, _ = hf_folder("v2_lite")
    engines = {s: ktjax.load(src, cpu_kernels=s, cache_dtype="float32", chunk_size=4) for s in ("on", "off")}
    ids = rng.integers(0, 97, size=(2, 12))
    np.testing.assert_allclose(engines["on"].cached_logits(ids), engines["off"].cached_logits(ids), rtol=1e-4,
                               atol=1e-4)
    out = {s: e.generate(ids.tolist(), max_new_tokens=6, temperature=0).tokens for s, e in engines.items()}
    assert out["on"] == out["off"]
    decode = {s: next(p for key, p in e._compiled.items() if key[0] == "decode").as_text() for s, e in engines.items()}
    assert cpu_kernels.TARGETS[np.dtype(np.float32)] in decode["on"]
    assert cpu_kernels.TARGETS[np.dtype(np.float32)] not in decode["off"]
    assert cpu_kernels.HEADS_TARGET in decode["on"] and cpu_kernels.HEADS_TARGET not in decode["off"]
    for a, b in zip(jax.tree.leaves(nnx.state(engines["on"].model)), jax.tree.leaves(nnx.state(engines["off"].model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_setting_resolution(tmp_path, hf_folder, monkeypatch):
    """auto holds a float32 model's 2-D matmul weights for the kernels (KernelOutIn), builds nothing where
    nothing would use them (bf16 weights under attention xla), and runs XLA, with a note, where the kernels
    cannot be built; on refuses, with the reason; off never builds them."""
    from ktjax.weights.convert import main as convert_main

    src, _ = hf_folder("v2_lite")
    float_model = ktjax.load(src, cpu_kernels="auto")
    assert float_model.backend.cpu_kernels and float_model.attention == "cpu"
    held = jax.tree.leaves(float_model.state, is_leaf=lambda x: isinstance(x, (cw.KernelQuantized, cw.KernelOutIn)))
    assert not any(isinstance(x, cw.KernelQuantized) for x in held)
    assert any(isinstance(x, cw.KernelOutIn) and x.values.dtype == jnp.float32 for x in held)
    # nothing would use them
    assert not ktjax.load(src, cpu_kernels="auto", attention="xla", dtype="bfloat16").backend.cpu_kernels
    folder = str(tmp_path / "int8")
    assert convert_main(["--hf-dir", src, "--out", folder, "--weights", "int8", "--quiet"]) == 0
    monkeypatch.setattr(cpu_build, "available", lambda: "cpu_kernels: no C++ compiler found")
    engine = ktjax.load(folder, cpu_kernels="auto")
    assert not engine.backend.cpu_kernels and engine.attention == "xla"
    assert any("no C++ compiler" in n for n in engine.notes)

    def refuse():
        raise KtjaxError("cpu_kernels: no C++ compiler found")
    monkeypatch.setattr(cpu_build, "require", refuse)
    with pytest.raises(KtjaxError, match=r"no C\+\+ compiler"):
        ktjax.load(folder, cpu_kernels="on")
    assert not ktjax.load(folder, cpu_kernels="off").backend.cpu_kernels


def _failing_compiler(tmp_path):
    script = tmp_path / "broken-c++"
    script.write_text("#!/bin/sh\necho 'fatal error: no headers here' >&2\nexit 1\n")
    script.chmod(0o755)
    return str(script)


# (what is wrong, the environment it makes, what the message says)
BUILD_FAILURES = [
    ("no compiler", lambda tmp: {"CXX": str(tmp / "no-such-compiler")}, r"no C\+\+ compiler found"),
    ("the compiler fails", lambda tmp: {"CXX": _failing_compiler(tmp)}, r"(?s)compiling matmul.cc and attention.cc failed.*no headers here"),
    ("the kernel folder is a file", lambda tmp: {"KTJAX_KERNEL_DIR": str(tmp / "a-file" / "kernels")},
     r"cannot write"),
]


@pytest.mark.parametrize("case, env, message", BUILD_FAILURES, ids=[c[0] for c in BUILD_FAILURES])
def test_a_build_that_cannot_work_says_why(monkeypatch, tmp_path, case, env, message):
    """One KtjaxError with the reason (cpu_kernels on turns it into exit 2; auto into a note and XLA's dot), and
    nothing left behind in the kernel folder."""
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("KTJAX_KERNEL_DIR", str(tmp_path / "kernels"))
    for key, value in env(tmp_path).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(KtjaxError, match=message) as e:
        cpu_build.build()
    assert "Traceback" not in str(e.value)
    kernels = tmp_path / "kernels"
    assert not kernels.exists() or list(kernels.iterdir()) == []
