"""The continuous-batching scheduler (ktjax/serve/scheduler.py) on a tiny model: greedy tokens equal
Engine.generate's whatever else is in the batch, prefix caching, logprobs against the full forward, stops,
cancellation, admission errors, and no compilation after warmup."""
import threading

import numpy as np
import pytest

import ktjax
from ktjax.errors import KtjaxError
from ktjax.serve.scheduler import (Finished, PromptTooLong, QueueFull, RequestParams, Scheduler, ShuttingDown,
                                   TokenEvent)

PAGE = 8
MAX_NEW = 6


class Stream:
    """Collects one request's events; .done is set by Finished."""

    def __init__(self):
        self.tokens, self.events, self.finished, self.done = [], [], None, threading.Event()

    def __call__(self, event):
        assert self.finished is None, "an event after Finished"
        if isinstance(event, Finished):
            self.finished = event
            self.done.set()
        else:
            assert isinstance(event, TokenEvent)
            self.tokens.append(event.token_id)
            self.events.append(event)

    def wait(self, timeout=120):
        assert self.done.wait(timeout), "no Finished event"
        return self


@pytest.fixture(scope="module")
def engine(hf_folder):
    folder, _ = hf_folder("v2_lite")
    # chunk_size 32: prefill chunks of 16 (two rows per step) and 32 (one row). cache_lens only sizes the
    # references' (generate's) cache: one size for all of them keeps their compiled programs few.
    return ktjax.load(folder, cache_dtype="float32", chunk_size=32, cache_lens=64, ignore_eos=True,
                      max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def sched(engine):
    s = Scheduler(engine, max_batch=4, page_size=PAGE, n_pages=48, max_queue=8)
    s.warmup()
    s.start()
    yield s
    s.shutdown(5)


def greedy(max_tokens=MAX_NEW, **kw):
    return RequestParams(**{"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, **kw})


def reference(engine, prompt, n=MAX_NEW):
    return engine.generate([prompt], max_new_tokens=n, temperature=0.0).tokens[0]


def test_greedy_tokens_equal_generate_with_joins_and_leaves(engine, sched):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, size=n).tolist() for n in (5, 25, 12, 21, 3)]
    lengths = [MAX_NEW, 3, MAX_NEW, 2, MAX_NEW]  # short requests leave while others run
    compiled = engine.compile_count
    first = [Stream() for _ in prompts[:3]]
    for p, n, st in zip(prompts, lengths, first):
        sched.submit(p, greedy(n), st)
    first[1].wait()  # later requests join a running batch
    later = [Stream() for _ in prompts[3:]]
    for p, n, st in zip(prompts[3:], lengths[3:], later):
        sched.submit(p, greedy(n), st)
    streams = [st.wait() for st in first + later]
    assert engine.compile_count == compiled, "steady traffic compiled a program after warmup"
    for p, n, st in zip(prompts, lengths, streams):
        assert st.tokens == reference(engine, p, MAX_NEW)[:n]
        assert st.finished.reason == "length" and st.finished.completion_tokens == n
        assert st.finished.prompt_tokens == len(p) and st.finished.ttft_s > 0
    stats = sched.stats()
    assert stats["running"] == 0 and stats["pages_used"] == 0
    assert stats["pages_free"] + stats["pages_cached"] == stats["pages_total"] == 48


def test_generate_and_the_scheduler_sample_the_same_tokens(engine, sched):
    """One runtime (runtime/batch.py): a sampled generate of two prompts of different lengths (row i draws from
    seed + i; the short one decodes while the long one prefills) gives each row the tokens a request with that
    seed gets from the scheduler."""
    prompts = [list(range(3, 40)), [7, 8, 9]]
    out = engine.generate(prompts, temperature=1.3, top_k=20, seed=40).tokens
    for i, prompt in enumerate(prompts):
        st = Stream()
        sched.submit(prompt, RequestParams(max_tokens=MAX_NEW, temperature=1.3, top_k=20, seed=40 + i,
                                           ignore_eos=True), st)
        assert st.wait().tokens == out[i]


def test_prefix_cache_prefills_only_the_rest(engine, sched):
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, 97, size=4 * PAGE + 3).tolist()
    a, b = prefix + [5, 6, 7], prefix + [9]
    before = sched.stats()
    first = Stream()
    sched.submit(a, greedy(), first)
    first.wait()
    second = Stream()
    sched.submit(b, greedy(), second)
    second.wait()
    assert first.finished.cached_tokens == 0 and second.finished.cached_tokens == 4 * PAGE
    after = sched.stats()
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] == 4 * PAGE
    assert after["prefix_lookup_tokens"] - before["prefix_lookup_tokens"] == len(a) + len(b)
    assert after["prefill_tokens_total"] - before["prefill_tokens_total"] == len(a) + len(b) - 4 * PAGE
    assert first.tokens == reference(engine, a) and second.tokens == reference(engine, b)


def test_next_turn_reuses_the_completion_pages(engine, sched):
    """Full pages that hold generated tokens are cached when the request ends: a follow-up prompt (prompt +
    completion + more) finds them."""
    prompt = np.random.default_rng(5).integers(0, 97, size=4 * PAGE + 3).tolist()
    first = Stream()
    sched.submit(prompt, greedy(), first)
    first.wait()
    follow = prompt + first.tokens + [4, 2]
    second = Stream()
    sched.submit(follow, greedy(), second)
    second.wait()
    # The cache held the prompt and all but the last generated token: 4 * PAGE + 3 + 5 = 5 full pages.
    assert second.finished.cached_tokens == 5 * PAGE
    assert second.tokens == reference(engine, follow)


def test_logprobs_match_the_full_forward(engine, sched):
    prompt = np.random.default_rng(2).integers(0, 97, size=11).tolist()
    st = Stream()
    sched.submit(prompt, greedy(4, logprobs=5), st)
    st.wait()
    logits = engine.logits(prompt + st.tokens)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    for i, (tok, ev) in enumerate(zip(st.tokens, st.events)):
        row = logp[len(prompt) - 1 + i]
        assert abs(ev.logprob - row[tok]) < 1e-4
        top = np.argsort(-row)[:5]
        assert [t for t, _ in ev.top_logprobs] == top.tolist()
        np.testing.assert_allclose([lp for _, lp in ev.top_logprobs], row[top], atol=1e-4)


def test_stop_token_ends_the_request(engine, sched):
    prompt = [1, 2, 3, 4, 5]
    ref = reference(engine, prompt)
    st = Stream()
    sched.submit(prompt, greedy(stop_token_ids=(ref[2],)), st)
    st.wait()
    stop_at = ref.index(ref[2])
    assert st.tokens == ref[:stop_at + 1] and st.finished.reason == "stop"


def test_sampling_is_reproducible_per_seed(sched):
    prompt = [7, 8, 9]
    runs = []
    for seed in (3, 3, 4):
        st = Stream()
        sched.submit(prompt, RequestParams(max_tokens=MAX_NEW, temperature=1.5, seed=seed, ignore_eos=True), st)
        runs.append(st.wait().tokens)
    assert runs[0] == runs[1] and len(runs[0]) == MAX_NEW


def test_cancel_frees_the_pages(sched):
    st = Stream()
    h = sched.submit([1] * 20, RequestParams(max_tokens=200, ignore_eos=True), st)
    sched.cancel(h)
    st.wait()
    assert st.finished.reason == "cancelled" and len(st.tokens) < 200
    assert sched.stats()["pages_used"] == 0


def test_a_raising_callback_cancels_only_its_request(engine, sched):
    class Broken(Stream):
        def __call__(self, event):
            super().__call__(event)
            if isinstance(event, TokenEvent):
                raise RuntimeError("client went away")

    broken, fine = Broken(), Stream()
    sched.submit([6, 6, 6], greedy(), broken)
    sched.submit([6, 6, 7], greedy(), fine)
    assert broken.wait().finished.reason == "cancelled" and len(broken.tokens) == 1
    assert fine.wait().tokens == reference(engine, [6, 6, 7])
    assert sched.stats()["pages_used"] == 0


def test_shutdown_cancels_what_outlives_the_timeout(engine, sched):
    s = Scheduler(engine, max_batch=4, page_size=PAGE, n_pages=48)  # same shapes: reuses sched's programs
    s.start()
    st = Stream()
    s.submit([1, 2, 3], RequestParams(max_tokens=370, ignore_eos=True), st)
    s.shutdown(0)
    assert st.done.is_set() and st.finished.reason == "cancelled" and len(st.tokens) < 370
    assert not s._thread.is_alive() and s.stats()["pages_used"] == 0
    patient = Scheduler(engine, max_batch=4, page_size=PAGE, n_pages=48)
    patient.start()
    short = Stream()
    patient.submit([1, 2, 3], greedy(), short)
    patient.shutdown(120)  # running requests finish within the timeout
    assert short.finished.reason == "length" and len(short.tokens) == MAX_NEW


def test_admission_errors(engine, sched):
    with pytest.raises(PromptTooLong, match="48 pages of 8 tokens"):
        sched.submit([1] * 300, greedy(200), Stream())
    for bad in (dict(logprobs=21), dict(temperature=-1.0), dict(top_p=0.0), dict(seed=-2)):
        with pytest.raises(KtjaxError):
            sched.submit([1, 2], greedy(**bad), Stream())
    with pytest.raises(KtjaxError, match="token ids"):
        sched.submit([1, 500], greedy(), Stream())
    with pytest.raises(KtjaxError, match="non-empty"):
        sched.submit([], greedy(), Stream())
    with pytest.raises(KtjaxError, match="stop_token_ids"):
        sched.submit([1], greedy(stop_token_ids=("x",)), Stream())
    with pytest.raises(KtjaxError, match="max_new_tokens"):
        sched.submit([1], greedy(0), Stream())


def test_short_prompts_prefill_together(engine, sched):
    """Two prompts of <= 16 tokens fill one step's 32-token budget: the first step prefills both (their first
    tokens), each later step decodes one more: MAX_NEW steps (one at a time would take MAX_NEW + 1). Same tokens
    as generate."""
    s = Scheduler(engine, max_batch=4, page_size=PAGE, n_pages=48)  # same shapes: reuses sched's programs
    compiled = engine.compile_count
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]]
    streams = [Stream(), Stream()]
    for p, st in zip(prompts, streams):
        s.submit(p, greedy(), st)
    s.start()  # both are waiting: the first step admits and prefills them together
    for p, st in zip(prompts, streams):
        assert st.wait().tokens == reference(engine, p)
    s.shutdown(5)
    assert s.stats()["steps_total"] == MAX_NEW and s.stats()["prefill_tokens_total"] == 17
    assert engine.compile_count == compiled


def test_queue_full_and_shutdown(engine):
    s = Scheduler(engine, max_batch=1, page_size=PAGE, n_pages=16, max_queue=1)  # not started: nothing runs
    s.submit([1, 2], greedy(), Stream())   # waits (would run first)
    with pytest.raises(QueueFull):
        s.submit([1, 2], greedy(), Stream())
    s.shutdown(0)
    with pytest.raises(ShuttingDown):
        s.submit([1, 2], greedy(), Stream())


def test_decode_bursts_emit_what_single_steps_emit(engine):
    """Decode steps run several per dispatch when no request waits (programs.decode_steps): a batch of sampled,
    greedy, stopping and length-limited requests, run once a step per dispatch and once MAX_STEPS per
    dispatch, emits the same tokens, log-probabilities and ends (each row's random stream counts on inside the
    burst) in fewer dispatches, and caches the same pages."""
    from ktjax.runtime.decode import MAX_STEPS

    stop = reference(engine, [4, 4, 2])[2]
    asks = [([7, 8, 9], RequestParams(max_tokens=MAX_NEW, temperature=1.3, top_k=20, seed=11, ignore_eos=True,
                                      logprobs=3)),
            ([4, 4, 2], greedy(stop_token_ids=(stop,))),
            ([5] * 9, RequestParams(max_tokens=3, temperature=0.8, seed=5, ignore_eos=True)),
            (list(range(1, 2 * PAGE + 2)), greedy())]
    runs = []
    for burst in (1, MAX_STEPS):
        s = Scheduler(engine, max_batch=4, page_size=PAGE, n_pages=48)  # same shapes: reuses sched's programs
        s._burst = lambda burst=burst: burst
        run, dispatches = s._run, []
        s._run = lambda reqs, chunk, *a, **k: (dispatches.append(chunk), run(reqs, chunk, *a, **k))[1]
        streams = [Stream() for _ in asks]
        for (prompt, params), st in zip(asks, streams):
            s.submit(prompt, params, st)
        s.start()  # all four wait: the first step admits and prefills them together
        for st in streams:
            st.wait()
        s.shutdown(5)
        runs.append((streams, dispatches.count(1), s.stats()))
    (single, single_dispatches, single_stats), (burst, burst_dispatches, burst_stats) = runs
    for a, b in zip(single, burst):
        assert a.tokens == b.tokens and a.finished.reason == b.finished.reason
        assert [(e.logprob, e.top_logprobs) for e in a.events] == [(e.logprob, e.top_logprobs) for e in b.events]
    assert [st.finished.reason for st in burst] == ["length", "stop", "length", "length"]
    assert burst[1].tokens[-1] == stop and burst[3].tokens == reference(engine, asks[3][0])
    assert burst[0].events[0].top_logprobs and burst[2].events[0].top_logprobs is None
    # a decode dispatch beside each prefill step but the first (nothing decodes yet), then one per step, or one
    # burst for the rest
    assert burst_dispatches < single_dispatches == single_stats["steps_total"] - 1
    for key in ("steps_total", "decode_tokens_total", "pages_cached", "prefix_hit_tokens"):
        assert single_stats[key] == burst_stats[key], key
