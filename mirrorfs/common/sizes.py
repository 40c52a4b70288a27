"""Sizes and rates as an operator writes and reads them: '50M' → 52428800, 1536 → '1.5 KiB'.

The one parser of sizes and rates: every option, argument and control-socket number that is a size
or a rate goes through here, so they all refuse the same things with the same words.

- Units are binary: K, M, G, T are KiB, MiB, GiB, TiB (1024, 1024², ...); 'KiB', 'MB', 'k', '50M/s'
  are the same unit spelled otherwise. B is bytes. A fraction is allowed ('1.5G') and rounded down
  to whole bytes.
- A size without a unit is bytes ('--region 1048576').
- A rate must have a unit: '--rate 100' was once taken as 100 bytes/s, a copy of days where the
  operator meant 100 MiB/s; it is refused, suggesting '100M' (write '100B' for bytes per second).
- Nothing below 1 byte (per second) is a size or a rate: '0.5' once rounded to 0, which the copies
  took as "no limit". No limit is spelled 'none' or 'unlimited', and only where a command documents
  it (`mirrorfs rate`, `mirrorfs budget set`); over the control socket it is JSON null.

Standard library only: both processes import it (the data path's messages, the CLI's display and
option parsing).
"""

import math
import re

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:([kKmMgGtT])(?:i?[bB])?|([bB]))?(?:/s)?$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
UNLIMITED = ("none", "unlimited")


def parse_size(text, *, rate=False):
    """'50M', '1G', '800k', '1.5GiB', '1048576' (bytes), '50M/s' → bytes (per second, for a rate).
    With `rate`, a number without a unit is refused. Raises ValueError naming the text, for
    anything else, and for anything below one byte."""
    text = str(text).strip()
    m = _SIZE.match(text)
    what = "rate" if rate else "size"
    example = "100M or 1G" if rate else "50M or 1G"
    if not m:
        raise ValueError(f"{text!r}: expected a {what} like {example} (K, M, G, T: KiB, MiB, ...)")
    number, unit = m.group(1), (m.group(2) or m.group(3) or "").lower()
    value = int(float(number) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"{text!r}: below 1 byte{'/s' if rate else ''}; expected a positive "
                         f"{what}, like {example}")
    if rate and not unit:
        raise ValueError(f"{text!r}: a rate needs a unit: {number}M is {number} MiB/s, "
                         f"{number}K {number} KiB/s ({number}B for bytes per second)")
    return value


def parse_rate(text, *, unlimited=False):
    """A rate (see parse_size); with `unlimited`, 'none' or 'unlimited' → None (no limit)."""
    if unlimited and str(text).strip().lower() in UNLIMITED:
        return None
    try:
        return parse_size(text, rate=True)
    except ValueError as e:
        if unlimited:
            raise ValueError(f"{e}; or 'none' for no limit") from None
        raise


def rate_value(value, what="rate", unlimited="null"):
    """A rate given as a number, from a control request (JSON) or the Python API: None (JSON's
    null; `unlimited` is how the caller spells it) → None (no limit), else a whole number of bytes
    per second, at least 1. 0, fractions, negatives, booleans and strings are refused: a number
    sent as 0.5 once became 0, "no limit"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 1 or value != int(value):
        raise ValueError(f"{what} {value!r}: expected a whole number of bytes per second, at least "
                         f"1 ({unlimited}: no limit)")
    return int(value)


def human_size(n):
    """1536 -> '1.5 KiB': sizes as the operator reads them."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
