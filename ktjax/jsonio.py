"""Reading the JSON files of a model folder (config, tokenizer config, generation config, safetensors index,
checkpoint manifest): one reader, so every way such a file can be broken gives the same kind of message."""
from __future__ import annotations

import json
import os

from .errors import KtjaxError
from .files import open_regular

MAX_JSON_BYTES = 256 * 2**20  # model folders' JSON files are kilobytes (a large index: a few megabytes)


def json_type_name(value) -> str:
    names = {dict: "JSON object", list: "JSON list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def read_json(path: str, what: str = "JSON file", missing_hint: str = "") -> dict:
    """The JSON object in `path`. A missing or unreadable file, bytes that are not UTF-8, text that is not
    JSON and JSON that is not an object are each a KtjaxError naming `path` and `what` the file should hold
    (e.g. "model config"); `missing_hint` says what to do when the file is not there."""
    try:
        with os.fdopen(open_regular(path, what), encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_size > MAX_JSON_BYTES:
                raise KtjaxError(f"{path}: the {what} is larger than {MAX_JSON_BYTES // 2**20} MiB; not a model file")
            raw = json.load(f)
    except FileNotFoundError:
        raise KtjaxError(f"{path}: no such file (the {what})" + (f"; {missing_hint}" if missing_hint else "")) \
            from None
    except UnicodeDecodeError as e:
        raise KtjaxError(f"{path}: the {what} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise KtjaxError(f"{path}: the {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise KtjaxError(f"{path}: the {what} is nested too deeply to be a model file") from None
    except OSError as e:  # a directory, no permission
        raise KtjaxError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise KtjaxError(f"{path}: the {what} must hold a JSON object, not a {json_type_name(raw)}")
    return raw
