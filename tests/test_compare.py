"""The solver comparison benchmark (benchmarks/compare.py, ``acopt compare``) and gzip profiles."""

from __future__ import annotations

import gzip
import json

import pytest

from acopt.records import Profile
from tests.strategies import chain_profile


def test_profile_json_gz_round_trip(tmp_path):
    prof = chain_profile(3)
    prof.to_json(tmp_path / "p.profile.json.gz")
    prof.to_json(tmp_path / "p.profile.json")
    raw = (tmp_path / "p.profile.json.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw)) == json.loads((tmp_path / "p.profile.json").read_text())
    assert Profile.from_json(tmp_path / "p.profile.json.gz") == prof
    # deterministic bytes (no mtime in the header): the corpus does not churn in git
    prof.to_json(tmp_path / "again.json.gz")
    assert (tmp_path / "again.json.gz").read_bytes() == raw
    # gzip is detected from the bytes, not the name
    (tmp_path / "renamed.json").write_bytes(raw)
    assert Profile.from_json(tmp_path / "renamed.json") == prof


def test_corrupt_gz_profile_is_a_value_error(tmp_path):
    (tmp_path / "bad.json.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match="corrupt acopt profile"):
        Profile.from_json(tmp_path / "bad.json.gz")
    (tmp_path / "bad2.json.gz").write_bytes(gzip.compress(b"{not json"))
    with pytest.raises(ValueError, match="corrupt acopt profile"):
        Profile.from_json(tmp_path / "bad2.json.gz")
