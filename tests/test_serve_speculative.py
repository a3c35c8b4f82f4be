"""Speculative decoding in the server (speculative mtp: ktjax/serve/scheduler.py's verifying steps over the paged
cache, runtime/speculative.py's rules) on the demo model, whose MTP module is trained: greedy tokens equal to the
server's without speculation (and to Engine.generate's) for a batch of prompts of different lengths in two cache
formats, a stop token and max_tokens inside an accepted run cut exactly, the same seed gives the same tokens
whatever else runs, the per-row random streams keep the model's distribution (chi-square), a prefix cached after
rejected drafts serves a later request as a fresh prefill would, and the usage and /metrics count exactly the
request's drafts.
"""
from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.serve.scheduler import Finished, RequestParams, Scheduler, TokenEvent
from serve_harness import MODEL, ServerThread, demo_engine

K = 2          # draft_tokens
PAGE = 16
MAX_NEW = 24
LOGPROB_TOL = 2e-2  # a verifying pass of k + 1 positions against one-position decode steps, bf16 / int8 caches
PROMPTS = ["The key to reading a long document is", "Once upon a time", "A cache of latent vectors holds"]


class Stream:
    """One request's events; .steps: the verifying pass that delivered each token (a pass delivers the accepted
    drafts and the token after them together; a scheduler step runs up to MAX_STEPS passes), counted by the
    scheduler's speculative_verify_passes_total (else its steps_total)."""

    def __init__(self, sched=None):
        self.sched, self.tokens, self.events, self.steps = sched, [], [], []
        self.finished, self.done = None, threading.Event()

    def __call__(self, event):
        assert self.finished is None, "an event after Finished"
        if isinstance(event, Finished):
            self.finished = event
            self.done.set()
            return
        assert isinstance(event, TokenEvent)
        self.tokens.append(event.token_id)
        self.events.append(event)
        if self.sched is not None:
            counts = self.sched._counts
            self.steps.append(counts.get("speculative_verify_passes_total", counts["steps_total"]))

    def wait(self, timeout=300):
        assert self.done.wait(timeout), "no Finished event"
        return self


def params(max_tokens=MAX_NEW, **kw):
    return RequestParams(**{"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, **kw})


def run(sched, prompts, **kw) -> list[Stream]:
    """The prompts submitted together (one batch); their streams once all finished."""
    streams = [Stream(sched) for _ in prompts]
    for p, st in zip(prompts, streams):
        sched.submit(p, params(**kw), st)
    return [st.wait() for st in streams]


def scheduler(engine):
    """A running scheduler of one batch bucket (4 rows, padded) and one prefill chunk (16, chunk_size): two
    programs to compile, a prefill and a decode (verifying) step, whatever joins and leaves."""
    s = Scheduler(engine, max_batch=4, page_size=PAGE, n_pages=64)
    s.programs.batches = [4]
    assert s.programs.chunks == [16]
    s.start()
    return s


@pytest.fixture(scope="module")
def servers():
    """fmt -> (plain engine, its scheduler, speculating engine, its scheduler), built once per format."""
    built = {}

    def get(fmt):
        if fmt not in built:
            settings = dict(cache_dtype=fmt, chunk_size=16, ignore_eos=True)
            plain, spec = demo_engine(**settings), demo_engine(speculative="mtp", draft_tokens=K, **settings)
            built[fmt] = plain, scheduler(plain), spec, scheduler(spec)
        return built[fmt]

    yield get
    for _, plain_sched, _, spec_sched in built.values():
        plain_sched.shutdown(5)
        spec_sched.shutdown(5)


def ids(engine):
    return [engine.tokenizer.encode(p) for p in PROMPTS]


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_greedy_tokens_equal_serving_without_speculation(servers, fmt):
    """A batch of three prompts of different lengths: token for token the server's without speculation, with
    drafts accepted and rejected, and the log-probabilities of the same tokens."""
    plain, plain_sched, spec, spec_sched = servers(fmt)
    prompts = ids(spec)
    assert len(set(map(len, prompts))) == 3
    ref = run(plain_sched, prompts, logprobs=2)
    got = run(spec_sched, prompts, logprobs=2)
    assert [s.tokens for s in got] == [s.tokens for s in ref]
    drafted = sum(s.finished.speculative["drafted"] for s in got)
    accepted = sum(s.finished.speculative["accepted"] for s in got)
    assert 0 < accepted < drafted, (accepted, drafted)
    for s, r in zip(got, ref):
        assert s.finished.reason == "length" and s.finished.completion_tokens == MAX_NEW
        f = s.finished.speculative
        # the first token comes from the prefill, each later one from a pass
        assert f["drafted"] == K * f["verify_passes"] and f["verify_passes"] == len(set(s.steps[1:]))
        # as an accepted draft or the token after them (the last pass may be cut by max_tokens)
        assert f["verify_passes"] + f["accepted"] - 1 <= MAX_NEW - 1 <= f["verify_passes"] + f["accepted"]
        # the model's log-probabilities, from the verifying pass's logits
        np.testing.assert_allclose([e.logprob for e in s.events], [e.logprob for e in r.events], atol=LOGPROB_TOL)
        assert [e.top_logprobs[0][0] for e in s.events] == [e.top_logprobs[0][0] for e in r.events]
    if fmt == "bf16":  # and Engine.generate's
        assert plain.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0).tokens == [s.tokens for s in got]


def accepted_run(stream: Stream):
    """(index, token) of a token delivered inside a verifying step's run, not last in it, whose first occurrence
    in the completion is there; None if there is none."""
    for i in range(1, len(stream.tokens) - 1):
        t = stream.tokens[i]
        inside = stream.steps[i] == stream.steps[i + 1]  # token i + 1 from the same pass (token 0: the prefill's)
        if inside and stream.tokens.index(t) == i:
            return i, t
    return None


def test_stop_token_and_max_tokens_inside_an_accepted_run(servers):
    """A stop token that the pass accepted with tokens after it: the completion ends at it (reason stop) and the
    tokens after it are not emitted; max_tokens ending inside a run likewise (reason length)."""
    plain, plain_sched, spec, spec_sched = servers("bf16")
    prompts = ids(spec)
    full = run(spec_sched, prompts)
    found = [(p, s, accepted_run(s)) for p, s in zip(prompts, full) if accepted_run(s) is not None]
    assert found, "no run of accepted drafts to cut"
    prompt, stream, (i, stop) = found[0]
    cut = run(spec_sched, [prompt], stop_token_ids=(stop,))[0]
    assert cut.tokens == stream.tokens[:i + 1] and cut.finished.reason == "stop"
    assert cut.finished.completion_tokens == i + 1
    short = run(spec_sched, [prompt], max_tokens=i + 1)[0]
    assert short.tokens == stream.tokens[:i + 1] and short.finished.reason == "length"
    ref = run(plain_sched, [prompt], max_tokens=i + 1, stop_token_ids=(stop,))[0]
    assert ref.tokens == cut.tokens


def test_same_seed_same_tokens_whatever_else_runs(servers):
    """Sampling (temperature 1, top-k): a request's tokens depend on its seed alone, not on the batch it runs in
    (Engine.generate's row with that seed gets them too), and repeated traffic compiles nothing."""
    _, _, spec, spec_sched = servers("bf16")
    prompts = ids(spec)
    sampled = dict(temperature=1.0, top_k=50, seed=7)
    alone = run(spec_sched, prompts[:1], **sampled)[0]
    together = run(spec_sched, prompts, **sampled)
    compiled = spec.compile_count
    again = run(spec_sched, prompts[:1], **sampled)[0]
    assert alone.tokens == together[0].tokens == again.tokens
    other = run(spec_sched, prompts[:1], **dict(sampled, seed=8))[0]
    assert other.tokens != alone.tokens
    assert spec.compile_count == compiled  # other acceptance, the same programs
    # one runtime (runtime/batch.py): Engine.generate's row i draws from seed + i, as a request with that seed
    out = spec.generate([prompts[1], prompts[0]], max_new_tokens=MAX_NEW, **dict(sampled, seed=6)).tokens
    assert out[1] == alone.tokens


def test_a_prefix_cached_after_rejections_serves_like_a_fresh_prefill(servers):
    """A request runs with drafts rejected; a follow-up prompt (its prompt, its completion and more) finds its pages
    in the prefix cache, completion pages included: greedy tokens and logprobs as the server without speculation
    gives, and sampled tokens as a fresh server's (whose prefill wrote every page itself)."""
    plain, plain_sched, spec, spec_sched = servers("bf16")
    prompt = ids(spec)[0] * 3  # several pages
    first = run(spec_sched, [prompt])[0]
    assert first.finished.speculative["accepted"] < first.finished.speculative["drafted"]
    follow = prompt + first.tokens + [5, 9]
    greedy = run(spec_sched, [follow], logprobs=3)[0]
    # the pages the first request's model and MTP slices filled (the MTP's lag its last pass)
    assert greedy.finished.cached_tokens >= (len(prompt) + MAX_NEW - K - 2) // PAGE * PAGE > len(prompt)
    ref = run(plain_sched, [follow], logprobs=3)[0]
    assert greedy.tokens == ref.tokens
    np.testing.assert_allclose([e.logprob for e in greedy.events], [e.logprob for e in ref.events], atol=2e-2)
    sampled = dict(temperature=1.0, seed=3)
    cached = run(spec_sched, [follow], **sampled)[0]
    assert cached.finished.cached_tokens > len(prompt)
    fresh_sched = scheduler(spec)  # same pool shape: the same compiled programs, an empty prefix cache
    try:
        fresh = run(fresh_sched, [follow], **sampled)[0]
    finally:
        fresh_sched.shutdown(5)
    assert fresh.finished.cached_tokens == 0 and fresh.tokens == cached.tokens
    # a prompt with another token after the first page: that page's last MTP entry is not its, so not reused
    other = follow[:PAGE] + [(follow[PAGE] + 1) % spec.cfg.vocab_size] + follow[PAGE + 1:]
    assert run(spec_sched, [other], max_tokens=2)[0].finished.cached_tokens == 0


def test_usage_and_metrics_count_the_requests_drafts(servers):
    """Over HTTP: usage.speculative of a completion, and /metrics' counters moved by exactly it; a stop string
    inside the completion cuts the text there."""
    import httpx

    from ktjax.serve.app import create_app
    from test_serve import scrape, value

    _, _, spec, spec_sched = servers("bf16")
    server = ServerThread(create_app(spec, spec_sched, model_name=MODEL))
    try:
        before = scrape(server.url)
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens":
                                                              MAX_NEW, "temperature": 0, "ignore_eos": True},
                       timeout=300)
        assert r.status_code == 200, r.text
        after = scrape(server.url)
        stats = spec_sched.stats()
        data = httpx.get(server.url + "/dashboard/data", timeout=30).json()["now"]
        text = r.json()["choices"][0]["text"]
        stop = text[len(text) // 2:len(text) // 2 + 3]
        cut = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens":
                                                                MAX_NEW, "temperature": 0, "ignore_eos": True,
                                                                "stop": stop}, timeout=300).json()
    finally:
        server.stop()
    assert cut["choices"][0]["text"] == text[:text.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    usage = r.json()["usage"]
    spec_usage = usage["speculative"]
    assert spec_usage["drafted"] == K * spec_usage["verify_passes"] and 0 < spec_usage["accepted"]

    def moved(name):
        return value(after, name) - value(before, name)

    assert moved("ktjax_speculative_drafted_tokens") == spec_usage["drafted"]
    assert moved("ktjax_speculative_accepted_tokens") == spec_usage["accepted"]
    assert moved("ktjax_speculative_verify_passes") == spec_usage["verify_passes"]
    assert moved("ktjax_decode_tokens") == usage["completion_tokens"] - 1
    for name in ("ktjax_speculative_drafted_tokens", "ktjax_speculative_accepted_tokens",
                 "ktjax_speculative_verify_passes"):
        assert after[name][0] == "counter"
    assert value(after, "ktjax_speculative_acceptance_rate") == pytest.approx(
        stats["speculative_accepted_total"] / stats["speculative_drafted_total"])
    assert value(after, "ktjax_speculative_tokens_per_pass") == pytest.approx(
        stats["decode_tokens_total"] / stats["speculative_verify_passes_total"])
    assert data["speculative_drafted_total"] == stats["speculative_drafted_total"]


def test_no_speculation_no_speculative_usage(servers):
    plain, plain_sched, _, _ = servers("bf16")
    s = run(plain_sched, ids(plain)[:1], max_tokens=2)[0]
    assert s.finished.speculative is None and "speculative_drafted_total" not in plain_sched.stats()


def test_the_serve_command_passes_speculative_mtp_to_the_server():
    """python -m ktjax.serve --speculative mtp --draft-tokens 2: the settings reach the scheduler."""
    from ktjax.cli.common import load_engine, resolve_settings
    from ktjax.cli.serve import build_parser

    args = build_parser().parse_args(["--speculative", "mtp", "--draft-tokens", "2", "--cache-dtype", "float32"])
    sched = Scheduler(load_engine(args, resolve_settings(args)), max_batch=2, page_size=PAGE, n_pages=8)
    assert sched.draft_tokens == 2 and sched.pool.c_kv.shape[0] == sched.engine.cfg.num_hidden_layers + 1
    assert sched.max_context == 8 * PAGE - 2  # pages keep room for the drafts


def test_per_row_streams_keep_the_models_distribution():
    """speculative's rejection rule with a random stream per row (the server's): 10000 rows, one draft distribution
    q and one target p per position (vocabulary 6, k = 2): the first token is distributed as p_0 and, where the
    first draft was accepted, the second as p_1 (chi-square); each row's tokens are those it gets alone."""
    from ktjax.runtime import speculative
    from ktjax.runtime.sampling import Sampling

    rows, vocab, k = 10000, 6, 2
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(vocab), size=k + 1).astype(np.float32)
    q = rng.dirichlet(np.ones(vocab), size=k).astype(np.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(rows))
    sampling = Sampling(jnp.ones(rows), jnp.zeros(rows, jnp.int32), jnp.ones(rows))

    @jax.jit
    def emitted(keys, sampling):
        k_draft, k_accept = speculative._split(keys, 2)
        drafts = jnp.stack([speculative._draw(jnp.broadcast_to(q[j], (keys.shape[0], vocab)), key, sampling)
                            for j, key in enumerate(speculative._split(k_draft, k))], 1)
        n, bonus = speculative._accept(jnp.broadcast_to(p, (keys.shape[0], k + 1, vocab)),
                                       jnp.broadcast_to(q, (keys.shape[0], k, vocab)), drafts, k_accept, sampling)
        return jnp.where(n > 0, drafts[:, 0], bonus), jnp.where(n > 1, drafts[:, 1], bonus), n

    first, second, n = map(np.asarray, emitted(keys, sampling))
    assert 0.1 < np.mean(n > 0) < 0.9  # drafts both accepted and rejected
    assert chi_square_p(first, p[0]) > 1e-4
    assert chi_square_p(second[n > 0], p[1]) > 1e-4
    assert chi_square_p(first, q[0]) < 1e-4  # the test has power: the drafts' own distribution fails it
    alone = emitted(*jax.tree.map(lambda x: x[3:4], (keys, sampling)))  # row 3 as a batch of one
    assert [int(np.asarray(x)[0]) for x in alone] == [first[3], second[3], n[3]]


def chi_square_p(tokens, probs) -> float:
    from scipy import stats

    probs = np.asarray(probs, np.float64) / np.sum(probs, dtype=np.float64)
    return float(stats.chisquare(np.bincount(tokens, minlength=len(probs)), probs * len(tokens)).pvalue)
