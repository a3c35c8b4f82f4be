"""OpenAI's request shapes, validated (pydantic, unknown fields refused), and its error shape.

Every bad request becomes one ApiError: status, a message that names the field, OpenAI's error type and code.
Fields that clients send with neutral values (response_format text, an empty logit_bias or tools, tool_choice
"none") are accepted; any other value of them is refused by name, never silently ignored.
"""
from __future__ import annotations

import json
import math
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_LOGPROBS = 20
MAX_STOPS = 16
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class _Strict(BaseModel):
    # strict: "5" is not a number and 1 is not true; no NaN or Infinity anywhere
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    # other fields (json_schema) are allowed here so that the refusal names the type, not the extra field
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    type: str


def unsupported(field: str, what: str) -> ApiError:
    return ApiError(400, f"{field}: {what}", field, "unsupported_value")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: Union[str, list[Union[str, int]], None] = None  # strings, or token ids (an extension)
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def check(self):
        """What the types alone cannot say."""
        if self.n != 1:
            raise ApiError(400, f"n={self.n}: only n=1 is supported", "n")
        if any(bias != 0 for bias in (self.logit_bias or {}).values()):
            raise unsupported("logit_bias", "biasing tokens is not supported (only {} or biases of 0)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ApiError(400, f"{name}: penalties are not supported (only 0)", name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only with stream=true", "stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(s == "" for s in stops):
            raise ApiError(400, f"stop: at most {MAX_STOPS} non-empty strings or token ids", "stop")
        if any(isinstance(s, int) and s < 0 for s in stops + list(self.stop_token_ids or [])):
            raise ApiError(400, "stop: token ids must be >= 0", "stop")

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if isinstance(s, str)]

    @property
    def stop_ids(self) -> list[int]:
        stops = [] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if isinstance(s, int)] + list(self.stop_token_ids or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None  # means nothing without tools

    def check(self):
        super().check()
        if self.response_format is not None and self.response_format.type != "text":
            raise unsupported("response_format", f"type {self.response_format.type!r} is not supported: this "
                                                 "server generates free text only ('text')")
        if self.tools:
            raise unsupported("tools", "tool calls are not supported (only an empty list)")
        if self.tool_choice not in (None, "none", "auto"):  # "auto" with no tools is "none"
            raise unsupported("tool_choice", f"{json.dumps(self.tool_choice)[:80]} is not supported: there are "
                                             "no tools (only 'none')")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ApiError(400, "max_tokens and max_completion_tokens: give one", "max_completion_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs=true", "top_logprobs")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_k(self) -> int:
        """Top-k alternatives asked of the scheduler (>= 1 whenever the chosen token's logprob is wanted)."""
        return max(self.top_logprobs or 0, 1) if self.logprobs else 0


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None

    def check(self):
        super().check()
        if self.echo:
            raise unsupported("echo", "echoing the prompt is not supported (only false)")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", f"only 1 is supported (got {self.best_of})")
        if len(self.prompt) == 0:
            raise ApiError(400, "prompt: empty", "prompt")

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_k(self) -> int:
        return 0 if self.logprobs is None else max(self.logprobs, 1)


def parse_json(raw: bytes) -> object:
    """The body as JSON, read by the bounded reader of model files (integers of at most 64 digits, nesting at
    most 64 deep); NaN and Infinity (which Python's json accepts) are refused."""
    from ktjax.util.jsonio import JSONLimitError, loads_bounded

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        return loads_bounded(raw, parse_constant=no_constants)
    except JSONLimitError as e:
        raise ApiError(400, f"the body {e}") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, f"the body is not valid JSON: {str(e)[:200]}") from None


def _not_text(data) -> tuple[str | None, str] | None:
    """(the field, what is wrong) for the first string in the body that cannot be UTF-8 (JSON's "\ud800" escape
    gives a lone surrogate, which the tokenizer and the response's encoder fail on), or None."""
    from ktjax.util.text import utf8_error

    stack = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str) and utf8_error(value):
            return path or None, utf8_error(value)
        if isinstance(value, dict):
            for key, item in value.items():
                if utf8_error(key):
                    return path or None, f"a field name: {utf8_error(key)}"
                stack.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value)
                         if isinstance(item, (str, dict, list)))
    return None


def parse_request(cls: type[_Strict], raw: bytes):
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    bad = _not_text(data)
    if bad is not None:
        field, problem = bad
        raise ApiError(400, f"{field or 'the body'}: {problem}", field, "invalid_value")
    try:
        request = cls.model_validate(data)
    except ValidationError as e:
        raise _api_error(e) from None
    request.check()
    return request


_TYPE_TAGS = {"str", "int", "float", "bool", "function-after", "function-plain"}


def _field_path(loc) -> str:
    """pydantic's location, without the union-branch tags it inserts ('str', 'list[int]')."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p not in _TYPE_TAGS and "[" not in p)]
    return ".".join(parts)


def _api_error(e: ValidationError) -> ApiError:
    errors = e.errors(include_url=False)
    unknown = [_field_path(err["loc"]) for err in errors if err["type"] == "extra_forbidden"]
    if unknown:
        return ApiError(400, f"unknown field(s): {', '.join(unknown)}", unknown[0], "unknown_field")
    missing = [_field_path(err["loc"]) for err in errors if err["type"] == "missing"]
    if missing:
        return ApiError(400, f"missing field(s): {', '.join(missing)}", missing[0], "missing_field")
    err = max(errors, key=lambda x: len(x["loc"]))  # of a union's branches, the one that got furthest
    field = _field_path(err["loc"])
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or (isinstance(value, float) and not math.isfinite(value)) \
        else f" (got {json.dumps(value)[:80]})" if _jsonable(value) else ""
    return ApiError(400, f"{field}: {err['msg']}{shown}", field, "invalid_value")


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
