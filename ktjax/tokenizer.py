"""Tokenizer and chat template from a model folder: tokenizer.json through `tokenizers`, special tokens and
the chat template from tokenizer_config.json, rendered like transformers does (sandboxed jinja2)."""
from __future__ import annotations

import json
import os

from .errors import KtjaxError


def _token_text(value):
    """tokenizer_config.json spells special tokens as plain strings or as AddedToken objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer, config: dict):
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
        if not os.path.exists(path):
            raise KtjaxError(f"{folder}: no tokenizer.json; pass token ids through the Python API instead")
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise KtjaxError(f"{path}: cannot be read as a tokenizer ({e})") from None
        config = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            from .jsonio import read_json
            config = read_json(cfg_path, "tokenizer config")
        return cls(tok, config)

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
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise KtjaxError("--chat needs a chat_template in tokenizer_config.json, and this model has none")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "")
        except TemplateError as e:
            raise KtjaxError(f"the chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The template supplies BOS itself, so nothing is added."""
        return self.tok.encode(self.render_chat(messages), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


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
