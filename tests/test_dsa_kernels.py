"""Sparse attention's Pallas kernels (interpret mode on the CPU; compiled on a GPU under KTJAX_PALLAS_COMPILED=1)
against the XLA path (kv/sparse.py), on every index-cache dtype and every latent-cache format; and the sparse code
against a dense reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.kv import formats as cf
from ktjax.kv import quant, sparse
from ktjax import pallas
from ktjax.pallas.backend import ATTENTION as PALLAS_ATTENTION
from ktjax.kv.attention import mla_decode_xla
from pallas_mode import INTERPRET, kernel_test_context, run_jitted, skip_without_gpu
from triton_ir import triton_modules

HEADS, DIM, T = 8, 16, 64      # index heads (padded to 16 in the kernel), index head dim, cache length
RANK, ROPE, H = 20, 8, 4       # latent rank (odd: padded), rope dim, attention heads


pytestmark = skip_without_gpu


@pytest.fixture(autouse=True)
def _kernel_test_context():
    with kernel_test_context():
        yield


def index_cache(rng, fmt, b=2):
    k = jnp.asarray(rng.normal(size=(b, T, DIM)) * rng.uniform(0.1, 5, size=(b, T, 1)), jnp.float32)
    stored, scale = sparse.quantize_index_keys(fmt, k)
    return quant.to_bits(stored), scale


@pytest.mark.parametrize("fmt_name, fp8_bits", [("float32", False), ("bf16", False), ("fp8", False),
                                                ("int4", True)])
def test_index_scores_kernel_matches_xla(rng, fmt_name, fp8_bits):
    fmt = cf.resolve_format(fmt_name)
    k_idx, k_scale = index_cache(rng, fmt)
    q = jnp.asarray(rng.normal(size=(2, HEADS, DIM)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, HEADS)), jnp.float32)
    lengths = jnp.asarray([37, 64], jnp.int32)
    got = run_jitted(lambda *a: pallas.index_scores_decode(*a, fmt=fmt, block_k=16, interpret=INTERPRET,
                                                           fp8_bits=fp8_bits), q, w, k_idx, k_scale, lengths)
    ref = sparse.index_scores(q[:, None], w[:, None], k_idx, k_scale, (lengths - 1)[:, None], lengths, fmt=fmt,
                              block=16)[:, 0]
    got, ref = np.asarray(got), np.asarray(ref)
    assert np.array_equal(np.isfinite(got), np.isfinite(ref))
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt_name", ["float32", "bf16", "fp8", "int8", "int4"])
def test_sparse_decode_kernel_matches_xla(rng, fmt_name):
    """Attention over the selected rows: the kernel against sparse_attend_gathered; sequence 0 has fewer
    visible tokens (9) than k (24), so its selection ends in invalid entries."""
    fmt = cf.resolve_format(fmt_name)
    c_kv, scales = quant.quantize(fmt, jnp.asarray(rng.normal(size=(2, T, RANK)), jnp.float32))
    k_pe = jnp.asarray(rng.normal(size=(2, T, ROPE)), jnp.float32).astype(fmt.k_pe_dtype)
    q_lat = jnp.asarray(rng.normal(size=(2, H, RANK)), jnp.float32)
    q_pe = jnp.asarray(rng.normal(size=(2, H, ROPE)), jnp.float32)
    lengths = jnp.asarray([9, 50])
    scores = jnp.where(jnp.arange(T)[None] < lengths[:, None], jnp.asarray(rng.normal(size=(2, T)), jnp.float32),
                       -jnp.inf)
    indices, valid = sparse.select_topk(scores, 24)
    assert int(valid[0].sum()) == 9 and bool(valid[1].all())
    kw = dict(fmt=fmt, scale=0.2)
    got = run_jitted(lambda *a: pallas.sparse_decode(*a, interpret=INTERPRET, **kw), q_lat, q_pe, c_kv, scales, k_pe,
                     indices, valid)
    ref = sparse.sparse_attend_gathered(q_lat, q_pe, quant.to_bits(c_kv), scales, quant.to_bits(k_pe), indices,
                                        valid, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt_name", ["float32", "fp8", "int4"])
def test_gathered_attention_over_every_token_is_dense_attention(rng, fmt_name):
    """Selecting every visible token reproduces the dense blockwise attention (kv/attention.py), in every
    format: the gathered path reads the same stored values and scales."""
    fmt = cf.resolve_format(fmt_name)
    c_kv, scales = quant.quantize(fmt, jnp.asarray(rng.normal(size=(2, T, RANK)), jnp.float32))
    k_pe = jnp.asarray(rng.normal(size=(2, T, ROPE)), jnp.float32).astype(fmt.k_pe_dtype)
    c_kv, k_pe = quant.to_bits(c_kv), quant.to_bits(k_pe)
    q_lat = jnp.asarray(rng.normal(size=(2, H, RANK)), jnp.float32)
    q_pe = jnp.asarray(rng.normal(size=(2, H, ROPE)), jnp.float32)
    lengths = jnp.asarray([9, 64])
    scores = jnp.where(jnp.arange(T)[None] < lengths[:, None], 1.0, -jnp.inf)
    indices, valid = sparse.select_topk(scores, T)
    got = sparse.sparse_attend_gathered(q_lat, q_pe, c_kv, scales, k_pe, indices, valid, fmt=fmt, scale=0.2)
    ref = mla_decode_xla(q_lat, q_pe, c_kv, scales, k_pe, lengths, fmt=fmt, scale=0.2, block=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_selection_mask_and_topk():
    scores = jnp.asarray([[[3.0, -jnp.inf, 1.0, 2.0, 0.5]]])
    indices, valid = sparse.select_topk(scores, 3)
    assert indices.tolist() == [[[0, 3, 2]]] and valid.all()
    mask = sparse.selection_mask(indices, valid, 5)
    assert mask.tolist() == [[[True, False, True, True, False]]]
    indices, valid = sparse.select_topk(scores, 5)
    assert valid.tolist() == [[[True, True, True, True, False]]]  # the invisible token comes last, invalid
    assert sparse.selected_fraction(np.array([1, 2, 10]), 4) == pytest.approx(7 / 13)


@pytest.mark.parametrize("fmt_name", ["bf16", "int4"])
def test_cache_decodes_alike_through_pallas_and_xla(rng, fmt_name):
    """LatentCache.attend_sparse for a decode step: the Pallas path (kernel scores, XLA top-k, kernel attention
    over the gathered rows) against the XLA path, over the same written cache (bf16 and e4m3 index keys)."""
    from hf_models import CONFIGS
    from ktjax.model.config import ModelConfig
    from ktjax.kv.cache import LatentCache

    cfg = ModelConfig.from_hf_dict(dict(CONFIGS["v32"][1], architectures=["DeepseekV32ForCausalLM"]))
    fmt = cf.resolve_format(fmt_name)
    b, rank, heads = 2, cfg.kv_lora_rank, cfg.num_attention_heads
    positions = jnp.broadcast_to(jnp.arange(T), (b, T))
    new = (jnp.asarray(rng.normal(size=(b, T, rank)), jnp.float32),
           jnp.asarray(rng.normal(size=(b, T, cfg.qk_rope_head_dim)), jnp.float32),
           jnp.asarray(rng.normal(size=(b, T, cfg.index_head_dim)), jnp.float32))
    q = (jnp.asarray(rng.normal(size=(b, 1, heads, rank)), jnp.float32),
         jnp.asarray(rng.normal(size=(b, 1, heads, cfg.qk_rope_head_dim)), jnp.float32),
         (jnp.asarray(rng.normal(size=(b, 1, cfg.index_n_heads, cfg.index_head_dim)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, 1, cfg.index_n_heads)), jnp.float32)))
    lengths = jnp.asarray([11, 57], jnp.int32)  # 11 < index_topk 16 < 57
    outs = {}
    for path, kernel in (("xla", None), ("pallas", PALLAS_ATTENTION)):
        cache = LatentCache.create(cfg, fmt, b, T, block=16, attention=kernel).write(1, positions, *new)
        outs[path] = run_jitted(lambda c, *a: c.attend_sparse(1, *a, (lengths - 1)[:, None], lengths, scale=0.2,
                                                              topk=16), cache, *q)
    np.testing.assert_allclose(np.asarray(outs["pallas"]), np.asarray(outs["xla"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt_name, fp8_bits", [("bf16", False), ("fp8", False), ("fp8", True)])
def test_index_kernel_lowers_to_valid_triton_ir(fmt_name, fp8_bits):
    """At V3.2's index shape (64 heads of 128) the scoring kernel lowers to Triton IR that passes MLIR
    verification, e4m3 keys natively or decoded from bits (pre-Ada). Running it needs a GPU."""
    pytest.importorskip("jax._src.pallas.triton.lowering")
    fmt = cf.resolve_format(fmt_name)
    b, n_keys, heads, dim = 2, 1024, 64, 128
    shapes = [jax.ShapeDtypeStruct((b, heads, dim), jnp.float32), jax.ShapeDtypeStruct((b, heads), jnp.float32),
              jax.ShapeDtypeStruct((b, n_keys, dim), cf.container(cf.index_store_dtype(fmt))),
              jax.ShapeDtypeStruct((b, n_keys, 1), jnp.float32) if cf.index_scaled(fmt) else None,
              jax.ShapeDtypeStruct((b,), jnp.int32)]
    fn = jax.jit(lambda *a: pallas.index_scores_decode(*a, fmt=fmt, interpret=False, fp8_bits=fp8_bits))
    modules = triton_modules(fn, *shapes)
    assert len(modules) == 1 and modules[0].operation.verify()
    if fmt_name == "fp8":
        assert ("f8E4M3FN" in str(modules[0])) != fp8_bits
