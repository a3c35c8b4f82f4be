"""The chat: Engine.session (a conversation that keeps its latent cache across turns) against transformers and
against a fresh generate over the whole conversation; the REPL's loop in-process (commands and hostile lines as
a table); python -m ktjax.chat through a pseudo-terminal (streaming, /stats, /reset, /quit, Ctrl-C)."""
import fcntl
import io
import os
import pty
import select
import shutil
import subprocess
import sys
import termios
import time

import numpy as np
import pytest

import ktjax
from hf_models import hf_logits
from ktjax.cli.chat import MAX_LINE_BYTES, Repl, stream_reader
from ktjax.demo import DEMO_MODEL_DIR
from ktjax.errors import KtjaxError
from ktjax.util.process import Terminated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spy_prefills(monkeypatch) -> list:
    """Record (tokens left to prefill, positions already cached) of the first sequence of each prefill step."""
    from ktjax.runtime.batch import Batch

    calls = []
    real = Batch._prefill

    def prefill(self, reqs):
        calls.append((len(reqs[0].prompt) - reqs[0].length, reqs[0].length))
        return real(self, reqs)

    monkeypatch.setattr(Batch, "_prefill", prefill)
    return calls


# -- the session --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,fmt", [("v3", "float32"), ("v2_lite", "int8"), ("v32", "bf16")])
def test_turn_two_prefills_only_its_new_tokens_and_matches_a_fresh_generate(hf_folder, rng, monkeypatch, name,
                                                                             fmt):
    """Turn 2 over the kept cache gives the greedy tokens of one generate over the whole conversation (and, with
    a float32 cache, of transformers' generate); it prefills turn 1's last token (which the decode loop never
    feeds) and its own, nothing else."""
    import torch

    folder, oracle = hf_folder(name)
    engine = ktjax.load(folder, cache_dtype=fmt, chunk_size=8, max_new_tokens=7, ignore_eos=True)
    p1, p2 = rng.integers(2, 97, size=13).tolist(), rng.integers(2, 97, size=11).tolist()
    session = engine.session(max_len=64)
    t1 = session.send(p1).tokens[0]
    assert session.tokens == p1 + t1 and session.cached == len(p1) + len(t1) - 1
    calls = spy_prefills(monkeypatch)
    turn2 = session.send(p2)
    conversation = p1 + t1 + p2
    held = len(p1) + len(t1) - 1  # chunks of 8: the first at the cached positions' end, the second 8 on
    assert calls == [(len(p2) + 1, held), (len(p2) + 1 - 8, held + 8)]
    assert turn2.stats["prefill_tokens"] == len(p2) + 1 and turn2.stats["reused_tokens"] == len(p1) + len(t1) - 1
    assert turn2.tokens[0] == engine.generate([conversation]).tokens[0]
    assert session.tokens == conversation + turn2.tokens[0]
    if fmt == "float32":
        with torch.no_grad():
            ref = oracle.generate(torch.as_tensor([conversation]), do_sample=False, max_new_tokens=7,
                                  eos_token_id=None, pad_token_id=0)
        assert turn2.tokens[0] == ref[0, len(conversation):].tolist()


@pytest.mark.parametrize("name,fmt,tol", [("v3", "float32", 1e-4), ("v2_lite", "int8", 1e-4)])
def test_a_continuation_over_the_kept_cache_gives_the_logits_of_the_whole_conversation(hf_folder, rng, name, fmt,
                                                                                      tol):
    """Every position of a continuation prefilled at an offset over turn 1's cache has the logits the whole
    conversation gets from one pass through a fresh cache (float rounding apart) and, with a float32 cache, from
    transformers' forward."""
    folder, oracle = hf_folder(name)
    engine = ktjax.load(folder, cache_dtype=fmt, chunk_size=8, max_new_tokens=5, ignore_eos=True)
    session = engine.session(max_len=64)
    p1 = rng.integers(2, 97, size=10).tolist()
    t1 = session.send(p1).tokens[0]
    new = t1[-1:] + rng.integers(2, 97, size=12).tolist()  # what the cache lacks: turn 1's last token, then turn 2
    start, conversation = session.cached, p1 + t1 + new[1:]
    chunk = engine._chunk(len(new))
    program = engine._prefill_program(session._cache, 1, chunk)
    logits, _ = engine._prefill(program, session._cache, [new], chunk, start=[start])
    got = np.asarray(logits)[0, :len(new)]
    fresh = engine.cached_logits(np.array([conversation]))[0, start:]
    assert np.abs(got - fresh).max() <= tol * np.abs(fresh).max()
    if fmt == "float32":
        ref = hf_logits(oracle, np.array([conversation]))[0, start:]
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.fixture(scope="module")
def demo():
    """The trained demo model, greedy, a few tokens per reply."""
    return ktjax.load(DEMO_MODEL_DIR, max_new_tokens=12, temperature=0.0)


def test_the_demo_template_renders_the_history_as_the_cache_holds_it(demo, monkeypatch):
    """The demo model's chat template re-renders turn 1 (its reply closed by EOS) exactly as the cache holds it:
    turn 2 reuses every cached token and prefills only the rest, and replies as a fresh generate over the whole
    rendered chat does."""
    session = demo.session(max_len=256)
    session.chat("What is a list?")
    held = session.cached
    calls = spy_prefills(monkeypatch)
    turn2 = session.chat("And a tuple?")
    rendered = demo.tokenizer.encode_chat(session.messages[:-1])
    assert rendered[:held] == session.tokens[:held]
    assert turn2.stats["reused_tokens"] == held and turn2.stats["dropped_tokens"] == 0
    assert calls == [(len(rendered) - held, held)]
    assert turn2.tokens[0] == demo.generate([rendered]).tokens[0]
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert session.messages[-1]["content"] == turn2.texts[0]


def test_a_history_rendered_otherwise_keeps_only_the_common_prefix(demo, monkeypatch):
    """Where the conversation passed again differs from what the cache holds (a template that re-tokenizes a
    reply otherwise), the cache keeps the longest common prefix and the rest is read again over the stale
    positions: the reply is a fresh generate's."""
    session = demo.session(max_len=256)
    ids = demo.tokenizer.encode("The for statement")
    session.generate(ids)
    held = session.cached
    edited = session.tokens[:8] + demo.tokenizer.encode(" while loops")[1:] + session.tokens[8:]
    calls = spy_prefills(monkeypatch)
    out = session.generate(edited)
    assert calls == [(len(edited) - 8, 8)]
    assert out.stats["reused_tokens"] == 8 and out.stats["dropped_tokens"] == held - 8
    assert out.tokens[0] == demo.generate([edited]).tokens[0]


def test_the_cache_grows_with_the_conversation_and_refuses_past_the_limit(demo):
    """With cache_lens unset the cache grows (the conversation read again into a larger one, with a note) and the
    replies stay a fresh generate's; past max_len a turn is refused with the numbers and leaves the session as it
    was."""
    session = demo.session()
    first = session.chat("Hi")
    size = session.stats["cache_lens"]
    assert size >= first.stats["prompt_tokens"] + 12
    text = "x" * size  # a message longer than the cache holds
    out = session.chat(text)
    assert session.stats["cache_lens"] > size and out.stats["reused_tokens"] == 0
    assert any("the cache grew" in n for n in out.stats["notes"])
    assert out.tokens[0] == demo.generate([demo.tokenizer.encode_chat(session.messages[:-1])]).tokens[0]

    with pytest.raises(KtjaxError, match=r"exceeds the model's window of 1024 positions"):
        session.chat("a b " * 2000)

    small = demo.session(max_len=40)
    small.chat("Hi")
    before = (list(small.tokens), small.cached, list(small.messages))
    with pytest.raises(KtjaxError, match=r"conversation of \d+ tokens \+ max_new_tokens 12 = \d+ exceeds max_len 40"):
        small.chat("a much longer message than the rest")
    assert (small.tokens, small.cached, small.messages) == before
    small.reset()
    assert small.stats["cached_tokens"] == 0 and small.stats["conversation_tokens"] == 0 and not small.messages


def test_an_interrupted_reply_stays_and_the_next_turn_reads_the_conversation_again(demo):
    """Ctrl-C inside a reply: what was streamed stays in the conversation, the cache (donated to the stopped call)
    is dropped, and the next turn reads the whole conversation again and replies as a fresh generate does."""
    session = demo.session(max_len=256)

    def stop(tokens):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.chat("What is a dict?", on_tokens=stop)
    assert session.cached == 0 and len(session.messages) == 2 and session.messages[1]["role"] == "assistant"
    assert "stopped" in session.notes[-1]
    out = session.chat("And a set?")
    rendered = demo.tokenizer.encode_chat(session.messages[:-1])
    assert out.stats["reused_tokens"] == 0 and out.stats["prefill_tokens"] == len(rendered)
    assert out.tokens[0] == demo.generate([rendered]).tokens[0]


@pytest.mark.parametrize("max_len", [0, 1, -5, 2.5, True, "64"])
def test_bad_max_len_is_refused(demo, max_len):
    with pytest.raises(KtjaxError, match="max_len must be an integer"):
        demo.session(max_len=max_len)


# -- the REPL, in-process -----------------------------------------------------------------------------------

def run_repl(engine, data: bytes, out_fail=None):
    """Feed `data` to a Repl over a new session -> (exit code, stdout text, stderr text, session, rearms)."""
    out, err, rearms = io.StringIO(), io.StringIO(), []

    def write(text):
        if out_fail is not None:
            out_fail(text)
        out.write(text)

    session = engine.session(max_len=256)
    repl = Repl(session, stream_reader(io.BytesIO(data)), prompt="", out=write, err=err,
                rearm=lambda: rearms.append(1))
    code = repl.run()
    return code, out.getvalue(), err.getvalue(), session, rearms


LONG = "a b " * 2000  # tokens past the demo model's window of 1024

# input -> (exit code, turns taken, text in stdout, text in stderr)
REPL_CASES = {
    "empty lines": (b"\n\r\n   \n", 0, 0, "", ""),
    "end of input with no newline": (b"/stats", 0, 0, "holds 0 of 0", ""),
    "unknown command": (b"/foo bar\n", 0, 0, "", "unknown command /foo; /help lists"),
    "a lone slash": (b"/\n", 0, 0, "", "unknown command /;"),
    "control characters are a message": (b"\x00\x1b[31m\x07\n", 0, 1, "", ""),
    "a command's case": (b"/STATS\n", 0, 0, "conversation: 0 tokens in 0 turns", ""),
    "help": (b"/help\n", 0, 0, "/reset", ""),
    "quit stops reading": (b"/quit\nWhat is a list?\n", 0, 0, "", ""),
    "exit": (b"/exit\n", 0, 0, "", ""),
    "not UTF-8": (b"\xff\xfe hello\n/stats\n", 0, 0, "0 turns", "not UTF-8 text (byte 0)"),
    "a line past the window": ((LONG + "\n/stats\n").encode(), 0, 0, "0 turns", "exceeds max_len 256"),
    "a line past the reader's limit": (b"b" * (MAX_LINE_BYTES + 10) + b"\n/stats\n", 0, 0, "0 turns",
                                       "more than 1 MiB"),
    "a message, then stats": (b"What is a list?\n/stats\n", 0, 1, "conversation: ", ""),
    "// sends a slash": (b"//help\n", 0, 1, "", ""),
    "reset empties the cache": (b"Hi\n/reset\n/stats\n", 0, 0, "the cache holds 0 of", ""),
}


@pytest.mark.parametrize("case", list(REPL_CASES))
def test_repl_lines(demo, case):
    data, code, turns, in_out, in_err = REPL_CASES[case]
    rc, out, err, session, _ = run_repl(demo, data)
    assert rc == code and session.turns == turns, (out, err)
    assert in_out in out and in_err in err, (out, err)
    assert "Traceback" not in out + err


def test_repl_stats_count_both_turns(demo):
    rc, out, err, session, _ = run_repl(demo, b"What is a list?\nAnd a tuple?\n/stats\n")
    assert rc == 0 and session.turns == 2
    n = len(session.tokens)
    assert f"conversation: {n} tokens in 2 turns; the cache holds {n - 1} of 256" in out
    assert f"({session.last_turn['reused_tokens']} reused from the cache)" in out and "decode" in out
    assert session.messages[0]["content"] == "What is a list?" and session.messages[2]["content"] == "And a tuple?"


def test_without_a_chat_template_each_line_continues_the_text(demo, monkeypatch):
    """A model with no chat template: each line is appended to the conversation as text, BOS only at its start."""
    monkeypatch.setattr(demo.tokenizer, "chat_template", None)
    rc, out, err, session, _ = run_repl(demo, b"The for statement\nThe while loop\n")
    assert rc == 0 and session.turns == 2 and "no chat template" in err
    bos = demo.tokenizer.bos_id
    assert session.tokens[0] == bos and session.tokens.count(bos) == 1 and not session.messages
    second = demo.tokenizer.encode("The while loop")[1:]
    assert any(session.tokens[i:i + len(second)] == second for i in range(len(session.tokens)))


def test_ctrl_c_in_a_reply_stops_it_and_the_chat_goes_on(demo):
    """Ctrl-C while a reply streams stops that reply only ([stopped], the handlers armed again); SIGTERM ends the
    chat."""
    writes = []

    def interrupt_first_reply(text):
        writes.append(text)
        if len(writes) == 1:
            raise KeyboardInterrupt

    rc, out, err, session, rearms = run_repl(demo, b"What is a list?\nAnd a tuple?\n", out_fail=interrupt_first_reply)
    assert rc == 0 and "[stopped]" in err and rearms == [1]
    assert session.turns == 1 and len(session.messages) == 4
    assert "read" in " ".join(session.notes)

    def terminate(text):
        raise Terminated()

    with pytest.raises(Terminated):
        run_repl(demo, b"What is a list?\n", out_fail=terminate)


# -- the command, in-process -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--cache-dtype", "int3"], "unknown cache format 'int3'"),
    (["--model", "/no/such/folder"], "no such folder"),
    (["--temperature", "nan"], "temperature"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_exit_2_with_one_message(capsys, argv, message):
    from ktjax.cli.chat import main

    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_help_lists_the_commands(capsys):
    from ktjax.cli.chat import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "/reset" in out and "/stats" in out and "--cache-dtype" in out


def test_piped_lines_are_read_without_prompts_and_the_end_exits_0(capsys, monkeypatch):
    from ktjax.cli.chat import main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"/stats\n/help\n")))
    assert main(["--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("conversation: 0 tokens in 0 turns") and "/reset" in out and "> " not in out
    assert "demo model" in err


class CtrlCAtThePrompt:
    """A stdin where Ctrl-C arrives while a line is awaited."""

    def isatty(self):
        return False

    def readline(self, limit=-1):
        raise KeyboardInterrupt


def test_ctrl_c_at_the_prompt_exits_130_with_one_line(capsys, monkeypatch):
    from ktjax.cli.chat import main

    monkeypatch.setattr(sys, "stdin", CtrlCAtThePrompt())
    assert main([]) == 130
    out, err = capsys.readouterr()
    assert err.rstrip().endswith("interrupted") and "Traceback" not in out + err


# -- python -m ktjax.chat through a pseudo-terminal -----------------------------------------------------------

class Terminal:
    """python -m ktjax.chat on a pseudo-terminal: type lines, read what it shows."""

    def __init__(self, *flags):
        self.fd, child = pty.openpty()
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "TERM": "dumb"}
        # Its own session with the terminal as its controlling one: Ctrl-C typed there is its SIGINT. setsid(1)
        # does it without running Python between fork and exec (a preexec_fn, the fallback, warns beside JAX).
        command = [sys.executable, "-m", "ktjax.chat", *flags]
        setsid = shutil.which("setsid")
        kw = (dict(args=[setsid, "--ctty", *command]) if setsid else
              dict(args=command, start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0)))
        self.proc = subprocess.Popen(stdin=child, stdout=child, stderr=child, cwd=ROOT, env=env, **kw)
        os.close(child)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 240) -> str:
        """What arrives up to and including the next `text` ("": at least one more character)."""
        end = time.monotonic() + timeout
        while (text not in self.seen) if text else not self.seen:
            left = end - time.monotonic()
            assert left > 0, f"no {text!r} in {self.seen[-2000:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                assert chunk, f"ended before {text!r}: {self.seen[-2000:]!r}"
                self.seen += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        i = self.seen.index(text) + len(text) if text else len(self.seen)
        got, self.seen = self.seen[:i], self.seen[i:]
        return got

    def type(self, text: str):
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        rest = self.seen
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    rest += os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:
                    break
        code = self.proc.wait(timeout=max(1, end - time.monotonic()))
        os.close(self.fd)
        return code, rest

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def terminal():
    opened = []

    def start(*flags):
        opened.append(Terminal(*flags))
        return opened[-1]

    yield start
    for t in opened:
        t.close()


def test_chat_in_a_terminal(terminal):
    """Two turns stream text, /stats shows the cache holding both turns, /reset empties it, /quit exits 0."""
    t = terminal("--max-new-tokens", "12")
    t.read_until("\n> ")
    t.type("What is a list?\n")
    first = t.read_until("\n> ")
    assert len(first.split("What is a list?\n", 1)[1].strip(" >\n")) > 0  # the reply
    t.type("And a tuple?\n")
    t.read_until("\n> ")
    t.type("/stats\n")
    stats = t.read_until("\n> ")
    n = int(stats.split("conversation: ")[1].split(" tokens")[0])
    assert f"{n} tokens in 2 turns; the cache holds {n - 1} of" in stats, stats
    assert "last turn: prefill" in stats and "tok/s" in stats and "memory: peak" in stats
    t.type("/reset\n")
    t.read_until("\n> ")
    t.type("/stats\n")
    assert "0 tokens in 0 turns; the cache holds 0 of" in t.read_until("\n> ")
    t.type("/quit\n")
    code, rest = t.wait()
    assert code == 0 and "Traceback" not in rest


@pytest.mark.slow  # a second start of JAX; the same paths run in-process above, without a terminal's signals
def test_ctrl_c_stops_a_reply_then_exits_130_at_the_prompt(terminal):
    """Ctrl-C typed while a reply streams stops it ([stopped], the prompt again); Ctrl-C at the prompt exits 130
    with one line, no traceback."""
    t = terminal("--max-new-tokens", "1000", "--ignore-eos")
    t.read_until("\n> ")
    t.type("Write a long story\n")
    t.read_until("Write a long story\n")
    t.read_until("")  # the reply has begun
    t.type("\x03")
    t.read_until("[stopped]")
    t.read_until("> ")
    t.type("\x03")  # Ctrl-C at the prompt: the terminal sends SIGINT
    code, rest = t.wait()
    assert code == 130 and "interrupted" in rest and "Traceback" not in rest, rest
