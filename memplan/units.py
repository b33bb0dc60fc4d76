"""Byte widths, size parsing and formatting. Pure functions, no state."""

from __future__ import annotations

import re

from memplan.errors import ConfigError

GIB = 1024**3
MIB = 1024**2

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
# Decimal units (GB) are 10^k; binary units (GiB) are 2^10k. "G" alone is treated as GB (decimal), as vendors do.
_FACTORS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}


def parse_size(text: str, *, nominal: bool = False) -> int:
    """'24GB' -> 24e9, '24GiB' -> 24*2^30, '24564MiB' -> bytes. Raises ConfigError on anything else.

    nominal=True reads GPU marketing sizes: a "24 GB" or "80 GB" card has 24 / 80 GiB of memory, so GB, MB, TB and
    the bare G, M, T mean GiB, MiB, TiB there.
    """
    m = _SIZE_RE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _FACTORS:
        raise ConfigError(f"cannot read size {text!r}: use a number with a unit such as 24GB, 24GiB, 24564MiB or 80G")
    if nominal and unit and not unit.endswith("ib") and unit not in ("b", ""):
        unit = unit[0] + "ib"
    value = int(float(m.group(1)) * _FACTORS[unit])
    if value <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return value


def fmt_gib(nbytes: int | float) -> str:
    """Bytes as GiB with two decimals, e.g. '13.48 GiB'."""
    return f"{nbytes / GIB:.2f} GiB"


def fmt_bytes(nbytes: int | float) -> str:
    """Human size in binary units, picking the unit: '512.0 MiB', '13.48 GiB'."""
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(nbytes) >= factor:
            return f"{nbytes / factor:.2f} {unit}"
    return f"{int(nbytes)} B"
