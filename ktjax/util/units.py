"""Byte counts and durations for people. No JAX here: the converter and the command lines print sizes before JAX
starts."""
from __future__ import annotations

_IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """IEC units (1 KiB = 1024 B), one decimal: "512 B", "6.8 MiB", "29.3 GiB"."""
    step = 0
    while abs(n) >= 1024 and step < len(_IEC_UNITS) - 1:
        n /= 1024
        step += 1
    return f"{int(n)} B" if step == 0 else f"{n:.1f} {_IEC_UNITS[step]}"


def format_seconds(s: float) -> str:
    """A duration, rounded to what a person plans by: "40 s", "12 min", "2 h 5 min"."""
    if s < 90:
        return f"{max(round(s), 0)} s"
    minutes = round(s / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60} min"
