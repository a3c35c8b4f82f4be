"""ktjax's C++ decode attention (ktjax/cpu/csrc/attention.cc) against float64 numpy on the dequantized cache, in
every cache format, over the dense and the paged cache; row results that do not depend on the batch; the model
with it and with the XLA path."""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ktjax
from ktjax.cpu import kernels as cpu_kernels
from ktjax.cpu.attention import ATTENTION as CPU_ATTENTION
from ktjax.kv.cache import LatentCache
from ktjax.kv.formats import FORMATS
from ktjax.kv.quant import dequantize

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")  # built at first use, not at collection

U = 2.0**-24
# (rank, rope, heads): DeepSeek's widths (whole vectors), widths that take the kernel's scalar tails, and 13 heads
# over three vectors (head blocks of 8 + 5 and 4 + 4 + 4 + 1; a pair of vectors and a single one)
WIDTHS = [(512, 64, 4), (40, 8, 3), (48, 16, 13)]
# keys per row: none, one, a partial 16-key block, a segment boundary crossed (256 keys per task)
LENGTHS = [0, 1, 37, 700]


def _cfg(rank, rope, layers=2):
    """What the caches read of a model config."""
    return types.SimpleNamespace(num_hidden_layers=layers, kv_lora_rank=rank, qk_rope_head_dim=rope)


def _filled(cache, rng, rows, length, rank, rope, decoys=None):
    """The cache with random latents written at positions [0, length) of every row and layer; with `decoys`
    (a position per row), a key 30 times larger there, which would dominate a row that wrongly saw it."""
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
    for layer in range(cache.c_kv.shape[0]):
        c = jnp.asarray(rng.standard_normal((rows, length, rank)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((rows, length, rope)), jnp.float32)
        cache = cache.write(layer, positions, c, k)
        if decoys is not None:
            big = [jnp.asarray(30 * rng.standard_normal((rows, 1, n)), jnp.float32) for n in (rank, rope)]
            cache = cache.write(layer, jnp.asarray(decoys, jnp.int32)[:, None], *big)
    return cache


def _keys(cache, rank):
    """Every row's keys as float64 numpy ([b, T, rank], [b, T, rope]) for layer 1, read back through the
    format's own dequantize (a dense cache, or a paged one through its table)."""
    fmt = cache.fmt
    c_kv, scales, k_pe = (None if x is None else x[1] for x in cache.buffers)
    c = dequantize(fmt, c_kv, scales, rank)
    k = jax.lax.bitcast_convert_type(k_pe, fmt.k_pe_dtype) if k_pe.dtype != fmt.k_pe_dtype else k_pe
    c, k = np.asarray(c, np.float64), np.asarray(k.astype(jnp.float32), np.float64)
    if not cache.dense:
        table = np.asarray(cache.page_table)
        c = c[table].reshape(table.shape[0], -1, rank)
        k = k[table].reshape(table.shape[0], -1, k.shape[-1])
    return c, k


def _reference(q_lat, q_pe, c, k, lengths, scale):
    """Exact softmax attention per row and head with its float32 error bound: scores carry at most (D + 2) u
    times the sum of |products| (a float32 dot product of D terms), which moves each probability by at most
    twice that; the output, a convex mix of the latents, then at most 2 max|ds| max|c| plus the rounding of a
    sum of n probabilities (n + 2) u max|c|."""
    out, bound = np.zeros(q_lat.shape), np.zeros(q_lat.shape)
    d = c.shape[-1] + k.shape[-1]
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        cb, kb = c[b, :n], k[b, :n]
        s = (q_lat[b] @ cb.T + q_pe[b] @ kb.T) * scale                     # [h, n]
        ds = (d + 2) * U * (np.abs(q_lat[b]) @ np.abs(cb).T + np.abs(q_pe[b]) @ np.abs(kb).T) * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        out[b] = (p / p.sum(-1, keepdims=True)) @ cb
        bound[b] = (4 * ds.max() + (n + 2) * U) * np.abs(cb).max() + 4 * U * np.abs(out[b])
    return out, bound


def _caches(fmt, rank, rope, rows, rng):
    """(dense, paged) caches with the XLA path and the kernel: the paged one with pages of 16 slots handed out
    in a scrambled order, so each row's keys are scattered over the pool."""
    cfg, fmt = _cfg(rank, rope), FORMATS[fmt]
    dense = LatentCache.create(cfg, fmt, rows, 768, block=256, attention=CPU_ATTENTION)
    width, page = 768 // 16, 16
    order = rng.permutation(rows * width).astype(np.int32).reshape(rows, width)
    paged = LatentCache.pool(cfg, fmt, rows * width + 3, page, batch=rows, max_pages=width,
                                    attention=CPU_ATTENTION).with_table(jnp.asarray(order))
    return dense, paged


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("rank, rope, heads", WIDTHS)
def test_kernel_matches_numpy_in_every_format(rng, fmt, rank, rope, heads):
    """Dense and paged, rows of 0 / 1 / 37 / 700 keys in one batch, each with a decoy key just past its end:
    the kernel's output and the XLA path's are both within the float32 bound of the exact attention over the
    dequantized cache."""
    rows = len(LENGTHS)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    q_lat = rng.standard_normal((rows, 1, heads, rank)).astype(np.float32) * 0.1
    q_pe = rng.standard_normal((rows, 1, heads, rope)).astype(np.float32) * 0.1
    scale = 0.3
    for cache in _caches(fmt, rank, rope, rows, rng):
        cache = _filled(cache, rng, rows, max(LENGTHS), rank, rope, decoys=LENGTHS)
        exact, bound = _reference(q_lat[:, 0].astype(np.float64), q_pe[:, 0].astype(np.float64), *_keys(cache, rank),
                                  LENGTHS, scale)
        positions = (lengths - 1)[:, None]
        for path in ("cpu", "xla"):
            run = jax.jit(lambda c, ql, qp: c.attend_latent(1, ql, qp, positions, lengths, scale=scale))
            got = dataclasses.replace(cache, attention={"cpu": CPU_ATTENTION, "xla": None}[path])
            if path == "cpu":
                assert "KtjaxDecodeAttention" in run.lower(got, q_lat, q_pe).as_text()
            out = np.asarray(run(got, q_lat, q_pe), np.float64)[:, 0]
            err = np.abs(out - exact)
            assert np.all(err <= bound), (type(cache).__name__, path, float(np.max(err - bound)))


# A verify pass's rows: keys per row after the chunk's own were written, around the kernel's 16-key blocks and
# 256-key segments (each query of a row ends at a different side of an edge), and one row shorter than its chunk
# (its first queries see no key).
MULTI_LENGTHS = [2, 17, 258, 700]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("queries", [2, 3, 4])
def test_a_few_queries_per_row_match_numpy_in_every_format(rng, fmt, queries):
    """Dense and paged, s = 2 / 3 / 4 queries per row at the consecutive positions lengths - s .. lengths - 1
    (a speculative verify pass), rows of different lengths with a decoy key just past each: the kernel takes
    the chunk (its one pass over the keys), and its output and the XLA path's are both within the float32 bound
    of the exact attention of each query over the keys at or before its position; each query's result is the
    one-query kernel's, bit for bit."""
    rank, rope, heads = 48, 16, 5
    rows = len(MULTI_LENGTHS)
    lengths = jnp.asarray(MULTI_LENGTHS, jnp.int32)
    positions = lengths[:, None] - queries + jnp.arange(queries, dtype=jnp.int32)
    q_lat = rng.standard_normal((rows, queries, heads, rank)).astype(np.float32) * 0.1
    q_pe = rng.standard_normal((rows, queries, heads, rope)).astype(np.float32) * 0.1
    scale = 0.3
    for cache in _caches(fmt, rank, rope, rows, rng):
        cache = _filled(cache, rng, rows, max(MULTI_LENGTHS), rank, rope, decoys=MULTI_LENGTHS)
        c, k = _keys(cache, rank)
        run = jax.jit(lambda c, ql, qp, pos, lens: c.attend_latent(1, ql, qp, pos, lens, scale=scale))
        out = {}
        for path in ("cpu", "xla"):
            got = dataclasses.replace(cache, attention={"cpu": CPU_ATTENTION, "xla": None}[path])
            if path == "cpu":
                assert "KtjaxDecodeAttention" in run.lower(got, q_lat, q_pe, positions, lengths).as_text()
            out[path] = np.asarray(run(got, q_lat, q_pe, positions, lengths), np.float64)
        for j in range(queries):
            seen = [max(0, n - queries + j + 1) for n in MULTI_LENGTHS]
            exact, bound = _reference(q_lat[:, j].astype(np.float64), q_pe[:, j].astype(np.float64), c, k, seen, scale)
            for path, got in out.items():
                err = np.abs(got[:, j] - exact)
                assert np.all(err <= bound), (type(cache).__name__, path, j, float(np.max(err - bound)))
            one = run(cache, q_lat[:, j:j + 1], q_pe[:, j:j + 1], positions[:, j:j + 1], lengths)
            np.testing.assert_array_equal(np.asarray(one, np.float64)[:, 0], out["cpu"][:, j])


def test_more_queries_than_the_kernel_takes_run_the_xla_path(rng):
    """A chunk of MAX_QUERIES + 1 queries per row (a prefill chunk) is declined: the XLA path runs it."""
    from ktjax.cpu.attention import MAX_QUERIES
    dense, _ = _caches("bf16", 48, 16, 2, rng)
    s = MAX_QUERIES + 1
    q_lat, q_pe = jnp.zeros((2, s, 3, 48), jnp.float32), jnp.zeros((2, s, 3, 16), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (2, s))
    text = jax.jit(lambda c: c.attend_latent(1, q_lat, q_pe, positions, jnp.full((2,), s), scale=0.1)).lower(
        dense).as_text()
    assert "KtjaxDecodeAttention" not in text


def _every_code(fmt, width, rng):
    """A row of `width` stored bytes / elements of the format holding each of its codes at least once where the row
    is long enough (e4m3's NaN codes 0x7f / 0xff excepted: the cache never stores NaN), else random ones."""
    if fmt.name == "float32":
        return rng.standard_normal(width).astype(np.float32)
    if fmt.name == "bf16":
        return rng.standard_normal(width).astype(np.float32).astype(fmt.store_dtype).view(np.uint16)
    codes = np.arange(256, dtype=np.uint8) if fmt.name in ("fp8", "int4") else np.arange(-127, 128).astype(np.int8)
    if fmt.name == "fp8":
        codes = codes[(codes & 0x7F) != 0x7F]
    return np.resize(rng.permutation(codes), width)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("rank", [512, 40])
def test_one_visible_key_reads_back_its_latents_exactly(rng, fmt, rank):
    """With one visible key every probability is exactly 1, so the kernel returns that key's latents as it
    dequantized them: they must equal the format's own dequantize exactly (zeros of either sign alike), every
    stored code (fp8 and int4:
    all 254 / 256 byte values; int8: -127..127) through the kernel's vector loops (rank 512) and its scalar ones
    (rank 40)."""
    fmt, rope, heads = FORMATS[fmt], 8, 3
    width = fmt.stored_width(rank)
    stored = np.stack([_every_code(fmt, width, rng) for _ in range(4)])                  # 4 slots of one page
    scales = (rng.uniform(0.01, 3, (4, fmt.n_groups(rank))).astype(np.float32) if fmt.quantized else None)
    k_pe = rng.standard_normal((4, rope)).astype(np.float32).astype(fmt.k_pe_dtype)
    lead = lambda x: None if x is None else jnp.asarray(x)[None, None]                   # [layer, page, slot, .]
    q_lat = jnp.asarray(rng.standard_normal((1, heads, rank)), jnp.float32)
    q_pe = jnp.asarray(rng.standard_normal((1, heads, rope)), jnp.float32)
    out = cpu_kernels.decode_attention(q_lat, q_pe, lead(stored), lead(scales), lead(k_pe.view(np.uint16) if
                                       fmt.k_pe_dtype != np.float32 else k_pe), jnp.zeros((1, 1), jnp.int32),
                                       jnp.int32(0), jnp.ones((1,), jnp.int32), fmt=fmt, scale=0.5)
    stored_as = stored if fmt.name in ("float32", "int8", "int4") else stored.view(fmt.store_dtype)
    want = np.asarray(dequantize(fmt, jnp.asarray(stored_as[:1]), None if scales is None else
                                 jnp.asarray(scales[:1]), rank))[0]
    assert np.isfinite(want).all()
    for h in range(heads):
        np.testing.assert_array_equal(np.asarray(out)[0, h], want)


def test_a_row_result_does_not_depend_on_its_batch(rng):
    """Each row's keys are split and merged in one order whatever the batch and the threads: a row alone gives
    the bits it gives among others (the server's greedy tokens equal the CLI's)."""
    rows = 4
    _, paged = _caches("int8", 512, 64, rows, rng)
    paged = _filled(paged, rng, rows, 700, 512, 64)
    lengths = jnp.asarray([700, 300, 5, 512], jnp.int32)
    q_lat = jnp.asarray(rng.standard_normal((rows, 1, 4, 512)), jnp.float32)
    q_pe = jnp.asarray(rng.standard_normal((rows, 1, 4, 64)), jnp.float32)

    def attend(c, ql, qp, lens):
        return c.attend_latent(1, ql, qp, (lens - 1)[:, None], lens, scale=0.1)
    batch = np.asarray(jax.jit(attend)(paged, q_lat, q_pe, lengths))
    for i in range(rows):
        alone = paged.with_table(paged.page_table[i:i + 1])
        got = np.asarray(jax.jit(attend)(alone, q_lat[i:i + 1], q_pe[i:i + 1], lengths[i:i + 1]))
        np.testing.assert_array_equal(got[0], batch[i])


@pytest.mark.parametrize("cache_dtype", ["bf16", "int4"])
def test_engine_decodes_with_the_kernel_as_with_xla(hf_folder, rng, cache_dtype):
    """The tiny v2_lite model: attention auto runs decode steps through the kernel on the CPU (prefill chunks
    through XLA), and gives the XLA path's greedy tokens, through generate and through the server's paged
    steps; its compiled decode step calls the kernel."""
    src, _ = hf_folder("v2_lite")
    engines = {a: ktjax.load(src, attention=a, cache_dtype=cache_dtype, chunk_size=8) for a in ("auto", "xla")}
    assert engines["auto"].attention == "cpu" and engines["xla"].attention == "xla"
    ids = rng.integers(0, 97, size=(2, 11)).tolist()
    out = {a: e.generate(ids, max_new_tokens=8, temperature=0) for a, e in engines.items()}
    assert out["auto"].tokens == out["xla"].tokens
    assert out["auto"].stats["attention"] == "cpu"
    decode = next(p for key, p in engines["auto"]._compiled.items() if key[0] == "decode")
    assert "KtjaxDecodeAttention" in decode.as_text()


def test_inconsistent_shapes_are_refused_before_the_kernel_reads_them(rng):
    """The kernel reads raw buffers: a caller passing shapes that disagree gets a ValueError at trace time."""
    dense, _ = _caches("int8", 512, 64, 2, rng)
    q_lat = jnp.zeros((2, 4, 512), jnp.float32)
    table = jnp.arange(2, dtype=jnp.int32)[:, None]
    visible = jnp.ones((2,), jnp.int32)
    good = dict(q_lat=q_lat, q_pe=jnp.zeros((2, 4, 64), jnp.float32), c_kv=dense.c_kv, scales=dense.scales,
                k_pe=dense.k_pe, page_table=table, layer=0, visible=visible)
    bad = [dict(q_pe=jnp.zeros((2, 4, 32), jnp.float32)), dict(scales=None), dict(page_table=table[:1]),
           dict(visible=visible[:1]), dict(q_lat=jnp.zeros((2, 4, 256), jnp.float32))]
    cpu_kernels.decode_attention(**good, fmt=FORMATS["int8"], scale=0.1).block_until_ready()
    for change in bad:
        with pytest.raises(ValueError, match="inconsistent shapes"):
            cpu_kernels.decode_attention(**{**good, **change}, fmt=FORMATS["int8"], scale=0.1)
