"""Plans, budgets, the floor, the registry and plan()'s checks."""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import metadata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from acopt import planning
from acopt.planning import (
    InfeasibleBudget,
    Plan,
    PlanCheckError,
    PlannerSpec,
    PlannerUnavailable,
    PlanStatus,
    SolverStats,
    assemble_plan,
    floor,
    no_recompute_peak,
    plan,
    planners,
    profile_fingerprint,
    register_planner,
    resolve_budget,
    unregister_planner,
)
from acopt.records import Profile, Region
from acopt.simulator import memory_model, simulate
from tests.strategies import chain_profile, profiles

# ---- Plan and Profile files ----------------------------------------------------------
finite = st.floats(allow_nan=False, allow_infinity=False)
names = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=12)
stats = st.builds(
    SolverStats,
    variables=st.none() | st.integers(0, 10**9),
    constraints=st.none() | st.integers(0, 10**9),
    objective=st.none() | finite,
    iterations=st.none() | st.integers(0, 10**6),
    build_time_s=st.none() | finite,
    notes=st.lists(st.text(max_size=30), max_size=3).map(tuple),
)
option_values = st.none() | st.booleans() | st.integers(-(10**12), 10**12) | finite | st.text(max_size=10)
plans_ = st.builds(
    Plan,
    recompute=st.frozensets(names, max_size=8),
    solver=names,
    status=st.sampled_from(PlanStatus),
    budget_bytes=st.integers(0, 2**62),
    predicted_peak_bytes=st.integers(0, 2**62),
    recompute_time_s=finite,
    solve_time_s=finite,
    bound=st.none() | finite,
    gap=st.none() | finite,
    stats=st.none() | stats,
    batch_size=st.integers(0, 4096),
    profile_id=st.text(max_size=16),
    options=st.dictionaries(names, option_values, max_size=3).map(lambda d: tuple(d.items())),
)


@given(plans_)
def test_plan_json_round_trip_is_exact(tmp_path_factory, p):
    path = tmp_path_factory.mktemp("plan") / "p.json"
    p.to_json(path)
    back = Plan.from_json(path)
    assert back == p
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@given(profiles())
def test_profile_json_round_trip_is_exact(tmp_path_factory, profile):
    path = tmp_path_factory.mktemp("profile") / "p.json"
    profile.to_json(path)
    back = Profile.from_json(path)
    assert back == profile
    assert profile_fingerprint(back) == profile_fingerprint(profile)
    assert simulate(back).timeline == simulate(profile).timeline


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "corrupt acopt plan"),
        ('{"format": "acopt.Profile", "version": 1}', "not an acopt plan"),
        ("[1, 2]", "not an acopt plan"),
        ('{"format": "acopt.Plan", "version": 99}', "version"),
    ],
)
def test_corrupt_plan_files_are_value_errors(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        Plan.from_json(path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("recompute", "relu0"),
        ("recompute", [1, 2]),
        ("status", "splendid"),
        ("budget_bytes", "6GiB"),
        ("budget_bytes", True),
        ("recompute_time_s", None),
        ("stats", {"variables": 3, "colour": "red"}),
        ("options", {"x": [1, 2]}),
        ("solver", None),
    ],
)
def test_plan_fields_are_type_checked_on_load(tmp_path, field, value):
    good = assemble_plan(chain_profile(3), {"relu0"}, solver="greedy", status="heuristic", budget_bytes=10**6)
    data = good.to_dict()
    data[field] = value
    with pytest.raises(ValueError, match="corrupt acopt plan"):
        Plan.from_dict(data)
    if field != "options":  # optional: older files have none
        del data[field]
        with pytest.raises(ValueError, match="corrupt acopt plan"):
            Plan.from_dict(data)


def test_truncated_plan_file(tmp_path):
    p = assemble_plan(chain_profile(3), {"relu1"}, solver="greedy", status="heuristic", budget_bytes=10**6)
    path = tmp_path / "p.json"
    p.to_json(path)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError, match="corrupt"):
        Plan.from_json(path)


def test_profile_fingerprint_tracks_graph_and_bytes_not_times():
    a, b = chain_profile(3), chain_profile(3, time_s=5e-3)
    assert profile_fingerprint(a) == profile_fingerprint(b)
    assert profile_fingerprint(a) != profile_fingerprint(chain_profile(3, act_bytes=1001))
    assert profile_fingerprint(a) != profile_fingerprint(chain_profile(4))
    assert len(profile_fingerprint(a)) == 16


# ---- budgets and the floor ------------------------------------------------------------
def test_resolve_budget():
    profile = chain_profile(3)
    peak = no_recompute_peak(profile)
    assert peak == 5404
    assert resolve_budget(profile, 5000) == 5000
    assert resolve_budget(profile, "4KiB") == 4096
    assert resolve_budget(profile, "5 kB") == 5000
    assert resolve_budget(profile, "50%") == 2702
    assert resolve_budget(profile, "70%") == math.floor(5404 * 0.7)
    assert resolve_budget(profile, "33.3%") == 5404 * 333 // 1000
    assert resolve_budget(profile, 4096.7) == 4096
    # fractions of the peak as torch's activation_memory_budget writes them: never 0 bytes
    assert resolve_budget(profile, 0.6) == resolve_budget(profile, "0.6") == resolve_budget(profile, "60%") == 3242
    assert resolve_budget(profile, 1.0) == resolve_budget(profile, "1.0") == peak
    lo = floor(profile)
    assert resolve_budget(profile, "floor") == lo
    assert resolve_budget(profile, "floor+50%") == resolve_budget(profile, "act50%") == lo + (peak - lo) // 2
    assert resolve_budget(profile, "floor+100%") == peak
    with pytest.raises(TypeError):
        resolve_budget(profile, True)
    with pytest.raises(TypeError):
        resolve_budget(profile, [5000])
    for bad in ("lots", "-5%", "0%", "5%%", "-1", "6 GB/s", 0.0, -0.5, float("nan"), "0.0", "floor+101%", "floor-5%"):
        with pytest.raises(ValueError):
            resolve_budget(profile, bad)


def test_floor_is_everything_recomputed():
    profile = chain_profile(5)
    everything = simulate(profile, memory_model(profile).candidates)
    assert floor(profile) == everything.peak_bytes < no_recompute_peak(profile)


@given(profiles())
def test_floor_is_at_most_the_no_recompute_peak(profile):
    everything = simulate(profile, memory_model(profile).candidates).peak_bytes
    assert floor(profile) == min(everything, no_recompute_peak(profile))


def test_infeasible_budget_says_where_the_peak_sits():
    profile = chain_profile(5)
    with pytest.raises(InfeasibleBudget) as e:
        plan(profile, budget=1000)
    err = e.value
    assert isinstance(err, ValueError)
    assert err.floor_bytes == floor(profile) and err.budget_bytes == 1000
    assert err.peak_region == Region.BACKWARD and err.peak_node
    text = str(err)
    assert "floor" in text and str(err.floor_bytes) in text and "1000 bytes" in text
    assert f"at {err.peak_node}" in text and "backward pass" in text


def test_infeasible_budget_names_the_optimizer_step():
    """Adam-like state makes the optimizer step the floor's peak."""
    from tests.strategies import O, _Builder

    profile = chain_profile(3)
    b = _Builder(list(profile.nodes[:-1]), list(profile.storages))
    b.node("tmp", "mul", O, inputs=("gw0",), storages=("tmp",), allocates=("tmp",))
    b.alloc("tmp", 10_000, "tmp")
    b.node("output", "output", O, inputs=("loss", "tmp"))
    with pytest.raises(InfeasibleBudget, match=r"at tmp \(optimizer step\)"):
        plan(b.profile(), budget=100)


def test_a_budget_that_holds_the_peak_gets_the_empty_plan():
    profile = chain_profile(4)
    for budget in (no_recompute_peak(profile), "100%", "150%", 10**12):
        p = plan(profile, budget=budget)
        assert p.recompute == frozenset() and p.status == PlanStatus.OPTIMAL
        assert p.recompute_time_s == 0 and p.bound == 0 and p.gap == 0


def test_plan_carries_its_provenance():
    profile = chain_profile(6, batch_size=16)
    p = plan(profile, budget="80%", max_simulations=8)
    assert p.solver == "greedy" and p.batch_size == 16 and p.profile_id == profile_fingerprint(profile)
    assert dict(p.options) == {"max_simulations": 8, "kicks": 8, "min_time_s": 1e-12}
    assert p.budget_bytes == resolve_budget(profile, "80%") and p.fits
    assert p.solve_time_s >= 0


# ---- the registry ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EveryOptions:
    reverse: bool = False
    limit: int = 0


def _everything(*, profile, budget_bytes, options):
    chosen = memory_model(profile).candidates
    chosen = chosen[: options.limit] if options.limit else chosen
    return assemble_plan(profile, chosen, solver="everything", status="heuristic", budget_bytes=budget_bytes, options=options)


@pytest.fixture
def registry():
    """Registry state restored after the test."""
    saved = (dict(planning._REGISTRY), dict(planning._BROKEN), set(planning._SEEN_ENTRY_POINTS))
    yield
    planning._REGISTRY.clear()
    planning._REGISTRY.update(saved[0])
    planning._BROKEN.clear()
    planning._BROKEN.update(saved[1])
    planning._SEEN_ENTRY_POINTS.clear()
    planning._SEEN_ENTRY_POINTS.update(saved[2])


def test_third_party_planner_is_used_by_plan(registry):
    register_planner(PlannerSpec(name="everything", planner=_everything, options_type=EveryOptions))
    profile = chain_profile(4)
    p = plan(profile, budget=floor(profile), solver="everything")
    assert p.recompute == frozenset(memory_model(profile).candidates) and p.solver == "everything"
    assert "everything" in planners()
    with pytest.raises(TypeError, match=r"valid options: reverse: bool, limit: int"):
        plan(profile, budget=floor(profile), solver="everything", colour="red")
    with pytest.raises(TypeError, match="must be int"):
        plan(profile, budget=floor(profile), solver="everything", limit=True)  # a flag is not a count
    with pytest.raises(TypeError, match="must be bool"):
        plan(profile, budget=floor(profile), solver="everything", reverse=1)


def test_registering_a_taken_name(registry):
    spec = PlannerSpec(name="everything", planner=_everything, options_type=EveryOptions)
    register_planner(spec)
    register_planner(spec)  # the same spec again is fine
    other = dataclasses.replace(spec, exact=True)
    with pytest.raises(ValueError, match="already registered"):
        register_planner(other)
    register_planner(other, replace=True)
    assert planners()["everything"].exact
    unregister_planner("everything")
    assert "everything" not in planners()


def test_planner_spec_is_validated():
    with pytest.raises(TypeError, match="dataclass"):
        PlannerSpec(name="x", planner=_everything, options_type=dict)
    with pytest.raises(ValueError, match="name"):
        PlannerSpec(name="", planner=_everything, options_type=EveryOptions)


def test_unknown_solver_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown solver 'gredy'; registered planners: .*greedy"):
        plan(chain_profile(3), budget="90%", solver="gredy")


def test_plans_are_checked_by_the_simulator(registry):
    def liar(*, profile, budget_bytes, options):
        honest = assemble_plan(profile, (), solver="liar", status="heuristic", budget_bytes=budget_bytes, check=False)
        return dataclasses.replace(honest, predicted_peak_bytes=budget_bytes)  # claims to fit

    def slowpoke(*, profile, budget_bytes, options):
        honest = assemble_plan(profile, memory_model(profile).candidates, solver="slowpoke", status="heuristic",
                               budget_bytes=budget_bytes)  # fmt: skip
        return dataclasses.replace(honest, recompute_time_s=honest.recompute_time_s / 2)

    register_planner(PlannerSpec(name="liar", planner=liar, options_type=EveryOptions))
    register_planner(PlannerSpec(name="slowpoke", planner=slowpoke, options_type=EveryOptions))
    profile = chain_profile(4)
    with pytest.raises(PlanCheckError, match="exceeds its budget"):
        plan(profile, budget=floor(profile), solver="liar")
    with pytest.raises(PlanCheckError, match="recompute time"):
        plan(profile, budget=floor(profile), solver="slowpoke")


def test_infeasible_status_passes_through(registry):
    def giveup(*, profile, budget_bytes, options):
        return assemble_plan(profile, (), solver="giveup", status="infeasible", budget_bytes=budget_bytes)

    register_planner(PlannerSpec(name="giveup", planner=giveup, options_type=EveryOptions))
    profile = chain_profile(4)
    p = plan(profile, budget=floor(profile), solver="giveup")
    assert p.status == PlanStatus.INFEASIBLE and not p.fits


def test_missing_required_module_says_what_to_install(registry):
    register_planner(
        PlannerSpec(name="needy", planner=_everything, options_type=EveryOptions, requires=("acopt_no_such_mod",))
    )
    with pytest.raises(PlannerUnavailable, match="pip install acopt_no_such_mod") as e:
        plan(chain_profile(3), budget="90%", solver="needy")
    assert isinstance(e.value, ImportError)


def test_broken_entry_points_do_not_break_the_greedy(registry, monkeypatch):
    group = planning.ENTRY_POINT_GROUP
    fake = [
        metadata.EntryPoint(name="broken", value="acopt_no_such_module.planner:SPEC", group=group),
        metadata.EntryPoint(name="wrongtype", value="acopt.units:format_bytes", group=group),
        metadata.EntryPoint(name="plugin", value="tests.test_planning:PLUGIN", group=group),
    ]
    monkeypatch.setattr(metadata, "entry_points", lambda group=None, **kw: [e for e in fake if e.group == group])
    for name in ("broken", "wrongtype", "plugin"):
        planning._SEEN_ENTRY_POINTS.discard(name)
    profile = chain_profile(4)
    assert plan(profile, budget="80%").solver == "greedy"
    with pytest.raises(PlannerUnavailable, match="acopt_no_such_module"):
        plan(profile, budget="80%", solver="broken")
    with pytest.raises(PlannerUnavailable, match="not an acopt PlannerSpec"):
        plan(profile, budget="80%", solver="wrongtype")
    assert plan(profile, budget=floor(profile), solver="plugin").solver == "everything"
    assert set(planning.planner_errors()) >= {"broken", "wrongtype"}
    assert "plugin" in planners() and "broken" not in planners()


PLUGIN = PlannerSpec(name="plugin", planner=_everything, options_type=EveryOptions)


def test_the_built_in_registry():
    specs = planners()
    assert specs["greedy"].exact is False and specs["greedy"].requires == ()
    from acopt.greedy import GreedyOptions

    assert specs["greedy"].options_type is GreedyOptions


# ---- what a plan leaves on disk ----------------------------------------------------------
def test_decisions_csv(tmp_path):
    import pandas as pd

    from acopt.plan_outputs import decisions_frame, write_decisions_csv

    profile = chain_profile(4, batch_size=8)
    p = plan(profile, budget="80%")
    path = write_decisions_csv(profile, p, tmp_path / "out")
    assert path.name == f"ac_decisions_bs8_{profile.meta.model}_greedy.csv"  # the design's stem, model, solver
    other = write_decisions_csv(profile, plan(profile, budget="80%", solver="mu-two"), tmp_path / "out")
    assert other.name == f"ac_decisions_bs8_{profile.meta.model}_mu-two.csv" and path.exists()
    frame = pd.read_csv(path)
    assert list(frame.columns[:7]) == [
        "activation_name", "module", "decision", "size_bytes", "recomp_time_s", "creation_rank", "first_bw_use_rank",
    ]  # fmt: skip
    assert set(frame["decision"]) <= {"CHECKPOINT", "RECOMPUTE"}
    assert set(frame.loc[frame["decision"] == "RECOMPUTE", "activation_name"]) == set(p.recompute)
    assert frame["block_time_s"].sum() == pytest.approx(p.recompute_time_s)
    relu0 = frame.set_index("activation_name").loc["relu0"]
    assert relu0["size_bytes"] == 1000 and relu0["recomp_time_s"] == pytest.approx(1.5e-3)
    assert relu0["creation_rank"] == profile.node_index["relu0"]
    assert relu0["first_bw_use_rank"] == profile.node_index["gw1"]
    assert len(decisions_frame(profile, ())) == len(memory_model(profile).activation_storages)


def test_sweep_and_plots(tmp_path):
    from acopt.plan_outputs import plot_sweep, plot_timelines, sweep

    profile = chain_profile(6)
    lo, hi = floor(profile), no_recompute_peak(profile)
    frame = sweep(profile, solver="greedy", budgets=[lo - 1, lo, (lo + hi) // 2, hi])
    assert list(frame["status"]) == ["below_floor", "heuristic", "heuristic", "optimal"]
    ok = frame[frame["status"] != "below_floor"]
    assert (ok["peak_bytes"] <= ok["budget_bytes"]).all()
    assert ok["pareto"].any() and not frame["pareto"].iloc[0]
    png = plot_sweep(frame, tmp_path / "sweep.png")
    assert png.stat().st_size > 1000
    p = plan(profile, budget=(lo + hi) // 2)
    png = plot_timelines(profile, {"greedy": p, "everything": memory_model(profile).candidates}, tmp_path / "t.png")
    assert png.stat().st_size > 1000
    assert plot_timelines(profile, {}, tmp_path / "empty.png").exists()
