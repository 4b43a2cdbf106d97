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
Percentages ("70%") are not sizes: :func:`parse_budget` reads every budget
form, and :func:`acopt.planning.resolve_budget` turns it into bytes, since the
relative forms need a profile.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from fractions import Fraction

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


# ---- budgets ------------------------------------------------------------------------
BUDGET_FORMS = (
    'bytes or a size ("6GiB", "512MB"); a share of the no-recompute peak P ("70%", or a '
    'fraction like 0.7 as in torch\'s activation_memory_budget); or a share of the way from '
    'the floor F to P ("floor+50%": F + 0.5 * (P - F))'
)


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    """A parsed budget: ``bytes``, or ``share`` of the peak (``of="peak"``) or of
    the way from the floor to the peak (``of="floor"``)."""

    of: str  # "bytes", "peak" or "floor"
    bytes: int = 0
    share: Fraction = Fraction(0)


_PERCENT_OF_PEAK = re.compile(r"^\s*(?P<num>[0-9]*\.?[0-9]+)\s*%\s*$")
# "floor+50%"; "act50%" is the benchmark harness's older spelling of the same
_PERCENT_ABOVE_FLOOR = re.compile(r"^\s*(?:floor\s*\+\s*|act\s*)(?P<num>[0-9]*\.?[0-9]+)\s*%\s*$", re.IGNORECASE)
_FRACTION = re.compile(r"^\s*(?P<num>[0-9]*\.[0-9]+|[0-9]+\.[0-9]*|[0-9.]+[eE][+-]?[0-9]+)\s*$")


def parse_budget(budget: int | float | str) -> Budget:
    """Read a budget in any of its forms (``BUDGET_FORMS``).

    An int is bytes. A float or a bare decimal string in (0, 1] is that
    fraction of the peak (``0.6`` is 60%, never 0 bytes); above 1 it is bytes.
    ``"70%"`` is 70% of the peak (more than 100% is allowed), ``"floor+50%"``
    halfway from the floor to the peak (0% to 100%), ``"floor"`` the floor.
    Raises ``ValueError`` (what forms there are) or ``TypeError``.
    """
    if isinstance(budget, bool) or not isinstance(budget, (numbers.Real, str)):
        raise TypeError(f"a budget must be {BUDGET_FORMS}; not {budget!r}")
    if isinstance(budget, numbers.Integral):
        return Budget("bytes", bytes=parse_bytes(int(budget)))
    if isinstance(budget, numbers.Real):
        value = float(budget)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"a budget must be positive and finite, got {budget!r}")
        if value <= 1:
            return Budget("peak", share=Fraction(value).limit_denominator(10**9))
        return Budget("bytes", bytes=math.floor(value))
    text = budget.strip()
    if text.lower() == "floor":
        return Budget("floor")
    for pattern, of in ((_PERCENT_ABOVE_FLOOR, "floor"), (_PERCENT_OF_PEAK, "peak")):
        m = pattern.match(text)
        if m is not None:
            share = Fraction(m["num"]) / 100
            if of == "peak" and share <= 0:
                raise ValueError(f"a budget percentage must be positive, got {budget!r}")
            if of == "floor" and share > 1:
                raise ValueError(f"budget {budget!r}: the way from the floor to the peak goes from 0% to 100%")
            return Budget(of, share=share)
    if "%" in text:
        raise ValueError(f"cannot parse budget {budget!r}: expected {BUDGET_FORMS}")
    m = _FRACTION.match(text)
    if m is not None and Fraction(m["num"]) <= 1:
        if Fraction(m["num"]) <= 0:
            raise ValueError(f"a budget must be positive, got {budget!r}")
        return Budget("peak", share=Fraction(m["num"]))
    try:
        return Budget("bytes", bytes=parse_bytes(text))
    except ValueError as e:
        raise ValueError(f"{e}; a budget is {BUDGET_FORMS}") from None
