"""Pallas MLA kernels (interpret mode on the CPU) against their jnp references, on every cache format.

KTJAX_PALLAS_COMPILED=1 runs the same tests with the kernels compiled for the GPU (interpret=False; skipped
without one), with float32 XLA dots at full precision so that the references stay float32
(benchmarks/gpu_check.sh sets it).

Outputs are poisoned: the kernel writes into NaN-filled buffers (input_output_aliases), so an element it
never writes turns the merged result into NaN and fails the comparison.
"""
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ktjax.kv import attention
from ktjax.kv import formats as cf
from ktjax import pallas
from ktjax.kv import quant
from ktjax.kv.cache import LatentCache
from ktjax.pallas import layout as kl
from ktjax.pallas.backend import ATTENTION as PALLAS_ATTENTION
from ktjax.pallas import mla_kernels as kernels
from ktjax.pallas import platform
from pallas_mode import COMPILED, INTERPRET, kernel_test_context, run_jitted, skip_without_gpu
from triton_ir import triton_modules

FORMATS = ["float32", "bf16", "fp8", "int8", "int4"]
# float32 kernels against the float32 reference: same math, different summation order.
F32_TOL = dict(rtol=1e-5, atol=1e-5)
ROPE = 8
BLOCK = 16          # the XLA reference's tile; cache lengths are multiples of it
pytestmark = skip_without_gpu


@pytest.fixture(autouse=True)
def _kernel_test_context():
    with kernel_test_context():
        yield


def make_cache(rng, fmt, batch, cache_len, rank, rope=ROPE):
    """A random cache written through kv.quant.quantize: (c_kv stored, scales or None, k_pe)."""
    c_kv = jnp.asarray(rng.normal(size=(batch, cache_len, rank)), jnp.float32)
    stored, scales = quant.quantize(fmt, c_kv)
    k_pe = jnp.asarray(rng.normal(size=(batch, cache_len, rope)), jnp.float32).astype(fmt.k_pe_dtype)
    return stored, scales, k_pe


def make_queries(rng, lead, rank, rope=ROPE, dtype=jnp.float32):
    q_lat = jnp.asarray(rng.normal(size=(*lead, rank)), jnp.float32).astype(dtype)
    q_pe = jnp.asarray(rng.normal(size=(*lead, rope)), jnp.float32).astype(dtype)
    return q_lat, q_pe


def softmax_scale(rank, rope=ROPE):
    return float((rank + rope) ** -0.5)


def run_decode(fmt, q_lat, q_pe, cache, lengths, *, num_splits, block_k=16, **kw):
    config = pallas.KernelConfig(block_k=block_k, num_splits=num_splits)

    def kernel(q_lat, q_pe, c_kv, scales, k_pe, lengths):
        return pallas.mla_decode(q_lat, q_pe, c_kv, scales, k_pe, lengths, fmt=fmt, scale=softmax_scale(q_lat.shape[-1]),
                                 block=BLOCK, config=config, interpret=INTERPRET, poison_outputs=True, **kw)

    return run_jitted(kernel, q_lat, q_pe, *cache, lengths)


def reference_decode(fmt, q_lat, q_pe, cache, lengths):
    return attention.mla_decode_xla(q_lat.astype(jnp.float32), q_pe.astype(jnp.float32), *cache, lengths, fmt=fmt,
                                    scale=softmax_scale(q_lat.shape[-1]), block=BLOCK)


# ------------------------------------------------------------------------------------------------ decode

@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("rank", [20, 256])
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_decode_matches_reference(rng, fmt_name, rank, num_splits):
    """Ragged batch, lengths off the tile grid (1, 37, full); rank 20 pads (and re-packs int4), 256 fits as is."""
    fmt = cf.resolve_format(fmt_name)
    cache = make_cache(rng, fmt, 3, 64, rank)
    q_lat, q_pe = make_queries(rng, (3, 4), rank)
    lengths = jnp.array([1, 37, 64], jnp.int32)
    out = run_decode(fmt, q_lat, q_pe, cache, lengths, num_splits=num_splits)
    np.testing.assert_allclose(out, reference_decode(fmt, q_lat, q_pe, cache, lengths), **F32_TOL)


@pytest.mark.parametrize("fmt_name", ["fp8", "int8", "int4"])
def test_decode_short_last_group(rng, fmt_name):
    """rank 200: the last scale group is shorter (72 of 128, 8 of 64); many heads span two row blocks."""
    fmt = cf.resolve_format(fmt_name)
    cache = make_cache(rng, fmt, 2, 48, 200)
    q_lat, q_pe = make_queries(rng, (2, 20), 200)
    lengths = jnp.array([48, 17], jnp.int32)
    config = pallas.KernelConfig(block_m=16, block_k=16, num_splits=2)
    out = run_jitted(lambda *a: pallas.mla_decode(*a, fmt=fmt, scale=softmax_scale(200), block=BLOCK, config=config,
                                                  interpret=INTERPRET, poison_outputs=True), q_lat, q_pe, *cache, lengths)
    np.testing.assert_allclose(out, reference_decode(fmt, q_lat, q_pe, cache, lengths), **F32_TOL)


def test_decode_default_config(rng):
    """No KernelConfig: tiles and splits chosen by the wrapper."""
    fmt = cf.resolve_format("int8")
    cache = make_cache(rng, fmt, 2, 96, 32)
    q_lat, q_pe = make_queries(rng, (2, 3), 32)
    lengths = jnp.array([96, 50], jnp.int32)
    out = run_jitted(lambda *a: pallas.mla_decode(*a, fmt=fmt, scale=0.2, block=BLOCK, interpret=INTERPRET,
                                                  poison_outputs=True), q_lat, q_pe, *cache, lengths)
    ref = attention.mla_decode_xla(q_lat, q_pe, *cache, lengths, fmt=fmt, scale=0.2, block=BLOCK)
    np.testing.assert_allclose(out, ref, **F32_TOL)


@pytest.mark.parametrize("wide, fmt_name, queries, tiles", [
    (True, "bf16", jnp.bfloat16, (64, 64, 8)),      # Hopper: the H200 sweep's tiling
    (True, "int8", jnp.bfloat16, (64, 64, 8)),
    (True, "int4", jnp.bfloat16, (64, 32, 8)),
    (True, "float32", jnp.bfloat16, (64, 32, 8)),   # a float32 tile of 64 keys would not fit twice
    (True, "bf16", jnp.float32, (32, 32, 8)),       # float32 queries: 32 rows
    (False, "bf16", jnp.bfloat16, (32, 32, 8)),     # less shared memory (A100, RTX): the narrow tiles
])
def test_default_tiling_per_device_and_format(monkeypatch, wide, fmt_name, queries, tiles):
    monkeypatch.setattr(platform, "wide_tiles", lambda: wide)
    fmt = cf.resolve_format(fmt_name)
    pick = lambda config=pallas.KernelConfig(), cache_len=131072: kernels.kernel_config(  # noqa: E731
        config, rows=128, batch=1, cache_len=cache_len, rank_p=512, fmt=fmt, dot_dtype=queries)
    cfg = pick()
    assert (cfg.block_m, cfg.block_k, cfg.num_warps, cfg.num_stages) == (*tiles, 2)
    assert pick(cache_len=48).block_k == 16                       # the key tile divides the cache
    assert pick(pallas.KernelConfig(block_m=16, block_k=16, num_warps=4)).block_m == 16   # a given config wins


def test_decode_fp8_decoded_from_bits(rng):
    """The path for GPUs before Ada: e4m3 decoded from its bits by integer arithmetic."""
    fmt = cf.resolve_format("fp8")
    cache = make_cache(rng, fmt, 2, 64, 256)
    q_lat, q_pe = make_queries(rng, (2, 4), 256)
    lengths = jnp.array([64, 29], jnp.int32)
    out = run_decode(fmt, q_lat, q_pe, cache, lengths, num_splits=3, fp8_bits=True)
    np.testing.assert_allclose(out, reference_decode(fmt, q_lat, q_pe, cache, lengths), **F32_TOL)


def test_e4m3_bit_decode_exact():
    """Every finite e4m3 bit pattern (normals, subnormals, signed zeros) decodes to its exact value."""
    bits = np.array([b for b in range(256) if b & 0x7F != 0x7F], np.uint8)  # 0x7F / 0xFF are NaN
    expected = bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(kernels.decode_e4m3_bits(jnp.asarray(bits))), expected)


def test_decode_bf16_queries_run_bf16_dots(rng):
    """bf16 queries take the tensor-core path (bf16 operands, f32 accumulation): bf16-level agreement."""
    fmt = cf.resolve_format("bf16")
    cache = make_cache(rng, fmt, 2, 64, 64)
    q_lat, q_pe = make_queries(rng, (2, 4), 64, dtype=jnp.bfloat16)
    lengths = jnp.array([64, 23], jnp.int32)
    out = run_decode(fmt, q_lat, q_pe, cache, lengths, num_splits=2)
    ref = reference_decode(fmt, q_lat, q_pe, cache, lengths)
    # p is rounded to bf16 (8 bits) before p @ c_kv; outputs are averages of O(1) values.
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------- prefill

@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_prefill_matches_reference(rng, fmt_name, num_splits):
    """A chunk of 5 queries per sequence at different offsets, causal by position; one query sees nothing
    (position -1) and one sits past its sequence's length."""
    fmt = cf.resolve_format(fmt_name)
    rank = 20 if num_splits == 1 else 128
    cache = make_cache(rng, fmt, 2, 64, rank)
    q_lat, q_pe = make_queries(rng, (2, 5, 4), rank)
    q_positions = jnp.array([[0, 1, 2, 3, -1], [30, 31, 32, 33, 40]], jnp.int32)
    lengths = jnp.array([4, 34], jnp.int32)
    config = pallas.KernelConfig(block_m=16, block_k=16, num_splits=num_splits)  # 20 rows: 2 row blocks
    scale = softmax_scale(rank)
    out = run_jitted(lambda *a: pallas.mla_prefill(*a, fmt=fmt, scale=scale, block=BLOCK, config=config,
                                                   interpret=INTERPRET, poison_outputs=True),
                     q_lat, q_pe, *cache, q_positions, lengths)
    ref = attention.mla_prefill_xla(q_lat, q_pe, *cache, q_positions, lengths, fmt=fmt, scale=scale, block=BLOCK)
    np.testing.assert_allclose(out, ref, **F32_TOL)
    assert not np.any(np.asarray(out[0, 4]))  # the row that sees nothing is 0


# ----------------------------------------------------------------------- the cache's choice of attention

@pytest.mark.parametrize("fmt_name", ["bf16", "fp8", "int4"])
def test_cache_attends_alike_through_pallas_and_xla(rng, fmt_name):
    """The cache holds narrow floats as their bits (formats.container): both paths read them back."""
    fmt = cf.resolve_format(fmt_name)
    layer = make_cache(rng, fmt, 2, 32, 24)
    caches = {path: LatentCache(*(None if x is None else quant.to_bits(x)[None] for x in layer), fmt=fmt, rank=24,
                                block=BLOCK, attention=kernel)
              for path, kernel in (("pallas", PALLAS_ATTENTION), ("xla", None))}
    lengths = jnp.array([32, 9], jnp.int32)
    scale = softmax_scale(24)
    for q_positions in (jnp.array([[31], [8]], jnp.int32), jnp.array([[30, 31], [7, 8]], jnp.int32)):  # decode, prefill
        q_lat, q_pe = make_queries(rng, (2, q_positions.shape[1], 4), 24)
        out = {path: c.attend_latent(0, q_lat, q_pe, q_positions, lengths, scale=scale) for path, c in caches.items()}
        np.testing.assert_allclose(out["pallas"], out["xla"], **F32_TOL)


@pytest.mark.skipif(COMPILED, reason="compiled kernels give no interpret-mode notice")
def test_interpret_notice_once(rng):
    fmt = cf.resolve_format("float32")
    cache = make_cache(rng, fmt, 1, 16, 16)
    q_lat, q_pe = make_queries(rng, (1, 2), 16)
    platform.warn_interpreted_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            pallas.mla_decode(q_lat, q_pe, *cache, jnp.array([16]), fmt=fmt, scale=0.25, block=BLOCK)
    notices = [w for w in caught if issubclass(w.category, platform.InterpretModeWarning)]
    assert len(notices) == 1 and "interpret mode" in str(notices[0].message)


# ------------------------------------------------------------------------------------------ merge, plans

def test_merge_splits_empty_split_and_poison():
    o = jnp.array([[[[2.0, 4.0]], [[0.0, 0.0]]]])           # [b=1, splits=2, rows=1, R=2]
    m = jnp.array([[[0.5], [kernels.NEG]]])
    l = jnp.array([[[2.0], [0.0]]])
    np.testing.assert_allclose(kernels.merge_splits(o, m, l), [[[1.0, 2.0]]])
    # A row with no keys anywhere is 0; an unwritten (NaN) partial is never masked, even with weight 0.
    np.testing.assert_array_equal(kernels.merge_splits(o * 0, m * 0 + kernels.NEG, l * 0), [[[0.0, 0.0]]])
    assert np.isnan(kernels.merge_splits(o.at[0, 1].set(jnp.nan), m, l)).all()
    assert np.isnan(kernels.merge_splits(o, m, l.at[0, 1].set(jnp.nan))).all()


def test_num_splits_fill_the_gpu_but_stay_long():
    assert kernels.choose_num_splits(programs_per_split=2, cache_len=131072, cores=132) == 132
    assert kernels.choose_num_splits(programs_per_split=128, cache_len=131072, cores=132) == 3
    assert kernels.choose_num_splits(programs_per_split=2, cache_len=4096, cores=132) == 16
    assert kernels.choose_num_splits(programs_per_split=1, cache_len=64, cores=132) == 1


def test_deepseek_rank_needs_no_copy():
    """R = 512: every format's stored layout is the kernel's layout (no padding, no int4 re-pack)."""
    for name in FORMATS:
        fmt = cf.resolve_format(name)
        lay = kl.latent_layout(fmt, 512)
        assert (lay.rank_p, lay.width_p, lay.n_groups_p, lay.repack_int4) == (
            512, fmt.stored_width(512), fmt.n_groups(512), False)
    int4 = kl.latent_layout(cf.resolve_format("int4"), 512)
    assert [(c.col, c.part, c.group, c.out) for c in int4.chunks[:4]] == [
        (0, "low", 0, 0), (0, "high", 4, 256), (64, "low", 1, 64), (64, "high", 5, 320)]


# ------------------------------------------------------------------------- Triton lowering (no GPU needed)

def _lower_for_cuda(fmt, *, rank=512, rope=64, heads=16, batch=2, cache_len=1024, dtype=jnp.bfloat16, **kw):
    """Lower a decode call for CUDA on this CPU and return the Triton modules it produced (verified)."""
    shapes = [jax.ShapeDtypeStruct((batch, heads, rank), dtype), jax.ShapeDtypeStruct((batch, heads, rope), dtype),
              jax.ShapeDtypeStruct((batch, cache_len, fmt.stored_width(rank)), fmt.store_dtype),
              jax.ShapeDtypeStruct((batch, cache_len, fmt.n_groups(rank)), jnp.float32) if fmt.quantized else None,
              jax.ShapeDtypeStruct((batch, cache_len, rope), fmt.k_pe_dtype),
              jax.ShapeDtypeStruct((batch,), jnp.int32)]
    fn = jax.jit(lambda *a: pallas.mla_decode(*a, fmt=fmt, scale=0.1, block=512, interpret=False, **kw))
    return triton_modules(fn, *shapes)


@pytest.mark.parametrize("fmt_name, fp8_bits", [(name, False) for name in FORMATS] + [("fp8", True)])
def test_lowers_to_valid_triton_ir(fmt_name, fp8_bits):
    """Each format lowers to Triton IR that passes MLIR verification (power-of-two tensors, dot types).
    Compiling it with Triton and running it needs a GPU; see the GPU checklist in the report."""
    pytest.importorskip("jax._src.pallas.triton.lowering")
    fmt = cf.resolve_format(fmt_name)
    config = pallas.KernelConfig(num_splits=4)
    modules = _lower_for_cuda(fmt, config=config, fp8_bits=fp8_bits)
    assert len(modules) == 1 and modules[0].operation.verify()
    if fmt_name == "fp8":
        assert ("f8E4M3FN" in str(modules[0])) != fp8_bits  # the pre-Ada path never touches the fp8 type
