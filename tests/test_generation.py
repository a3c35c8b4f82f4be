"""Generation through the latent cache: chunked prefill and decoding against the full forward and against
transformers' generate; sampling, stop tokens, cache sizing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ktjax
from ktjax.errors import KtjaxError
from ktjax.runtime.sampling import Sampling, sample

FORMATS = ["float32", "bf16", "fp8", "int8", "int4"]


@pytest.mark.parametrize("name,chunk,absorb", [("v3", 5, True), ("v3", 5, False), ("v3", 16, True),
                                                ("v2_lite", 1, True), ("v2_lite", 7, False)])
def test_cached_logits_equal_full_forward(hf_folder, rng, name, chunk, absorb):
    folder, _ = hf_folder(name)
    ids = rng.integers(0, 97, size=(2, 37))
    full = ktjax.load(folder).logits(ids)
    engine = ktjax.load(folder, cache_dtype="float32", chunk_size=chunk, absorb_for_prefill=absorb)
    cached = engine.cached_logits(ids)
    assert np.abs(cached - full).max() <= 1e-4 * np.abs(full).max()


@pytest.mark.parametrize("absorb", [True, False])
def test_ragged_batch_greedy_matches_transformers_generate(hf_folder, rng, absorb):
    import torch

    folder, oracle = hf_folder("v3")
    prompts = [rng.integers(0, 97, size=n).tolist() for n in (19, 6)]
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = oracle.generate(torch.as_tensor([p]), do_sample=False, max_new_tokens=12, eos_token_id=None,
                                  pad_token_id=0)
        refs.append(out[0, len(p):].tolist())
    engine = ktjax.load(folder, cache_dtype="float32", chunk_size=8, absorb_for_prefill=absorb,
                        max_new_tokens=12, ignore_eos=True)
    result = engine.generate(prompts)
    assert result.tokens == refs
    s = result.stats
    assert s["prompt_tokens"] == 25 and s["generated_tokens"] == 24 and s["cache_lens"] >= 19 + 12
    assert s["decode_tokens_per_s"] > 0 and s["prefill_tokens_per_s"] > 0 and s["compile_s"] > 0


def test_teacher_forced_agreement_with_bf16_cache(hf_folder, rng):
    """Top-1 agreement over 64 greedy steps with each cache format, against the bf16 cache's tokens."""
    folder, _ = hf_folder("v2_lite")
    prompt = rng.integers(0, 97, size=32).tolist()
    steps = 64
    seq = prompt + ktjax.load(folder, cache_dtype="bf16", max_new_tokens=steps, ignore_eos=True).generate(
        [prompt]).tokens[0]
    agreement = {}
    for fmt in FORMATS:
        logits = ktjax.load(folder, cache_dtype=fmt, chunk_size=32).cached_logits(np.array([seq]))
        agreement[fmt] = float((logits[0, len(prompt) - 1:-1].argmax(-1) == np.array(seq[len(prompt):])).mean())
    print("top-1 agreement with the bf16 cache over 64 steps:", agreement)
    assert agreement["bf16"] == 1.0
    assert agreement["float32"] >= 0.9 and agreement["int8"] >= 0.9 and agreement["fp8"] >= 0.85
    assert agreement["int4"] >= 0.6


def test_stop_tokens_from_generation_config(hf_folder, rng):
    folder, _ = hf_folder("v2_lite")
    prompt = rng.integers(0, 97, size=9).tolist()
    engine = ktjax.load(folder, max_new_tokens=10, ignore_eos=True)
    free = engine.generate([prompt]).tokens[0]
    stop = free[3]
    first = free.index(stop)
    engine.generation_config["eos_token_ids"] = [stop, 96]
    stopped = engine.generate([prompt], ignore_eos=False).tokens[0]
    assert stopped == free[:first + 1]


def test_sampling_is_reproducible_and_top_k_one_is_greedy(hf_folder, rng):
    folder, _ = hf_folder("v2_lite")
    prompt = rng.integers(0, 97, size=9).tolist()
    engine = ktjax.load(folder, max_new_tokens=16, ignore_eos=True)
    greedy = engine.generate([prompt], temperature=0.0).tokens[0]
    a = engine.generate([prompt], temperature=1.5, seed=7).tokens[0]
    b = engine.generate([prompt], temperature=1.5, seed=7).tokens[0]
    c = engine.generate([prompt], temperature=1.5, seed=8).tokens[0]
    assert a == b and a != c and a != greedy
    assert engine.generate([prompt], temperature=1.5, top_k=1, seed=3).tokens[0] == greedy


def test_each_row_samples_from_its_own_stream(hf_folder, rng):
    """Row i of a call draws from the stream of seed + i (runtime/decode.py): two copies of one prompt in one call
    differ, and the second copy's tokens are the first copy's in the call with the next seed."""
    folder, _ = hf_folder("v2_lite")
    prompt = rng.integers(0, 97, size=9).tolist()
    engine = ktjax.load(folder, max_new_tokens=16, ignore_eos=True)
    a = engine.generate([prompt, prompt], temperature=1.5, seed=7).tokens
    b = engine.generate([prompt, prompt], temperature=1.5, seed=8).tokens
    assert a[0] != a[1] and a[1] == b[0] and len(a[1]) == 16


def test_sample_top_k_top_p_masks():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 2000)

    def draw(**kw):
        s = Sampling.make(temperature=1.0, **kw)
        return np.asarray(jax.vmap(lambda l, k: sample(l[None], k, s)[0])(logits, keys))

    assert set(draw(top_k=2)) == {0, 1}
    assert set(draw(top_p=0.7)) == {0, 1}        # 0.5 < 0.7 <= 0.8: the two most likely
    assert set(draw(top_p=0.5)) == {0}
    freq = np.bincount(draw(), minlength=4) / 2000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_prompt_longer_than_cache(hf_folder, rng):
    folder, _ = hf_folder("v2_lite")
    engine = ktjax.load(folder, cache_lens=32, max_new_tokens=8)
    prompt = rng.integers(0, 97, size=30).tolist()
    with pytest.raises(KtjaxError, match=r"30 tokens \+ max_new_tokens 8 = 38 exceeds the cache of 32"):
        engine.generate([prompt])
    out = engine.generate([prompt], truncate_left=True)
    assert out.stats["prompt_tokens"] == 24 and out.stats["cache_lens"] == 32


def test_cache_lens_auto_fits_the_budget(hf_folder):
    folder, _ = hf_folder("v2_lite")
    engine = ktjax.load(folder, cache_lens="auto", memory_budget="64MiB", max_new_tokens=4)
    cache_lens = engine.plan_cache(batch=2, needed=20).cache_lens
    per_token = engine.runtime.cache_dtype.bytes_per_token(engine.cfg)
    assert 20 <= cache_lens and engine.weight_bytes + 2 * cache_lens * per_token <= 64 * 2**20
    tiny = ktjax.load(folder, cache_lens="auto", memory_budget="1MiB")
    with pytest.raises(KtjaxError, match="memory budget 1.0 MiB is too small for the weights"):
        tiny.plan_cache(batch=1, needed=512)  # a 512-token chunk's activations alone take more
    assert engine.plan_cache(batch=1, needed=20).cache_lens <= engine.cfg.max_position_embeddings  # the window
    from ktjax.runtime.memory import weight_bytes_on_load
    assert weight_bytes_on_load(folder, 4) == engine.weight_bytes
    with pytest.raises(KtjaxError, match=r"memory budget 1\.0 KiB is smaller than the weights"):
        ktjax.load(folder, memory_budget="1KiB")  # refused from the headers, before any weight is read


def test_planner_says_what_capped_the_cache(hf_folder, rng):
    """auto capped by the window or by the budget says which; an explicit cache_lens past the window is capped
    with a note (generating exactly as a cache of the window's size); a budget that cannot hold the weights and
    activations is refused as such, not as holding them."""
    from ktjax.kv.cache import plan_cache_lens
    from ktjax.runtime import memory

    folder, _ = hf_folder("v2_lite")
    window = 512  # tests/hf_models.py's max_position_embeddings
    engine = ktjax.load(folder, cache_lens="auto", memory_budget="4GiB")
    roomy = engine.plan_cache(batch=1, needed=20)
    assert roomy.cache_lens == plan_cache_lens(window)[0]
    assert "capped at the model's window of 512 positions" in roomy.note
    act = memory.activation_bytes(engine.cfg, 1, 32, plan_cache_lens(32)[1])  # 20 tokens: one 32-token chunk
    per_token = engine.runtime.cache_dtype.bytes_per_token(engine.cfg)
    budget = int((engine.weight_bytes + act + 200 * per_token) / memory.HEADROOM) + 1  # room for 200 tokens
    tight = ktjax.load(folder, cache_lens="auto", memory_budget=str(budget)).plan_cache(batch=1, needed=20)
    assert 20 <= tight.cache_lens <= 200 and "what the memory budget" in tight.note and "window" not in tight.note

    prompt = rng.integers(0, 97, size=12).tolist()
    past = ktjax.load(folder, cache_lens=4096, max_new_tokens=6, ignore_eos=True)
    out = past.generate([prompt])
    assert out.stats["cache_lens"] == plan_cache_lens(window)[0]
    assert any("cache_lens 4096 capped at the model's window of 512" in n for n in out.stats["sharding_notes"])
    assert out.tokens == ktjax.load(folder, cache_lens=window, max_new_tokens=6, ignore_eos=True).generate(
        [prompt]).tokens

    budget = int((engine.weight_bytes + act / 2) / memory.HEADROOM)  # the weights fit, the activations do not
    small = ktjax.load(folder, cache_lens="auto", memory_budget=str(budget))
    with pytest.raises(KtjaxError, match=r"is too small for the weights \(.*\) and activations \(.*: 1 x a "
                                         r"32-token prefill chunk\), .* before any cache; raise --memory-budget, "
                                         r"or use narrower weights") as refused:
        small.plan_cache(batch=1, needed=20)
    assert "holds" not in str(refused.value)
    with pytest.raises(KtjaxError, match=r"holds the weights .* but only \d+ cached tokens per sequence"):
        ktjax.load(folder, cache_lens="auto", memory_budget="64MiB").plan_cache(batch=1, needed=10**7)


def test_non_finite_logits_stop_generation_with_a_message(hf_folder):
    """A model already in memory (no load-time check) whose embedding of one token is NaN: generation stops at
    that token's step, naming it, instead of sampling from NaN or returning an empty completion."""
    folder, _ = hf_folder("v2_lite")
    base = ktjax.load(folder)
    model = base.model
    model.embed[...] = model.embed[...].at[7].set(jnp.nan)
    engine = ktjax.load_model(base.cfg, model, max_new_tokens=6, ignore_eos=True)
    with pytest.raises(KtjaxError, match="non-finite logits .* at generation step 0 of sequence 1"):
        engine.generate([[3, 4, 5], [3, 4, 7]])


def test_sample_rows_with_their_own_settings_equal_each_row_alone():
    """The server samples a batch whose rows have their own settings and keys: each row draws what it would
    alone, whether or not another row needs the top-k / top-p filter (which a step runs only then)."""
    logits = jax.random.normal(jax.random.key(1), (5, 50)) * 3
    keys = jax.random.split(jax.random.key(2), 5)
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 3, 1.0), (1.2, 0, 0.6), (0.7, 5, 0.9)]
    for rows in (settings, settings[:2]):  # with and without a filtering row
        n = len(rows)
        s = Sampling(*(jnp.asarray(col, dtype) for col, dtype in
                       zip(zip(*rows), (jnp.float32, jnp.int32, jnp.float32))))
        batch = np.asarray(sample(logits[:n], keys[:n], s))
        alone = [int(sample(logits[i:i + 1], keys[i], Sampling.make(*rows[i]))[0]) for i in range(n)]
        assert batch.tolist() == alone
    assert batch[0] == int(jnp.argmax(logits[0]))
