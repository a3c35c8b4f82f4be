"""Tokenizer and chat template from a model folder: tokenizer.json through `tokenizers`, special tokens and
the chat template from tokenizer_config.json, rendered like transformers does (sandboxed jinja2)."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import threading

from ktjax.errors import KtjaxError
from ktjax.util.text import utf8_error


def _token_text(value):
    """tokenizer_config.json spells special tokens as plain strings or as AddedToken objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _check_tokenizer_config(config):
    """tokenizer_config.json's fields that ktjax reads, type-checked (a KtjaxError naming the field)."""
    from ktjax.util.jsonio import json_type_name
    from ktjax.util.text import short_repr

    if not isinstance(config, dict):
        raise KtjaxError(f"must hold a JSON object of settings, not a {json_type_name(config)}")
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        if not (value is None or isinstance(value, str) or isinstance(_token_text(value), str)):
            raise KtjaxError(f"{key} must be a token (a string, or an object with a string \"content\")")
    if not isinstance(config.get("add_bos_token", False), (bool, type(None))):
        raise KtjaxError(f"add_bos_token={short_repr(config['add_bos_token'])} must be true or false")
    template = config.get("chat_template")
    named = isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str)
                                               for t in template)
    if not (template is None or isinstance(template, str) or named):
        raise KtjaxError("chat_template must be a template string or a list of {\"name\", \"template\"} objects")


class Tokenizer:
    def __init__(self, tokenizer, config: dict):
        _check_tokenizer_config(config)
        self.tok = tokenizer
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos_token = bool(config.get("add_bos_token", False))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template = template

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):  # a FIFO or a device would block the tokenizers library for ever
            raise KtjaxError(f"{folder}: no tokenizer.json file; pass token ids through the Python API instead")
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise KtjaxError(f"{path}: cannot be read as a tokenizer ({e})") from None
        config = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            from ktjax.util.jsonio import read_json
            config = read_json(cfg_path, "tokenizer config")
        try:
            return cls(tok, config)
        except KtjaxError as e:
            raise KtjaxError(f"{cfg_path}: {e}") from None

    def token_id(self, text):
        return None if text is None else self.tok.token_to_id(text)

    @property
    def bos_id(self):
        return self.token_id(self.bos_token)

    @property
    def eos_ids(self) -> list[int]:
        eos = self.token_id(self.eos_token)
        return [] if eos is None else [eos]

    def encode(self, text: str) -> list[int]:
        """A plain prompt; BOS first if and only if add_bos_token is set (tokenizers' own post-processor is
        bypassed, since DeepSeek's ByteLevel tokenizer does not add it even when the flag is set)."""
        ids = self.tok.encode(_checked_text(text), add_special_tokens=False).ids
        if self.add_bos_token and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise KtjaxError("--chat needs a chat_template in tokenizer_config.json, and this model has none")
        input_chars = sum(len(str(m.get("content", ""))) for m in messages)
        limits = _TemplateLimits(max_output=TEMPLATE_MIN_OUTPUT + TEMPLATE_OUTPUT_PER_INPUT * input_chars)
        try:
            with _time_limit(TEMPLATE_SECONDS):
                template = _sandbox(limits).from_string(self.chat_template)
                out = []
                for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                               bos_token=self.bos_token or "", eos_token=self.eos_token or ""):
                    limits.output(len(piece))
                    out.append(piece)
                return "".join(out)
        except Exception as e:  # anything a template does wrong: TemplateError, ZeroDivisionError, MemoryError...
            raise KtjaxError(f"the chat template failed: {type(e).__name__}: {str(e)[:200]}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The template supplies BOS itself, so nothing is added."""
        return self.tok.encode(_checked_text(self.render_chat(messages)), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


# Limits on one rendering of a chat template (a model folder's code, run on the user's prompt).
TEMPLATE_SECONDS = 5.0
TEMPLATE_RANGE_ITEMS = 1_000_000      # items of all range() calls together: loops stay short
TEMPLATE_MIN_OUTPUT = 1_000_000       # characters, plus TEMPLATE_OUTPUT_PER_INPUT per character of the messages
TEMPLATE_OUTPUT_PER_INPUT = 4
TEMPLATE_MAX_INT_BITS = 100_000       # results of * and ** on integers (10**10**9 would compute for hours)


class TemplateLimitExceeded(Exception):
    pass


class _TemplateLimits:
    def __init__(self, max_output: int):
        self.max_output = max_output
        self.output_chars = 0
        self.range_items = 0

    def output(self, chars: int):
        self.output_chars += chars
        if self.output_chars > self.max_output:
            raise TemplateLimitExceeded(f"its output passed {self.max_output} characters")

    def range(self, *args):
        items = range(*args)
        self.range_items += len(items)
        if self.range_items > TEMPLATE_RANGE_ITEMS:
            raise TemplateLimitExceeded(f"its loops passed {TEMPLATE_RANGE_ITEMS} range() items")
        return items

    def sizes(self, *values):
        """Refuse an integer argument past the output cap ("a"|center(10**9)): C code would build that string
        before any timer could stop it."""
        if any(isinstance(v, int) and abs(v) > self.max_output for v in values):
            raise TemplateLimitExceeded(f"a size of over {self.max_output} characters was asked for")

    def format_spec(self, spec: str, *args):
        """The same for a printf or str.format string ("%0999999999d", "{:>999999999}"), and for the arguments
        it takes its widths from ("%*d", "{:{}}")."""
        self.sizes(*(int(d) for d in re.findall(r"\d{7,}", spec)))
        if "*" in spec or re.search(r"\{[^}]*\{", spec):
            self.sizes(*args)

    def binop(self, operator: str, left, right):
        """Refuse * and ** whose result would be huge, before computing it (a bigint power cannot be timed out)."""
        def bits(x):
            return x.bit_length() if isinstance(x, int) else 0

        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right > 0 and bits(left) * right > TEMPLATE_MAX_INT_BITS:
            raise TemplateLimitExceeded(f"{operator} would give an integer of over {TEMPLATE_MAX_INT_BITS} bits")
        if operator == "%" and isinstance(left, str):
            self.format_spec(left, *(right if isinstance(right, tuple) else (right,)))
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int) and bits(left) + bits(right) > TEMPLATE_MAX_INT_BITS:
                raise TemplateLimitExceeded(f"* would give an integer of over {TEMPLATE_MAX_INT_BITS} bits")
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.max_output:
                    raise TemplateLimitExceeded(f"* would build a sequence of {len(seq) * n} items")


def _sandbox(limits: _TemplateLimits):
    """transformers' template environment (sandboxed jinja2, tojson, raise_exception) with `limits` on loops,
    arithmetic and output."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "%"])

        def call_binop(self, context, operator, left, right):
            limits.binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None

            def checked(*args, **kwargs):
                limits.format_spec(value.__self__, *args, *kwargs.values())
                return wrapped(*args, **kwargs)
            return checked

    def sized(name, f):
        @functools.wraps(f)
        def checked(*args, **kwargs):
            if name == "format" and isinstance(args[0], str):  # the value filtered is the format string
                limits.format_spec(args[0], *args[1:], *kwargs.values())
            limits.sizes(*args[1:], *kwargs.values())
            return f(*args, **kwargs)
        return checked

    def raise_exception(message):
        raise TemplateError(message)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters.update({name: sized(name, f) for name, f in env.filters.items()})
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = limits.range
    return env


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise TemplateLimitExceeded in the block after `seconds` (a SIGALRM timer; only in the main thread, where
    Python delivers signals: elsewhere the loop, output and arithmetic limits still hold)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TemplateLimitExceeded(f"it ran for more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class StreamDecoder:
    """Turns a growing list of token ids into text increments that never split a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest of its bytes
            return ""
        out, self.emitted = text[self.emitted:], len(text)
        return out

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        out, self.emitted = text[self.emitted:], len(text)
        return out


def _checked_text(text: str) -> str:
    """text, or one KtjaxError where it cannot be UTF-8 (a lone surrogate from the Python API): the tokenizer
    would raise its own exception, which is no message for a user."""
    why = utf8_error(text)
    if why:
        raise KtjaxError(f"the prompt is not text: {why}")
    return text
