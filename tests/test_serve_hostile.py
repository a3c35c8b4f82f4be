"""Hostile requests AS A TABLE: each gets its status and an OpenAI-shaped error naming the field, and the server
still answers afterwards. Plus the API key, the scheduler's refusals (429, 503) and draining; slow and idle
clients dropped; signals while the server warms up and drains (issue 32)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serve_harness import MODEL, RefusingScheduler, ServerThread, free_port

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
    # issue 32: text that UTF-8 cannot hold (JSON's "\ud800" escape), structured input past a limit, ids not ints
    ("lone surrogate in the prompt", "POST", COMPLETIONS, text(prompt="a\ud800"), 400, "prompt"),
    ("lone surrogate in a message", "POST", CHAT, chat(messages=[{"role": "user", "content": "\udc00x"}]), 400,
     "messages.0.content"),
    ("lone surrogate in a content part", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]), 400,
     "messages.0.content.0.text"),
    ("lone surrogate in a stop string", "POST", COMPLETIONS, text(stop=["\ud800"]), 400, "stop.0"),
    ("lone surrogate in the model name", "POST", CHAT, chat(model="\ud800"), 400, "model"),
    ("lone surrogate in a field name", "POST", COMPLETIONS, text()[:-1] + ', "\\ud800": 1}', 400, None),
    ("integer of 5000 digits", "POST", COMPLETIONS, text()[:-1] + ', "seed": ' + "1" * 5000 + "}", 400, None),
    ("float token ids", "POST", COMPLETIONS, text(prompt=[1.5, 2.0]), 400, "prompt.0"),
    ("boolean token ids", "POST", COMPLETIONS, text(prompt=[True, 2]), 400, "prompt.0"),
    # issue 31: OpenAI fields with a value that is not neutral are refused by name (neutral ones: test_serve.py)
    ("response_format json_object", "POST", CHAT, chat(response_format={"type": "json_object"}), 400,
     "response_format"),
    ("response_format json_schema", "POST", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}), 400,
     "response_format"),
    ("response_format a string", "POST", CHAT, chat(response_format="text"), 400, "response_format"),
    ("a logit bias", "POST", COMPLETIONS, text(logit_bias={"5": 100}), 400, "logit_bias"),
    ("a logit bias on chat", "POST", CHAT, chat(logit_bias={"5": -100}), 400, "logit_bias"),
    ("a tool", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("tool_choice required", "POST", CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    ("tool_choice a function", "POST", CHAT, chat(tool_choice={"type": "function", "function": {"name": "f"}}),
     400, "tool_choice"),
    ("echo", "POST", COMPLETIONS, text(echo=True), 400, "echo"),
    ("best_of 2", "POST", COMPLETIONS, text(best_of=2), 400, "best_of"),
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


@pytest.mark.parametrize("path", ["/metrics", "/v1/models", "/v1/models/" + MODEL, "/nope", "/health/x",
                                  "/healthz"])
def test_api_key_on_every_route_but_health(side_servers, path):
    url = side_servers["key"].url + path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        assert_openai_error(httpx.get(url, headers=headers), 401)
    ok = httpx.get(url, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == (200 if path.startswith(("/metrics", "/v1/")) else 404)


def test_health_is_open_with_an_api_key(side_servers):
    """A load balancer checks /health without the key; what it answers says nothing but ok."""
    url = side_servers["key"].url + "/health"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer sekret"}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 200 and r.json() == {"status": "ok"}, headers
    assert_openai_error(httpx.post(side_servers["key"].url + COMPLETIONS, content=text()), 401)


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


def test_more_than_one_authorization_header_is_400(serve_stack, side_servers):
    """A proxy in front may read the first and we the last: refused with or without an API key."""
    twice = [("Authorization", "Bearer sekret"), ("Authorization", "Bearer sekret")]
    for url in (side_servers["key"].url, serve_stack[2].url):
        error = assert_openai_error(httpx.get(url + "/health", headers=twice), 400)
        assert "2 Authorization headers" in error["message"]


# ---- slow and idle clients: python -m ktjax.serve's own uvicorn settings, with half-second timeouts -------------

@pytest.fixture(scope="module")
def strict_server(serve_stack):
    import uvicorn
    from argparse import Namespace

    from ktjax.cli.serve import server_config
    from ktjax.serve.app import create_app
    from ktjax.serve.scheduler import QueueFull

    app = create_app(serve_stack[0], RefusingScheduler(QueueFull("busy")), model_name=MODEL, body_timeout=0.5)
    args = Namespace(host="127.0.0.1", port=free_port(), log_level="warning", shutdown_timeout=1.0,
                     header_timeout=0.5, idle_timeout=0.5)
    server = uvicorn.Server(server_config(app, args))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    yield args.port
    server.should_exit = True
    thread.join(30)


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes `sock` within `seconds`, while the client sends `trickle` a byte at a time."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            if trickle:
                sock.send(trickle[:1])
                trickle = trickle[1:]
            if sock.recv(4096) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset, broken pipe: closed
            return True
    return False


@pytest.mark.parametrize("client", ["idle after connecting", "headers a byte at a time (slowloris)",
                                    "idle after a response"])
def test_slow_and_idle_clients_are_disconnected(strict_server, client):
    with socket.create_connection(("127.0.0.1", strict_server)) as sock:
        if client == "idle after a response":
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        slowloris = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: a\r\n" * 20
        assert _closed_within(sock, 3.0, slowloris if "slowloris" in client else b"")
    assert httpx.get(f"http://127.0.0.1:{strict_server}/health").status_code == 200  # others are still served


def test_a_body_that_trickles_gets_408(strict_server):
    with socket.create_connection(("127.0.0.1", strict_server), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"model": ')
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")


# ---- signals while warming up (exit 130) and while draining (exit 0) ----------------------------------------------

@pytest.fixture
def signal_handlers():
    """SIGINT raises (it begins ignored under `nohup ... &`), and the previous handlers come back afterwards."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum,line", [(signal.SIGINT, "interrupted: the server never started"),
                                         (signal.SIGTERM, "interrupted by SIGTERM: the server never started")])
def test_a_signal_during_warm_up_stops_with_one_line_and_130(capsys, monkeypatch, signal_handlers, signum, line):
    from ktjax.cli.serve import main
    from ktjax.serve.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "warmup", lambda self, progress=None: os.kill(os.getpid(), signum))
    rc = main(["--port", str(free_port()), "--log-level", "error"])
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == line, err


def test_warm_up_is_logged_from_the_first_moment(caplog, monkeypatch, signal_handlers):
    """Issue 31: a cold start says what it does at once, then "compiling N programs", then "ready in X s" once it
    listens; JAX's INFO lines (its "Unable to initialize backend 'tpu'") stay out; SIGTERM then exits 0."""
    import logging

    from ktjax.cli.serve import main
    from ktjax.serve.scheduler import Scheduler

    programs, seen = [], {}

    def warmup(self, progress):  # no compiling here (minutes): only the count and the progress it reports
        programs.append(len(self.programs.prefill_shapes()) + len(self.programs.decode_shapes()))
        for done in range(1, programs[0] + 1):
            progress(done, programs[0])

    monkeypatch.setattr(Scheduler, "warmup", warmup)
    port = free_port()

    def stop_once_ready():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        seen["jax info"] = logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.INFO)
        seen["ktjax info"] = logging.getLogger("ktjax.serve").isEnabledFor(logging.INFO)
        os.kill(os.getpid(), signal.SIGTERM)

    caplog.set_level(logging.DEBUG)  # a root logger open to everything, as basicConfig(level=INFO) left it
    root_level = logging.getLogger().level
    stopper = threading.Thread(target=stop_once_ready, daemon=True)
    stopper.start()
    assert main(["--port", str(port), "--log-level", "info"]) == 0
    stopper.join(10)
    lines = [r.getMessage() for r in caplog.records if r.name == "ktjax.serve"]
    assert lines[0].startswith("starting: loading the demo model"), lines
    assert programs and programs[0] > 1 and f"compiling {programs[0]} programs" in lines[1], (programs, lines)
    assert lines[2].startswith(f"compiled {programs[0]} of {programs[0]} programs in "), lines
    assert lines[3].startswith("ready in ") and lines[3].endswith(f"http://127.0.0.1:{port}"), lines
    assert seen == {"jax info": False, "ktjax info": True}
    assert logging.getLogger().level == root_level  # put back: main() runs in-process here


@pytest.mark.slow  # a real server process: its warm-up compiles every bucket (about a minute on 2 cores)
def test_two_sigterms_during_a_drain_exit_0_once_the_stream_finished(tmp_path):
    port, root = free_port(), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ktjax.serve", "--port", str(port), "--max-batch", "1",
                                 "--chunk-size", "32", "--shutdown-timeout", "60", "--log-level", "warning"],
                                cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL,
                                stderr=log)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        body = {"model": MODEL, "prompt": "The", "max_tokens": 100, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                events += [line] if line.startswith("data: ") else []
                if len(events) == 3:
                    proc.send_signal(signal.SIGTERM)
                    time.sleep(0.1)
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "data: [DONE]"
        assert proc.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()
        assert "Traceback" not in (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
