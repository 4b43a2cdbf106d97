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


# ---- the comparison ------------------------------------------------------------
compare = pytest.importorskip("acopt.compare")
pytest.importorskip("pulp")
pytest.importorskip("ortools")

import acopt  # noqa: E402
from acopt.planning import floor, no_recompute_peak  # noqa: E402
from acopt.simulator import memory_model  # noqa: E402

MLP = compare.PROFILES_DIR / "mlp_bs512.profile.json"


@pytest.fixture(scope="module")
def chain_rows():
    prof = chain_profile(6)
    return prof, compare.compare_profile(prof, label="chain6", time_limit_s=600)  # asserts optima: no reachable limit


def test_every_solver_gets_a_row_per_budget(chain_rows):
    prof, rows = chain_rows
    assert len(rows) == len(compare.DEFAULT_BUDGETS) * len(compare.SOLVERS)
    lo, hi = floor(prof), no_recompute_peak(prof)
    budgets = sorted({r["budget_bytes"] for r in rows})
    assert budgets == [lo + (hi - lo) * q // 4 for q in (1, 2, 3)]  # floor+25%, +50%, +75%
    for b in budgets:
        assert [r["solver"] for r in rows if r["budget_bytes"] == b] == list(compare.SOLVERS)
    for r in rows:
        assert r["status"] not in ("error", "invalid plan"), r["notes"]
        assert set(compare.COLUMNS) <= set(r)
        assert r["candidates"] == len(memory_model(prof).candidates)


def test_reported_peaks_and_times_are_the_simulators(chain_rows):
    prof, rows = chain_rows
    for r in rows:
        sim = acopt.simulate(prof, r["plan"])
        assert r["simulated_peak_bytes"] == sim.peak_bytes
        assert r["recompute_time_s"] == pytest.approx(sim.recompute_time_s, rel=1e-12, abs=1e-15)
        assert r["fits"] is (sim.peak_bytes <= r["budget_bytes"])
        assert r["recomputed"] == len(r["plan"])
    # acopt's planners always fit; the knapsack solvers do not on this chain (they
    # recompute the last layers, whose activations are needed first in the backward)
    assert all(r["fits"] for r in rows if r["solver"] in compare.ACOPT_SOLVERS)
    assert not all(r["fits"] for r in rows if r["solver"] in compare.TORCH_SOLVERS)


def test_proven_optimum_is_never_worse_than_a_plan_that_fits(chain_rows):
    _, rows = chain_rows
    for b in {r["budget_bytes"] for r in rows}:
        group = [r for r in rows if r["budget_bytes"] == b]
        proven = [r for r in group if r["solver"] in compare.EXACT and r["status"] == "optimal"]
        assert proven, "ilp and cpsat prove optimality on a 6-layer chain"
        opt = min(r["recompute_time_s"] for r in proven)
        for r in group:
            assert r["optimum_s"] == opt
            if r["fits"]:
                assert r["recompute_time_s"] >= opt * (1 - 1e-9)
                assert r["gap"] == pytest.approx((r["recompute_time_s"] - opt) / opt if opt else 0.0)
            else:
                assert r["gap"] == ""


def test_knapsack_inputs_and_budget_mapping():
    prof = chain_profile(4)
    ks = compare.knapsack_of(prof)
    mm = memory_model(prof)
    assert ks.names == mm.candidates
    assert ks.bytes == tuple(prof.storage_by_name[a].bytes for a in ks.names)
    assert ks.times == tuple(mm.block(a, frozenset({a})).time_s for a in ks.names)
    assert ks.times == (1.5e-3,) * 4  # mm + relu of one layer
    peak = no_recompute_peak(prof)
    # max_memory = (sum(bytes) - (P - B)) / sum(bytes): saved fraction of all candidate bytes
    assert ks.max_memory(peak, peak) == 1.0
    assert ks.max_memory(peak, peak - 1000) == pytest.approx(0.75)
    assert ks.max_memory(peak, 0) == 0.0
    t = compare.torch_plan(prof, peak - 2000, "torch-ilp", ks)
    assert t["knapsack_peak_bytes"] <= peak - 2000 and len(t["recompute"]) == 2


@pytest.mark.skipif(not MLP.exists(), reason="the corpus is not in this checkout")
def test_knapsack_times_are_the_profiles_single_recompute_times():
    prof = Profile.from_json(MLP)
    ks = compare.knapsack_of(prof)
    assert ks.names and ks.times == tuple(prof.activation_by_name[a].recomp_time_s for a in ks.names)


def test_budget_specs():
    prof = chain_profile(4)
    lo, hi = floor(prof), no_recompute_peak(prof)
    specs = ["floor", "floor+50%", "floor+100%", "90%", "0.9", 0.9, "5000"]
    out = compare.resolve_budgets(prof, specs)
    assert [b for _, b in out] == [lo, lo + (hi - lo) // 2, hi, hi * 9 // 10, hi * 9 // 10, hi * 9 // 10, 5000]
    assert [label for label, _ in out] == [str(s) for s in specs]


@pytest.mark.skipif(not MLP.exists(), reason="the corpus is not in this checkout")
def test_cli_compare_writes_csv_markdown_and_plots(tmp_path):
    import csv

    from acopt.cli import main

    rc = main(["compare", str(MLP), "--budgets", "floor+50%", "--time-limit", "10", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["solver"] for r in rows] == list(compare.SOLVERS)
    assert all(r["profile"] == "mlp_bs512" and r["model"] == "mlp" for r in rows)
    assert list(rows[0]) == list(compare.COLUMNS)
    md = (tmp_path / "compare.md").read_text()
    assert "| torch-dp |" in md and "## Summary" in md
    png = tmp_path / "pareto_mlp_bs512.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_knapsack_is_optimistic_about_both_peak_and_time(chain_rows):
    """Recomputing a set R lowers the peak by at most its bytes, and chains only add
    time: so the simulated peak is never below the knapsack's linear estimate, the
    simulated recompute time never below the knapsack's sum, and the knapsack
    optimum (torch-ilp's objective) is a lower bound on the true optimum."""
    _, rows = chain_rows
    for r in rows:
        if r["solver"] in compare.TORCH_SOLVERS:
            assert r["simulated_peak_bytes"] >= r["knapsack_peak_bytes"]
            assert r["recompute_time_s"] >= r["knapsack_recompute_s"] * (1 - 1e-9)
        if r["solver"] == "torch-ilp":  # its claim: the plan it returns may differ (x == 1 on floats)
            assert r["knapsack_claim_s"] <= r["optimum_s"] * (1 + 1e-9)


def test_cli_compare_reports_a_missing_profile(tmp_path, capsys):
    from acopt.cli import main

    assert main(["compare", str(tmp_path / "nope.profile.json"), "--out", str(tmp_path)]) == 2
    assert "no such profile file" in capsys.readouterr().err  # user errors go to stderr
    assert not (tmp_path / "compare.csv").exists()
