"""Reading the JSON files of a model folder (config, tokenizer config, generation config, safetensors index,
checkpoint manifest): one bounded reader, so every way such a file can be broken gives the same kind of message,
and none of them a traceback or a hang: only regular files are opened, and size, nesting depth and the digits of
an integer are limited (Python's int() refuses past 4300 digits with a ValueError of its own)."""
from __future__ import annotations

import json
import os

from ktjax.errors import KtjaxError
from ktjax.util.files import open_regular

MAX_JSON_BYTES = 256 * 2**20  # model folders' JSON files are kilobytes (a large index: a few megabytes)
MAX_DEPTH = 64                # nesting of lists and objects (model files: under 10)
MAX_INT_DIGITS = 64           # digits of one integer (a 64-bit id: 20)


def json_type_name(value) -> str:
    names = {dict: "JSON object", list: "JSON list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


class JSONLimitError(ValueError):
    """JSON past one of the limits above; the message says which, as "holds an integer of 5000 digits"."""


class _LimitExceeded(Exception):
    pass


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _LimitExceeded(f"holds an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def check_depth(value, limit: int = MAX_DEPTH) -> int:
    """The nesting depth of lists and dicts in `value` (walked without recursion), refused past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise _LimitExceeded(f"is nested more than {limit} deep")
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def loads_bounded(text: str | bytes, **hooks):
    """json.loads within the limits above; a broken text raises JSONDecodeError or UnicodeDecodeError, one past
    a limit JSONLimitError (all ValueErrors)."""
    try:
        value = json.loads(text, parse_int=_bounded_int, **hooks)
        check_depth(value)
    except _LimitExceeded as e:
        raise JSONLimitError(str(e)) from None
    except RecursionError:
        raise JSONLimitError(f"is nested more than {MAX_DEPTH} deep") from None
    return value


def read_json(path: str, what: str = "JSON file", missing_hint: str = "") -> dict:
    """The JSON object in `path`. A missing or unreadable file, bytes that are not UTF-8, text that is not
    JSON, JSON past a limit and JSON that is not an object are each a KtjaxError naming `path` and `what` the
    file should hold (e.g. "model config"); `missing_hint` says what to do when the file is not there."""
    try:
        with os.fdopen(open_regular(path, what), "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_JSON_BYTES:
                raise KtjaxError(f"{path}: the {what} is larger than {MAX_JSON_BYTES // 2**20} MiB; not a model file")
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:  # it grew while being read
            raise KtjaxError(f"{path}: the {what} is larger than {MAX_JSON_BYTES // 2**20} MiB; not a model file")
        raw = loads_bounded(data.decode("utf-8"))
    except FileNotFoundError:
        raise KtjaxError(f"{path}: no such file (the {what})" + (f"; {missing_hint}" if missing_hint else "")) \
            from None
    except UnicodeDecodeError as e:
        raise KtjaxError(f"{path}: the {what} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise KtjaxError(f"{path}: the {what} is not valid JSON ({e})") from None
    except JSONLimitError as e:
        raise KtjaxError(f"{path}: the {what} {e}; not a model file") from None
    except OSError as e:  # a directory, no permission
        raise KtjaxError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise KtjaxError(f"{path}: the {what} must hold a JSON object, not a {json_type_name(raw)}")
    return raw
