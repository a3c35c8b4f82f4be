"""Text in messages and text from users: a value shown in an error message never makes the message long or
slow (a 100 MB string, a 5000-digit integer, a structure nested 10,000 deep), and text that cannot be UTF-8 is
found before it reaches a tokenizer, a file name or a JSON encoder."""
from __future__ import annotations

import reprlib

MAX_SHOWN = 80  # characters of a value in a message


class _Short(reprlib.Repr):
    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, MAX_SHOWN, MAX_SHOWN, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 6

    def repr_int(self, x, level):
        if x.bit_length() > 256:  # repr() of an int past 4300 digits raises, and a long one is unreadable
            return f"<an integer of about {int(x.bit_length() * 0.30103)} digits>"
        return super().repr_int(x, level)


_SHORT = _Short()


def short_repr(value, limit: int = MAX_SHOWN) -> str:
    """repr(value) cut to about `limit` characters, without ever building the whole repr (bounded depth and
    items, huge integers described instead of printed)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def utf8_error(text: str) -> str | None:
    """None if `text` encodes as UTF-8, else where it does not: a lone surrogate, which is what bytes that are
    not UTF-8 become in command-line arguments (Python's surrogateescape) or what JSON's "\\ud800" escape gives."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for a byte
            return f"byte 0x{code - 0xDC00:02x} at character {e.start} is not UTF-8"
        return f"character {e.start} is a lone surrogate (U+{code:04X}), not text that UTF-8 can hold"
