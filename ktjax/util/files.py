"""Opening a user's file for reading without hanging: only regular files are opened (a FIFO would block open()
forever, a device would stream without end)."""
from __future__ import annotations

import os
import stat

from ktjax.errors import KtjaxError


def open_regular(path: str, what: str) -> int:
    """A read-only descriptor of `path`, or one KtjaxError unless it is a regular file (checked before opening;
    O_NONBLOCK and a second check guard the race between the two). FileNotFoundError passes through."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise KtjaxError(f"{path}: not a regular file (a folder, FIFO or device); the {what} must be a file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise KtjaxError(f"{path}: not a regular file; the {what} must be a file")
    return fd
