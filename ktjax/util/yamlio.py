"""Reading a YAML settings preset within bounds: a regular file of at most 64 KiB, nesting at most 32 deep, at
most 10,000 values with every alias expanded (an alias bomb is refused while its events are counted, before
any of it is built or printed), and integers of at most 64 digits. The events are checked without recursion,
then the document is built by PyYAML's safe loader."""
from __future__ import annotations

import os

from ktjax.errors import KtjaxError
from ktjax.util.files import open_regular
from ktjax.util.jsonio import MAX_INT_DIGITS

MAX_YAML_BYTES = 64 * 2**10  # presets are a few hundred bytes
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 10_000     # scalars and collections, aliases counted as what they stand for
_INT_TAG = "tag:yaml.org,2002:int"


def read_yaml(path: str, what: str = "YAML file"):
    """The YAML document in `path` (None when empty), or one KtjaxError naming `path` and the `what`."""
    import yaml

    try:
        with os.fdopen(open_regular(path, what), "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
        if len(data) > MAX_YAML_BYTES:
            raise KtjaxError(f"{path}: the {what} is larger than {MAX_YAML_BYTES // 2**10} KiB")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise KtjaxError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise KtjaxError(f"{path}: the {what} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:  # a folder, no permission
        raise KtjaxError(f"{path}: cannot read the {what} ({e.strerror})") from None
    loader_class = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_events(loader_class(text))
        return yaml.load(text, Loader=loader_class)
    except _Refused as e:
        raise KtjaxError(f"{path}: the {what} {e}") from None
    except yaml.YAMLError as e:  # its own text spans lines: one line, where and what
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(e, "problem", None) or type(e).__name__)[:200]
        raise KtjaxError(f"{path}: not valid YAML ({problem}{where})") from None
    except (ValueError, OverflowError) as e:  # a value PyYAML cannot build (a date out of range)
        raise KtjaxError(f"{path}: the {what} holds a value that cannot be read ({str(e)[:200]})") from None


class _Refused(Exception):
    pass


def _check_events(loader):
    """Depth, values with aliases expanded, and integer sizes, from the parser's events (no tree is built)."""
    import yaml
    from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, NodeEvent, ScalarEvent

    resolver = yaml.resolver.Resolver()
    expanded: dict[str, int] = {}  # anchor -> values it stands for
    open_counts: list[list] = []  # per open collection: [anchor, values inside so far]
    total = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, CollectionEndEvent):
                anchor, inside = open_counts.pop()
                if anchor is not None:
                    expanded[anchor] = inside
                if open_counts:
                    open_counts[-1][1] += inside
                continue
            if not isinstance(event, NodeEvent):  # stream and document marks
                continue
            n = expanded.get(event.anchor, 1) if isinstance(event, AliasEvent) else 1
            if isinstance(event, CollectionStartEvent):
                open_counts.append([event.anchor, 1])
                if len(open_counts) > MAX_YAML_DEPTH:
                    raise _Refused(f"is nested more than {MAX_YAML_DEPTH} deep{_line(event)}")
            else:
                if isinstance(event, ScalarEvent):
                    _check_scalar(resolver, event)
                    if event.anchor is not None:
                        expanded[event.anchor] = 1
                if open_counts:
                    open_counts[-1][1] += n
            total += n
            if total > MAX_YAML_VALUES:
                raise _Refused(f"holds more than {MAX_YAML_VALUES} values with its aliases expanded{_line(event)}")
    finally:
        loader.dispose()


def _check_scalar(resolver, event):
    import yaml

    tag = event.tag if event.tag not in (None, "!") else resolver.resolve(yaml.ScalarNode, event.value,
                                                                          event.implicit)
    digits = len(event.value.strip().lstrip("+-")) if tag == _INT_TAG else 0  # 0x.., 1_000, 1:30 count whole
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"holds an integer of {digits} digits (at most {MAX_INT_DIGITS}){_line(event)}")


def _line(event) -> str:
    mark = getattr(event, "start_mark", None)
    return f" (line {mark.line + 1})" if mark is not None else ""
