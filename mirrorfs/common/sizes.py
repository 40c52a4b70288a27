"""Sizes as an operator writes and reads them: '50M' → 52428800, 1536 → '1.5 KiB'.

Standard library only: both processes import it (the data path's messages, the CLI's display and
option parsing)."""

import re

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgGtT]?)(?:i?[bB])?(?:/s)?$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text):
    """'50M', '1G', '800k', '1048576', '50M/s' → bytes (per second, for a rate). Binary units.
    Raises ValueError for anything else, zero and negative sizes included."""
    m = _SIZE.match(str(text).strip())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r}: expected a positive size, like 50M or 1G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_size(n):
    """1536 -> '1.5 KiB': sizes as the operator reads them."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
