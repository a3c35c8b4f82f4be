"""python -m ktjax.chat: a conversation with a model in the terminal.

Each line you type is a user message; the model's reply streams as it is generated. The conversation keeps its
latent cache across turns (ktjax/runtime/session.py), so a turn reads only its new tokens into it; the model's
chat template renders the messages (a model without one continues the text line by line). With no --model it
runs the built-in demo model. Commands: /help, /reset (start a new conversation), /stats (tokens in the cache,
its fill, the last turn's prefill and decode speed, memory), /quit. A line that starts with // sends the rest
with one / as a message. Ctrl-C during a reply stops it (what was shown stays in the conversation); Ctrl-C at
the prompt exits with code 130, Ctrl-D (end of input) or /quit with 0. Bad flags exit 2; a bad line (not UTF-8,
too long for the model's window) is one message and the conversation goes on.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ktjax.cli.common import (ENGINE_MODULES, Parser, add_setting_flags, add_version_flag, check_text_flags,
                              enable_compilation_cache, guarded_main, load_engine, resolve_settings)
from ktjax.errors import KtjaxError
from ktjax.util.process import Terminated, import_uninterrupted, install_signal_handlers, require_stdout, write_out
from ktjax.util.text import utf8_error

PROMPT = "> "
MAX_LINE_BYTES = 1 << 20  # one message; more than any model's window holds in tokens, refused before tokenizing

EXAMPLES = """examples:
  python -m ktjax.chat                                   # the built-in demo model
  python -m ktjax.chat --model deepseek-ai/DeepSeek-V2-Lite-Chat --cache-dtype int8 --temperature 0.7
  python -m ktjax.chat --model MODEL --cache-lens 8192   # a fixed cache: it never grows (nor compiles again)

commands (typed at the prompt):
  /help    this list
  /reset   forget the conversation (its cache is emptied)
  /stats   tokens in the cache, its fill, the last turn's prefill and decode speed, memory
  /quit    leave (so do Ctrl-D and /exit)
  //text   send "/text" as a message

the cache grows with the conversation (read again into a larger one, with a note) unless --cache-lens fixes its
size; a conversation past the cache or the model's window is refused with the numbers: /reset starts over.
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ktjax.chat", usage="%(prog)s [--model MODEL] [options]", description=__doc__,
               epilog=EXAMPLES)
    p.add_argument("--model", help="a Hugging Face DeepSeek folder, a converted ktjax checkpoint, or a Hugging "
                                   "Face Hub id (org/name or org/name@revision; downloaded into the Hugging Face "
                                   "cache unless there) (default: the built-in demo model)")
    add_version_flag(p)
    add_setting_flags(p)
    return p


def main(argv=None) -> int:
    return guarded_main(lambda: _main(argv))


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    check_text_flags(args)
    resolved = resolve_settings(args)
    require_stdout()
    import_uninterrupted(*ENGINE_MODULES, "ktjax.runtime.session")
    enable_compilation_cache()
    engine = load_engine(args, resolved)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    repl = Repl(engine.session(), read_line=terminal_reader() if interactive else stream_reader(sys.stdin),
                prompt=PROMPT if interactive else "", rearm=install_signal_handlers)
    return repl.run()


# -- reading lines --------------------------------------------------------------------------------------------

def terminal_reader() -> Callable[[], str | None]:
    """Lines from the terminal through input() (with readline's editing and history where Python has it); None at
    end of input (Ctrl-D)."""
    try:
        import readline  # noqa: F401 - imported for its effect on input()
    except ImportError:
        pass

    def read(prompt: str) -> str | None:
        try:
            return input(prompt)
        except EOFError:
            return None
        except UnicodeDecodeError as e:
            raise KtjaxError(f"the line is not UTF-8 text (byte {e.start}); type UTF-8") from None
    return read


def stream_reader(stream) -> Callable[[str], str | bytes | None]:
    """Lines from a file or pipe, read as bytes (a line past MAX_LINE_BYTES is read to its end and refused)."""
    binary = getattr(stream, "buffer", stream)

    def read(prompt: str) -> bytes | None:
        if prompt:
            write_out(prompt)
        data = binary.readline(MAX_LINE_BYTES + 1)
        if not data:
            return None
        if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
            while (rest := binary.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
            raise KtjaxError(f"a line of more than {MAX_LINE_BYTES >> 20} MiB, more than any model's window holds")
        return data
    return read


def line_text(raw: str | bytes) -> str:
    """A line as text without its line break, or one KtjaxError where it is not UTF-8 or too long."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise KtjaxError(f"the line is not UTF-8 text (byte {e.start}); type UTF-8") from None
    why = utf8_error(raw)
    if why:
        raise KtjaxError(f"the line is not UTF-8 text: {why}")
    if len(raw) > MAX_LINE_BYTES:
        raise KtjaxError(f"a line of more than {MAX_LINE_BYTES >> 20} MiB, more than any model's window holds")
    return raw.rstrip("\r\n")


# -- the loop -------------------------------------------------------------------------------------------------

class Repl:
    """The read-reply loop over a Session. read_line(prompt) -> str, bytes or None (end of input); `out` gets the
    replies and the commands' output, `err` errors and notes; rearm() makes Ctrl-C raise again after it stopped a
    reply (the signal handlers raise once)."""

    def __init__(self, session, read_line, prompt: str = PROMPT, out: Callable[[str], None] = write_out,
                 err=None, rearm: Callable[[], object] = lambda: None):
        self.session = session
        self.read_line = read_line
        self.prompt = prompt
        self.out = out
        self.err = err
        self.rearm = rearm
        tokenizer = session.engine.tokenizer
        self.chat = tokenizer is not None and bool(tokenizer.chat_template)
        self.commands = {
            "/help": (self.help, "this list"),
            "/reset": (self.reset, "forget the conversation (its cache is emptied)"),
            "/stats": (self.stats, "tokens in the cache, its fill, the last turn's prefill and decode speed, memory"),
            "/quit": (self.quit, "leave (so do Ctrl-D and /exit)"),
            "/exit": (self.quit, None),
        }

    def say(self, line: str):
        print(line, file=self.err or sys.stderr, flush=True)

    def run(self) -> int:
        how = "chat template" if self.chat else "no chat template: each line continues the text"
        self.say(f"ktjax chat ({how}); /help for the commands, Ctrl-D to leave")
        while True:
            try:
                raw = self.read_line(self.prompt)
                if raw is None:  # end of input
                    if self.prompt:
                        self.out("\n")
                    return 0
                line = line_text(raw)
            except KtjaxError as e:
                self.say(f"error: {e}")
                continue
            code = self.handle(line)
            if code is not None:
                return code

    def handle(self, line: str) -> int | None:
        """One line: a command, or a message. -> an exit code to leave with, or None to go on."""
        if not line.strip():
            return None
        if line.startswith("/") and not line.startswith("//"):
            name = line.split()[0]
            command = self.commands.get(name.lower())
            if command is None:
                self.say(f"error: unknown command {name[:40]}; /help lists the commands (//text sends /text)")
                return None
            return command[0]()
        self.reply(line[1:] if line.startswith("//") else line)
        return None

    def reply(self, text: str):
        from ktjax.runtime.tokenizer import StreamDecoder

        decoder = StreamDecoder(self.session.engine.tokenizer)
        started = []

        def on_tokens(new):
            started.append(True)
            piece = decoder.push(new[0])
            if piece:
                self.out(piece)

        notes_before = len(self.session.notes)
        try:
            if self.chat:
                self.session.chat(text, on_tokens=on_tokens)
            else:
                self.session.send(text, on_tokens=on_tokens)
            self.out(decoder.flush() + "\n")
        except KtjaxError as e:
            if started:
                self.out(decoder.flush() + "\n")
            self.say(f"error: {e}")
        except KeyboardInterrupt as e:
            if isinstance(e, Terminated):  # SIGTERM ends the program, Ctrl-C only the reply
                raise
            self.rearm()
            self.out(decoder.flush() + "\n")
            self.say("[stopped]")
        for note in self.session.notes[notes_before:]:
            self.say(f"note: {note}")

    # -- commands -----------------------------------------------------------------------------------------
    def help(self) -> None:
        for name, (_, text) in self.commands.items():
            if text:
                self.out(f"  {name:<8} {text}\n")
        self.out("  //text   send \"/text\" as a message\n")

    def reset(self) -> None:
        self.session.reset()
        self.out("conversation reset: the cache holds 0 tokens\n")

    def quit(self) -> int:
        return 0

    def stats(self) -> None:
        self.out(format_stats(self.session.stats))


def format_stats(s: dict) -> str:
    from ktjax.util.units import format_bytes

    turns = f"{s['turns']} turn" + ("" if s["turns"] == 1 else "s")
    lines = [f"conversation: {s['conversation_tokens']} tokens in {turns}; the cache holds {s['cached_tokens']} "
             f"of {s['cache_lens']} ({s['cache_fill']:.1%} full, {s['cache_dtype']}, "
             f"{format_bytes(s['cache_bytes'])}); the conversation may reach {s['limit']} tokens"]
    t = s["last_turn"]
    if t:
        lines.append(f"last turn: prefill {t['prefill_tokens']} new tokens ({t['reused_tokens']} reused from the "
                     f"cache) at {t['prefill_tokens_per_s']:.1f} tok/s, decode {t['generated_tokens']} tokens at "
                     f"{t['decode_tokens_per_s']:.1f} tok/s, first token {t['time_to_first_token_s']:.3f} s")
    lines.append(f"memory: peak {format_bytes(s['peak_memory_bytes'])}, weights {format_bytes(s['weight_bytes'])}, "
                 f"cache {format_bytes(s['cache_bytes'])}")
    return "".join(line + "\n" for line in lines)


if __name__ == "__main__":
    sys.exit(main())
