"""DeepSeek-V3.2 (sparse attention, DSA) served: the paged cache's pages carry the index keys.

The paged cache's sparse attention equals the dense cache's on the same keys (every cache format, decode and
prefill, absorbed and naive, with a page shared as the prefix cache shares it), and a tiny random V3.2 model
served over HTTP answers the official openai client with transformers' DeepseekV32 greedy generate, token for
token, including a second request that reads the first one's prompt pages from the prefix cache. And fp8
index keys are Hadamard-rotated before quantizing, which keeps the top-k closer to the float scores' one."""
import json
import os
import shutil

import numpy as np
import pytest

from hf_models import CONFIGS
from ktjax.kv.formats import FORMATS

TOPK = CONFIGS["v32"][1]["index_topk"]   # 16
VOCAB = CONFIGS["v32"][1]["vocab_size"]
PAGE = 8


def _v32_cfg():
    from ktjax.model.config import ModelConfig
    return ModelConfig.from_hf_dict(dict(CONFIGS["v32"][1], architectures=["DeepseekV32ForCausalLM"]))


def _caches(cfg, fmt, rng, shared_pages: int):
    """A dense LatentCache [2 sequences, 64 positions] and a page pool (pages of 8, shuffled over a pool
    of 20) holding the same latents and index keys; sequence 1's first `shared_pages` pages are sequence 0's
    own pages (a prefix-cache hit: their keys were written once, by sequence 0)."""
    import jax.numpy as jnp

    from ktjax.kv.cache import LatentCache

    t, width = 64, 64 // PAGE
    dense = LatentCache.create(cfg, fmt, 2, t, block=64)
    paged = LatentCache.pool(cfg, fmt, 20, PAGE, batch=2, max_pages=width)
    pages = rng.permutation(20)
    table = np.stack([pages[:width], np.concatenate([pages[:shared_pages], pages[width:2 * width - shared_pages]])])
    paged = paged.with_table(jnp.asarray(table, jnp.int32))

    def keys(*shape, spread=1.0):
        return (rng.normal(size=shape) * rng.uniform(0.1, spread, size=shape[:-1] + (1,))).astype(np.float32)
    c_kv, k_pe = keys(2, t, cfg.kv_lora_rank), keys(2, t, cfg.qk_rope_head_dim)
    k_idx = keys(2, t, cfg.index_head_dim, spread=10.0)
    shared = shared_pages * PAGE
    for x in (c_kv, k_pe, k_idx):
        x[1, :shared] = x[0, :shared]
    positions = np.broadcast_to(np.arange(t), (2, t))
    dense = dense.write(1, jnp.asarray(positions), jnp.asarray(c_kv), jnp.asarray(k_pe), jnp.asarray(k_idx))
    # sequence 1 writes only past the shared pages (a position past the table is dropped)
    own = np.where((np.arange(2)[:, None] == 1) & (positions < shared), 10**6, positions)
    paged = paged.write(1, jnp.asarray(own), jnp.asarray(c_kv), jnp.asarray(k_pe), jnp.asarray(k_idx))
    return dense, paged


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_paged_sparse_attention_equals_dense(rng, name):
    """Same queries, same keys: the paged cache selects the same top-k and attends as the dense cache does (a
    decode step gathering the rows, a prefill chunk masking the blockwise walk, absorbed and naive), for
    sequences of 52 and 37 keys (more than index_topk 16: selection matters) whose first 2 pages are shared."""
    import jax.numpy as jnp

    cfg = _v32_cfg()
    fmt = FORMATS[name]
    dense, paged = _caches(cfg, fmt, rng, shared_pages=2)
    lengths = jnp.asarray([52, 37], jnp.int32)
    h, heads, dim = cfg.num_attention_heads, cfg.index_n_heads, cfg.index_head_dim
    scale = cfg.softmax_scale
    for s in (1, 5):
        q_pos = jnp.asarray(np.array([52, 37])[:, None] - s + np.arange(s)[None], jnp.int32)
        q_idx = jnp.asarray(rng.normal(size=(2, s, heads, dim)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(2, s, heads)), jnp.float32)
        q_lat = jnp.asarray(rng.normal(size=(2, s, h, cfg.kv_lora_rank)), jnp.float32)
        q_pe = jnp.asarray(rng.normal(size=(2, s, h, cfg.qk_rope_head_dim)), jnp.float32)
        q_nope = jnp.asarray(rng.normal(size=(2, s, h, cfg.qk_nope_head_dim)), jnp.float32)
        w_uk = jnp.asarray(rng.normal(size=(h, cfg.qk_nope_head_dim, cfg.kv_lora_rank)) * 0.3, jnp.float32)
        w_uv = jnp.asarray(rng.normal(size=(h, cfg.v_head_dim, cfg.kv_lora_rank)) * 0.3, jnp.float32)
        kw = dict(scale=scale, topk=TOPK)
        calls = [((q_lat, q_pe, (q_idx, w), q_pos, lengths), kw),
                 ((q_nope, q_pe, (q_idx, w), q_pos, lengths), dict(kw, naive_weights=(w_uk, w_uv)))]
        for args, options in calls:
            want = np.asarray(dense.attend_sparse(1, *args, **options))
            got = np.asarray(paged.attend_sparse(1, *args, **options))
            # float32 arithmetic in a different key-block order: rounding only
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=f"s={s}")
        # and selection matters here: attending over every visible key gives other numbers
        dense_all = np.asarray(dense.attend_latent(1, q_lat, q_pe, q_pos, lengths, scale=scale))
        assert np.abs(dense_all - np.asarray(dense.attend_sparse(1, *calls[0][0], **kw))).max() > 1e-3


@pytest.mark.parametrize("name", ["float32", "int4"])
def test_a_dense_cache_is_the_one_page_case_of_a_pool(rng, name):
    """LatentCache.create (dense) is the pool whose table gives sequence b the one page b of cache_lens slots: the
    same writes (ragged, padding dropped) leave the same bits in every buffer, index keys included, and every
    attention (absorbed, naive, sparse; decode steps and chunks) gives the same numbers."""
    import jax.numpy as jnp

    from ktjax.kv.cache import LatentCache

    cfg, fmt, t = _v32_cfg(), FORMATS[name], 64
    dense = LatentCache.create(cfg, fmt, 2, t, block=64)
    pool = LatentCache.pool(cfg, fmt, 2, t, batch=2, max_pages=1).with_table(jnp.asarray([[0], [1]], jnp.int32))
    assert dense.dense and not pool.dense and dense.cache_lens == pool.cache_lens == t
    lengths = np.array([52, 37])
    positions = np.broadcast_to(np.arange(t), (2, t))
    positions = np.where(positions < lengths[:, None], positions, t)  # padding: dropped
    new = [jnp.asarray(rng.normal(size=(2, t, d)), jnp.float32)
           for d in (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim)]
    dense, pool = (c.write(1, jnp.asarray(positions), *new) for c in (dense, pool))
    for a, b in zip(dense.all_buffers, pool.all_buffers):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(np.asarray(dense.c_kv[1]).any(-1).sum()) == lengths.sum()

    h, heads = cfg.num_attention_heads, cfg.index_n_heads
    lengths = jnp.asarray(lengths, jnp.int32)
    kw = dict(scale=cfg.softmax_scale)
    for s in (1, 5):
        q_pos = jnp.asarray(np.array([52, 37])[:, None] - s + np.arange(s)[None], jnp.int32)
        q = {d: jnp.asarray(rng.normal(size=(2, s, h, d)), jnp.float32)
             for d in (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim)}
        q_lat, q_pe, q_nope = q[cfg.kv_lora_rank], q[cfg.qk_rope_head_dim], q[cfg.qk_nope_head_dim]
        index = (jnp.asarray(rng.normal(size=(2, s, heads, cfg.index_head_dim)), jnp.float32),
                 jnp.asarray(rng.normal(size=(2, s, heads)), jnp.float32))
        w_uk = jnp.asarray(rng.normal(size=(h, cfg.qk_nope_head_dim, cfg.kv_lora_rank)) * 0.3, jnp.float32)
        w_uv = jnp.asarray(rng.normal(size=(h, cfg.v_head_dim, cfg.kv_lora_rank)) * 0.3, jnp.float32)
        calls = {"absorbed": lambda c: c.attend_latent(1, q_lat, q_pe, q_pos, lengths, **kw),
                 "naive": lambda c: c.attend_naive(1, q_nope, q_pe, w_uk, w_uv, q_pos, lengths, **kw),
                 "sparse": lambda c: c.attend_sparse(1, q_lat, q_pe, index, q_pos, lengths, topk=TOPK, **kw),
                 "sparse naive": lambda c: c.attend_sparse(1, q_nope, q_pe, index, q_pos, lengths, topk=TOPK,
                                                           naive_weights=(w_uk, w_uv), **kw)}
        for what, call in calls.items():
            want, got = np.asarray(call(dense)), np.asarray(call(pool))
            # float32 arithmetic whose last key block may be split otherwise: rounding only
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=f"{what} s={s}")


def _char(i: int) -> str:
    return chr(0x100 + i)   # one printable character per token id


def _add_char_tokenizer(folder: str) -> None:
    """tokenizer.json for the tiny model's 97 ids (serving needs one): token i is one character, decoded as is,
    so a completion's text gives back its ids."""
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.BPE(vocab={_char(i): i for i in range(VOCAB)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": False}, f)


@pytest.fixture(scope="module")
def served_v32(hf_folder, tmp_path_factory):
    """The tiny random V3.2 model (index_topk 16) served by ktjax in float32 (pages of 8 tokens), and its
    transformers oracle."""
    import openai

    import ktjax
    from ktjax.serve.app import create_app
    from ktjax.serve.scheduler import Scheduler
    from serve_harness import ServerThread

    src, oracle = hf_folder("v32")
    folder = str(tmp_path_factory.mktemp("v32_served") / "model")
    shutil.copytree(src, folder)
    _add_char_tokenizer(folder)
    engine = ktjax.load(folder, cache_dtype="float32", chunk_size=16)
    scheduler = Scheduler(engine, max_batch=2, page_size=PAGE, n_pages=24)
    scheduler.start()
    server = ServerThread(create_app(engine, scheduler, model_name="v32"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    yield client, oracle, scheduler
    server.stop()
    scheduler.shutdown(timeout=10)


def _hf_greedy(oracle, prompt, n):
    import torch

    with torch.no_grad():
        out = oracle.generate(torch.as_tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=None,
                              pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_served_v32_greedy_equals_transformers_generate(served_v32, rng):
    """Prompts of 21 and 27 tokens, 12 greedy tokens each (so queries see up to 38 keys: selection keeps 16).
    The second prompt starts with the first one's 16 tokens: it reads those 2 pages (latents and index keys)
    from the prefix cache, and still equals transformers."""
    client, oracle, scheduler = served_v32
    first = rng.integers(2, VOCAB, size=21).tolist()
    second = first[:16] + rng.integers(2, VOCAB, size=11).tolist()
    n = 12
    for prompt, cached in ((first, 0), (second, 16)):
        out = client.completions.create(model="v32", prompt=prompt, max_tokens=n, temperature=0,
                                        extra_body={"ignore_eos": True})
        tokens = [ord(ch) - 0x100 for ch in out.choices[0].text]
        assert tokens == _hf_greedy(oracle, prompt, n)
        assert out.usage.completion_tokens == n
        assert out.usage.prompt_tokens_details.cached_tokens == cached


def _topk_overlap(scores, ref, k):
    """Mean fraction of each query's k best tokens under `ref` that `scores` also puts in its k best."""
    got, want = np.argsort(-scores, -1)[..., :k], np.argsort(-ref, -1)[..., :k]
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(got.reshape(-1, k), want.reshape(-1, k))])


def test_fp8_index_keys_are_hadamard_rotated(rng):
    """e4m3 index keys are rotated by the orthonormal Hadamard matrix (H[i,j] = (-1)^popcount(i & j) / sqrt(D))
    before quantizing, and queries by the same H when scored. At V3.2's sizes (64 index heads of 128, 2048
    keys, top 256), on keys whose 4 outlier channels are 10x the others (what the rotation is for), the top-k
    of the fp8 scores overlaps the float scores' more than quantizing the same keys unrotated does.
    Measured (this seed): 0.995 rotated, 0.986 unrotated (on plain Gaussian keys, both ~0.978)."""
    import jax.numpy as jnp
    import ml_dtypes

    from ktjax.kv import sparse

    d = np.arange(128)
    parity = np.vectorize(lambda x: bin(x).count("1") % 2)(d[:, None] & d[None])
    np.testing.assert_allclose(sparse.hadamard(128), np.where(parity, -1.0, 1.0) / np.sqrt(128), rtol=1e-7)

    fmt, t, heads, dim, s, k = FORMATS["fp8"], 2048, 64, 128, 16, 256
    keys = rng.normal(size=(1, t, dim)).astype(np.float32)
    q = rng.normal(size=(1, s, heads, dim)).astype(np.float32)
    keys[..., :4] *= 10
    q[..., :4] *= 10
    w = rng.normal(size=(1, s, heads)).astype(np.float32)
    ref = np.einsum("bsh,bsht->bst", w, np.maximum(np.einsum("bshd,btd->bsht", q, keys), 0))

    stored, scale = sparse.quantize_index_keys(fmt, jnp.asarray(keys))
    rotated = np.asarray(sparse.index_scores(jnp.asarray(q), jnp.asarray(w), stored, scale,
                                             jnp.full((1, s), t - 1), jnp.asarray([t]), fmt=fmt, block=512))
    amax = np.abs(keys).max(-1, keepdims=True)
    plain_keys = (keys / (amax / 448)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * (amax / 448)
    plain = np.einsum("bsh,bsht->bst", w, np.maximum(np.einsum("bshd,btd->bsht", q, plain_keys), 0))
    got, unrotated = _topk_overlap(rotated, ref, k), _topk_overlap(plain, ref, k)
    assert got > unrotated, (got, unrotated)
    assert got >= 0.95, got
