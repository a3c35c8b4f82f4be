"""The Mosaic GPU decode kernel (ktjax/pallas/mosaic.py) in Mosaic GPU interpret mode against the XLA reference
(compiled on a Hopper GPU with KTJAX_PALLAS_COMPILED=1, as benchmarks/gpu_check.py runs it).

Interpret mode runs the kernel body on the CPU (TMA copies, barriers, wgmma as numpy matmuls); what it cannot
check (layouts, swizzling, the transposed wgmma operand, speed) is listed in the module's docstring.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.kv.attention import mla_decode_xla
from ktjax.kv.formats import FORMATS
from ktjax.pallas import mosaic
from ktjax.pallas.mla_kernels import choose_num_splits
from ktjax.pallas.mosaic import mla_decode_mosaic, smem_bytes
from pallas_mode import INTERPRET, skip_without_gpu

pytestmark = [skip_without_gpu, pytest.mark.skipif(not INTERPRET and not mosaic.supported(),
                                                   reason="compiled, the Mosaic kernel needs compute capability 9.0")]

BF16 = FORMATS["bf16"]


def _inputs(rng, *, batch: int, heads: int, rank: int, rope: int, cache_len: int, dtype=jnp.bfloat16):
    """bf16 queries and cache, as the kernel's tensor cores see them (the reference then sees the same numbers)."""
    def normal(*shape, dt=jnp.bfloat16):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dt)

    return (normal(batch, heads, rank), normal(batch, heads, rope),
            normal(batch, cache_len, rank, dt=dtype), normal(batch, cache_len, rope, dt=dtype))


def _numpy_reference(q_lat, q_pe, c_kv, k_pe, lengths, *, scale: float):
    """The math, in float64: softmax over keys [0, lengths[b]) of (q_lat . c_kv + q_pe . k_pe) * scale, @ c_kv."""
    q_lat, q_pe, c_kv, k_pe = (np.asarray(x, np.float64) for x in (q_lat, q_pe, c_kv, k_pe))
    scores = (np.einsum("bhc,btc->bht", q_lat, c_kv) + np.einsum("bhr,btr->bht", q_pe, k_pe)) * scale
    visible = np.arange(c_kv.shape[1])[None, None, :] < np.asarray(lengths)[:, None, None]
    scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bht,btc->bhc", p / p.sum(-1, keepdims=True), c_kv)


def _reference(q_lat, q_pe, c_kv, k_pe, lengths, *, scale: float):
    """mla_decode_xla, the project's reference; it walks the cache in whole blocks (T % block == 0), so a
    cache of another length is checked against the math instead."""
    if c_kv.shape[1] % 64:
        return _numpy_reference(q_lat, q_pe, c_kv, k_pe, lengths, scale=scale)
    return np.asarray(mla_decode_xla(q_lat, q_pe, c_kv, None, k_pe, lengths, fmt=BF16, scale=scale, block=64))


def _check(rng, *, heads: int, rank: int, lengths, cache_len: int, num_splits, rope: int = 64, block_k: int = 32,
           interpret=INTERPRET):
    q_lat, q_pe, c_kv, k_pe = _inputs(rng, batch=len(lengths), heads=heads, rank=rank, rope=rope,
                                      cache_len=cache_len)
    lengths = jnp.asarray(lengths, jnp.int32)
    scale = (rank + rope) ** -0.5
    out = np.asarray(mla_decode_mosaic(q_lat, q_pe, c_kv, k_pe, lengths, scale=scale, block_k=block_k,
                                       num_splits=num_splits, interpret=interpret))
    ref = _reference(q_lat, q_pe, c_kv, k_pe, lengths, scale=scale)
    assert out.shape == ref.shape == (len(lengths), heads, rank) and out.dtype == np.float32
    assert np.isfinite(out).all()  # interpret mode fills unwritten memory with NaN
    # Scores and sums are float32 over exact bf16 products on both sides; the kernel alone rounds the
    # probabilities to bf16 (relative error <= 2^-9) before p @ c_kv. The output is a convex combination of
    # c_kv rows, so that rounding moves it by at most 2^-9 * max|c_kv|; twice that leaves room for float32
    # summation order.
    atol = 2.0 ** -8 * float(jnp.max(jnp.abs(c_kv.astype(jnp.float32))))
    np.testing.assert_allclose(out, ref, rtol=0, atol=atol)


@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_real_widths_v2_lite_heads(rng, num_splits):
    """DeepSeek's R = 512, r = 64 with V2-Lite's 16 heads (padded to a 64-row wgmma), ragged rows."""
    _check(rng, heads=16, rank=512, lengths=[37, 200], cache_len=256, num_splits=num_splits)


def test_real_widths_v3_heads(rng):
    """V3's 128 heads: two head blocks, each with two value blocks of 256 channels."""
    _check(rng, heads=128, rank=512, lengths=[37, 200], cache_len=256, num_splits=2)


def test_partial_head_block_and_empty_splits(rng):
    """80 heads (a padded second head block), a cache length that is no multiple of the tile (padded), a
    row of one key and a full row, and more splits than tiles (empty splits must weigh nothing)."""
    _check(rng, heads=80, rank=128, lengths=[1, 250], cache_len=250, num_splits=8, block_k=16)


@pytest.mark.skipif(not INTERPRET, reason="interpret mode's race detector")
def test_double_buffer_has_no_races(rng):
    """Interpret mode's race detector over the TMA copies into the two key-tile buffers and their readers."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    _check(rng, heads=16, rank=128, lengths=[100, 200], cache_len=256, num_splits=2,
           interpret=InterpretGPUParams(detect_races=True))
    assert not get_races().races_found


@pytest.mark.parametrize("fmt_dtype", [jnp.float32, jnp.float8_e4m3fn])
def test_other_cache_formats_are_not_implemented(rng, fmt_dtype):
    q_lat, q_pe, c_kv, k_pe = _inputs(rng, batch=1, heads=16, rank=128, rope=64, cache_len=64, dtype=fmt_dtype)
    with pytest.raises(NotImplementedError, match="bf16 caches only"):
        mla_decode_mosaic(q_lat, q_pe, c_kv, k_pe, jnp.array([10], jnp.int32), scale=0.1, interpret=INTERPRET)


@pytest.mark.parametrize("batch, n_keys, n_sms, rows, expected", [
    (1, 4096, 132, 2, 16),        # one V2-Lite sequence: 66 wanted, capped at 4096 / 256 keys
    (1, 65536, 132, 2, 66),       # a long context: one wave of 132 programs
    (1, 65536, 132, 4, 33),       # V3's 128 heads: twice the programs per split
    (64, 65536, 132, 2, 2),       # a big batch already fills the GPU (almost)
    (256, 65536, 132, 2, 1),      # more than one wave without splitting
    (4, 200, 132, 2, 1),          # a context shorter than one split's minimum
    (4, 0, 132, 2, 1),            # never below one split
])
def test_one_wave_of_splits(batch, n_keys, n_sms, rows, expected):
    """The kernel's split count: choose_num_splits with one wave (one program fills an SM's shared memory)."""
    assert choose_num_splits(batch * rows, n_keys, n_sms, waves=1) == expected


def test_default_tiles_fit_hopper_shared_memory(rng):
    """block_k 32 at DeepSeek's widths fits a Hopper CTA; 64 does not, and the wrapper says so."""
    assert smem_bytes(512, 64, 32, 256) <= mosaic.SMEM_LIMIT < smem_bytes(512, 64, 64, 256)
    q_lat, q_pe, c_kv, k_pe = _inputs(rng, batch=1, heads=16, rank=512, rope=64, cache_len=128)
    with pytest.raises(ValueError, match="shared memory"):
        mla_decode_mosaic(q_lat, q_pe, c_kv, k_pe, jnp.array([10], jnp.int32), scale=0.1, block_k=64,
                          interpret=INTERPRET)
