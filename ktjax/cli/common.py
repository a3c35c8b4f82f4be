"""What python -m ktjax.generate, ktjax.serve and ktjax.chat share: the parser (bad flags: one message, exit 2),
the setting flags in --help's groups, --version, the settings resolved once, the compilation cache, and the
engine loaded (a model folder or the demo model)."""
from __future__ import annotations

import argparse
import os
import sys

from ktjax.errors import KtjaxError
from ktjax.runtime.settings import SETTINGS, describe, load_yaml, resolve
from ktjax.util.text import utf8_error
from ktjax.util.version import version_text

# Imported with Ctrl-C held (seconds; a signal inside a C extension's import prints a traceback), after the flags
# are checked: what loading a model and running it imports.
ENGINE_MODULES = ("jax", "flax.nnx", "tensorstore", "tokenizers", "ktjax.runtime.engine", "ktjax.weights.loader",
                  "ktjax.weights.checkpoint", "ktjax.runtime.tokenizer")

# --help's groups of the settings table's flags, in this order; a setting not named here lands in "advanced".
SETTING_GROUPS = {
    "settings": ("dtype", "cache_dtype", "max_new_tokens", "truncate_left", "ignore_eos", "mesh"),
    "sampling": ("temperature", "top_k", "top_p", "seed"),
    "memory": ("cache_lens", "memory_budget", "chunk_size"),
    "advanced": (),
}


class Parser(argparse.ArgumentParser):
    """argparse with help kept as written (the examples' line breaks), and a bad flag as one clear message and
    exit code 2 (KtjaxError), also when called in-process."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        raise KtjaxError(message)


def add_version_flag(p: argparse.ArgumentParser):
    p.add_argument("--version", action="version", version=version_text(),
                   help="print ktjax's version and the jax it runs on, and exit")


def add_setting_flags(p: argparse.ArgumentParser, config_help: str = "a YAML preset of settings "
                                                                     "(configs/*.yaml); flags override it"):
    """--config and one flag per setting of ktjax/runtime/settings.py's table, in SETTING_GROUPS' groups, the help
    and choices taken from the table; values are checked by the table's own parsers (after merging with --config),
    not by argparse."""
    groups = {name: p.add_argument_group(name) for name in SETTING_GROUPS}
    groups["settings"].add_argument("--config", help=config_help)
    for key, setting in SETTINGS.items():
        group = next((g for name, g in groups.items() if key in SETTING_GROUPS[name]), groups["advanced"])
        flag = "--" + key.replace("_", "-")
        text = setting.help + ("" if setting.default is None else f" (default: {describe(setting.default)})")
        text = text.replace("%", "%%")  # argparse %-formats help strings; the table's text is plain
        if setting.switch:
            group.add_argument(flag, action="store_const", const=True, default=None, help=text)
        else:
            metavar = "{" + ",".join(setting.choices) + "}" if setting.choices else key.upper()
            group.add_argument(flag, default=None, metavar=metavar, help=text)


def check_text_flags(args: argparse.Namespace):
    """Every flag's text must be UTF-8: bytes that are not (which Python keeps as lone surrogates) would fail in
    the tokenizer, a file name or a JSON encoder much later."""
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and utf8_error(text):
                raise KtjaxError(f"--{name.replace('_', '-')}: {utf8_error(text)}; pass UTF-8 text")


def resolve_settings(args: argparse.Namespace) -> tuple:
    """--config, then the setting flags over it, then the model folder checked -> (RuntimeConfig, CallSettings);
    sets args.model to the folder named by either (None: the demo model)."""
    settings = load_yaml(args.config) if args.config else {}
    model = args.model if args.model is not None else settings.pop("model", None)  # --model "" is refused
    settings.pop("model", None)
    settings.update({k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None})
    resolved = resolve(**settings)
    if model is not None:
        from ktjax.weights.hub import resolve_model
        model = resolve_model(model, "--model")  # a Hub id -> its snapshot folder (a local path wins)
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


def model_folder(args) -> str | None:
    """The folder the engine loads: --model, else the trained demo model's folder when it is installed (None:
    the demo model with random weights)."""
    from ktjax.demo import DEMO_MODEL_DIR

    if args.model:
        return args.model
    return DEMO_MODEL_DIR if os.path.isfile(os.path.join(DEMO_MODEL_DIR, "config.json")) else None


def load_engine(args, resolved, progress=None):
    """The engine; `progress` (ktjax/runtime/progress.py) is told of the "load" phase."""
    from ktjax import engine_for, open_folder
    from ktjax.demo import RANDOM_WEIGHTS_NOTICE, TRAINED_NOTICE, demo_model, demo_tokenizer

    if args.model:
        return open_folder(args.model, *resolved, progress=progress)
    folder = model_folder(args)
    if folder is not None:
        print(f"ktjax: {TRAINED_NOTICE}", file=sys.stderr)
        return open_folder(folder, *resolved, progress=progress)
    print(f"ktjax: {RANDOM_WEIGHTS_NOTICE}", file=sys.stderr)
    if progress is not None:
        progress.phase("load", 0, "parameters")
    cfg, model = demo_model(resolved[0].jnp_dtype)
    engine = engine_for(cfg, model, *resolved, tokenizer=demo_tokenizer())
    if progress is not None:
        progress.end()
    return engine


def guarded_main(body) -> int:
    """A command's main: body() -> exit code, under the signal handlers, with the README's exit codes: bad input
    one message and 2, an unusable stdout 1, Ctrl-C or SIGTERM at any moment one line and 130, no traceback."""
    from ktjax.util.process import (EXIT_BAD_INPUT, EXIT_INTERRUPTED, OutputFailed, interrupted_by, interrupted_line,
                                    report_output_failure, signals_interrupt)

    with signals_interrupt():
        try:
            return body()
        except KtjaxError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OutputFailed as e:
            return report_output_failure(e)
        except Exception as e:  # Ctrl-C or SIGTERM, also where an import turned it into an ImportError
            if not interrupted_by(e):
                raise
            print("\n" + interrupted_line(e), file=sys.stderr)
            return EXIT_INTERRUPTED
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
            print("\n" + interrupted_line(e), file=sys.stderr)
            return EXIT_INTERRUPTED
