"""Freed host memory handed back to the OS while the weights are converted.

On a CPU, XLA's buffers come from the C allocator. Converting a model's weights (per-layer splits, kernel
layouts) frees thousands of 1-100 MB buffers while allocating their replacements from other threads, hence
other malloc arenas: glibc keeps the freed pages and the process stays that much larger (V2-Lite at full size:
16.4 GB resident for 9.4 GB of weights after the kernel layouts, 10.1 GB after malloc_trim; docs/results.md,
"Memory at real size"). release_freed_memory() returns them; elsewhere than glibc it does nothing.
restart_on_huge_pages() puts the heap on transparent huge pages for the commands that run a model.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


RELEASE_EVERY = 256 * 2**20  # freed bytes between two releases while converting: the most the peak carries
_freed = [0]


def release_freed_memory() -> bool:
    """Give the pages of freed heap memory back to the OS (glibc's malloc_trim) -> whether it could."""
    _freed[0] = 0
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def freed(nbytes: int):
    """Note nbytes freed while converting; every RELEASE_EVERY bytes, release them (a trim costs about a second per
    6 GB released, little more per call)."""
    _freed[0] += nbytes
    if _freed[0] >= RELEASE_EVERY:
        release_freed_memory()


# ---- the C heap on transparent huge pages (the commands that run a model) ----------------------------------
# A decode step streams every active weight once, and on 4 KiB pages each page is a TLB miss. glibc 2.35 and
# later put the heap, and with it JAX's CPU buffers, on transparent huge pages when a tunable asks at start-up;
# at DeepSeek-V2-Lite's size the same decode ran 1.0-1.7x faster and the whole run 1.3x faster with the same peak
# memory (docs/results.md, "Real size on the CPU"). A tunable is read only when a process starts, so a command
# restarts itself once with it, before it imports anything heavy.

HUGE_PAGES_ENV = "KTJAX_HUGE_PAGES"  # 0: leave the heap on ordinary pages
HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_env(environ, glibc: tuple[int, int] | None, thp_mode: str | None) -> dict | None:
    """The environment to restart a command with so that the heap goes on huge pages, or None where that is not
    wanted (KTJAX_HUGE_PAGES=0), already asked for (by us, or by the user's own GLIBC_TUNABLES entry), not
    possible (not glibc, older than 2.35) or of no use (transparent huge pages off)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(HUGE_PAGES_ENV, "1") == "0" or HUGETLB_TUNABLE in _tunables(environ):
        return None
    if glibc is None or glibc < (2, 35) or thp_mode not in ("always", "madvise"):
        return None
    return dict(environ, GLIBC_TUNABLES=f"{tunables}:{HUGETLB_TUNABLE}=1" if tunables else f"{HUGETLB_TUNABLE}=1")


def huge_pages_active(environ=None, thp_mode: str | None = None) -> bool:
    """Whether this process's heap was asked onto huge pages (GLIBC_TUNABLES at its start) where the kernel gives
    them: the `huge_pages` of a generation's statistics."""
    mode = _thp_mode() if thp_mode is None else thp_mode
    return _tunables(environ).get(HUGETLB_TUNABLE, "0") not in ("", "0") and mode in ("always", "madvise")


def _tunables(environ=None) -> dict:
    """GLIBC_TUNABLES as {name: value} (its form: name=value:name=value)."""
    environ = os.environ if environ is None else environ
    return dict(t.partition("=")[::2] for t in environ.get("GLIBC_TUNABLES", "").split(":") if t)


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr
        return None


def _thp_mode() -> str | None:
    """The bracketed choice of `always [madvise] never`, or None where the kernel has no such file."""
    try:
        with open(THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def restart_on_huge_pages() -> None:
    """Restart this process (same pid, arguments and descriptors) with the heap on huge pages where
    huge_pages_env says so; returns where it does not, or where the restart fails."""
    env = huge_pages_env(os.environ, _glibc_version(), _thp_mode())
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    except (OSError, ValueError):  # carry on as we are
        return
