"""Human sizes: ``4096``, ``64KiB``, ``1MiB``, ``10GiB``, ``4K`` (binary units)."""

from __future__ import annotations

import re

from standbylib.errors import InvalidArgument

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "p": 1 << 50,
    "pib": 1 << 50,
}

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Return the number of bytes `text` names; K/M/G/T are binary units."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(detail=f"size {text} is negative")
        return text
    match = _SIZE_RE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise InvalidArgument(detail=f"size {text!r} is not a number of bytes like 4096, 64KiB or 10GiB")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def format_size(n: int) -> str:
    """Render `n` bytes with the largest binary unit that divides it exactly."""
    for suffix, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{suffix}"
    return f"{n}B" if n else "0B"


def human_size(n: int) -> str:
    """Render `n` bytes for people: ``0 B``, ``512 B``, ``5.3 MiB``."""
    value = float(n)
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or suffix == "TiB":
            return f"{n} B" if suffix == "B" else f"{value:.1f} {suffix}"
        value /= 1024
    raise AssertionError("unreachable")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str | float) -> float:
    """Seconds from ``300``, ``300s``, ``5m``, ``8h``, ``8d`` or ``2w``."""
    if isinstance(text, int | float):
        return float(text)
    m = _DURATION.match(text)
    if m is None:
        raise InvalidArgument(detail=f"bad duration {text!r}: use seconds, or a number with s, m, h, d or w")
    return float(m.group(1)) * _SECONDS[m.group(2)]
