"""python -m ktjax.generate: read a prompt into the latent cache and generate from it.

With no --model it runs the built-in demo model. Settings come from defaults, then a --config YAML preset,
then flags (flags win); every setting is defined once in ktjax/runtime/settings.py (SETTINGS), which also validates
the flags, the YAML and ktjax.load's keywords alike. Bad input exits with code 2 and one message; Ctrl-C
or SIGTERM stops cleanly with code 130; a stdout that is full or closed exits 1 (a broken pipe, as `| head`
makes, quietly). `--prompt-file -` reads the prompt from stdin.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import stat
import sys

from ktjax.cli.common import (ENGINE_MODULES, Parser, add_setting_flags, add_version_flag, check_text_flags,
                              enable_compilation_cache, guarded_main, load_engine, model_folder, resolve_settings)
from ktjax.errors import KtjaxError
from ktjax.util.files import open_regular
from ktjax.util.process import OutputFailed, import_uninterrupted, require_stdout, write_out

DEFAULT_PROMPT = "The key to reading a long document is"
MAX_PROMPT_BYTES = 64 * 2**20  # read of one prompt file; with --truncate-left, of its end
TAIL_MARGIN_TOKENS = 64        # tokens beyond the window read with --truncate-left (where the cut fell)
INSTRUCTION_SEPARATOR = "\n\n"  # between --prompt's instruction and a --prompt-file's text

EXAMPLES = """examples:
  python -m ktjax.generate --prompt "The key to reading a long document is" --max-new-tokens 32
  python -m ktjax.generate --model MODEL --prompt "Summarise this:" --prompt-file report.txt --chat
  cat report.txt | python -m ktjax.generate --model MODEL --prompt-file - --truncate-left
  python -m ktjax.generate --model MODEL --config configs/deepseek-v2-lite-long-int8.yaml --json

prompts: each --prompt is one prompt (repeat for a batch), and so is each --prompt-file. Given together,
the one --prompt is an instruction: each file becomes one prompt, the instruction, a blank line, then the
file's text (with --truncate-left the file's oldest text is dropped, never the instruction).
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ktjax.generate", usage="%(prog)s [--model MODEL] [--prompt TEXT] [--prompt-file FILE] "
               "[options]", description=__doc__, epilog=EXAMPLES)
    p.add_argument("--model", help="a Hugging Face DeepSeek folder, a converted ktjax checkpoint, or a Hugging "
                                   "Face Hub id (org/name or org/name@revision; downloaded into the Hugging Face "
                                   "cache unless there) (default: the built-in demo model)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt text; repeat for a batch of prompts; with --prompt-file, the instruction put before "
                        "the file's text (see below)")
    p.add_argument("--prompt-file", action="append", metavar="FILE",
                   help="read a prompt from a file (- or /dev/stdin: from stdin); repeatable; at most 64 MiB")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the model's chat "
                                                       "template")
    p.add_argument("--json", action="store_true", help="print one compact JSON object {completion, "
                                                       "completion_ids, stats} as the last line of stdout instead "
                                                       "of streamed text")
    p.add_argument("--no-progress", action="store_true", help="no live status on stderr (phase, tokens, tok/s, "
                                                              "memory, cache fill: one line on a terminal, a "
                                                              "log line per phase otherwise)")
    p.add_argument("--dry-run", action="store_true", help="print the memory plan (device and host memory: weights, "
                                                          "cache, activations, experts; the cache that cache_lens "
                                                          "auto gets) from the model folder's headers, read no "
                                                          "weight, and exit")
    add_version_flag(p)
    add_setting_flags(p)
    return p


def parse(argv) -> tuple[argparse.Namespace, tuple]:
    """Flags -> (args, (RuntimeConfig, CallSettings)), every value checked once, before JAX starts. Sets
    args.prompts (texts), args.prompt_names (for messages) and args.instruction (None, or the --prompt put
    before each --prompt-file's text)."""
    args = build_parser().parse_args(argv)
    check_text_flags(args)
    resolved = resolve_settings(args)
    texts, files = list(args.prompt or []), list(args.prompt_file or [])
    args.instruction = None
    if texts and files:
        if len(texts) > 1:
            raise KtjaxError(f"{len(texts)} --prompt with --prompt-file: with a file, --prompt is the one "
                             "instruction put before each file's text; pass one --prompt, or the prompts alone")
        args.instruction, texts = texts[0], []
        if not args.instruction:
            raise KtjaxError("the --prompt instruction is empty")
    args.prompts, args.prompt_names = texts, ["--prompt"] * len(texts)
    for path in files:
        args.prompts.append(read_prompt_file(path, tail=resolved[1].truncate_left))
        args.prompt_names.append(f"--prompt-file {path}")
    if not args.prompts:
        args.prompts, args.prompt_names = [DEFAULT_PROMPT], ["the default prompt"]
    if any(not p for p in args.prompts):
        raise KtjaxError("a prompt is empty")
    return args, resolved


def shown_prompt(args, text: str) -> str:
    """A prompt as the model reads it (before any chat template): the instruction, if any, then the text."""
    return text if args.instruction is None else args.instruction + INSTRUCTION_SEPARATOR + text


def read_prompt_file(path: str, tail: bool = False) -> str:
    """A prompt file's text: a regular file of at most MAX_PROMPT_BYTES (with `tail`, its last MAX_PROMPT_BYTES:
    --truncate-left keeps the end anyway), or stdin for "-" and /dev/stdin (a pipe: at most MAX_PROMPT_BYTES)."""
    what = f"--prompt-file {path}"
    try:
        if _is_stdin(path):
            stream = getattr(sys.stdin, "buffer", None)
            if stream is None:
                raise KtjaxError(f"{what}: stdin is closed")
            data = stream.read(MAX_PROMPT_BYTES + 1)
            if len(data) > MAX_PROMPT_BYTES:
                raise KtjaxError(f"{what}: more than {MAX_PROMPT_BYTES >> 20} MiB on stdin, more than any model's "
                                 "window holds; pass a file (with --truncate-left, its end is read)")
        else:
            with os.fdopen(open_regular(path, "--prompt-file"), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_PROMPT_BYTES and not tail:
                    raise KtjaxError(f"{what}: {size} bytes, more than any model's window holds (at most "
                                     f"{MAX_PROMPT_BYTES >> 20} MiB are read); pass --truncate-left to keep its end")
                f.seek(max(0, size - MAX_PROMPT_BYTES))
                data = _from_a_character(f.read(MAX_PROMPT_BYTES)) if size > MAX_PROMPT_BYTES else f.read()
    except OSError as e:
        raise KtjaxError(f"{what}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KtjaxError(f"{what}: not UTF-8 text (byte {e.start})") from None


def _is_stdin(path: str) -> bool:
    """"-", or a name of the pipe or terminal that is stdin (/dev/stdin, /dev/fd/0)."""
    if path == "-":
        return True
    try:
        st, st0 = os.stat(path), os.fstat(0)
    except OSError:
        return False
    return not stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (st0.st_dev, st0.st_ino)


def _from_a_character(data: bytes) -> bytes:
    """`data` from its first whole UTF-8 character (a cut may fall inside one: at most 3 bytes to skip)."""
    skip = 0
    while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
        skip += 1
    return data[skip:]


def main(argv=None) -> int:
    return guarded_main(lambda: _main(argv))


def _main(argv) -> int:
    args, resolved = parse(argv)
    require_stdout()  # before minutes of loading, for a completion nobody can read
    if args.dry_run:
        return dry_run(args, resolved)
    import_uninterrupted(*ENGINE_MODULES)
    enable_compilation_cache()
    from ktjax.runtime.progress import LiveStatus, Timeline

    # Left on an error, it clears its line first: the error stays the last line of stderr.
    with Timeline() if args.no_progress else LiveStatus(sys.stderr) as progress:
        return run(load_engine(args, resolved, progress), args, progress)


def run(engine, args, progress=None) -> int:
    """Generate and print; `progress` (ktjax/runtime/progress.py) hears of every phase, and its timeline goes
    into the stats."""
    from ktjax.runtime.progress import Timeline
    from ktjax.runtime.tokenizer import StreamDecoder

    progress = progress or Timeline()
    prompts = [encode_prompt(engine, text, name, args.chat, args.instruction)
               for text, name in zip(args.prompts, args.prompt_names)]
    stream = not args.json and len(prompts) == 1
    # Status and streamed text on one terminal (or in one log, 2>&1) would write over each other: there the prompt
    # is echoed when the first tokens come, and the status makes way for the text until its last line.
    one_screen = stream and same_file(sys.stdout, sys.stderr)
    decoder = StreamDecoder(engine.tokenizer)
    echoed = False

    def echo():  # once the prompts passed every check: an error never glues onto the echoed prompt
        nonlocal echoed
        if stream and not echoed:
            if one_screen:
                progress.pause()
            echoed = True
            write_out(shown_prompt(args, args.prompts[0]))

    def on_tokens(new):
        echo()
        text = decoder.push(new[0])
        if text:
            write_out(text)

    try:
        result = engine.generate(prompts, on_tokens=on_tokens if stream else None,
                                 on_start=None if one_screen else echo, progress=progress)
    except (KtjaxError, KeyboardInterrupt):
        if echoed:
            try:
                write_out(decoder.flush() + "\n")
            except OutputFailed:  # the error being raised says more
                pass
        raise
    if stream:
        echo()
        write_out(decoder.flush() + "\n")
    progress.close()  # its line cleared (or its last log line written) before the output and the stats
    texts = result.texts
    from ktjax.runtime.memory import weights_note
    result.stats["weights_note"] = weights_note(model_folder(args), engine.runtime.jnp_dtype)
    result.stats["timeline"] = progress.timeline()
    if args.json:
        one = len(prompts) == 1
        write_out(json.dumps({"completion": texts[0] if one else texts,
                              "completion_ids": result.tokens[0] if one else result.tokens,
                              "stats": result.stats}, separators=(",", ":")) + "\n")
        return 0
    if not stream:
        for prompt, text in zip(map(functools.partial(shown_prompt, args), args.prompts), texts):
            write_out(f"--- {prompt!r}\n{prompt}{text}\n")
    print_stats(result.stats)
    return 0


def dry_run(args, resolved) -> int:
    """--dry-run: the plan of runtime/memory.py's plan_folder for these prompts (tokenized by the folder's
    tokenizer, without a chat template) plus max_new_tokens, printed (--json: one JSON object); nothing loaded."""
    from ktjax.runtime.memory import describe_plan, plan_folder
    from ktjax.runtime.tokenizer import Tokenizer

    runtime, call = resolved
    folder = model_folder(args)
    if folder is None:
        raise KtjaxError("--dry-run plans a model folder from its headers: pass --model")
    tokenizer = Tokenizer.from_folder(folder)
    longest = max(len(tokenizer.encode(shown_prompt(args, text))) for text in args.prompts)
    cache_lens, plan, note = plan_folder(folder, runtime, len(args.prompts), longest + call.max_new_tokens)
    if args.json:
        write_out(json.dumps({"dry_run": True, "prompt_tokens": longest, "cache_lens": cache_lens,
                              "cache_dtype": runtime.cache_dtype.name, **plan.stats(), "note": note},
                             separators=(",", ":")) + "\n")
        return 0
    lines = [f"dry run: {len(args.prompts)} prompt(s) of at most {longest} tokens + {call.max_new_tokens} new: "
             f"cache {runtime.cache_dtype.name} x {cache_lens} tokens", *describe_plan(plan)]
    write_out("".join(line + "\n" for line in lines + ([f"note: {note}"] if note else [])))
    return 0


def same_file(a, b) -> bool:
    """Whether two streams write to one file, pipe or terminal (False for streams without a file: pytest's)."""
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def encode_prompt(engine, text: str, name: str, chat: bool = False, instruction: str | None = None) -> list[int]:
    """A prompt's tokens, the work bounded by the model's window: a prompt whose bytes alone prove it longer than
    the window (this tokenizer's tokens each stand for at most max_token_bytes) is refused before it is
    tokenized, and with --truncate-left only its end (what the window keeps, and a margin) is tokenized. With an
    `instruction` the prompt is the instruction, a blank line, then `text`; --truncate-left cuts only `text`."""
    encode = engine.encode_chat if chat else engine.tokenizer.encode
    call, window = engine.defaults, engine.cfg.max_position_embeddings
    room = window - call.max_new_tokens
    head = "" if instruction is None else instruction + INSTRUCTION_SEPARATOR
    size = len((head + text).encode("utf-8"))
    per_token = max_token_bytes(engine.tokenizer) if size > max(room, 0) else None
    if per_token is not None and -(-size // per_token) > room:
        if not call.truncate_left or room < 1:
            raise KtjaxError(
                f"{name}: {size} bytes are at least {-(-size // per_token)} tokens (a token of this tokenizer "
                f"stands for at most {per_token} bytes) + max_new_tokens {call.max_new_tokens} exceeds the model's "
                f"window of {window} positions (max_position_embeddings); use a shorter prompt, lower "
                "--max-new-tokens" + (", or pass --truncate-left to drop the oldest tokens" if room >= 1 else ""))
        text = _from_a_character(text.encode("utf-8")[-(room + TAIL_MARGIN_TOKENS) * per_token:]).decode("utf-8")
    ids = encode(head + text)  # the engine checks the tokens against the window and the cache (and cuts them)
    if not head or not call.truncate_left:
        return ids
    cache_lens = engine.runtime.cache_lens
    room = min(window, cache_lens if isinstance(cache_lens, int) else window) - call.max_new_tokens
    return _keep_instruction(ids, encode(head), room, name)


def _keep_instruction(ids: list[int], head: list[int], room: int, name: str) -> list[int]:
    """`ids` cut to `room` tokens by dropping the oldest tokens after the instruction's (the tokens `ids` shares
    with the instruction encoded alone: a chat template's opening, the instruction), not the instruction."""
    if len(ids) <= room:
        return ids
    keep = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
    if room - keep < 1:
        raise KtjaxError(f"{name}: the instruction takes {keep} of the {room} tokens a prompt may have (the window "
                         "or the cache, less max_new_tokens), leaving none for the file's text; shorten --prompt "
                         "or lower --max-new-tokens")
    return ids[:keep] + ids[len(ids) - (room - keep):]


def max_token_bytes(tokenizer) -> int | None:
    """The most bytes of text one token can stand for, where the tokenizer provably turns every byte of the text
    into tokens (byte-level BPE; no normalizer; no pre-tokenizer or added token that drops or swallows text):
    then B bytes are at least B / this many tokens. None for any other tokenizer."""
    try:
        spec = json.loads(tokenizer.tok.to_str())
    except Exception:  # not a `tokenizers` tokenizer
        return None
    normalizer = spec.get("normalizer")
    if normalizer and normalizer != {"type": "Sequence", "normalizers": []}:
        return None
    pre, kinds = [spec.get("pre_tokenizer") or {}], set()
    while pre:
        part = pre.pop()
        kinds.add(part.get("type"))
        pre.extend(part.get("pretokenizers") or [])
        if part.get("behavior") == "Removed":
            return None
    model = spec.get("model") or {}
    added = spec.get("added_tokens") or []
    if "ByteLevel" not in kinds or not kinds <= {"ByteLevel", "Sequence", "Split", "Digits", "Punctuation"} or \
            model.get("type") != "BPE" or any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    # a byte-level vocabulary spells each byte as one character; added tokens match the text as it is
    longest = max(max(map(len, model.get("vocab") or {}), default=0),
                  max((len((t.get("content") or "").encode("utf-8")) for t in added), default=0))
    return longest or None


def print_stats(s: dict, file=None):
    from ktjax.util.units import format_bytes

    file = file or sys.stderr
    print(f"prompt {s['prompt_tokens']} tokens, generated {s['generated_tokens']} | "
          f"prefill {s['prefill_tokens_per_s']:.1f} tok/s, decode {s['decode_tokens_per_s']:.1f} tok/s, "
          f"first token {s['time_to_first_token_s']:.3f} s, compile {s['compile_s']:.1f} s", file=file)
    if s.get("speculative", "off") != "off":
        print(f"speculative {s['speculative']}: {s['draft_tokens']} draft token(s) per pass, "
              f"{s['draft_acceptance_rate']:.0%} of drafts accepted, {s['accept_length']:.2f} tokens per pass",
              file=file)
    per_device = (f", {format_bytes(s['cache_bytes_per_device'])} per device"
                  if s.get("cache_bytes_per_device", s["cache_bytes"]) != s["cache_bytes"] else "")
    why = f" ({s['weights_note']})" if s.get("weights_note") else ""
    print(f"cache {s['cache_dtype']} x {s['cache_lens']} tokens = {format_bytes(s['cache_bytes'])}{per_device} "
          f"({s['cache_bytes_per_token']} B/token, all layers) | weights {format_bytes(s['weight_bytes'])}{why} | "
          f"peak memory {format_bytes(s['peak_memory_bytes'])} | {s['devices']} {s['backend']} device(s)",
          file=file)
    if s.get("host_memory", {}).get("total"):  # experts host: the planner's two memories
        print(f"planned memory: device {format_bytes(s['device_memory']['total'])}, host "
              f"{format_bytes(s['host_memory']['total'])} (routed experts)", file=file)
    for note in s.get("sharding_notes") or []:
        print(f"note: {note}", file=file)


if __name__ == "__main__":
    sys.exit(main())
