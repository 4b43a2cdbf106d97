"""The simulator against hand-computed timelines and an independent brute force."""

from __future__ import annotations

import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from acopt.planning import PlanStatus, assemble_plan
from acopt.records import Region
from acopt.schedule import InvalidPlan, MemoryModel
from acopt.simulator import EventKind, _delta, peak_bytes, peak_location, simulate
from tests.strategies import _Builder, chain_profile, plans, profiles, profiles_and_plans

F, B, O = Region.FORWARD, Region.BACKWARD, Region.OPTIMIZER


# ---- an independent brute force ---------------------------------------------------
def brute_force_timeline(profile, recompute) -> list[int]:
    """Live bytes per step of the schedule, by the definition, the slow way.

    Runs the schedule like the profiler runs a graph: each value knows the
    physical storages it refers to (a new one per allocation, identified by
    the step that made it; an alias shares its input's), a value dies after
    the last step that reads it (never, if the output reads it or it is a
    placeholder), and a storage is live while any live value refers to it.
    """
    schedule = MemoryModel(profile).schedule(recompute)  # a fresh model: no cache shared with the simulator
    steps = schedule.steps
    nodes = profile.node_by_name
    nbytes = {s.name: s.bytes for s in profile.storages}
    last = len(steps) - 1
    value_storages: dict[tuple, list[tuple[str, int]]] = {}
    born: dict[tuple, int] = {}
    for t, step in enumerate(steps):
        node = nodes[step.node]
        mine = []
        for s in node.storages:
            if s in node.allocates:
                mine.append((s, t))
                continue
            found = [p for r in step.reads for p in value_storages.get(r, []) if p[0] == s]
            if not found:  # a tied placeholder: the same storage as the one that made it
                found = [p for v in value_storages.values() for p in v if p[0] == s]
            mine.append(found[0])
        value = (step.node, step.block)
        value_storages[value] = mine
        born[value] = t
    dies: dict[tuple, int] = {}
    for value, t0 in born.items():
        if nodes[value[0]].is_placeholder:
            dies[value] = last
            continue
        readers = [t for t, step in enumerate(steps) if value in step.reads]
        if any(nodes[steps[t].node].is_output for t in readers):
            dies[value] = last
        else:
            dies[value] = max(readers, default=t0)
    # Rule 7: a replayed random node's saved generator state, from its forward
    # step to its last replay; and the current state during each replay.
    replays = {n for n, blk in (s.value for s in steps) if blk is not None and nodes[n].random}
    state = profile.rng_state_bytes
    timeline = []
    for t, step in enumerate(steps):
        live = {p for v, ps in value_storages.items() if born[v] <= t <= dies[v] for p in ps}
        live |= {(s, t) for s in nodes[step.node].allocates}
        saved = sum(
            state for v in replays
            if born[(v, None)] <= t <= max(born[x] for x in born if x[0] == v and x[1] is not None)
        )  # fmt: skip
        current = state if step.block is not None and nodes[step.node].random else 0
        timeline.append(sum(nbytes[s] for s, _ in live) + nodes[step.node].temp_bytes + saved + current)
    return timeline


@given(profiles_and_plans())
def test_simulator_equals_brute_force(case):
    profile, recompute = case
    note(f"plan {sorted(recompute)}")
    sim = simulate(profile, recompute)
    expected = brute_force_timeline(profile, recompute)
    assert list(sim.timeline) == expected
    assert sim.peak_bytes == max(expected)
    assert sim.peak_step == expected.index(max(expected))
    assert sim.step_nodes[sim.peak_step][0] == sim.peak_node
    model = MemoryModel(profile)
    assert sim.recompute_time_s == pytest.approx(sum(model.block(a, recompute).time_s for a in recompute))
    assert sim.recompute_time_s >= 0


@given(profiles_and_plans())
def test_fast_path_equals_the_schedule_walk(case):
    """peak_bytes() (the empty plan's timeline plus the plan's changes) gives
    the full simulation's timeline, step for step."""
    profile, recompute = case
    fast = _delta(profile).timeline(recompute)
    assert fast.tolist() == list(simulate(profile, recompute).timeline)
    assert peak_bytes(profile, recompute) == simulate(profile, recompute).peak_bytes
    sim = simulate(profile, recompute)
    assert peak_location(profile, recompute) == (sim.peak_bytes, sim.peak_node, sim.peak_block, sim.peak_region)


@given(profiles())
def test_empty_plan_is_the_graph(profile):
    sim = simulate(profile, ())
    assert sim.recompute_time_s == 0
    assert [n for n, _ in sim.step_nodes] == [n.name for n in profile.nodes]
    assert all(block is None for _, block in sim.step_nodes)
    assert sim.peak_region == profile.node_by_name[sim.peak_node].region
    assert [e.kind for e in sim.events] == [EventKind.PEAK]


@given(profiles_and_plans())
def test_peak_live_storages_add_up(case):
    profile, recompute = case
    sim = simulate(profile, recompute)
    nbytes = {s.name: s.bytes for s in profile.storages}
    temp = profile.node_by_name[sim.peak_node].temp_bytes
    assert sum(nbytes[s] for s, _ in sim.peak_live) + temp + sim.peak_rng_state_bytes == sim.peak_bytes


# ---- hand-computed ------------------------------------------------------------------
# chain_profile(3): placeholders x (1000 B) and w0..w2 (100 B each); forward
# mm_i (1000 B, freed after relu_i reads it) and relu_i (1000 B, activations),
# loss (4 B, read by the output); backward grelu_i (1000 B), gw_i (100 B, read
# by the optimizer step), gx_i (1000 B); optimizer steps in place.
CHAIN3_NODES = (
    "x w0 w1 w2 mm0 relu0 mm1 relu1 mm2 relu2 loss grelu2 gw2 gx2 grelu1 gw1 gx1 grelu0 gw0 step0 step1 step2 output"
).split()
CHAIN3_EMPTY = [
    1000, 1100, 1200, 1300,  # placeholders
    2300,  # mm0
    3300,  # relu0 (mm0 dies after it: 2300)
    3300,  # mm1
    4300,  # relu1 (mm1 dies: 3300)
    4300,  # mm2
    5300,  # relu2 (mm2 dies: 4300)
    4304,  # loss
    5304,  # grelu2 (relu2 dies: 4304)
    4404,  # gw2 (+100)
    5404,  # gx2 (grelu2 dies: 4404)  <- peak
    5404,  # grelu1 (gx2 and relu1 die: 3404)
    3504,  # gw1
    4504,  # gx1 (grelu1 dies: 3504)
    4504,  # grelu0 (gx1 and relu0 die: 2504)
    2604,  # gw0 (grelu0 dies: 1604)
    1604, 1504, 1404,  # each step frees its gradient
    1304,  # output
]  # fmt: skip


def test_chain_without_recomputation():
    profile = chain_profile(3)
    sim = simulate(profile)
    assert [n for n, _ in sim.step_nodes] == CHAIN3_NODES
    assert list(sim.timeline) == CHAIN3_EMPTY
    assert (sim.peak_bytes, sim.peak_node, sim.peak_region) == (5404, "gx2", B)
    assert MemoryModel(profile).candidates == ("relu0", "relu1", "relu2")


def test_empty_plan_reproduces_a_given_timeline():
    """A profile carrying its measured timeline (here: the hand-computed one,
    as the profiler would record it) is reproduced by the empty plan."""
    import dataclasses

    profile = dataclasses.replace(chain_profile(3), timeline=tuple(CHAIN3_EMPTY), peak_bytes=max(CHAIN3_EMPTY))
    sim = simulate(profile, frozenset())
    assert sim.timeline == profile.timeline and sim.peak_bytes == profile.peak_bytes
    assert sim.recompute_time_s == 0 and not sim.schedule.blocks


def test_chain_recomputing_relu1():
    profile = chain_profile(3)
    sim = simulate(profile, {"relu1"})
    # relu1 dies after its last forward use (mm2); its block (mm1, relu1, from
    # the kept relu0 and w1) runs just before its first backward use, gw2.
    expected = [
        1000, 1100, 1200, 1300, 2300, 3300, 3300, 4300,
        4300,  # mm2: relu1 still read here, then freed (3300)
        4300,  # relu2 (mm2 dies: 3300)
        3304,  # loss
        4304,  # grelu2 (relu2 dies: 3304)
        4304,  # replayed mm1
        5304,  # replayed relu1 (mm1 copy dies: 4304)
        4404,  # gw2
        5404,  # gx2 <- peak, unchanged: the backward peak does not involve relu1's gap
        5404, 3504, 4504, 4504, 2604, 1604, 1504, 1404, 1304,
    ]  # fmt: skip
    assert list(sim.timeline) == expected
    assert sim.step_nodes[12:14] == (("mm1", "relu1"), ("relu1", "relu1"))
    assert sim.recompute_time_s == pytest.approx(1.5e-3)
    assert [str(e) for e in sim.events] == [
        "free relu1 after its last forward use (mm2)",
        "recompute block for relu1: 2 nodes, 1.5 ms, before gw2",
        "peak 5.28 KiB at gx2 (backward)",
    ]


def _backward_view_profile():
    """x -> a (big activation) -> s (forward-only) -> loss; backward reads a
    only through a view v made in the backward, which g then reads."""
    b = _Builder()
    b.node("x", "placeholder", F, storages=("x",), allocates=("x",))
    b.alloc("x", 10, "x")
    b.node("a", "f", F, inputs=("x",), storages=("a",), allocates=("a",), time_s=2e-3)
    b.alloc("a", 1000, "a")
    b.node("loss", "sum", F, inputs=("a",), storages=("loss",), allocates=("loss",))
    b.alloc("loss", 1, "loss")
    b.node("gl", "ones", B, inputs=("loss",), storages=("gl",), allocates=("gl",))
    b.alloc("gl", 100, "gl")
    b.node("v", "view", B, inputs=("a",), storages=("a",))
    b.node("big", "g", B, inputs=("gl",), storages=("big",), allocates=("big",))
    b.alloc("big", 5000, "big")
    b.node("g", "mul", B, inputs=("v", "big"), storages=("g",), allocates=("g",))
    b.alloc("g", 10, "g")
    b.node("output", "output", O, inputs=("loss", "g"))
    return b.profile()


def test_a_backward_view_keeps_the_rebuilt_copy_alive():
    profile = _backward_view_profile()
    sim = simulate(profile, {"a"})
    names = [f"{n}@{blk}" if blk else n for n, blk in sim.step_nodes]
    assert names == ["x", "a", "loss", "gl", "a@a", "v", "big", "g", "output"]
    # The forward copy of a dies after loss, its last forward use; the rebuilt
    # copy lives through big and g because the view v refers to it (were v to
    # keep the forward copy instead, step 4 would count both copies: 2111).
    assert list(sim.timeline) == [10, 1010, 1011, 111, 1111, 1111, 6111, 6021, 21]
    assert (sim.peak_node, sim.peak_region, sim.peak_block) == ("big", B, None)


def test_peak_inside_a_recompute_block():
    b = _Builder()
    b.node("x", "placeholder", F, storages=("x",), allocates=("x",))
    b.alloc("x", 10, "x")
    b.node("h", "f", F, inputs=("x",), storages=("h",), allocates=("h",), time_s=1e-3)  # forward-only, big
    b.alloc("h", 1000, "h")
    b.node("a", "g", F, inputs=("h",), storages=("a",), allocates=("a",), time_s=1e-3)
    b.alloc("a", 10, "a")
    b.node("gbig", "ones", B, inputs=("x",), storages=("gbig",), allocates=("gbig",))
    b.alloc("gbig", 500, "gbig")
    b.node("ga", "mul", B, inputs=("a", "gbig"), storages=("ga",), allocates=("ga",))
    b.alloc("ga", 10, "ga")
    b.node("output", "output", O, inputs=("ga",))
    profile = b.profile()
    sim = simulate(profile, {"a"})
    # The block for a replays h (1000 B) and a (10 B) while x and gbig (500 B)
    # are alive: 10 + 500 + 1000 + 10 during the replayed a.
    assert list(sim.timeline) == [10, 1010, 1020, 510, 1510, 1520, 530, 20]
    assert (sim.peak_bytes, sim.peak_node, sim.peak_block, sim.peak_region) == (1520, "a", "a", B)
    assert str(sim.events[-1]) == "peak 1.48 KiB at a in the recompute block for a (backward)"
    assert simulate(profile).peak_bytes == 1020  # recomputing made it worse here


def test_workspace_counts_only_during_its_node():
    b = _Builder()
    b.node("x", "placeholder", F, storages=("x",), allocates=("x",))
    b.alloc("x", 10, "x")
    b.node("y", "f", F, inputs=("x",), storages=("y",), allocates=("y",), temp_bytes=300)
    b.alloc("y", 20, "y")
    b.node("output", "output", O, inputs=("y",))
    assert simulate(b.profile()).timeline == (10, 330, 30)


def test_invalid_plans_are_refused():
    profile = chain_profile(2)
    with pytest.raises(InvalidPlan, match="not recomputable"):
        simulate(profile, {"mm0"})  # forward-only: not an activation
    with pytest.raises(TypeError, match="string"):
        simulate(profile, "relu0")
    other = chain_profile(3)
    foreign = assemble_plan(other, {"relu0"}, solver="x", status=PlanStatus.HEURISTIC, budget_bytes=10**9)
    with pytest.raises(ValueError, match="another profile"):
        simulate(profile, foreign)


def test_simulations_are_cached_per_profile_and_plan():
    profile = chain_profile(4)
    assert simulate(profile, {"relu1"}) is simulate(profile, ["relu1"])
    assert simulate(profile, {"relu1"}) is not simulate(chain_profile(4), {"relu1"})


# ---- stateful ------------------------------------------------------------------------
class PlanEditing(RuleBasedStateMachine):
    """Add and remove activations; the simulator must always agree with the brute force."""

    @initialize(profile=profiles(max_forward=8, max_backward=6))
    def setup(self, profile):
        self.profile = profile
        self.model = MemoryModel(profile)
        self.plan: set[str] = set()

    @precondition(lambda self: bool(self.model.candidates))
    @rule(data=st.data())
    def add(self, data):
        self.plan.add(data.draw(st.sampled_from(self.model.candidates)))

    @precondition(lambda self: bool(self.plan))
    @rule(data=st.data())
    def remove(self, data):
        self.plan.discard(data.draw(st.sampled_from(sorted(self.plan))))

    @rule()
    def clear(self):  # always applicable, also for profiles without candidates
        self.plan.clear()

    @invariant()
    def agrees_with_brute_force(self):
        sim = simulate(self.profile, self.plan)
        assert list(sim.timeline) == brute_force_timeline(self.profile, frozenset(self.plan))
        assert _delta(self.profile).timeline(frozenset(self.plan)).tolist() == list(sim.timeline)
        blocks = [self.model.block(a, frozenset(self.plan)) for a in self.plan]
        assert sim.recompute_time_s == pytest.approx(sum(b.time_s for b in blocks))
        assert {b.activation for b in sim.schedule.blocks} == self.plan


TestPlanEditing = PlanEditing.TestCase


def test_plans_strategy_only_draws_candidates():
    @given(st.data())
    def inner(data):
        profile = data.draw(profiles())
        recompute = data.draw(plans(profile))
        assert recompute <= set(MemoryModel(profile).candidates)

    inner()
