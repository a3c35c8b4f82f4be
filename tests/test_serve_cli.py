"""python -m ktjax.serve: flags (one message, exit 2), the dependency hint, --help and README, and SIGTERM during
a stream in a subprocess (the stream finishes, exit code 0, new requests are refused)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from serve_harness import free_port

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def run_main(capsys, argv):
    from ktjax.cli.serve import main

    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--port", "http"], "--port"),
    (["--port", "70000"], "--port"),
    (["--max-batch", "0"], "--max-batch"),
    (["--shutdown-timeout", "nan"], "--shutdown-timeout"),
    (["--cache-dtype", "fp9"], "cache_dtype"),
    (["--frobnicate"], "--frobnicate"),
    (["--model", "/no/such/folder"], "/no/such/folder"),
    (["--config", "/no/such/preset.yaml"], "/no/such/preset.yaml"),
])
def test_bad_flags_exit_2_with_one_message(capsys, argv, needle):
    rc, err = run_main(capsys, argv)
    assert rc == 2 and needle in err and err.count("\n") == 1, err


def test_a_port_in_use_is_one_message(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc, err = run_main(capsys, ["--port", str(busy.getsockname()[1])])
    assert rc == 2 and "cannot listen on 127.0.0.1:" in err and err.count("\n") == 1, err


def test_missing_dependency_says_what_to_install(capsys, monkeypatch):
    import ktjax.cli.serve as cli

    monkeypatch.setattr(cli, "NEEDS", cli.NEEDS + ("no_such_module_ktjax",))
    rc, err = run_main(capsys, [])
    assert rc == 2 and "no_such_module_ktjax" in err and "pip install" in err


def test_help_and_readme_document_every_flag():
    from ktjax.runtime.settings import SETTINGS
    from ktjax.cli.serve import build_parser

    parser = build_parser()
    text = parser.format_help()
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    serve_section = readme.split("## Serve", 1)[1].split("\n## ", 1)[0]
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]
    for flag in flags:
        assert flag in text
        if flag.lstrip("-").replace("-", "_") not in SETTINGS:  # the settings have their own table
            assert f"`{flag}" in serve_section, flag


def test_served_name_is_the_folder_name():
    from ktjax.cli.serve import build_parser, served_name

    assert served_name(build_parser().parse_args(["--model", "/x/DeepSeek-V2-Lite/"])) == "DeepSeek-V2-Lite"
    assert served_name(build_parser().parse_args(["--served-model-name", "ds"])) == "ds"
    assert served_name(build_parser().parse_args([])) == "demo_model"


def test_generate_does_not_import_the_server_stack():
    code = ("import sys, ktjax.cli.generate as g; g.parse(['--prompt', 'x']); "
            "print([m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'starlette') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_sigterm_lets_the_stream_finish_and_exits_0(tmp_path):
    """Started with --warmup none: it listens before compiling, the first request compiles what it needs (and the
    log says so), the stream finishes after SIGTERM, exit 0."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # a file, not a pipe nobody reads: the server never blocks on it
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "ktjax.serve", "--port", str(port), "--max-batch", "1",
                             "--page-size", "64", "--chunk-size", "32", "--shutdown-timeout", "60",
                             "--warmup", "none", "--log-level", "info"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)
        body = {"model": "demo_model", "prompt": "The", "max_tokens": 400, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 3:
                        proc.send_signal(signal.SIGTERM)
                        time.sleep(0.3)
                        try:  # a new request: refused, while the stream goes on
                            status = httpx.get(url + "/health", timeout=5).status_code
                        except httpx.TransportError:
                            status = "refused"
                        assert status in (503, "refused")
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 400
        finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[1:-2]]
        assert finish[-1] == "length"
        assert proc.wait(timeout=60) == 0
        logged = (tmp_path / "server.log").read_text()
        assert "--warmup none: each of up to" in logged and "programs in" not in logged, logged[-3000:]
        for name in ("step", "decode"):  # the prompt's prefill chunk, then the decode bursts
            assert f"compiling the {name} program (rows 1, tokens " in logged, logged[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_help_groups_common_flags_first_and_version(capsys):
    from importlib import metadata

    import ktjax
    from ktjax.cli.serve import main

    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    out = capsys.readouterr().out
    order = [out.index(f"\n{title}:\n") for title in ("options", "server", "settings", "sampling", "memory",
                                                     "advanced", "examples")]
    assert stop.value.code == 0 and order == sorted(order), order
    for flag in ("--model", "--port", "--api-key", "--version"):
        assert order[0] < out.index("\n  " + flag) < order[1], flag
    assert order[1] < out.index("\n  --max-batch") < order[2] and "/v1/completions" in out[order[6]:]
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"ktjax {ktjax.__version__} (jax {metadata.version('jax')}")


@pytest.mark.parametrize("seconds,text", [(0.4, "0 s"), (40.2, "40 s"), (89, "89 s"), (90, "2 min"), (719, "12 min"),
                                          (7140, "119 min"), (7500, "2 h 5 min")])
def test_durations_for_people(seconds, text):
    from ktjax.util.units import format_seconds

    assert format_seconds(seconds) == text


def test_compile_progress_says_the_time_left(monkeypatch, caplog):
    """A warmup's log line: programs compiled, seconds so far and, until the last, the time left at the pace so
    far."""
    import logging
    import time

    from ktjax.cli.serve import compile_progress

    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    progress = compile_progress(100.0, every_s=0)
    caplog.set_level(logging.INFO, logger="ktjax.serve")
    for done, at in ((1, 145.0), (2, 190.0), (45, 2080.0)):
        now[0] = at
        progress(done, 45)
    assert [r.getMessage() for r in caplog.records] == [
        "compiled 1 of 45 programs in 45.0 s (about 33 min left)",
        "compiled 2 of 45 programs in 90.0 s (about 32 min left)",
        "compiled 45 of 45 programs in 1980.0 s"]
