"""Cache formats: round trips against numpy references, attention over quantized caches, byte counts."""
import jax.numpy as jnp
import numpy as np
import pytest

from numpy_references import latent_attention, quantize_round_trip

from ktjax.model.config import ModelConfig
from ktjax.errors import KtjaxError
from ktjax.kv.attention import mla_decode_xla, mla_prefill_xla, naive_prefill, tail_block
from ktjax.kv.cache import LatentCache, cache_bytes, plan_cache_lens
from ktjax.kv.formats import FORMATS, resolve_format
from ktjax.kv.quant import dequantize, quantize

# Per-row relative L2 error of a round trip on Gaussian rows, (mean, max) over rows. Measured (seed 1234):
# bf16 0.0017/0.0026, fp8 0.026/0.034, int8 0.0064/0.0089, int4 0.107/0.154. int4's ~10% is the floor of a
# 15-level uniform quantizer on Gaussian values (~9% at the optimal clip), not a few %: its effect on
# attention and logits is what the other tests bound.
ROUND_TRIP_BOUND = {"float32": (0.0, 0.0), "bf16": (0.002, 0.003), "fp8": (0.03, 0.04), "int8": (0.008, 0.01),
                    "int4": (0.12, 0.16)}


def _row_rel_err(x, y):
    return np.linalg.norm(x - y, axis=-1) / np.linalg.norm(x, axis=-1)


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("rank", [512, 20, 200])  # 20 and 200 leave a short last group
def test_round_trip_matches_numpy_reference(rng, name, rank):
    fmt = FORMATS[name]
    x = rng.normal(size=(4, 9, rank)).astype(np.float32) * rng.uniform(0.1, 10, size=(4, 9, 1)).astype(np.float32)
    stored, scales = quantize(fmt, jnp.asarray(x))
    assert stored.shape[-1] == fmt.stored_width(rank)
    if fmt.quantized:
        assert scales.shape[-1] == -(-rank // fmt.group)
    got = np.asarray(dequantize(fmt, stored, scales, rank))
    ref = quantize_round_trip(name, x)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(x).max())
    err = _row_rel_err(x, got)
    mean_bound, max_bound = ROUND_TRIP_BOUND[name]
    assert err.mean() <= mean_bound and err.max() <= max_bound


def test_int4_packs_two_halves(rng):
    fmt = FORMATS["int4"]
    x = np.zeros((1, 8), np.float32)
    x[0, 1], x[0, 5] = 7.0, -7.0  # channel 1 low nibble of byte 1, channel 5 high nibble of byte 1
    stored, _ = quantize(fmt, jnp.asarray(x))
    assert np.asarray(stored)[0, 1] == (7 + 8) | ((-7 + 8) << 4)


def _attention_inputs(rng, fmt_name, b=3, s=5, h=4, rank=20, rope=8, cache_lens=48):
    fmt = resolve_format(fmt_name)
    c_kv = rng.normal(size=(b, cache_lens, rank)).astype(np.float32)
    k_pe = rng.normal(size=(b, cache_lens, rope)).astype(np.float32)
    stored, scales = quantize(fmt, jnp.asarray(c_kv))
    q_lat = rng.normal(size=(b, s, h, rank)).astype(np.float32)
    q_pe = rng.normal(size=(b, s, h, rope)).astype(np.float32)
    lengths = np.array([37, 5, 48], np.int32)[:b]
    q_positions = (lengths[:, None] - s + np.arange(s)).astype(np.int32)
    return fmt, c_kv, k_pe, stored, scales, q_lat, q_pe, lengths, q_positions


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("block", [16, 48])
def test_attention_over_quantized_cache(rng, name, block):
    fmt, c_kv, k_pe, stored, scales, q_lat, q_pe, lengths, q_pos = _attention_inputs(rng, name)
    k_pe_stored = jnp.asarray(k_pe).astype(fmt.k_pe_dtype)
    out = np.asarray(mla_prefill_xla(jnp.asarray(q_lat), jnp.asarray(q_pe), stored, scales, k_pe_stored,
                                     jnp.asarray(q_pos), jnp.asarray(lengths), fmt=fmt, scale=0.3, block=block))
    # Per-group scaling inside attention equals attention over the dequantized cache (float32 accuracy) ...
    deq = np.asarray(dequantize(fmt, stored, scales, c_kv.shape[-1]))
    ref_deq = latent_attention(q_lat, q_pe, deq, np.asarray(k_pe_stored, np.float32), q_pos, lengths, 0.3)
    np.testing.assert_allclose(out, ref_deq, rtol=2e-5, atol=2e-5 * np.abs(ref_deq).max())
    # ... and stays within the format's error of exact attention over the unquantized latents.
    ref = latent_attention(q_lat, q_pe, c_kv, k_pe, q_pos, lengths, 0.3)
    bound = {"float32": 1e-5, "bf16": 0.02, "fp8": 0.1, "int8": 0.02, "int4": 0.3}[name]
    assert np.abs(out - ref).max() <= bound * np.abs(ref).max()


@pytest.mark.parametrize("name", ["bf16", "int8"])
def test_key_loop_walks_full_blocks_then_tail_blocks(rng, name):
    """block 128 over 384 keys: lengths that end inside the first, second and third block read full blocks and
    then 64-key tail blocks (kv/attention.tail_block); the result is exact attention over the visible keys."""
    fmt, c_kv, k_pe, stored, scales, q_lat, q_pe, _, _ = _attention_inputs(rng, name, cache_lens=384)
    lengths = np.array([300, 70, 129], np.int32)
    q_pos = (lengths[:, None] - q_lat.shape[1] + np.arange(q_lat.shape[1])).astype(np.int32)
    assert tail_block(128) == 64 and tail_block(48) == 16
    kp = jnp.asarray(k_pe).astype(fmt.k_pe_dtype)
    out = np.asarray(mla_prefill_xla(jnp.asarray(q_lat), jnp.asarray(q_pe), stored, scales, kp, jnp.asarray(q_pos),
                                     jnp.asarray(lengths), fmt=fmt, scale=0.3, block=128))
    deq = np.asarray(dequantize(fmt, stored, scales, c_kv.shape[-1]))
    ref = latent_attention(q_lat, q_pe, deq, np.asarray(kp, np.float32), q_pos, lengths, 0.3)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


# (lengths, whether sequence 0's queries are padding at position cache_lens): the keys every query sees end
# inside a block; exactly at a block edge (96); at the shortest length (a finished row's padding queries)
PREFIX_CASES = [([140, 101, 144], False), ([100, 120, 144], False), ([96, 140, 144], True)]


@pytest.mark.parametrize("naive", [False, True], ids=["absorbed", "naive"])
@pytest.mark.parametrize("block", [16, 48])
@pytest.mark.parametrize("lengths, padded", PREFIX_CASES, ids=["inside", "edge", "shortest"])
def test_prefix_blocks_every_query_sees_run_unmasked(rng, naive, block, lengths, padded):
    """A chunk whose every query, in every sequence, sees the first keys whole (a prompt's later chunk): those full
    blocks run without masks (kv/attention._flash), the rest masked; exact attention over the visible keys
    either way, for the absorbed and the naive (heads-first) loop."""
    fmt, c_kv, k_pe, stored, scales, q_lat, q_pe, _, _ = _attention_inputs(rng, "bf16", cache_lens=144)
    lengths = np.array(lengths, np.int32)
    q_pos = (lengths[:, None] - q_lat.shape[1] + np.arange(q_lat.shape[1])).astype(np.int32)
    if padded:
        q_pos[0] = 144  # padding queries: past every key, they see a finished row's whole length
    assert min(q_pos.min() + 1, lengths.min()) // block >= 2  # at least two blocks run unmasked
    kp = jnp.asarray(k_pe).astype(fmt.k_pe_dtype)
    deq = np.asarray(dequantize(fmt, stored, scales, c_kv.shape[-1]))
    args = (stored, scales, kp, jnp.asarray(q_pos), jnp.asarray(lengths))
    if naive:
        h, dv, rank = q_lat.shape[2], 7, c_kv.shape[-1]
        w_uk = rng.normal(size=(h, 6, rank)).astype(np.float32)
        w_uv = rng.normal(size=(h, dv, rank)).astype(np.float32)
        q_nope = rng.normal(size=q_pe.shape[:3] + (6,)).astype(np.float32)
        out = np.asarray(naive_prefill(jnp.asarray(q_nope), jnp.asarray(q_pe), *args, jnp.asarray(w_uk),
                                       jnp.asarray(w_uv), fmt=fmt, scale=0.3, block=block))
        o_lat = latent_attention(np.einsum("bshd,hdc->bshc", q_nope, w_uk), q_pe, deq, np.asarray(kp, np.float32),
                                 q_pos, lengths, 0.3)
        ref = np.einsum("bshc,hdc->bshd", o_lat, w_uv)
    else:
        out = np.asarray(mla_prefill_xla(jnp.asarray(q_lat), jnp.asarray(q_pe), *args, fmt=fmt, scale=0.3,
                                         block=block))
        ref = latent_attention(q_lat, q_pe, deq, np.asarray(kp, np.float32), q_pos, lengths, 0.3)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_decode_is_the_one_query_case(rng):
    fmt, c_kv, k_pe, stored, scales, q_lat, q_pe, lengths, _ = _attention_inputs(rng, "int8", s=1)
    kp = jnp.asarray(k_pe, fmt.k_pe_dtype)
    out = mla_decode_xla(jnp.asarray(q_lat[:, 0]), jnp.asarray(q_pe[:, 0]), stored, scales, kp,
                         jnp.asarray(lengths), fmt=fmt, scale=0.3, block=16)
    deq = np.asarray(dequantize(fmt, stored, scales, c_kv.shape[-1]))
    ref = latent_attention(q_lat, q_pe, deq, np.asarray(kp, np.float32), (lengths - 1)[:, None], lengths, 0.3)[:, 0]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_naive_prefill_equals_absorbed(rng):
    fmt, c_kv, k_pe, stored, scales, _, q_pe, lengths, q_pos = _attention_inputs(rng, "int4")
    h, dn, dv, rank = 4, 6, 7, c_kv.shape[-1]
    w_uk = rng.normal(size=(h, dn, rank)).astype(np.float32)
    w_uv = rng.normal(size=(h, dv, rank)).astype(np.float32)
    q_nope = rng.normal(size=q_pe.shape[:3] + (dn,)).astype(np.float32)
    kp = jnp.asarray(k_pe, fmt.k_pe_dtype)
    naive = naive_prefill(jnp.asarray(q_nope), jnp.asarray(q_pe), stored, scales, kp, jnp.asarray(q_pos),
                          jnp.asarray(lengths), jnp.asarray(w_uk), jnp.asarray(w_uv), fmt=fmt, scale=0.2, block=16)
    q_lat = np.einsum("bshd,hdc->bshc", q_nope, w_uk)
    o_lat = mla_prefill_xla(jnp.asarray(q_lat), jnp.asarray(q_pe), stored, scales, kp, jnp.asarray(q_pos),
                            jnp.asarray(lengths), fmt=fmt, scale=0.2, block=16)
    absorbed = np.einsum("bshc,hdc->bshd", np.asarray(o_lat), w_uv)
    np.testing.assert_allclose(np.asarray(naive), absorbed, rtol=1e-4, atol=1e-4 * np.abs(absorbed).max())


V3_DIMS = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168,
               intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
               q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
               first_k_dense_replace=3)


def test_bytes_per_token_match_design_table():
    per_layer = {n: FORMATS[n].bytes_per_token_per_layer(512, 64) for n in FORMATS}
    assert per_layer == {"float32": 2304, "bf16": 1152, "fp8": 656, "int8": 656, "int4": 416}
    cfg = ModelConfig.from_hf_dict(V3_DIMS)
    assert FORMATS["bf16"].bytes_per_token(cfg) / FORMATS["int4"].bytes_per_token(cfg) >= 2.5


@pytest.mark.parametrize("name", list(FORMATS))
def test_cache_arrays_hold_exactly_the_formula(name):
    from hf_models import CONFIGS

    cfg = ModelConfig.from_hf_dict(dict(CONFIGS["v3"][1], architectures=["DeepseekV3ForCausalLM"]))
    cache = LatentCache.create(cfg, FORMATS[name], batch=3, cache_lens=64, block=16)
    assert cache.nbytes == cache_bytes(cfg, FORMATS[name], 3, 64) == 3 * 64 * FORMATS[name].bytes_per_token(cfg)


def test_cache_lens_rounding_and_unknown_format():
    assert plan_cache_lens(1) == (16, 16)
    assert plan_cache_lens(100) == (112, 112)
    assert plan_cache_lens(513) == (1024, 512)
    with pytest.raises(KtjaxError, match="int3"):
        resolve_format("int3")


@pytest.mark.parametrize("name", ["bf16", "int4"])
def test_stacked_cache_with_a_layer_index_equals_that_layer(rng, name):
    """Attention reads key blocks straight out of the stacked cache [L, b, T, ...] (no copy of a layer)."""
    layers = [_attention_inputs(rng, name) for _ in range(3)]
    fmt = layers[0][0]
    def stacked(i, dtype=None):
        return None if layers[0][i] is None else jnp.stack([jnp.asarray(inputs[i], dtype) for inputs in layers])

    stack = [stacked(3), stacked(4), stacked(2, fmt.k_pe_dtype)]  # stored c_kv, scales, k_pe
    _, _, _, _, _, q_lat, q_pe, lengths, q_pos = layers[1]
    args = (jnp.asarray(q_lat), jnp.asarray(q_pe))
    kw = dict(fmt=fmt, scale=0.3, block=16)
    one = mla_prefill_xla(*args, *(x[1] if x is not None else None for x in stack), jnp.asarray(q_pos),
                          jnp.asarray(lengths), **kw)
    stacked = mla_prefill_xla(*args, *stack, jnp.asarray(q_pos), jnp.asarray(lengths), layer=jnp.int32(1), **kw)
    np.testing.assert_array_equal(np.asarray(stacked), np.asarray(one))
