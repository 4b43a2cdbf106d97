"""Byte sizes in and out."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from acopt.units import format_bytes, parse_budget, parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("6GiB", 6 * 1024**3),
        ("6 GiB", 6 * 1024**3),
        ("512MB", 512 * 10**6),
        ("512mb", 512 * 10**6),
        ("1.5KiB", 1536),
        ("1.5 kB", 1500),
        ("100", 100),
        ("100B", 100),
        ("2TiB", 2 * 1024**4),
        ("1e9", 10**9),
        ("0.1B", 0),
        ("123456789012345678901234567890 GiB", 123456789012345678901234567890 * 1024**3),
        (" 7 MiB ", 7 * 1024**2),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_passes_ints_through():
    assert parse_bytes(0) == 0
    assert parse_bytes(12345) == 12345


@pytest.mark.parametrize("bad", ["", "GiB", "6 GiBs", "6 G", "six GiB", "-1GiB", "1,5GiB", "6 GiB 2", "inf", "1e999GiB"])
def test_parse_bytes_refuses_garbage(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


@pytest.mark.parametrize("bad", [True, 1.5, None, [1]])
def test_parse_bytes_refuses_other_types(bad):
    with pytest.raises(TypeError):
        parse_bytes(bad)


def test_parse_bytes_refuses_negative_ints():
    with pytest.raises(ValueError):
        parse_bytes(-1)


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (12_900_000, "12.3 MiB"),
        (1024**2 - 1, "1.00 MiB"),
        (6 * 1024**3, "6.00 GiB"),
        (5 * 1024**5, "5120 TiB"),
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@given(st.integers(0, 2**60))
def test_format_then_parse_is_close(n):
    text = format_bytes(n)
    assert abs(parse_bytes(text) - n) <= max(0.006 * n, 1)


@pytest.mark.parametrize(
    "spec, of, amount",
    [
        (5000, "bytes", 5000),
        ("6GiB", "bytes", 6 * 1024**3),
        ("1", "bytes", 1),  # an integer is bytes
        (6e9, "bytes", 6 * 10**9),
        (0.6, "peak", Fraction(3, 5)),  # as torch's activation_memory_budget: 60%, never 0 bytes
        ("0.6", "peak", Fraction(3, 5)),
        ("1.0", "peak", Fraction(1)),
        ("70%", "peak", Fraction(7, 10)),
        ("150%", "peak", Fraction(3, 2)),
        ("floor", "floor", Fraction(0)),
        ("floor+25%", "floor", Fraction(1, 4)),
        ("Floor + 25 %", "floor", Fraction(1, 4)),
        ("act50%", "floor", Fraction(1, 2)),  # the harness's older spelling
    ],
)
def test_parse_budget(spec, of, amount):
    got = parse_budget(spec)
    assert got.of == of
    assert (got.bytes if of == "bytes" else got.share) == amount


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), "0.0", "0%", "floor+101%", "floor-5%", "lots", "5%%"])
def test_parse_budget_refuses_what_is_no_budget(bad):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(bad)
