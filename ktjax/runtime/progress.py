"""Progress of a run, phase by phase: what loading, compiling, prefilling and decoding report, and who listens.

The work reports through one small interface, Progress: phase(name, total, unit) opens a phase (closing the one
before), update(done) says how far it got, cache(cached, capacity) how full the cache is, end() closes the
phase. Progress itself ignores everything (what a caller who asked for nothing gets). Timeline records each
phase (start, end, tokens, tokens/s, memory in use and peak at its end) for --json; LiveStatus is a Timeline
that also shows the run as it goes: one status line rewritten in place on a terminal, or a log line per phase
change (and at most one every `every_s` seconds) on anything else.
"""
from __future__ import annotations

import os
import resource
import shutil
import sys
import threading
import time
from typing import Callable

from ktjax.util.units import format_bytes

LIVE_REDRAW_S = 0.1  # a terminal's line is redrawn at most this often
LOG_EVERY_S = 5.0    # a log (not a terminal) gets one line per phase change and at most one per this many seconds
TICK_S = 1.0         # between reports (a long compile, a checkpoint's read) the view is refreshed this often


def memory_now() -> tuple[int, int]:
    """(in use, peak) bytes: the default device's allocator on an accelerator, the process's resident set (and
    its peak) on a CPU. The peak never reads below the value in use (the two are read apart)."""
    from ktjax.runtime.memory import device_memory_stats, peak_memory_bytes

    stats = device_memory_stats()
    in_use = int(stats["bytes_in_use"]) if stats and "bytes_in_use" in stats else _rss_bytes()
    return in_use, max(in_use, peak_memory_bytes())


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Progress:
    """The interface the work reports through; this one ignores every report. `live` says whether anyone
    watches the steps inside a phase (then the engine waits for each prefill chunk to finish, to report it)."""

    live = False

    def phase(self, name: str, total: int = 0, unit: str = "tokens"):
        """Open phase `name` of `total` units (0: unknown), closing the open one."""

    def update(self, done: int, total: int | None = None):
        """`done` units of the open phase are finished (`total` corrects the phase's total)."""

    def cache(self, cached: int, capacity: int):
        """The cache holds `cached` tokens of `capacity` (all sequences together)."""

    def end(self):
        """Close the open phase (the next one may start later)."""


NO_PROGRESS = Progress()


class Timeline(Progress):
    """Every phase as a record: {phase, start_s, end_s (seconds since the timeline began), tokens, tokens_per_s,
    memory_bytes, peak_memory_bytes (memory at the phase's end; the peak since the process started), unit, done,
    total, cache_tokens, cache_capacity (the cache's fill at the phase's end; None before there is a cache)}.
    `tokens` counts a phase's tokens (0 for loading and compiling, which count parameters and programs)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 memory: Callable[[], tuple[int, int]] = memory_now):
        self.clock, self.memory = clock, memory
        self.t0 = clock()
        self.phases: list[dict] = []
        self.current: dict | None = None
        self.cached: tuple[int, int] | None = None
        self.peak = 0

    def phase(self, name: str, total: int = 0, unit: str = "tokens"):
        self.end()
        self.current = {"phase": name, "start": self.clock(), "done": 0, "total": int(total), "unit": unit}
        self.cached = None
        self.changed(started=True)

    def update(self, done: int, total: int | None = None):
        if self.current is None:
            return
        self.current["done"] = int(done)
        if total is not None:
            self.current["total"] = int(total)
        self.changed()

    def cache(self, cached: int, capacity: int):
        self.cached = (int(cached), int(capacity))

    def end(self):
        if self.current is None:
            return
        now, (in_use, peak) = self.clock(), self.sample_memory()
        c = self.current
        seconds = now - c["start"]
        tokens = c["done"] if c["unit"] == "tokens" else 0
        self.phases.append({"phase": c["phase"], "start_s": c["start"] - self.t0, "end_s": now - self.t0,
                            "tokens": tokens, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                            "memory_bytes": in_use, "peak_memory_bytes": peak, "unit": c["unit"],
                            "done": c["done"], "total": c["total"],
                            "cache_tokens": None if self.cached is None else self.cached[0],
                            "cache_capacity": None if self.cached is None else self.cached[1]})
        self.current = None
        self.changed(ended=True)

    def sample_memory(self) -> tuple[int, int]:
        in_use, peak = self.memory()
        self.peak = max(self.peak, peak, in_use)
        return in_use, self.peak

    def changed(self, started: bool = False, ended: bool = False):
        """Called after every report: a view redraws here."""

    def timeline(self) -> list[dict]:
        """The closed phases, in order (the open one is closed first)."""
        self.end()
        return list(self.phases)

    def pause(self):
        """Stop showing the run (a view whose screen the run's own output now needs); recording goes on."""

    def close(self, ok: bool = True):
        self.end()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        self.close(ok=kind is None)
        return False

    # -- the status text ----------------------------------------------------------------------------------
    def status(self, phase: dict | None = None) -> str:
        """One line: phase, units done/total, speed, seconds in the phase, memory in use and peak, cache fill;
        of the open phase, or of a closed phase's record."""
        now = self.clock()
        if phase is None:
            c = self.current
            if c is None:
                return ""
            name, done, total, unit, seconds = c["phase"], c["done"], c["total"], c["unit"], now - c["start"]
            in_use, peak = self.sample_memory()
            cached = self.cached
        else:
            name, done, total, unit = phase["phase"], phase["done"], phase["total"], phase["unit"]
            seconds, in_use, peak = phase["end_s"] - phase["start_s"], phase["memory_bytes"], \
                phase["peak_memory_bytes"]
            cached = None if phase["cache_tokens"] is None else (phase["cache_tokens"], phase["cache_capacity"])
        parts = [f"{name} {done}/{total} {unit}" if total else f"{name} {done} {unit}" if done else name]
        if unit == "tokens" and seconds > 0 and done:
            parts[0] += f", {done / seconds:.1f} tok/s"
        parts[0] += f", {seconds:.1f} s"  # before what a narrow terminal may cut
        parts.append(f"memory {format_bytes(in_use)} (peak {format_bytes(peak)})")
        if cached is not None:
            parts.append(f"cache {cached[0]}/{cached[1]} tokens")
        return " | ".join(parts)


class LiveStatus(Timeline):
    """A Timeline shown as it goes on `stream` (stderr): on a terminal one line, rewritten in place (at most
    every LIVE_REDRAW_S) and cleared by close(); otherwise "ktjax: <status>" lines: one when a phase follows
    another (the phase before summed up, then the new one named), one when the run closes (the last phase summed
    up), and between them at most one every `every_s` seconds (a run refused before its first phase ends prints
    none: its error stays the one line). Between reports a thread refreshes it every `tick_s` seconds (None: never),
    so that the seconds and the memory move while one long step (a compilation) runs. Use it as a context manager:
    leaving it on an error clears the terminal's line and writes nothing more, so the error is the last line."""

    live = True

    def __init__(self, stream=None, tty: bool | None = None, every_s: float = LOG_EVERY_S, width: int | None = None,
                 tick_s: float | None = TICK_S, **kwargs):
        super().__init__(**kwargs)
        self.lock = threading.RLock()  # the run's reports and the refreshing thread
        self.tick_s, self.ticker, self.stop_ticking = tick_s, None, threading.Event()
        self.width = width  # of the terminal's line (None: the terminal's own)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.every_s = every_s
        self.last_write = None
        self.shown = False  # a terminal line is on screen
        self.closed = False
        self.paused = False
        self.ended = None  # the phase that ended last, summed up on the log when the next one starts

    def phase(self, name: str, total: int = 0, unit: str = "tokens"):
        with self.lock:
            super().phase(name, total, unit)
        if self.ticker is None and self.tick_s is not None and not self.closed:
            self.ticker = threading.Thread(target=self._tick, name="ktjax-progress", daemon=True)
            self.ticker.start()

    def update(self, done: int, total: int | None = None):
        with self.lock:
            super().update(done, total)

    def cache(self, cached: int, capacity: int):
        with self.lock:
            super().cache(cached, capacity)

    def end(self):
        with self.lock:
            super().end()

    def _tick(self):
        while not self.stop_ticking.wait(self.tick_s):
            with self.lock:
                if self.current is not None:
                    self.changed()

    def changed(self, started: bool = False, ended: bool = False):
        if ended:
            self.ended = self.phases[-1]
            return
        if self.closed:
            return
        now = self.clock()
        if self.paused:
            return
        if self.tty:
            if started or self.last_write is None or now - self.last_write >= LIVE_REDRAW_S:
                self._draw(self.status())
        elif started:
            c, before, self.ended = self.current, self.ended, None
            now_on = f"{c['phase']} {c['total']} {c['unit']}" if c["total"] else c["phase"]
            if before is None:  # the first phase: a line once it ends, or after every_s if it takes longer
                self.last_write = now
            else:
                self._write(f"ktjax: {self.status(before)}; next: {now_on}\n")
        elif self.last_write is None or now - self.last_write >= self.every_s:
            self._write(f"ktjax: {self.status()}\n")

    def close(self, ok: bool = True):
        """End the run: clear the terminal's line; on a log, write the last phase's final line (unless `ok` is
        False: after an error nothing more is written)."""
        self.stop_ticking.set()
        if self.ticker is not None and self.ticker is not threading.current_thread():
            self.ticker.join(5)
        with self.lock:
            self._close(ok)

    def _close(self, ok: bool):
        self.end()
        if self.closed:
            return
        self.closed = True
        if self.tty:
            if self.shown:
                self._write("\r\x1b[K")
                self.shown = False
        elif ok and self.ended is not None:
            self._write(f"ktjax: {self.status(self.ended)}\n")

    def pause(self):
        """Show nothing more until close() (recording goes on): the run's streamed text now takes the screen or
        the log. A terminal's line is cleared."""
        with self.lock:
            if self.tty and self.shown:
                self._write("\r\x1b[K")
            self.shown, self.paused = False, True

    def _draw(self, text: str):
        self._write("\r\x1b[K" + text[:max(self._width() - 1, 10)])
        self.shown = True

    def _width(self) -> int:
        """The terminal's columns (a line longer than that would wrap, and \\r would rewrite only its end)."""
        if self.width is not None:
            return self.width
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        return columns or shutil.get_terminal_size((100, 24)).columns

    def _write(self, text: str):
        self.last_write = self.clock()
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or full stderr: the run goes on without its status
            pass


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
