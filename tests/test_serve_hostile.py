"""Hostile requests AS A TABLE: each gets its status and an OpenAI-shaped error naming the field, and the server
still answers afterwards. Plus the API key, the scheduler's refusals (429, 503) and draining."""
from __future__ import annotations

import json

import httpx
import pytest

from serve_harness import MODEL, RefusingScheduler, ServerThread

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
OK_TEXT = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


def chat(**changes):
    return json.dumps({**OK_CHAT, **changes})


def text(**changes):
    return json.dumps({**OK_TEXT, **changes})


def without(body: dict, key: str) -> str:
    return json.dumps({k: v for k, v in body.items() if k != key})


# (name, method, path, raw body, expected status, expected param (None: any))
CASES = [
    ("bad JSON", "POST", COMPLETIONS, '{"model": ', 400, None),
    ("not UTF-8", "POST", COMPLETIONS, b'\xff\xfe{}', 400, None),
    ("array body", "POST", COMPLETIONS, "[1, 2]", 400, None),
    ("deep nesting", "POST", COMPLETIONS, "[" * 100_000, 400, None),
    ("NaN", "POST", COMPLETIONS, text()[:-1] + ', "temperature": NaN}', 400, None),
    ("Infinity", "POST", CHAT, chat()[:-1] + ', "top_p": Infinity}', 400, None),
    ("1e400 overflows to inf", "POST", COMPLETIONS, text()[:-1] + ', "temperature": 1e400}', 400, "temperature"),
    ("max_tokens a string", "POST", COMPLETIONS, text(max_tokens="5"), 400, "max_tokens"),
    ("stream a number", "POST", CHAT, chat(stream=1), 400, "stream"),
    ("temperature a string", "POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("unknown field", "POST", COMPLETIONS, text(frobnicate=True), 400, "frobnicate"),
    ("unknown message field", "POST", CHAT, chat(messages=[{"role": "user", "content": "x", "mood": 1}]), 400,
     "messages.0.mood"),
    ("missing model", "POST", CHAT, without(OK_CHAT, "model"), 400, "model"),
    ("missing messages", "POST", CHAT, without(OK_CHAT, "messages"), 400, "messages"),
    ("empty messages", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("bad role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
    ("content a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    ("empty prompt", "POST", COMPLETIONS, text(prompt=""), 400, "prompt"),
    ("empty token list", "POST", COMPLETIONS, text(prompt=[]), 400, "prompt"),
    ("token id past the vocabulary", "POST", COMPLETIONS, text(prompt=[1, 10**6]), 400, "prompt"),
    ("negative token id", "POST", COMPLETIONS, text(prompt=[-1]), 400, "prompt"),
    ("mixed prompt list", "POST", COMPLETIONS, text(prompt=[1, "a"]), 400, "prompt.1"),
    ("huge max_tokens", "POST", COMPLETIONS, text(max_tokens=10**9), 400, "max_tokens"),
    ("huge max_completion_tokens", "POST", CHAT, chat(max_tokens=None, max_completion_tokens=2**40), 400,
     "max_completion_tokens"),
    ("zero max_tokens", "POST", COMPLETIONS, text(max_tokens=0), 400, "max_tokens"),
    ("negative max_tokens", "POST", CHAT, chat(max_tokens=-3), 400, "max_tokens"),
    ("negative temperature", "POST", COMPLETIONS, text(temperature=-0.5), 400, "temperature"),
    ("top_p zero", "POST", COMPLETIONS, text(top_p=0), 400, "top_p"),
    ("negative top_k", "POST", COMPLETIONS, text(top_k=-1), 400, "top_k"),
    ("negative seed", "POST", COMPLETIONS, text(seed=-1), 400, "seed"),
    ("n=2", "POST", CHAT, chat(n=2), 400, "n"),
    ("logprobs over 20", "POST", COMPLETIONS, text(logprobs=21), 400, "logprobs"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("empty stop string", "POST", COMPLETIONS, text(stop=[""]), 400, "stop"),
    ("stop id past the vocabulary", "POST", COMPLETIONS, text(stop_token_ids=[10**7]), 400, "stop"),
    ("penalty", "POST", CHAT, chat(presence_penalty=1.0), 400, "presence_penalty"),
    ("stream_options without stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("unknown model", "POST", CHAT, chat(model="gpt-9"), 404, "model"),
    ("unknown model card", "GET", "/v1/models/gpt-9", None, 404, "model"),
    ("unknown route", "POST", "/v1/embeddings", text(), 404, None),
    ("wrong method", "GET", COMPLETIONS, None, 405, None),
    ("10 MB body", "POST", COMPLETIONS, text(prompt="a" * 10_000_000), 413, None),
    ("prompt past the window", "POST", COMPLETIONS, text(prompt=[5] * 5000), 413, "prompt"),
    ("prompt + max_tokens past the window", "POST", COMPLETIONS, text(prompt=[5] * 1000, max_tokens=100), 413,
     "prompt"),
]


def assert_openai_error(r: httpx.Response, status: int, param=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_hostile_requests(serve_stack):
    url = serve_stack[2].url
    with httpx.Client(base_url=url, timeout=60) as http:
        for name, method, path, raw, status, param in CASES:
            r = http.request(method, path, content=raw, headers={"content-type": "application/json"})
            error = assert_openai_error(r, status, param)
            if param is not None:
                assert param.split(".")[0] in error["message"], (name, error)
            assert http.get("/health").status_code == 200, name
        # and it still serves a real request
        r = http.post(COMPLETIONS, content=text())
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.fixture(scope="module")
def side_servers(serve_stack):
    """Apps over the same engine: one with an API key, one whose scheduler refuses with `QueueFull`, one with
    `ShuttingDown`."""
    from ktjax.serve.app import create_app
    from ktjax.serve.scheduler import QueueFull, ShuttingDown

    engine, scheduler = serve_stack[0], serve_stack[1]
    servers = {"key": ServerThread(create_app(engine, scheduler, model_name=MODEL, api_key="sekret")),
               "busy": ServerThread(create_app(engine, RefusingScheduler(QueueFull("8 waiting")),
                                               model_name=MODEL)),
               "closing": ServerThread(create_app(engine, RefusingScheduler(ShuttingDown("bye")),
                                                  model_name=MODEL))}
    yield servers
    for s in servers.values():
        s.stop()


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models", "/nope"])
def test_api_key_on_every_route(side_servers, path):
    url = side_servers["key"].url + path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        assert_openai_error(httpx.get(url, headers=headers), 401)
    ok = httpx.get(url, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == (404 if path == "/nope" else 200)


def test_scheduler_refusals_map_to_429_and_503(side_servers):
    r = httpx.post(side_servers["busy"].url + COMPLETIONS, content=text())
    assert_openai_error(r, 429)
    r = httpx.post(side_servers["closing"].url + CHAT, content=chat())
    assert_openai_error(r, 503)


def test_draining_refuses_new_requests(side_servers):
    server = side_servers["closing"]
    app = server.server.config.app
    app.state.draining = True
    try:
        assert_openai_error(httpx.get(server.url + "/health"), 503)
        assert_openai_error(httpx.post(server.url + COMPLETIONS, content=text()), 503)
    finally:
        app.state.draining = False


def test_chunked_body_over_the_limit_is_413(serve_stack):
    """No Content-Length (chunked): the limit is counted while reading."""
    def body():
        yield b'{"model": "demo_model", "prompt": "'
        for _ in range(10):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = httpx.post(serve_stack[2].url + COMPLETIONS, content=body(), timeout=60)
    assert_openai_error(r, 413)
    assert httpx.get(serve_stack[2].url + "/health").status_code == 200
