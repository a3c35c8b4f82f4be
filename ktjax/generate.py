"""python -m ktjax.generate: read a prompt into the latent cache and generate from it.

With no --model it runs the built-in demo model. Settings come from defaults, then a --config YAML preset,
then flags (flags win); every setting is defined once in ktjax/runtime.py (SETTINGS), which also validates
the flags, the YAML and ktjax.load's keywords alike. Bad input exits with code 2 and one message; Ctrl-C
stops cleanly with code 130.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import KtjaxError
from .files import open_regular
from .runtime import SETTINGS, describe, load_yaml, resolve

DEFAULT_PROMPT = "The key to reading a long document is"
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear message and exit code 2, also when called in-process
        raise KtjaxError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ktjax.generate", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face DeepSeek folder or a converted ktjax checkpoint "
                                   "(default: the built-in demo model)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch of prompts")
    p.add_argument("--prompt-file", action="append", help="read a prompt from a file; repeatable")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the model's chat "
                                                       "template")
    p.add_argument("--config", help="a YAML preset of settings (configs/*.yaml); flags override it")
    p.add_argument("--json", action="store_true", help="print one compact JSON object {completion, "
                                                       "completion_ids, stats} as the last line of stdout instead "
                                                       "of streamed text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar during a long prefill")
    add_setting_flags(p)
    return p


def add_setting_flags(p: argparse.ArgumentParser):
    """One flag per setting of ktjax/runtime.py's table, its help and choices taken from there; values are
    checked by the table's own parsers (after merging with --config), not by argparse."""
    for key, setting in SETTINGS.items():
        flag = "--" + key.replace("_", "-")
        text = setting.help + ("" if setting.default is None else f" (default: {describe(setting.default)})")
        text = text.replace("%", "%%")  # argparse %-formats help strings; the table's text is plain
        if setting.switch:
            p.add_argument(flag, action="store_const", const=True, default=None, help=text)
        else:
            metavar = "{" + ",".join(setting.choices) + "}" if setting.choices else key.upper()
            p.add_argument(flag, default=None, metavar=metavar, help=text)


def parse(argv) -> tuple[argparse.Namespace, tuple]:
    """Flags -> (args, (RuntimeConfig, CallSettings)), every value checked once, before JAX starts."""
    args = build_parser().parse_args(argv)
    resolved = resolve_settings(args)
    args.prompts = list(args.prompt or [])
    for path in args.prompt_file or []:
        try:
            with os.fdopen(open_regular(path, "--prompt-file"), encoding="utf-8") as f:
                args.prompts.append(f.read())
        except OSError as e:
            raise KtjaxError(f"--prompt-file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise KtjaxError(f"--prompt-file {path}: not UTF-8 text") from None
    if not args.prompts:
        args.prompts = [DEFAULT_PROMPT]
    if any(not p for p in args.prompts):
        raise KtjaxError("a prompt is empty")
    return args, resolved


def resolve_settings(args: argparse.Namespace) -> tuple:
    """--config, then the setting flags over it, then the model folder checked -> (RuntimeConfig, CallSettings);
    sets args.model to the folder named by either (None: the demo model). Shared with python -m ktjax.serve."""
    settings = load_yaml(args.config) if args.config else {}
    model = args.model or settings.pop("model", None)
    settings.pop("model", None)
    settings.update({k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None})
    resolved = resolve(**settings)
    if model is not None and not os.path.isdir(model):
        raise KtjaxError(f"--model {model}: no such folder")
    if model is not None and not os.path.isfile(os.path.join(model, "config.json")) and \
            not os.path.isfile(os.path.join(model, "manifest.json")):
        raise KtjaxError(f"--model {model}: neither a Hugging Face folder (config.json) nor a converted checkpoint")
    if model is not None and not os.path.lexists(os.path.join(model, "tokenizer.json")):
        raise KtjaxError(f"--model {model}: no tokenizer.json, so no text in or out; copy the model's tokenizer "
                         "files into the folder, or pass token ids through the Python API (engine.generate)")
    args.model = model
    return resolved


def enable_compilation_cache():
    """JAX's persistent compilation cache, on by default: a second run skips compilation."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/ktjax/jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def load_engine(args, resolved):
    from . import engine_for, open_folder
    from .demo import DEMO_MODEL_DIR, RANDOM_WEIGHTS_NOTICE, TRAINED_NOTICE, demo_model, demo_tokenizer

    if args.model:
        return open_folder(args.model, *resolved)
    if os.path.isfile(os.path.join(DEMO_MODEL_DIR, "config.json")):
        print(f"ktjax: {TRAINED_NOTICE}", file=sys.stderr)
        return open_folder(DEMO_MODEL_DIR, *resolved)
    print(f"ktjax: {RANDOM_WEIGHTS_NOTICE}", file=sys.stderr)
    cfg, model = demo_model(resolved[0].jnp_dtype)
    return engine_for(cfg, model, *resolved, tokenizer=demo_tokenizer())


def main(argv=None) -> int:
    try:
        args, resolved = parse(argv)
        enable_compilation_cache()
        return run(load_engine(args, resolved), args)
    except KtjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(engine, args) -> int:
    from .tokenizer import StreamDecoder

    encode = engine.encode_chat if args.chat else engine.tokenizer.encode
    prompts = [encode(p) for p in args.prompts]
    stream = not args.json and len(prompts) == 1
    decoder = StreamDecoder(engine.tokenizer)
    echoed = False

    def echo():  # once the prompts passed every check: an error never glues onto the echoed prompt
        nonlocal echoed
        if stream:
            sys.stdout.write(args.prompts[0])
            sys.stdout.flush()
            echoed = True

    def on_tokens(new):
        text = decoder.push(new[0])
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        result = engine.generate(prompts, on_tokens=on_tokens if stream else None, on_start=echo,
                                 progress=not args.no_progress and sys.stderr.isatty())
    except (KtjaxError, KeyboardInterrupt):
        if echoed:
            sys.stdout.write(decoder.flush() + "\n")
            sys.stdout.flush()
        raise
    texts = result.texts
    if args.json:
        one = len(prompts) == 1
        print(json.dumps({"completion": texts[0] if one else texts,
                          "completion_ids": result.tokens[0] if one else result.tokens,
                          "stats": result.stats}, separators=(",", ":")))
        return 0
    if stream:
        sys.stdout.write(decoder.flush() + "\n")
    else:
        for prompt, text in zip(args.prompts, texts):
            print(f"--- {prompt!r}\n{prompt}{text}")
    print_stats(result.stats)
    return 0


def print_stats(s: dict, file=None):
    from .units import format_bytes

    file = file or sys.stderr
    print(f"prompt {s['prompt_tokens']} tokens, generated {s['generated_tokens']} | "
          f"prefill {s['prefill_tokens_per_s']:.1f} tok/s, decode {s['decode_tokens_per_s']:.1f} tok/s, "
          f"first token {s['time_to_first_token_s']:.3f} s, compile {s['compile_s']:.1f} s", file=file)
    per_device = (f", {format_bytes(s['cache_bytes_per_device'])} per device"
                  if s.get("cache_bytes_per_device", s["cache_bytes"]) != s["cache_bytes"] else "")
    print(f"cache {s['cache_dtype']} x {s['cache_lens']} tokens = {format_bytes(s['cache_bytes'])}{per_device} "
          f"({s['cache_bytes_per_token']} B/token, all layers) | weights {format_bytes(s['weight_bytes'])} | "
          f"peak memory {format_bytes(s['peak_memory_bytes'])} | {s['devices']} {s['backend']} device(s)",
          file=file)
    for note in s.get("sharding_notes") or []:
        print(f"note: {note}", file=file)


if __name__ == "__main__":
    sys.exit(main())
