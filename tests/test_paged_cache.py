"""The paged latent cache (ktjax/kv/paged.py) through the unchanged model: teacher-forced logits equal the
dense LatentCache's in every format, with pages scattered over the pool and chunks that cross page ends."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ktjax
from ktjax.runtime.engine import _prefill_chunk
from ktjax.kv.cache import LatentCache
from ktjax.kv.formats import resolve_format
from ktjax.pallas.backend import ATTENTION as PALLAS_ATTENTION

PAGE, CHUNK, SEQ = 8, 5, 29


@pytest.fixture(scope="module")
def engine(hf_folder):
    folder, _ = hf_folder("v2_lite")
    return ktjax.load(folder, cache_dtype="float32")


def teacher_forced(engine, cache, tokens, absorb):
    """Logits at every position [b, seq, vocab], fed CHUNK tokens at a time through `cache`."""
    b, s = tokens.shape
    fn = jax.jit(functools.partial(_prefill_chunk, engine.graphdef, engine.run_options(absorb)))
    out = []
    for start in range(0, s, CHUNK):
        pos = start + np.arange(CHUNK)
        pos = np.broadcast_to(np.where(pos < s, pos, cache.cache_lens), (b, CHUNK))
        ids = np.zeros((b, CHUNK), np.int32)
        ids[:, :min(CHUNK, s - start)] = tokens[:, start:start + CHUNK]
        lengths = np.full((b,), min(start + CHUNK, s), np.int32)
        logits, cache = fn(engine.state, cache, jnp.asarray(ids), jnp.asarray(pos, jnp.int32), jnp.asarray(lengths),
                           None)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)[:, :s]


def scattered_table(b, width, n_pages, seed=0):
    """Each sequence's pages spread over the pool in a random order, no page used twice."""
    return np.random.default_rng(seed).permutation(n_pages)[:b * width].reshape(b, width).astype(np.int32)


SLOW = pytest.mark.slow  # each case compiles the model twice: the fast run keeps one per path and packing


@pytest.mark.parametrize("fmt,absorb", [("float32", True), ("int4", True), ("bf16", False),
                                        pytest.param("fp8", True, marks=SLOW), pytest.param("int8", True, marks=SLOW),
                                        pytest.param("bf16", True, marks=SLOW),
                                        pytest.param("int4", False, marks=SLOW)])
def test_paged_logits_equal_dense(engine, fmt, absorb):
    cfg, f = engine.cfg, resolve_format(fmt)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, SEQ))
    # The same key blocks on both sides (4 pages of 8 = the dense block of 32), so both sum in the same order.
    dense = LatentCache.create(cfg, f, 2, 32, block=32, attention=None)
    width = 4  # 32 positions per sequence
    paged = LatentCache.pool(cfg, f, 11, PAGE, attention=None).with_table(
        jnp.asarray(scattered_table(2, width, 11)))
    want = teacher_forced(engine, dense, tokens, absorb)
    got = teacher_forced(engine, paged, tokens, absorb)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_padding_and_unused_rows_write_nothing(engine):
    cfg = engine.cfg
    paged = LatentCache.pool(cfg, resolve_format("int8"), 4, PAGE).with_table(jnp.asarray([[2, 0], [1, 3]]))
    c_kv = jnp.ones((2, 3, cfg.kv_lora_rank))
    k_pe = jnp.ones((2, 3, cfg.qk_rope_head_dim))
    out = paged.write(0, jnp.asarray([[0, 9, 16], [15, 99, -1]]), c_kv, k_pe)
    written = np.argwhere(np.asarray(out.c_kv[0]).any(-1))
    # seq 0: pos 0 -> page 2 slot 0, pos 9 -> page 0 slot 1, pos 16 is past its table; seq 1: pos 15 -> page 3
    # slot 7; 99 and -1 are dropped
    assert written.tolist() == [[0, 1], [2, 0], [3, 7]]


def test_pallas_paged_path_through_the_model(engine):
    """The model over a paged cache attending through the Pallas kernel (interpreted) gives the XLA path's
    logits (absorbed attention: the kernel's path)."""
    import warnings

    from ktjax.pallas import platform

    cfg, f = engine.cfg, resolve_format("bf16")
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, SEQ))
    table = jnp.asarray(scattered_table(2, 2, 5, seed=1))
    kernels = {"xla": None, "pallas": PALLAS_ATTENTION}
    caches = {path: dataclasses.replace(LatentCache.pool(cfg, f, 5, 16), attention=kernel).with_table(table)
              for path, kernel in kernels.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", platform.InterpretModeWarning)
        got = {path: teacher_forced(engine, c, tokens, absorb=True) for path, c in caches.items()}
    # The kernel sums in its own tiles: the project's float32 bound for a different summation order (README).
    assert np.abs(got["pallas"] - got["xla"]).max() <= 1e-4 * np.abs(got["xla"]).max()
