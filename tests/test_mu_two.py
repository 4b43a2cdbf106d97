"""The mu-TWO greedy (``solver="mu-two"``, the reference heuristic): it fits or
says why not, its blocks are the memory model's, its order is the ratio
order, and it is deterministic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import acopt
from acopt.mu_two import MuTwoOptions, _Blocks, _Greedy, _shortest_fitting_prefix, pick_order
from acopt.planning import InfeasibleBudget, PlanStatus, floor, no_recompute_peak, plan
from acopt.schedule import MemoryModel
from acopt.simulator import peak_bytes, simulate
from tests.strategies import (
    chain_profile,
    profiles,
    residual_profile,
    unreplayable_chain_profile,
    worked_example_profile,
)

ROOT = Path(__file__).resolve().parents[1]


@given(profiles(), st.data())
def test_fits_or_raises_exactly_below_the_floor(profile, data):
    peak = no_recompute_peak(profile)
    budget = data.draw(st.integers(0, peak + 10), label="budget")
    if budget < floor(profile):
        with pytest.raises(InfeasibleBudget) as e:
            plan(profile, budget=budget, solver="mu-two")
        assert e.value.floor_bytes == floor(profile) and e.value.budget_bytes == budget
        return
    result = plan(profile, budget=budget, solver="mu-two")
    sim = simulate(profile, result)
    assert sim.peak_bytes <= budget
    assert result.predicted_peak_bytes == sim.peak_bytes
    assert result.recompute_time_s == pytest.approx(sim.recompute_time_s) and result.recompute_time_s >= 0
    if budget >= peak:
        assert result.recompute == frozenset() and result.status == PlanStatus.OPTIMAL
    else:
        assert result.status == PlanStatus.HEURISTIC and result.recompute
        # the greedy's own bookkeeping of the recompute time (Algorithms E/F) agrees
        assert result.stats.objective == pytest.approx(result.recompute_time_s, rel=1e-9, abs=1e-15)


@given(profiles(), st.data())
def test_the_plan_is_the_shortest_fitting_prefix_of_the_pick_order(profile, data):
    lo, hi = floor(profile), no_recompute_peak(profile)
    if lo >= hi:
        return
    budget = data.draw(st.integers(lo, hi - 1), label="budget")
    order = pick_order(profile).order
    peaks = [simulate(profile, order[:k]).peak_bytes for k in range(len(order) + 1)]
    linear = plan(profile, budget=budget, solver="mu-two", search="linear")
    first = next(k for k, p in enumerate(peaks) if p <= budget)
    assert linear.recompute == frozenset(order[:first])
    bisect = plan(profile, budget=budget, solver="mu-two")
    k = len(bisect.recompute)
    assert bisect.recompute == frozenset(order[:k]) and peaks[k] <= budget
    if all(a >= b for a, b in zip(peaks, peaks[1:])):  # the peak never rises along the order
        assert k == first


@settings(max_examples=30)
@given(profiles(max_forward=12, max_backward=8), st.randoms(use_true_random=False))
def test_incremental_blocks_are_the_memory_models_blocks(profile, rnd):
    """Note G1: after any sequence of picks, every candidate's block is
    MemoryModel.block(c, R | {c}), members, sources and time."""
    model = MemoryModel(profile)
    blocks = _Blocks(profile, model)
    order = list(model.candidates)
    rnd.shuffle(order)
    recompute: set[str] = set()
    for p in [None, *order]:
        if p is not None:
            blocks.pick(p)
            recompute.add(p)
        for c in model.candidates:
            expected = model.block(c, frozenset(recompute | {c}))
            assert blocks.members[c] == set(expected.nodes), (p, c)
            assert blocks.sources[c] == set(expected.sources), (p, c)
            assert blocks.block_time[c] == pytest.approx(expected.time_s, rel=1e-9, abs=1e-15)


@settings(max_examples=30)
@given(profiles(max_forward=12, max_backward=8))
def test_prefix_blocks_from_the_growth_history(profile):
    """The blocks the search hands the simulator's fast path for prefix k are
    MemoryModel.block(a, R_k), for every k."""
    model = MemoryModel(profile)
    g = _Greedy(profile, min_time_s=1e-12)
    g.extend(g.n)
    for k in range(g.n + 1):
        recompute = frozenset(g.order[:k])
        for b in g.blocks(k):
            expected = model.block(b.activation, recompute)
            assert (b.nodes, b.position) == (expected.nodes, expected.position)
        assert peak_bytes(profile, recompute, blocks=g.blocks(k)) == simulate(profile, recompute).peak_bytes


@given(profiles())
def test_picks_follow_the_ratio(profile):
    """Each pick has the best bytes / block-time ratio among the remaining
    candidates under the plan so far (ties: created first)."""
    model = MemoryModel(profile)
    order = pick_order(profile).order
    assert sorted(order) == sorted(model.candidates)
    rank = {c: i for i, c in enumerate(model.candidates)}
    sizes = {s.name: s.bytes for s in profile.storages}
    picked: set[str] = set()
    for c in order:
        def ratio(a):
            t = model.block(a, frozenset(picked | {a})).time_s
            return sizes[a] / max(t, 1e-12)

        best = max(ratio(a) for a in model.candidates if a not in picked)
        assert ratio(c) == pytest.approx(best, rel=1e-9)
        ties = [a for a in model.candidates if a not in picked and ratio(a) == pytest.approx(best, rel=1e-9)]
        assert rank[c] == min(rank[a] for a in ties)
        picked.add(c)


def test_chain_pick_order_by_hand():
    # Every relu_i alone: block (mm_i, relu_i), 1.5 ms for 1000 B; ties go to
    # the first created. Picking relu0 makes relu1's block run through relu0's
    # (3 ms), so relu2 is next, then relu4; then relu1 (3 ms) ties relu3 (3 ms,
    # through relu2) and goes first; relu3 last, its block now back to x (6 ms).
    picks = pick_order(chain_profile(5))
    assert picks.order == ("relu0", "relu2", "relu4", "relu1", "relu3")
    assert picks.block_times_s == pytest.approx((1.5e-3, 1.5e-3, 1.5e-3, 3e-3, 6e-3))
    # relu3's pick also grows nothing else; relu1's pick grew relu3's block.
    assert picks.total_times_s == pytest.approx((1.5e-3, 3e-3, 4.5e-3, 10.5e-3, 22.5e-3))
    assert picks.steps[-1] == len(simulate(chain_profile(5), picks.order).timeline)


def test_more_budget_never_costs_more_on_a_chain():
    profile = chain_profile(12)
    lo, hi = floor(profile), no_recompute_peak(profile)
    costs = [plan(profile, budget=b, solver="mu-two").recompute_time_s for b in range(lo, hi + 1, max(1, (hi - lo) // 40))]
    assert all(a >= b for a, b in zip(costs, costs[1:])), costs
    assert costs[0] > 0 and costs[-1] >= 0


def test_free_recomputes_rank_first():
    """A zero-time block (a view of a placeholder's copy, here a free op) is picked first."""
    from tests.strategies import _Builder, F, B, O

    b = _Builder()
    b.node("x", "placeholder", F, storages=("x",), allocates=("x",))
    b.alloc("x", 10, "x")
    b.node("cheap", "f", F, inputs=("x",), storages=("cheap",), allocates=("cheap",), time_s=1e-3)
    b.alloc("cheap", 1000, "cheap")
    b.node("free", "g", F, inputs=("x",), storages=("free",), allocates=("free",), time_s=0.0)
    b.alloc("free", 10, "free")
    b.node("gx", "h", B, inputs=("cheap", "free"), storages=("gx",), allocates=("gx",))
    b.alloc("gx", 1, "gx")
    b.node("output", "output", O, inputs=("gx",))
    assert pick_order(b.profile()).order == ("free", "cheap")


def test_greedy_is_deterministic_across_hash_seeds(tmp_path):
    profile = residual_profile(8)  # branches and ties, where set order could leak in
    path = tmp_path / "p.json"
    profile.to_json(path)
    budget = (floor(profile) + no_recompute_peak(profile)) // 2
    here = plan(profile, budget=budget, solver="mu-two")
    script = (
        "import json, sys, acopt; from acopt.mu_two import pick_order; "
        f"p = acopt.Profile.from_json({str(path)!r}); "
        f"print(json.dumps([list(pick_order(p).order), sorted(acopt.plan(p, budget={budget}, solver=\"mu-two\").recompute)]))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        order, chosen = json.loads(out.stdout)
        assert tuple(order) == pick_order(profile).order
        assert set(chosen) == set(here.recompute)


def test_options_are_checked():
    profile = chain_profile(3)
    with pytest.raises(TypeError, match="search"):
        plan(profile, budget="90%", solver="mu-two", serach="linear")
    with pytest.raises(TypeError, match="must be"):
        plan(profile, budget="90%", solver="mu-two", search="fast")
    with pytest.raises(ValueError, match="positive"):
        MuTwoOptions(min_time_s=0.0)


def test_direct_call_skips_the_floor_check_but_never_returns_a_plan_that_does_not_fit():
    from acopt.mu_two import mu_two

    profile = chain_profile(3)
    with pytest.raises(InfeasibleBudget):  # nothing fits
        mu_two(profile=profile, budget_bytes=100, options=MuTwoOptions())


@given(profiles(), st.data())
def test_direct_calls_fit_whenever_a_prefix_does(profile, data):
    from acopt.mu_two import mu_two

    budget = data.draw(st.integers(0, no_recompute_peak(profile)), label="budget")
    order = pick_order(profile).order
    fitting = [k for k in range(len(order) + 1) if simulate(profile, order[:k]).peak_bytes <= budget]
    if not fitting:
        with pytest.raises(InfeasibleBudget):
            mu_two(profile=profile, budget_bytes=budget, options=MuTwoOptions(search="linear"))
        return
    result = mu_two(profile=profile, budget_bytes=budget, options=MuTwoOptions(search="linear"))
    assert result.recompute == frozenset(order[: fitting[0]]) and result.fits


def test_lazy_order_stops_early():
    profile = chain_profile(40)
    full = pick_order(profile).order
    g = _Greedy(profile, min_time_s=1e-12)
    g.extend(3)
    assert g.order == list(full[:3])
    g = _Greedy(profile, min_time_s=1e-12)
    budget = acopt.planning.resolve_budget(profile, "95%")
    k, sims = _shortest_fitting_prefix(profile, g, budget, "bisect")
    assert 0 < k < len(g.order) < g.n  # only the picks the search looked at were made
    assert acopt.plan(profile, budget=budget, solver="mu-two").recompute == frozenset(full[:k])


def test_the_worked_example_in_the_docs():
    profile = worked_example_profile()
    assert MemoryModel(profile).candidates == ("a", "b")
    table = {
        (): [100, 110, 510, 910, 914, 1014, 714, 224, 124, 114],
        ("a",): [100, 110, 510, 910, 514, 614, 614, 714, 224, 124, 114],
        ("b",): [100, 110, 510, 910, 914, 914, 1014, 714, 224, 124, 114],
        ("a", "b"): [100, 110, 510, 910, 514, 514, 914, 614, 614, 714, 224, 124, 114],
    }
    for recompute, timeline in table.items():
        assert list(simulate(profile, recompute).timeline) == timeline, recompute
    assert [simulate(profile, r).recompute_time_s for r in table] == pytest.approx([0, 2e-3, 1e-3, 5e-3])
    assert floor(profile) == 914
    picks = pick_order(profile)
    assert picks.order == ("b", "a") and picks.total_times_s == pytest.approx((1e-3, 5e-3))
    assert plan(profile, budget=1000, solver="mu-two").recompute == {"a", "b"}
    with pytest.raises(InfeasibleBudget, match=r"below the floor 914 B .* at b in the recompute block for b"):
        plan(profile, budget=912, solver="mu-two")
    assert plan(profile, budget=1014, solver="mu-two").recompute == frozenset()


def test_chains_that_cannot_be_replayed_are_skipped():
    """Greedy Note G4: recomputing both a and b would make b's block replay a
    node that cannot be replayed. The greedy skips the conflicting pick, the
    floor is the peak of what it can pick, and below it InfeasibleBudget."""
    profile = unreplayable_chain_profile()
    order = pick_order(profile).order
    assert len(order) == 1 < len(MemoryModel(profile).candidates)
    assert floor(profile) == 310 == peak_bytes(profile, order)
    p = plan(profile, budget=310, solver="mu-two")
    assert simulate(profile, p).peak_bytes <= 310
    with pytest.raises(InfeasibleBudget, match="1 of the 2 recomputable"):
        plan(profile, budget=300, solver="mu-two")
