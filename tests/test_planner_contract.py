"""One contract for every registered planner (STYLE point 11).

Every planner in :func:`acopt.planning.planners` (greedy, mu-two, ilp,
cpsat, and any plugin) runs the same cases:

* a table of small hand-built profiles whose optimal recompute cost at a budget
  was worked out by hand (the derivations are in the builders' docstrings):
  exact planners must hit the optimum and prove it, every planner must fit,
  and a heuristic returns the same plan on every run;
* hypothesis profiles (tests/strategies.py): the exact planners agree on the
  optimal cost, it is never worse than any heuristic's (greedy, mu-two), it
  never rises when the budget grows, and they agree on which budgets no plan
  fits; every heuristic's plan fits and is the same on every run.

The simulator (``acopt.simulate``) is the referee throughout.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import acopt
from acopt.planning import (
    InfeasibleBudget,
    PlanStatus,
    check_plan,
    floor,
    get_planner,
    no_recompute_peak,
    planners,
)
from acopt.records import NodeRecord, Profile, ProfileMeta, Region, StorageRecord
from acopt.schedule import InvalidPlan
from acopt.simulator import memory_model, simulate
from acopt.solvers.model import Formulation
from tests.strategies import chain_profile, profiles, unreplayable_chain_profile

PLANNERS = sorted(planners())
EXACT = sorted(name for name, spec in planners().items() if spec.exact)
F, B, O = Region.FORWARD, Region.BACKWARD, Region.OPTIMIZER
# Per exact solve. The cases here take milliseconds; the wall-clock limit only stops a hung
# solve, so it is far beyond what a loaded machine can stretch them to (20 s was hit once
# by a 7-candidate profile under load, failing a correct run that asserts an optimum).
NO_TIME_LIMIT_S = 600.0
FAST = {"time_limit_s": NO_TIME_LIMIT_S}


def _options(name: str, **kw):
    spec = get_planner(name)
    fields = {f.name for f in dataclasses.fields(spec.options_type)}
    return spec.options_type(**{k: v for k, v in {**FAST, **kw}.items() if k in fields})


def _direct(name: str, profile: Profile, budget: int, **kw):
    """Call a planner itself (bypassing ``plan()``'s floor check), then check its plan."""
    spec = get_planner(name)
    result = spec.planner(profile=profile, budget_bytes=budget, options=_options(name, **kw))
    check_plan(profile, result, budget_bytes=budget)
    return result


def _plan(name: str, profile: Profile, budget: int):
    opts = {k: v for k, v in FAST.items() if k in {f.name for f in dataclasses.fields(get_planner(name).options_type)}}
    return acopt.plan(profile, budget=budget, solver=name, **opts)


# ---- hand-built profiles ------------------------------------------------------
def _build(forward, backward, outputs, *, placeholders=(("x", 0),)) -> Profile:
    """Nodes in order; each non-placeholder node makes one storage named after it.

    ``forward`` / ``backward``: (name, inputs, bytes, time_s). The output node
    reads ``outputs``.
    """
    nodes, storages = [], []
    for name, nbytes in placeholders:
        nodes.append(NodeRecord(name=name, op="placeholder", region=F, storages=(name,), allocates=(name,)))
        storages.append(StorageRecord(name=name, bytes=nbytes, node=name))
    for region, rows in ((F, forward), (B, backward)):
        for name, inputs, nbytes, t in rows:
            nodes.append(
                NodeRecord(
                    name=name, op="op", region=region, inputs=tuple(inputs), storages=(name,),
                    allocates=(name,), time_s=t,
                )
            )  # fmt: skip
            storages.append(StorageRecord(name=name, bytes=nbytes, node=name))
    nodes.append(NodeRecord(name="output", op="output", region=O, inputs=tuple(outputs), recomputable=False))
    return Profile(nodes=tuple(nodes), storages=tuple(storages), meta=ProfileMeta(model="contract"))


def knapsack() -> Profile:
    """Greedy's ratio rule is not optimal here.

    p = f(x) 100 B, 4 s; q = f(x) 60 B, 3 s; loss = f(p, q); backward g1
    (200 B) then g2 (10 B) read nothing saved, gp reads p, gq reads q.
    Live bytes: forward p+q = 160; at g2 p+q+g1+g2 = 370 (the peak).
    Recompute p: p is freed after loss and rebuilt before gp: peak g1+q+g2 =
    270. Recompute q: rebuilt before gq: peak p+g1+g2 = 310. Both: 210 (floor).
    Optimum: budget 310..369 -> {q}, 3 s (greedy takes p first, ratio 25 > 20:
    4 s); 270..309 -> {p}, 4 s; 210..269 -> {p, q}, 7 s.
    """
    return _build(
        forward=[("p", ["x"], 100, 4.0), ("q", ["x"], 60, 3.0), ("loss", ["p", "q"], 0, 0.0)],
        backward=[
            ("g1", ["loss"], 200, 0.0), ("g2", ["g1"], 10, 0.0), ("gp", ["g2", "p"], 10, 0.0),
            ("gq", ["gp", "q"], 10, 0.0),
        ],
        outputs=["loss", "gq"],
    )  # fmt: skip


def chain() -> Profile:
    """mu-TWO chains: a recomputed activation's block replays the recomputed ones before it.

    a = f(x), b = f(a), c = f(b), d = f(c), 100 B each, times 1, 1, 10, 10 s;
    loss = f(d); backward: g1 (150 B), g2 (10 B), then gd, gc, gb, ga read d,
    c, b, a (10 B each). Empty plan: forward peak 400 (at d), whole peak
    a+b+c+d+g1+g2 = 560 at g2. Each recomputed activation is dead at g2 (its
    forward copy dies after its reader, its block runs after g2): -100 B there,
    and no block or forward step comes near that peak.
    Budget 460..559: one of them, the cheapest: {a}, 1 s.
    Budget 360..459: two: {a, b} costs a + (a + b) = 3 s, since b's block
    replays a; any pair with c or d costs at least 1 + 10 s.
    Budget 260..359: three: {a, b, d} costs 1 + 2 + 10 = 13 s (d's source c is
    kept); {a, b, c} costs 1 + 2 + 12 = 15 s.
    """
    return _build(
        forward=[
            ("a", ["x"], 100, 1.0), ("b", ["a"], 100, 1.0), ("c", ["b"], 100, 10.0), ("d", ["c"], 100, 10.0),
            ("loss", ["d"], 0, 0.0),
        ],
        backward=[
            ("g1", ["loss"], 150, 0.0), ("g2", ["g1"], 10, 0.0), ("gd", ["g2", "d"], 10, 0.0),
            ("gc", ["gd", "c"], 10, 0.0), ("gb", ["gc", "b"], 10, 0.0), ("ga", ["gb", "a"], 10, 0.0),
        ],
        outputs=["loss", "ga"],
    )  # fmt: skip


def transient() -> Profile:
    """A block's intermediates count (memory model rule 4), and rule 6's floor is not the least peak.

    t = f(x) 300 B (forward-only), a = f(t) 100 B, 1 s each; b = f(a) 100 B,
    5 s; loss = f(b). Backward: g1 250 B, g2 10 B, gb reads b, ga reads a.
    Forward peak 400 (t + a at a). Empty plan: 460 at g2.
    Recompute a (1 + 1 = 2 s, replays t): 360 at g2 but its block holds
    gb + t + a = 410. Recompute b (5 s, source a): 400. Both: 410.
    Optimum: budget 410..459 -> {a}, 2 s; 400..409 -> {b}, 5 s (below rule 6's
    floor of 410, so only a direct call reaches it); below 400 nothing fits.
    """
    return _build(
        forward=[("t", ["x"], 300, 1.0), ("a", ["t"], 100, 1.0), ("b", ["a"], 100, 5.0), ("loss", ["b"], 0, 0.0)],
        backward=[("g1", ["loss"], 250, 0.0), ("g2", ["g1"], 10, 0.0), ("gb", ["g2", "b"], 10, 0.0), ("ga", ["gb", "a"], 10, 0.0)],
        outputs=["loss", "ga"],
    )  # fmt: skip


def extension() -> Profile:
    """A kept source read by a later block lives until that block (memory model rule 4).

    s = f(x), a = f(s), 100 B, 1 s each; loss = f(a). Backward: g1 200 B,
    g2 10 B, gs reads s (its last use), gq 250 B, gr 10 B, ga reads a.
    Empty plan: 410 at g2. Recompute a alone: its block reads s, so s lives
    from gs to the block: 360 at gq (s + gs + gq). Recompute s alone (rebuilt
    before gs): 360 at gq too. Both (a's block replays s): 260.
    Optimum: budget 360..409 -> one of them, 1 s; 260..359 -> {s, a}, 1 + 2 = 3 s
    (a model without the extension would take {a} at 310).
    """
    return _build(
        forward=[("s", ["x"], 100, 1.0), ("a", ["s"], 100, 1.0), ("loss", ["a"], 0, 0.0)],
        backward=[
            ("g1", ["loss"], 200, 0.0), ("g2", ["g1"], 10, 0.0), ("gs", ["g2", "s"], 10, 0.0),
            ("gq", ["gs"], 250, 0.0), ("gr", ["gq"], 10, 0.0), ("ga", ["gr", "a"], 10, 0.0),
        ],
        outputs=["loss", "ga"],
    )  # fmt: skip


def mlp() -> Profile:
    """``chain_profile(3)``: 3 x (mm -> relu), 1000 B activations, placeholders 1300 B.

    mm{i} is forward-only (its relu is its only reader), so relu{i}'s block
    replays mm{i} and relu{i} (1.5 ms) from relu{i-1}. Empty plan: 5404 B at
    gx2 and grelu1 (placeholders + relu0 + relu1 + loss + gw2 + grelu2/gx2 +
    gx2/grelu1). relu1's block runs before gw2 and relu2's right at grelu2, so
    only relu0 is dead there: {relu0} gives 4504 B, reached at gx1 and grelu0,
    where the rebuilt relu0 must be alive anyway; recomputing everything also
    gives 4504 (rule 6's floor). Optimum at 4504: {relu0}, 1.5 ms.
    """
    return chain_profile(3)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    profile: object  # a builder
    budget: int
    optimum: float  # seconds
    plan: frozenset[str]  # an optimal plan (documentation; ties allowed)
    below_floor: bool = False  # below rule 6's floor: only a direct planner call gets here


CASES = [
    Case("knapsack-370", knapsack, 369, 3.0, frozenset({"q"})),
    Case("knapsack-310", knapsack, 310, 3.0, frozenset({"q"})),
    Case("knapsack-300", knapsack, 300, 4.0, frozenset({"p"})),
    Case("knapsack-floor", knapsack, 210, 7.0, frozenset({"p", "q"})),
    Case("chain-one", chain, 460, 1.0, frozenset({"a"})),
    Case("chain-two", chain, 400, 3.0, frozenset({"a", "b"})),
    Case("chain-three", chain, 300, 13.0, frozenset({"a", "b", "d"})),
    Case("transient-fits", transient, 410, 2.0, frozenset({"a"})),
    Case("transient-block-too-big", transient, 405, 5.0, frozenset({"b"}), below_floor=True),
    Case("extension-one", extension, 360, 1.0, frozenset({"a"})),
    Case("extension-extended", extension, 320, 3.0, frozenset({"s", "a"})),
    Case("mlp-floor", lambda: mlp(), 4504, 0.0015, frozenset({"relu0"})),
    Case("unreplayable-chain", unreplayable_chain_profile, 310, 1.0, frozenset({"a"})),
]


def _enumerate(profile: Profile, budget: int) -> float | None:
    """Brute force: the least recompute time of any plan that fits (None if none)."""
    cands = memory_model(profile).candidates
    best = None
    for k in range(len(cands) + 1):
        for combo in itertools.combinations(cands, k):
            try:
                sim = simulate(profile, combo)
            except InvalidPlan:  # a chain that replays what cannot be replayed
                continue
            if sim.peak_bytes <= budget and (best is None or sim.recompute_time_s < best):
                best = sim.recompute_time_s
    return best


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_table_is_right(case: Case):
    """The hand-worked optima, checked by enumerating every plan."""
    profile = case.profile()
    assert _enumerate(profile, case.budget) == pytest.approx(case.optimum, rel=1e-9)
    sim = simulate(profile, case.plan)
    assert sim.peak_bytes <= case.budget
    assert sim.recompute_time_s == pytest.approx(case.optimum, rel=1e-9)
    assert (case.budget < floor(profile)) == case.below_floor


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("name", PLANNERS)
def test_table(name: str, case: Case):
    profile = case.profile()
    spec = get_planner(name)
    if case.below_floor:
        with pytest.raises(InfeasibleBudget):
            _plan(name, profile, case.budget)
        if not spec.exact:
            return
        result = _direct(name, profile, case.budget)
    else:
        result = _plan(name, profile, case.budget)
    sim = simulate(profile, result)
    assert result.fits and sim.peak_bytes <= case.budget
    assert result.recompute_time_s == pytest.approx(sim.recompute_time_s, rel=1e-9)
    if spec.exact:
        assert result.status == PlanStatus.OPTIMAL
        assert result.recompute_time_s == pytest.approx(case.optimum, rel=1e-9)
        assert result.bound == pytest.approx(case.optimum, rel=1e-9)
        assert result.gap == pytest.approx(0.0, abs=1e-9)
        assert result.stats is not None and result.stats.variables and result.stats.constraints
    else:
        assert result.recompute_time_s >= case.optimum * (1 - 1e-9)


@pytest.mark.parametrize("case", [c for c in CASES if not c.below_floor], ids=lambda c: c.name)
@pytest.mark.parametrize("name", PLANNERS)
def test_same_plan_on_every_run(name: str, case: Case):
    """A fresh profile object each time, so nothing is cached: a heuristic
    returns the same plan, an exact planner the same (optimal) cost."""
    first, again = _plan(name, case.profile(), case.budget), _plan(name, case.profile(), case.budget)
    if get_planner(name).exact:
        assert first.recompute_time_s == pytest.approx(again.recompute_time_s, rel=1e-9)
    else:
        assert first.recompute == again.recompute


HEURISTIC = sorted(name for name, spec in planners().items() if not spec.exact)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profile=profiles(max_forward=12, max_backward=8), data=st.data())
def test_heuristic_plans_fit_and_repeat(profile: Profile, data):
    """At any budget from the floor up, every heuristic's plan fits when
    simulated, states the simulator's peak and time, and is the same for an
    equal profile object planned again."""
    lo, hi = floor(profile), no_recompute_peak(profile)
    budget = data.draw(st.integers(lo, max(lo, hi - 1)), label="budget")
    copy = Profile.from_dict(profile.to_dict())
    for name in HEURISTIC:
        result = _plan(name, profile, budget)
        sim = check_plan(profile, result, budget_bytes=budget)
        assert sim.peak_bytes <= budget
        assert _plan(name, copy, budget).recompute == result.recompute, name


@pytest.mark.parametrize("name", EXACT)
def test_below_least_peak_is_infeasible(name: str):
    """Below the least peak any plan reaches (400 for ``transient``), the exact
    planners prove infeasibility and say what the least peak is."""
    result = _direct(name, transient(), 399)
    assert result.status == PlanStatus.INFEASIBLE
    assert any("400 bytes (proven)" in n for n in result.stats.notes), result.stats.notes
    assert simulate(transient(), result).peak_bytes == 400


@pytest.mark.parametrize("name", EXACT)
def test_chain_through_unreplayable_node_is_never_planned(name: str):
    """Below 310 only {a, b} would fit ``unreplayable_chain_profile``, and it is invalid: the
    exact planners prove that no plan fits (solvers/model.py Note 11), from the
    first model and with every chain member up front alike."""
    profile = unreplayable_chain_profile()
    with pytest.raises(InvalidPlan):
        simulate(profile, {"a", "b"})
    for depth in (0, None):
        result = _direct(name, profile, 250, chain_depth=depth)
        assert result.status == PlanStatus.INFEASIBLE
        assert any("310 bytes (proven)" in n for n in result.stats.notes), result.stats.notes
        assert result.recompute in (frozenset({"a"}), frozenset({"b"}))


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("depth", [0, 1, None])
def test_chain_depth_keeps_the_optimum(name: str, depth):
    """Note 10: chain members on demand (any depth) or all up front reach the
    same proven optimum; depth 0 must add chain members to get there."""
    profile = chain()
    result = _direct(name, profile, 360, chain_depth=depth)
    assert result.status == PlanStatus.OPTIMAL
    assert result.recompute_time_s == pytest.approx(3.0, rel=1e-9)
    assert result.bound == pytest.approx(3.0, rel=1e-9)


@pytest.mark.parametrize("frontier", [True, False])
@pytest.mark.parametrize("growth", ["step", "missing", "full"])
def test_chain_growth_policies_keep_the_optimum(growth: str, frontier: bool):
    """exact.solve's rebuild policies and the frontier costs (model.py Note 10)
    only change how fast the chain members come in, never the proven optimum."""
    from acopt.solvers import exact
    from acopt.solvers.cpsat import CpsatBackend, CpsatOptions, _import_cp_model

    cp_model = _import_cp_model()
    opts = CpsatOptions(time_limit_s=NO_TIME_LIMIT_S)
    out = exact.solve(
        chain(), budget=300, make_backend=lambda f: CpsatBackend(cp_model, f, opts), time_limit_s=NO_TIME_LIMIT_S,
        chain_depth=0, growth=growth, frontier=frontier,
    )  # fmt: skip
    assert out.status == exact.OPTIMAL and out.objective == pytest.approx(13.0, rel=1e-9)
    assert out.bound == pytest.approx(13.0, rel=1e-9)
    with pytest.raises(ValueError, match="growth"):
        exact.solve(chain(), budget=300, make_backend=None, time_limit_s=1.0, growth="sideways")


@pytest.mark.parametrize("name", EXACT)
def test_time_limit_returns_a_fitting_plan(name: str):
    profile = chain_profile(12)
    budget = (floor(profile) + no_recompute_peak(profile)) // 2
    result = _plan(name, profile, budget)
    assert result.fits
    assert result.status in (PlanStatus.OPTIMAL, PlanStatus.TIME_LIMIT)
    assert result.bound is not None and result.bound <= result.recompute_time_s + 1e-12


@pytest.mark.parametrize("name", EXACT)
def test_time_limit_spent_before_the_first_solve_returns_the_warm_start(name: str):
    """A limit shorter than the model's analysis still builds once and returns the
    warm start (the greedy's plan) at status time_limit: no internal error."""
    profile = chain_profile(12)
    budget = (floor(profile) + no_recompute_peak(profile)) // 2
    result = acopt.plan(profile, budget=budget, solver=name, time_limit_s=1e-9)
    assert result.status == PlanStatus.TIME_LIMIT
    assert simulate(profile, result.recompute).peak_bytes <= budget


def test_ilp_uses_no_deprecated_pulp_api():
    """PuLP 3.3 warns of what 4.0 removes (reading prob.constraints as a dict, LpVariable(...))."""
    import warnings

    profile = chain_profile(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _plan("ilp", profile, (floor(profile) + no_recompute_peak(profile)) // 2)
    assert not [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning) and "PuLP" in str(w.message)]


@pytest.mark.parametrize("name, module", [("ilp", "pulp"), ("cpsat", "ortools")])
def test_missing_solver_module_says_what_to_install(name: str, module: str, monkeypatch):
    spec = get_planner(name)
    for mod in list(sys.modules):
        if mod == module or mod.startswith(module + "."):
            monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"pip install 'acopt\[solvers\]'"):
        spec.planner(profile=knapsack(), budget_bytes=300, options=_options(name))


# ---- hypothesis: the exact planners against each other and the greedy ------------
def _exact_costs(profile: Profile, budget: int) -> dict[str, float | None]:
    """Each exact planner's cost at ``budget`` (None: proven infeasible)."""
    out = {}
    for name in EXACT:
        result = _direct(name, profile, budget)
        assert result.status in (PlanStatus.OPTIMAL, PlanStatus.INFEASIBLE), (result.status, result.stats)
        out[name] = None if result.status == PlanStatus.INFEASIBLE else result.recompute_time_s
    return out


def _budgets(profile: Profile, data) -> list[int]:
    lo, hi = floor(profile), no_recompute_peak(profile)
    picks = {lo, hi - 1} if hi > lo else {lo}
    picks.add(data.draw(st.integers(max(0, lo - 64), max(lo, hi - 1)), label="budget"))
    return sorted(b for b in picks if b >= 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(profile=profiles(max_forward=10, max_backward=8), data=st.data())
def test_exact_planners_agree_and_beat_greedy(profile: Profile, data):
    if len(EXACT) < 1 or not memory_model(profile).candidates:
        return
    previous: dict[str, float | None] = {}
    for budget in _budgets(profile, data):
        costs = _exact_costs(profile, budget)
        values = list(costs.values())
        # they agree on infeasibility and on the optimal cost
        assert all((v is None) == (values[0] is None) for v in values), costs
        if values[0] is not None:
            for v in values:
                assert math.isclose(v, values[0], rel_tol=1e-6, abs_tol=1e-12), costs
        # never worse than the greedy (where the greedy may run: at or above the floor)
        if budget >= floor(profile):
            assert values[0] is not None
            for name in PLANNERS:
                if get_planner(name).exact:
                    continue
                other = _plan(name, profile, budget)
                assert values[0] <= other.recompute_time_s * (1 + 1e-6) + 1e-12, (name, costs, other)
        # a bigger budget never costs more, and what fits stays feasible
        for name, v in costs.items():
            if name in previous:
                before = previous[name]
                if before is not None:
                    assert v is not None and v <= before * (1 + 1e-6) + 1e-12, (name, before, v)
            previous[name] = v


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(profile=profiles(max_forward=12, max_backward=8), data=st.data())
def test_chain_members_on_demand_reach_the_full_models_optimum(profile: Profile, data):
    """solvers/model.py Note 10: starting with no chain member (depth 0, the
    most rebuilds) and growing on demand, or with every member up front, the
    exact planners prove the same optimum (or the same infeasibility)."""
    if not memory_model(profile).candidates:
        return
    # Note 7's relaxation settles plans one no-good cut at a time, which can take
    # longer than the test's time limit; traced graphs never have that pattern.
    assume(not Formulation(profile).irregular)
    budget = _budgets(profile, data)[-1 if data.draw(st.booleans(), label="high") else 0]
    for name in EXACT:
        got = {}
        for depth in (0, None):
            result = _direct(name, profile, budget, chain_depth=depth)
            assert result.status in (PlanStatus.OPTIMAL, PlanStatus.INFEASIBLE), (result.status, result.stats)
            got[depth] = None if result.status == PlanStatus.INFEASIBLE else result.recompute_time_s
        assert (got[0] is None) == (got[None] is None), got
        if got[0] is not None:
            assert math.isclose(got[0], got[None], rel_tol=1e-6, abs_tol=1e-12), (name, got)

