"""The HTTP server through the official openai client: chat and completions, streaming or not, stop strings,
seeds, logprobs; greedy outputs equal engine.generate's. One server (conftest serve_stack) for all server tests."""
from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest

from serve_harness import MODEL, wait_until

PROMPT = "The key to reading a long document is"
N = 12


@pytest.fixture(scope="module")
def stack(serve_stack):
    return serve_stack


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack[2].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(engine, ids, n=N):
    """Greedy tokens and text from engine.generate, the oracle for outputs through the server."""
    out = engine.generate([ids], max_new_tokens=n)
    return out.tokens[0], out.texts[0]


def test_models_and_health(stack, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(stack[2].url + "/health").json() == {"status": "ok"}


def test_chat_greedy_equals_generate(stack, client):
    engine = stack[0]
    tokens, text = reference(engine, engine.encode_chat(PROMPT))
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=N,
                                       temperature=0)
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(tokens)
    assert r.usage.prompt_tokens == len(engine.encode_chat(PROMPT))
    assert r.choices[0].finish_reason == ("length" if len(tokens) == N else "stop")


def test_chat_stream_equals_whole(stack, client):
    engine = stack[0]
    tokens, text = reference(engine, engine.encode_chat(PROMPT))
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=N, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if len(tokens) == N else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)


def test_completions_text_and_token_ids(stack, client):
    engine = stack[0]
    ids = engine.tokenizer.encode(PROMPT)
    tokens, text = reference(engine, ids)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=N, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == len(tokens)
    assert by_text.object == "text_completion"


def test_completions_stream_raw_sse(stack):
    """The wire format itself: data: lines, a usage chunk, then [DONE]."""
    engine = stack[0]
    _, text = reference(engine, engine.tokenizer.encode(PROMPT))
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", stack[2].url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(p["choices"][0]["text"] for p in payloads if p["choices"]) == text
    assert payloads[-1]["usage"]["total_tokens"] == payloads[-1]["usage"]["prompt_tokens"] + \
        payloads[-1]["usage"]["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(stack, client, stream):
    engine = stack[0]
    _, text = reference(engine, engine.tokenizer.encode(PROMPT), n=24)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "the reference completion is too short to pick a stop string from"
    want = text[:text.index(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                  stream=stream)
    got = "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
    assert got == want
    if not stream:
        assert r.choices[0].finish_reason == "stop"


def test_stop_token_id_ends_before_it(stack, client):
    engine = stack[0]
    ids = engine.tokenizer.encode(PROMPT)
    tokens, _ = reference(engine, ids)
    stop_id = tokens[3]
    cut = tokens.index(stop_id)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=N, temperature=0,
                                  extra_body={"stop_token_ids": [stop_id]})
    assert r.choices[0].text == engine.tokenizer.decode(tokens[:cut])
    assert r.choices[0].finish_reason == "stop"


def test_seed_repeats_sampling(client):
    def once(seed):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    first = once(7)
    assert once(7) == first
    assert len({once(s) for s in (1, 2, 3)} | {first}) > 1  # sampling does depend on the seed


def test_chat_logprobs_match_the_model(stack, client):
    """The chosen tokens' log-probabilities and the top 3, against log-softmax of the model's own logits."""
    engine = stack[0]
    ids = engine.encode_chat(PROMPT)
    tokens, _ = reference(engine, ids, n=6)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(tokens)
    logits = engine.cached_logits([ids + tokens])[0, len(ids) - 1:len(ids) - 1 + len(tokens)]
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    for i, (entry, tok) in enumerate(zip(content, tokens)):
        assert entry.token == engine.tokenizer.decode([tok])
        assert abs(entry.logprob - logp[i, tok]) < 2e-2
        assert len(entry.top_logprobs) == 3
        best = np.argsort(-logp[i])[:3]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(logp[i, best], abs=2e-2)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely


def test_completion_logprobs_shape(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == r.choices[0].text


# Fields clients send with neutral values (issue 31): accepted, and the output is what it is without them.
NEUTRAL_FIELDS = [
    ("response_format text", dict(response_format={"type": "text"})),
    ("empty logit_bias", dict(logit_bias={})),
    ("zero logit biases", dict(logit_bias={"5": 0})),
    ("empty tools", dict(tools=[])),
    ("tool_choice none", dict(tool_choice="none")),
    ("parallel_tool_calls without tools", dict(parallel_tool_calls=False)),
    ("user", dict(user="someone")),
    ("all of them", dict(response_format={"type": "text"}, logit_bias={}, tools=[], tool_choice="none",
                         parallel_tool_calls=True, user="someone")),
]


@pytest.mark.parametrize("name, fields", NEUTRAL_FIELDS, ids=[n for n, _ in NEUTRAL_FIELDS])
def test_neutral_openai_fields_are_accepted(stack, client, name, fields):
    engine = stack[0]
    _, text = reference(engine, engine.encode_chat(PROMPT), n=4)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
                                       temperature=0, **fields)
    assert r.choices[0].message.content == text


def test_neutral_completion_fields_are_accepted(stack, client):
    _, text = reference(stack[0], stack[0].tokenizer.encode(PROMPT), n=4)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={},
                                  echo=False, best_of=1, user="someone")
    assert r.choices[0].text == text


def test_a_refused_field_is_named_to_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format" and "json_object" in e.value.body["message"]


def scrape(url: str) -> dict:
    """/metrics as {name: (type, {labels: value})}, read by Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: (f.type, {tuple(sorted(s.labels.items())): s.value for s in f.samples if s.name in
                              (f.name, f.name + "_total", f.name + "_count")})
            for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}


def value(metrics: dict, name: str, **labels) -> float:
    return metrics[name][1].get(tuple(sorted(labels.items())), 0.0)


def test_metrics_follow_prometheus_conventions(stack, client):
    """Counters for what accumulates (token counts move by exactly one request's work), gauges that are levels
    (none named _total), latency histograms, 4xx responses counted, a peak never below its current value."""
    url = stack[2].url
    before = scrape(url)
    r = client.completions.create(model=MODEL, prompt=PROMPT + " again", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": ""}).status_code == 400
    after = scrape(url)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert value(after, "ktjax_prefill_tokens") - value(before, "ktjax_prefill_tokens") == \
        r.usage.prompt_tokens - cached
    # the first token comes from the prefill; each later one from a decode step
    assert value(after, "ktjax_decode_tokens") - value(before, "ktjax_decode_tokens") == 4 - 1
    for name in ("ktjax_prefill_tokens", "ktjax_decode_tokens", "ktjax_steps", "ktjax_requests",
                 "ktjax_http_responses", "ktjax_prefix_cache_hit_tokens", "ktjax_prefix_cache_lookup_tokens"):
        assert after[name][0] == "counter", name
    for name in ("ktjax_time_to_first_token_seconds", "ktjax_inter_token_latency_seconds",
                 "ktjax_queue_wait_seconds", "ktjax_request_duration_seconds"):
        assert after[name][0] == "histogram", name
        assert value(after, name) > value(before, name), name  # a _count that moved
    gauges = [n for n, (kind, _) in after.items() if kind == "gauge"]
    assert not [n for n in gauges if n.endswith("_total") or "per_second" in n], gauges
    assert {"ktjax_running", "ktjax_waiting", "ktjax_pages_capacity", "ktjax_pages_used", "ktjax_pages_free",
            "ktjax_pages_cached", "ktjax_cache_bytes", "ktjax_device_memory_bytes"} <= set(gauges)
    assert value(after, "ktjax_pages_capacity") == stack[1].stats()["pages_total"]
    assert value(after, "ktjax_requests", reason="length") == value(before, "ktjax_requests", reason="length") + 1
    assert value(after, "ktjax_http_responses", code="400") == value(before, "ktjax_http_responses", code="400") + 1
    assert value(after, "ktjax_http_responses", code="200") >= value(before, "ktjax_http_responses", code="200") + 2
    assert value(after, "ktjax_device_memory_peak_bytes") >= value(after, "ktjax_device_memory_bytes") > 0


def test_client_disconnect_cancels(stack):
    """A stream closed after its first tokens is cancelled: the scheduler runs nothing soon after."""
    engine, scheduler, server = stack
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 600, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    assert wait_until(lambda: scheduler.stats()["running"] == 0 and scheduler.stats()["waiting"] == 0, 30)
    assert scheduler.stats()["pages_used"] == 0  # its pages went back (free, or cached for the prefix)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'ktjax_requests_total{reason="cancelled"}' in metrics


def test_unset_max_tokens_takes_the_server_default(stack, client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == stack[0].defaults.max_new_tokens
    assert r.choices[0].finish_reason == "length"
