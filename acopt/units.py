"""Byte sizes: parse ``"6GiB"``/``"512MB"`` budgets and format sizes for people.

>>> parse_bytes("6GiB")
6442450944
>>> parse_bytes("512MB")
512000000
>>> parse_bytes("1.5 KiB")
1536
>>> format_bytes(6442450944)
'6.00 GiB'
>>> format_bytes(512)
'512 B'

Binary prefixes (KiB, MiB, GiB, TiB) are powers of 1024, SI prefixes (kB, MB,
GB, TB) powers of 1000, as their standards say. A bare number is bytes.
Percentages ("70%") are not sizes: :func:`acopt.planning.resolve_budget`
handles them, since they need a profile.
"""

from __future__ import annotations

import math
import numbers
import re

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_SIZE = re.compile(r"^\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[A-Za-z]*)\s*$")


def parse_bytes(size: int | str) -> int:
    """A size in bytes from an int or a string such as ``"6GiB"``, ``"512 MB"``, ``"1e9"``.

    Fractional results are rounded down to whole bytes. Raises ``ValueError``
    for negative sizes, unknown units and malformed strings, ``TypeError`` for
    other types (``bool`` included: a flag is not a size).
    """
    if isinstance(size, bool) or not isinstance(size, (numbers.Integral, str)):
        raise TypeError(f"a size must be an int number of bytes or a string like '6GiB', not {size!r}")
    if isinstance(size, numbers.Integral):
        if size < 0:
            raise ValueError(f"a size cannot be negative: {size}")
        return int(size)
    m = _SIZE.match(size)
    if m is None:
        raise ValueError(f"cannot parse {size!r} as a size: expected a number and a unit, like '6GiB' or '512MB'")
    unit = m["unit"].lower()
    if unit not in _UNITS:
        known = "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB"
        raise ValueError(f"unknown size unit {m['unit']!r} in {size!r}; known units: {known}")
    value = float(m["num"]) * _UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"size {size!r} is not finite")
    if "." in m["num"] or "e" in m["num"].lower():
        return int(math.floor(value))
    return int(m["num"]) * _UNITS[unit]  # exact for big integers


def format_bytes(n: int) -> str:
    """``n`` bytes with a binary prefix and three significant digits: ``'12.3 MiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(int(n))
    if n < 1024:
        return f"{sign}{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n_unit = n / 1024 ** ("KiB MiB GiB TiB".split().index(unit) + 1)
        if n_unit < 1024 or unit == "TiB":
            digits = 2 if n_unit < 10 else 1 if n_unit < 100 else 0
            text = f"{n_unit:.{digits}f}"
            if float(text) >= 1024 and unit != "TiB":  # rounding crossed into the next unit
                continue
            return f"{sign}{text} {unit}"
    raise AssertionError("unreachable")
