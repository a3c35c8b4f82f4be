"""Byte counts for people. No JAX here: the converter and the command lines print sizes before JAX starts."""
from __future__ import annotations

_IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """IEC units (1 KiB = 1024 B), one decimal: "512 B", "6.8 MiB", "29.3 GiB"."""
    step = 0
    while abs(n) >= 1024 and step < len(_IEC_UNITS) - 1:
        n /= 1024
        step += 1
    return f"{int(n)} B" if step == 0 else f"{n:.1f} {_IEC_UNITS[step]}"
