"""The live view of a run (ktjax/runtime/progress.py): the status line on a terminal and the log lines elsewhere,
driven by a fake clock and fake memory readings so that every character is known; the timeline that --json
carries, checked through python -m ktjax.generate in-process (phases in order, not overlapping, tokens equal to
the run's); and the status line through a real pseudo-terminal."""
from __future__ import annotations

import io
import json
import os
import re
import sys
import threading

import pytest

from ktjax.cli.generate import main
from ktjax.runtime.progress import LiveStatus, Timeline

MIB = 1 << 20


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def fake_memory():
    return 300 * MIB, 512 * MIB


def drive(view, clock):
    """A run as the engine reports it: load (4 parameters), compile (2 programs), prefill of 1024 tokens in two
    chunks, decode of 8 tokens in two dispatches; seconds chosen so that every rate is exact."""
    view.phase("load", 0, "parameters")
    for i in range(1, 5):
        clock.now += 0.5
        view.update(i, 4)
    view.end()
    clock.now += 1.0
    view.phase("compile", 2, "programs")
    clock.now += 3.0
    view.update(1)
    clock.now += 0.5
    view.update(2)
    view.phase("prefill", 1024)
    view.cache(0, 2048)
    clock.now += 2.0
    view.cache(512, 2048)
    view.update(512)
    clock.now += 0.0625  # within LIVE_REDRAW_S of the last redraw: a terminal's line is not redrawn
    view.cache(1024, 2048)
    view.update(1024)
    view.phase("decode", 16)
    clock.now += 0.25
    view.cache(1028, 2048)
    view.update(4)
    clock.now += 0.25
    view.cache(1032, 2048)
    view.update(8)
    view.end()


def test_timeline_records_each_phase():
    clock = FakeClock()
    timeline = Timeline(clock=clock, memory=fake_memory)
    drive(timeline, clock)
    phases = timeline.timeline()
    assert [p["phase"] for p in phases] == ["load", "compile", "prefill", "decode"]
    assert [(p["start_s"], p["end_s"]) for p in phases] == [(0.0, 2.0), (3.0, 6.5), (6.5, 8.5625),
                                                            (8.5625, 9.0625)]
    assert [p["tokens"] for p in phases] == [0, 0, 1024, 8]
    assert phases[2]["tokens_per_s"] == 1024 / 2.0625 and phases[3]["tokens_per_s"] == 16.0
    assert [(p["done"], p["total"], p["unit"]) for p in phases] == [(4, 4, "parameters"), (2, 2, "programs"),
                                                                    (1024, 1024, "tokens"), (8, 16, "tokens")]
    assert [(p["cache_tokens"], p["cache_capacity"]) for p in phases] == [(None, None), (None, None),
                                                                          (1024, 2048), (1032, 2048)]
    assert all((p["memory_bytes"], p["peak_memory_bytes"]) == (300 * MIB, 512 * MIB) for p in phases)


def test_terminal_line_rewritten_in_place_and_cleared():
    clock, out = FakeClock(), io.StringIO()
    with LiveStatus(out, tty=True, clock=clock, memory=fake_memory, tick_s=None, width=200) as view:
        drive(view, clock)
    frames = out.getvalue().split("\r\x1b[K")
    assert frames[0] == "" and frames[-1] == ""  # every frame rewrites the line; the last clears it
    assert "\n" not in out.getvalue()
    shown = frames[1:-1]
    memory = "memory 300.0 MiB (peak 512.0 MiB)"
    assert shown == [
        f"load, 0.0 s | {memory}",
        f"load 1/4 parameters, 0.5 s | {memory}",
        f"load 2/4 parameters, 1.0 s | {memory}",
        f"load 3/4 parameters, 1.5 s | {memory}",
        f"load 4/4 parameters, 2.0 s | {memory}",
        f"compile 0/2 programs, 0.0 s | {memory}",
        f"compile 1/2 programs, 3.0 s | {memory}",
        f"compile 2/2 programs, 3.5 s | {memory}",
        f"prefill 0/1024 tokens, 0.0 s | {memory}",
        f"prefill 512/1024 tokens, 256.0 tok/s, 2.0 s | {memory} | cache 512/2048 tokens",
        # 1024/1024 came 0.0625 s later: not drawn
        f"decode 0/16 tokens, 0.0 s | {memory}",
        f"decode 4/16 tokens, 16.0 tok/s, 0.2 s | {memory} | cache 1028/2048 tokens",
        f"decode 8/16 tokens, 16.0 tok/s, 0.5 s | {memory} | cache 1032/2048 tokens",
    ]


def test_log_lines_per_phase_and_at_most_every_few_seconds():
    clock, out = FakeClock(), io.StringIO()
    with LiveStatus(out, tty=False, every_s=1.0, clock=clock, memory=fake_memory, tick_s=None) as view:
        drive(view, clock)
    memory = "memory 300.0 MiB (peak 512.0 MiB)"
    assert out.getvalue().splitlines() == [  # nothing when the first phase starts
        f"ktjax: load 2/4 parameters, 1.0 s | {memory}",  # 1.0 s after it started
        f"ktjax: load 4/4 parameters, 2.0 s | {memory}",
        f"ktjax: load 4/4 parameters, 2.0 s | {memory}; next: compile 2 programs",
        f"ktjax: compile 1/2 programs, 3.0 s | {memory}",
        f"ktjax: compile 2/2 programs, 3.5 s | {memory}; next: prefill 1024 tokens",
        f"ktjax: prefill 512/1024 tokens, 256.0 tok/s, 2.0 s | {memory} | cache 512/2048 tokens",
        f"ktjax: prefill 1024/1024 tokens, 496.5 tok/s, 2.1 s | {memory} | cache 1024/2048 tokens; next: decode 16 "
        "tokens",
        f"ktjax: decode 8/16 tokens, 16.0 tok/s, 0.5 s | {memory} | cache 1032/2048 tokens",  # the close
    ]


@pytest.mark.parametrize("tty", [True, False])
def test_an_error_leaves_nothing_after_it(tty):
    """Left by an exception, the view clears its line (terminal) or writes no closing line (log): the error
    message that follows is the last line."""
    clock, out = FakeClock(), io.StringIO()
    with pytest.raises(RuntimeError):
        with LiveStatus(out, tty=tty, clock=clock, memory=fake_memory, tick_s=None) as view:
            view.phase("prefill", 100)
            clock.now += 1
            view.update(50)
            raise RuntimeError("boom")
    text = out.getvalue()
    assert text.endswith("\r\x1b[K") if tty else text == ""  # a log: no closing line (nor a first one)
    view.update(60)  # after close: nothing more
    assert out.getvalue() == text


def test_a_long_step_is_refreshed_between_reports():
    """While one step runs (a compilation: no report for a minute), the line's seconds and memory still move."""
    clock, out = FakeClock(), io.StringIO()
    with LiveStatus(out, tty=True, clock=clock, memory=fake_memory, width=200, tick_s=0.01) as view:
        view.phase("compile", 2, "programs")
        clock.now += 42.0
        assert wait_until(lambda: "compile 0/2 programs, 42.0 s | memory 300.0 MiB (peak 512.0 MiB)" in
                          out.getvalue())
    assert out.getvalue().endswith("\r\x1b[K") and not view.ticker.is_alive()


def wait_until(predicate, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_paused_view_writes_nothing_until_close():
    clock, out = FakeClock(), io.StringIO()
    view = LiveStatus(out, tty=True, clock=clock, memory=fake_memory, tick_s=None)
    view.phase("decode", 10)
    view.pause()
    assert out.getvalue().endswith("\r\x1b[K")
    before = out.getvalue()
    clock.now += 1
    view.update(5)
    view.close()
    assert out.getvalue() == before
    assert view.timeline()[0]["tokens"] == 5


# -- through python -m ktjax.generate -------------------------------------------------------------------------
ARGV = ["--max-new-tokens", "5", "--ignore-eos"]


def test_json_timeline_of_a_run(capsys):
    assert main([*ARGV, "--json"]) == 0
    out, err = capsys.readouterr()
    stats = json.loads(out.strip().splitlines()[-1])["stats"]
    phases = stats["timeline"]
    assert [p["phase"] for p in phases] == ["load", "compile", "prefill", "decode"]
    for p, after in zip(phases, phases[1:] + [None]):
        assert 0 <= p["start_s"] <= p["end_s"], p
        assert after is None or p["end_s"] <= after["start_s"], (p, after)  # in order, never overlapping
        assert p["tokens_per_s"] == pytest.approx(p["tokens"] / (p["end_s"] - p["start_s"]))
        assert p["peak_memory_bytes"] >= p["memory_bytes"] > 0
    load, compile_, prefill, decode = phases
    assert load["done"] == load["total"] > 10 and load["unit"] == "parameters"  # every parameter placed
    assert (compile_["done"], compile_["total"], compile_["tokens"]) == (2, 2, 0)  # the prefill step, decode
    assert prefill["tokens"] == prefill["total"] == stats["prompt_tokens"]
    assert decode["tokens"] == stats["generated_tokens"] == 5
    assert prefill["cache_capacity"] == decode["cache_capacity"] == stats["cache_lens"]
    assert decode["cache_tokens"] == stats["prompt_tokens"] + 5 - 1  # the last token is never fed back
    # stderr is no terminal here: a log line per phase change
    log = [line for line in err.splitlines() if line.startswith("ktjax: ") and " | memory " in line]
    changes = [re.match(r"ktjax: (\w+) .*; next: (\w+)", line).groups() for line in log if "; next: " in line]
    assert changes == [("load", "compile"), ("compile", "prefill"), ("prefill", "decode")]
    assert log[-1].startswith("ktjax: decode 5/5 tokens")  # the closing line


def test_no_progress_silences_the_view(capsys):
    assert main([*ARGV, "--json", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "| memory" not in err
    assert [p["phase"] for p in json.loads(out.strip().splitlines()[-1])["stats"]["timeline"]] == \
        ["load", "compile", "prefill", "decode"]


def test_status_line_on_a_terminal(monkeypatch, capsys):
    """stderr a pseudo-terminal: the status is one line rewritten in place (never a newline of its own), cleared
    before the statistics."""
    import fcntl
    import struct
    import termios

    monkeypatch.setattr("ktjax.runtime.progress.LIVE_REDRAW_S", 0.0)  # every report drawn
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))  # 200 columns: no line cut
    chunks = []
    reader = threading.Thread(target=lambda: _drain(master, chunks), daemon=True)
    reader.start()
    tty = os.fdopen(slave, "w", buffering=1)
    monkeypatch.setattr(sys, "stderr", tty)
    try:
        assert main(ARGV) == 0
    finally:
        tty.close()
        reader.join(10)
        os.close(master)
    seen = b"".join(chunks).decode()
    status, _, stats = seen.rpartition("\r\x1b[K")  # the last clear
    assert stats.lstrip().startswith("prompt ") and "generated 5" in stats
    frames = status.split("\r\x1b[K")[1:]
    names = [re.match(r"\w+", f)[0] for f in frames]
    assert sorted(set(names), key=names.index) == ["load", "compile", "prefill", "decode"]  # in this order
    assert any(re.match(r"load \d+/\d+ parameters, [\d.]+ s \| memory ", f) for f in frames), frames
    assert all("| memory " in f and "\n" not in f for f in frames), frames
    prompt = 10  # the default prompt's tokens; + 5 new: a cache of 16 (a power of two)
    assert re.fullmatch(rf"prefill {prompt}/{prompt} tokens, [\d.]+ tok/s, [\d.]+ s \| memory [\d.]+ [KMG]iB \(peak "
                        rf"[\d.]+ [KMG]iB\) \| cache {prompt}/16 tokens", frames[names.index("decode") - 1]), frames
    assert re.fullmatch(rf"decode 5/5 tokens, [\d.]+ tok/s, [\d.]+ s \| .* \| cache {prompt + 4}/16 tokens",
                        frames[-1]), frames
    assert capsys.readouterr().out.startswith("The key to reading a long document is")


def _drain(fd: int, chunks: list):
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # the other side closed
            return
        if not data:
            return
        chunks.append(data)


class Recorder(Timeline):
    """A Timeline that keeps every update it hears."""

    def __init__(self):
        super().__init__()
        self.updates = []

    def update(self, done, total=None):
        self.updates.append((done, total))
        super().update(done, total)


def test_load_reports_every_parameter_of_both_formats(tmp_path, capsys):
    """ktjax.load of a Hugging Face folder and of the converted checkpoint: one report per parameter, counting up
    to the total, inside one "load" phase. Then engine.generate(progress=True): the live status on stderr."""
    import ktjax
    from ktjax.demo import DEMO_MODEL_DIR
    from ktjax.weights import convert

    assert convert.main(["--hf-dir", DEMO_MODEL_DIR, "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
    for folder in (DEMO_MODEL_DIR, str(tmp_path / "ckpt")):
        seen = Recorder()
        ktjax.load(folder, progress=seen)
        total = seen.updates[-1][1]
        assert total > 10 and seen.updates == [(i, total) for i in range(1, total + 1)], folder
        (load,) = seen.timeline()
        assert (load["phase"], load["done"], load["total"], load["unit"]) == ("load", total, total, "parameters")
    capsys.readouterr()
    engine = ktjax.load(DEMO_MODEL_DIR)
    out = engine.generate([[1, 2, 3]], max_new_tokens=2, ignore_eos=True, progress=True)
    log = capsys.readouterr().err.splitlines()  # no terminal here: log lines
    assert [line.split(",")[0] for line in log if "; next: " in line] == ["ktjax: compile 2/2 programs",
                                                                        "ktjax: prefill 3/3 tokens"]
    assert log[-1].startswith("ktjax: decode 2/2 tokens") and out.stats["generated_tokens"] == 2
