"""Byte sizes as people write them ("512MiB", "80GB", "1.5e9") and as the tools print them."""

from __future__ import annotations

import math
import re

__all__ = ["parse_bytes", "format_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int | float, what: str = "memory size") -> int:
    """Bytes of "512MiB", "80GB", "80 GiB", "1.5e9" or a number; ValueError, one line, else.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB) of 1024."""
    if isinstance(text, bool):
        raise ValueError(f"{what} must be a size like 512MiB or 80GB, got {text!r}")
    if isinstance(text, int | float):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"{what} must be a size like 512MiB, 80GB or 1.5e9 (units: B, kB, MB, GB, TB, "
                f"KiB, MiB, GiB, TiB), got {text!r}"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    nbytes = value * _UNITS[unit]
    if not math.isfinite(nbytes) or nbytes <= 0:
        raise ValueError(f"{what} must be positive, got {text!r}")
    return int(nbytes)


def format_bytes(nbytes: float) -> str:
    """'1.50 GiB', '512.0 MiB', '900 B': binary units, three significant figures or so."""
    value = float(nbytes)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.2f} {unit}" if abs(scaled) < 100 else f"{scaled:.1f} {unit}"
    return f"{value:.0f} B"
