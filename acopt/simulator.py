"""The simulator: the one source of truth for a plan's memory and recompute time.

``simulate(profile, plan)`` runs :meth:`MemoryModel.schedule` (the node order
the rewriter emits) through the storage accounting of docs/memory-model.md and
returns a :class:`Simulation`: the live bytes during every step, the peak and
where it sits, the recompute time, and a labelled event log.

>>> sim = simulate(profile, {"relu_1"})        # doctest: +SKIP
>>> sim.peak_bytes, sim.peak_node, sim.peak_region.value   # doctest: +SKIP
(3276800, 'addmm_2', 'backward')
>>> print(*sim.events, sep="\\n")              # doctest: +SKIP
free relu_1 after its last forward use (addmm_1)
recompute block for relu_1: 2 nodes, 0.80 ms, before threshold_backward
peak 3.12 MiB at addmm_2 (backward)

Counting rules (docs/memory-model.md, "How the simulator counts"):

* A *value instance* is ``(node, block)``; a *storage instance* is
  ``(storage, block)``. ``block`` is ``None`` for the original graph, or the
  activation whose recompute block replays the node.
* A storage instance is created at the step whose node lists the storage in
  ``allocates`` (a replayed node allocates fresh instances in its block). A
  value instance refers to the instances its step allocates and, for each
  other storage of its node, to the instance of that storage that a value it
  reads refers to: aliasing flows through the data, so a backward view of a
  rebuilt activation refers to the rebuilt copy.
* A value instance lives from its step to the last step that reads it (its
  own step if none does); placeholders and values read by the output node
  live to the last step.
* A storage instance lives from its creating step to the last step at which a
  value instance referring to it lives. Live bytes at step ``t`` = bytes of the
  storage instances alive at ``t`` + the node's ``temp_bytes``.

Cost: O(steps + reads + storage references) with dicts and lists; the
:class:`MemoryModel` of a profile is built once and cached (:func:`memory_model`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from acopt.records import Profile, Region
from acopt.schedule import Block, MemoryModel, Schedule
from acopt.units import format_bytes

ValueRef = tuple[str, str | None]
StorageRef = tuple[str, str | None]


class EventKind(str, enum.Enum):
    """What an :class:`Event` records."""

    FREE = "free"  # a recomputed activation's forward copy is freed
    RECOMPUTE = "recompute"  # a recompute block starts
    PEAK = "peak"  # the step where live bytes peak


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One labelled entry of a simulation's event log (``str(event)`` is the label)."""

    step: int
    kind: EventKind
    node: str
    block: str | None = None
    bytes: int = 0
    time_s: float = 0.0
    message: str

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Simulation:
    """A plan's schedule with its exact live-bytes timeline (memory model, rule 5).

    ``timeline[t]`` is the live bytes during step ``t`` of ``schedule.steps``
    (whose node and block are ``step_nodes[t]``). ``peak_step`` is the first
    step where the timeline reaches ``peak_bytes``; ``peak_region`` is that
    node's region, or for a replayed node the region of the node its block
    runs before. ``peak_live`` names the storage instances alive at the peak;
    ``peak_rng_state_bytes`` the generator states then held (rule 7).
    """

    recompute: frozenset[str]
    peak_bytes: int
    peak_step: int
    peak_node: str
    peak_region: Region
    timeline: tuple[int, ...]
    step_nodes: tuple[ValueRef, ...]
    recompute_time_s: float
    schedule: Schedule
    peak_live: tuple[StorageRef, ...]
    events: tuple[Event, ...]
    peak_rng_state_bytes: int = 0

    @property
    def peak_block(self) -> str | None:
        """The recompute block running at the peak, or ``None`` for an original node."""
        return self.step_nodes[self.peak_step][1]


# ---- per-profile cache --------------------------------------------------------
_NODE, _PLACEHOLDER, _OUTPUT = 0, 1, 2


class _Facts:
    """What the simulator and planners reuse across calls for one profile."""

    __slots__ = (
        "model", "sims", "pinned", "peaks", "located", "fingerprint", "node_info", "storage_bytes", "random",
        "rng_bytes", "delta",
        "__weakref__",
    )  # fmt: skip

    def __init__(self, profile: Profile):
        self.model = MemoryModel(profile)
        self.sims: OrderedDict[frozenset[str], Simulation] = OrderedDict()  # recent plans (LRU)
        self.pinned: dict[frozenset[str], Simulation] = {}  # the empty plan, every candidate (the floor)
        self.peaks: OrderedDict[frozenset[str], int] = OrderedDict()  # peak_bytes() results (LRU)
        self.located: dict[frozenset[str], tuple[int, str, str | None, Region]] = {}  # pinned plans' peaks
        self.fingerprint: str | None = None
        # node -> (allocates, storages, temp_bytes, kind, storages == allocates)
        self.node_info = {
            n.name: (
                n.allocates, n.storages, n.temp_bytes,
                _PLACEHOLDER if n.is_placeholder else _OUTPUT if n.is_output else _NODE,
                n.storages == n.allocates,
            )
            for n in profile.nodes
        }  # fmt: skip
        self.storage_bytes = {s.name: s.bytes for s in profile.storages}
        # Rule 7: random nodes, whose replays keep generator states of this size.
        self.random = frozenset(n.name for n in profile.nodes if n.random) if profile.rng_state_bytes else frozenset()
        self.rng_bytes = profile.rng_state_bytes
        self.delta: _Delta | None = None  # the fast path, built on first use


_FACTS: dict[int, tuple[weakref.ref, _Facts]] = {}
_SIM_CACHE_SIZE = 8
_PEAK_CACHE_SIZE = 256


def _facts(profile: Profile) -> _Facts:
    key = id(profile)
    hit = _FACTS.get(key)
    if hit is not None and hit[0]() is profile:
        return hit[1]
    facts = _Facts(profile)
    _FACTS[key] = (weakref.ref(profile, functools.partial(_forget, _FACTS, key)), facts)
    return facts


def _forget(table: dict, key: int, ref: weakref.ref) -> None:
    entry = table.get(key)
    if entry is not None and entry[0] is ref:
        del table[key]


def memory_model(profile: Profile) -> MemoryModel:
    """The profile's :class:`MemoryModel`, built once per profile object and cached
    (its candidates and aliases are costly on big graphs)."""
    return _facts(profile).model


def as_recompute(plan_or_recompute: Any) -> frozenset[str]:
    """The activation names of a :class:`~acopt.planning.Plan` or of an iterable of names."""
    names = getattr(plan_or_recompute, "recompute", plan_or_recompute)
    if isinstance(names, str):
        raise TypeError(f"expected a Plan or a collection of activation names, not the string {names!r}")
    if names is None:
        return frozenset()
    return frozenset(names)


# ---- simulation -----------------------------------------------------------------
def simulate(profile: Profile, plan_or_recompute: Any = ()) -> Simulation:
    """Simulate ``plan_or_recompute`` (a Plan, or activation names) on ``profile``.

    Raises :class:`~acopt.schedule.InvalidPlan` if the plan names something that
    is not a recomputable activation, and ``ValueError`` if a Plan was made for
    another profile (its ``profile_id`` differs).
    """
    recompute = as_recompute(plan_or_recompute)
    facts = _facts(profile)
    profile_id = getattr(plan_or_recompute, "profile_id", None)
    if profile_id:
        from acopt.planning import profile_fingerprint

        if profile_id != profile_fingerprint(profile):
            raise ValueError(
                f"this plan was made for another profile (profile_id {profile_id!r}, "
                f"this profile's is {profile_fingerprint(profile)!r})"
            )
    hit = facts.pinned.get(recompute) or facts.sims.get(recompute)
    if hit is not None:
        if recompute in facts.sims:
            facts.sims.move_to_end(recompute)
        return hit
    sim = _simulate(profile, facts, recompute)
    if not recompute or recompute == frozenset(facts.model.candidates):
        facts.pinned[recompute] = sim  # needed by every plan() call: never evicted
    else:
        facts.sims[recompute] = sim
        if len(facts.sims) > _SIM_CACHE_SIZE:
            facts.sims.popitem(last=False)
    return sim


def peak_bytes(profile: Profile, recompute: Any, *, blocks: Iterable[Block] | None = None) -> int:
    """``simulate(profile, recompute).peak_bytes``, fast: no schedule, no event log.

    Computed by the fast path (:class:`_Delta`): the empty plan's timeline plus
    what the plan changes, so its cost grows with the plan's blocks rather than
    the graph. What a planner's search needs. Cached per profile. A planner
    that maintains the plan's blocks (``MemoryModel.block(a, recompute)`` for
    each ``a``) may pass them.
    """
    recompute = as_recompute(recompute)
    facts = _facts(profile)
    hit = facts.pinned.get(recompute) or facts.sims.get(recompute)
    if hit is not None:
        return hit.peak_bytes
    if recompute in facts.located or _pinned(facts, recompute):
        return peak_location(profile, recompute)[0]
    peak = facts.peaks.get(recompute)
    if peak is None:
        timeline = _delta(profile).timeline(recompute, blocks)
        peak = int(timeline.max()) if len(timeline) else 0
        facts.peaks[recompute] = peak
        if len(facts.peaks) > _PEAK_CACHE_SIZE:
            facts.peaks.popitem(last=False)
    else:
        facts.peaks.move_to_end(recompute)
    return peak


def peak_location(profile: Profile, recompute: Any) -> tuple[int, str, str | None, Region]:
    """``(peak_bytes, peak_node, peak_block, peak_region)`` of a plan, as
    :func:`simulate` gives them, by the fast path. Cached for the empty plan
    and the every-candidate plan (the floor's), which every ``plan()`` needs."""
    recompute = as_recompute(recompute)
    facts = _facts(profile)
    hit = facts.located.get(recompute)
    if hit is not None:
        return hit
    delta = _delta(profile)
    timeline = delta.timeline(recompute)
    step = int(timeline.argmax()) if len(timeline) else 0
    found = (int(timeline[step]) if len(timeline) else 0, *delta.locate(step))
    if _pinned(facts, recompute):
        facts.located[recompute] = found
    return found


def _pinned(facts: _Facts, recompute: frozenset[str]) -> bool:
    return not recompute or recompute == frozenset(facts.model.candidates)


def _measure(facts: _Facts, schedule: Schedule) -> tuple[list[int], dict[StorageRef, int], dict[StorageRef, int], list[int]]:
    """The live-bytes timeline of ``schedule``, each storage instance's first and
    last live step, and the generator-state bytes per step (rule 7)."""
    steps = schedule.steps
    n_steps = len(steps)
    end_step = n_steps - 1
    info = facts.node_info
    nbytes = facts.storage_bytes

    # Value instances: the last step that reads each one (values read by the
    # output live to the end).
    last_read: dict[ValueRef, int] = {}
    for t, step in enumerate(steps):
        if step.reads:
            last_read.update(dict.fromkeys(step.reads, end_step if info[step.node][3] == _OUTPUT else t))

    # Storage instances: created at their allocating step, alive while a value
    # instance referring to them is. Aliasing flows through reads: a value
    # refers to what it allocates, and for its other storages to the instance
    # that a value it reads refers to (a view of a rebuilt activation refers to
    # the rebuilt copy, whatever block it is in).
    start: dict[StorageRef, int] = {}
    end: dict[StorageRef, int] = {}
    refs: dict[ValueRef, list[StorageRef]] = {}
    temp = [0] * n_steps
    for t, step in enumerate(steps):
        block = step.block
        allocates, storages, temp_bytes, kind, only_allocates = info[step.node]
        if temp_bytes:
            temp[t] = temp_bytes
        for s in allocates:
            inst = (s, block)
            start[inst] = t
            end[inst] = t
        if not storages:
            continue
        if only_allocates:
            insts = [(s, block) for s in storages]
        else:
            insts = [(s, block) if s in allocates else _inherited(s, step, refs, start) for s in storages]
        value = (step.node, block)
        refs[value] = insts
        value_end = end_step if kind == _PLACEHOLDER else last_read.get(value, t)
        for inst in insts:
            if end[inst] < value_end:
                end[inst] = value_end

    delta = [0] * (n_steps + 1)
    for inst, t0 in start.items():
        b = nbytes[inst[0]]
        delta[t0] += b
        delta[end[inst] + 1] -= b
    states = [0] * n_steps  # rule 7
    if facts.random and schedule.blocks:
        # Rule 7: a replayed random node's generator state lives from its forward
        # run to its last replay; each replay also holds the current state.
        forward_step: dict[str, int] = {}
        last_replay: dict[str, int] = {}
        for t, step in enumerate(steps):
            if step.node in facts.random:
                if step.block is None:
                    forward_step[step.node] = t
                else:
                    last_replay[step.node] = t
                    states[t] += facts.rng_bytes
        for v, t1 in last_replay.items():
            for t in range(forward_step[v], t1 + 1):
                states[t] += facts.rng_bytes
    timeline = []
    live = 0
    for t in range(n_steps):
        live += delta[t]
        timeline.append(live + temp[t] + states[t])
    return timeline, start, end, states


def _simulate(profile: Profile, facts: _Facts, recompute: frozenset[str]) -> Simulation:
    schedule = facts.model.schedule(recompute)
    steps = schedule.steps
    n_steps = len(steps)
    nodes = profile.node_by_name
    nbytes = facts.storage_bytes
    timeline, start, end, states = _measure(facts, schedule)

    if n_steps:
        peak = max(timeline)
        peak_step = timeline.index(peak)
    else:
        peak, peak_step = 0, 0
    blocks = {b.activation: b for b in schedule.blocks}
    if n_steps:
        peak_node, peak_block = steps[peak_step].node, steps[peak_step].block
        if peak_block is None:
            peak_region = nodes[peak_node].region
        else:
            peak_region = profile.nodes[blocks[peak_block].position].region
    else:
        peak_node, peak_block, peak_region = "", None, Region.FORWARD
    peak_live = tuple(
        sorted((inst for inst, t0 in start.items() if t0 <= peak_step <= end[inst]), key=_ref_key)
    )
    events = _events(
        profile, steps, blocks, end, recompute, peak, peak_step, peak_node, peak_block, peak_region, nbytes
    )
    return Simulation(
        recompute=recompute,
        peak_bytes=peak,
        peak_step=peak_step,
        peak_node=peak_node,
        peak_region=peak_region,
        timeline=tuple(timeline),
        step_nodes=tuple((s.node, s.block) for s in steps),
        recompute_time_s=schedule.recompute_time_s,
        schedule=schedule,
        peak_live=peak_live,
        events=events,
        peak_rng_state_bytes=states[peak_step] if n_steps else 0,
    )


def _inherited(storage: str, step, refs, start) -> StorageRef:
    """The instance of ``storage`` that ``step`` refers to without allocating it:
    the one a value it reads refers to (first in input order), else (a tied
    placeholder, which reads nothing) the block's or the original instance."""
    for r in step.reads:
        for inst in refs.get(r, ()):
            if inst[0] == storage:
                return inst
    for inst in ((storage, step.block), (storage, None)):
        if inst in start:
            return inst
    raise ValueError(f"node {step.node!r} refers to storage {storage!r}, which it neither allocates nor reads")


def _ref_key(ref: StorageRef) -> tuple[str, str]:
    return (ref[0], ref[1] or "")


def _events(
    profile, steps, blocks, end, recompute, peak, peak_step, peak_node, peak_block, peak_region, nbytes
) -> tuple[Event, ...]:
    events: list[Event] = []
    for a in recompute:
        t = end[(a, None)]
        events.append(
            Event(
                step=t, kind=EventKind.FREE, node=steps[t].node, bytes=nbytes[a],
                message=f"free {a} after its last forward use ({steps[t].node})",
            )
        )  # fmt: skip
    first_step: dict[str, int] = {}
    for t, step in enumerate(steps):
        if step.block is not None and step.block not in first_step:
            first_step[step.block] = t
    for a, b in blocks.items():
        t = first_step[a]
        before = profile.nodes[b.position].name
        events.append(
            Event(
                step=t, kind=EventKind.RECOMPUTE, node=steps[t].node, block=a, time_s=b.time_s,
                message=(
                    f"recompute block for {a}: {len(b.nodes)} node{'s' if len(b.nodes) != 1 else ''}, "
                    f"{b.time_s * 1e3:.3g} ms, before {before}"
                ),
            )
        )  # fmt: skip
    where = f"{peak_node} in the recompute block for {peak_block}" if peak_block else peak_node
    events.append(
        Event(
            step=peak_step, kind=EventKind.PEAK, node=peak_node, block=peak_block, bytes=peak,
            message=f"peak {format_bytes(peak)} at {where} ({peak_region.value})",
        )
    )  # fmt: skip
    order = {EventKind.FREE: 0, EventKind.RECOMPUTE: 1, EventKind.PEAK: 2}
    events.sort(key=lambda e: (e.step, order[e.kind], e.block or "", e.message))
    return tuple(events)



# ---- the fast path: the same timeline, from the empty plan's plus what a plan changes ----
class _Delta:
    """Exact timelines of plans, computed as the empty plan's plus the changes.

    See docs/memory-model.md, "The fast path". A plan changes the storage
    instances of few values only: the forward aliases of recomputed
    activations (they lose their backward reads), the sources of blocks (they
    gain reads), the replayed values, and backward aliases that now inherit a
    rebuilt copy. Every other storage keeps its empty-plan interval, whose
    bytes are precomputed per step (``base``) and per gap between steps
    (``cross``: what a block inserted in that gap sees). So a plan costs
    O(its blocks + the aliases it touches) in Python and O(steps) in numpy,
    instead of O(steps) in Python. The blocks and the ``rebuilt`` rule mirror
    :meth:`MemoryModel.schedule`; tests/test_simulator.py checks that this
    path and :func:`simulate` agree step for step.
    """

    def __init__(self, profile: Profile, facts: _Facts):
        import numpy as np

        self.np = np
        model = facts.model
        self.model = model
        nodes = profile.nodes
        n = len(nodes)
        self.n = n
        self.index = index = profile.node_index
        self.node = profile.node_by_name
        self.forward = {v.name for v in nodes if v.region == Region.FORWARD}
        self.bytes = facts.storage_bytes
        self.creator_index = {s.name: index[s.node] for s in profile.storages}
        users = profile.users
        self.later_users = {
            v: tuple(u for u in users[v] if u not in self.forward) for v in self.forward
        }  # forward value -> its readers outside the forward region
        self.fw_last = {
            v: max((index[u] for u in users[v] if u in self.forward), default=index[v]) for v in self.forward
        }
        # Empty-plan value ends (original step indices), as _measure counts them.
        last = n - 1
        end0 = {}
        for v in nodes:
            if not v.storages:
                continue
            if v.is_placeholder or any(self.node[u].is_output for u in users[v.name]):
                end0[v.name] = last
            else:
                end0[v.name] = max((index[u] for u in users[v.name]), default=index[v.name])
        self.end0 = end0
        self.aliases = model.aliases
        storage_end = {}
        for s, refs in self.aliases.items():
            storage_end[s] = max([self.creator_index[s], *(end0[v] for v in refs)])
        self.storage_end = storage_end
        base = np.zeros(n + 1, dtype=np.int64)
        cross = np.zeros(n + 2, dtype=np.int64)
        for s, e in storage_end.items():
            c, b = self.creator_index[s], self.bytes[s]
            base[c] += b
            base[e + 1] -= b
            cross[c + 1] += b  # alive in the gaps before c+1 .. e
            cross[e + 1] -= b
        self.base = np.cumsum(base)[:n]
        self.cross = np.cumsum(cross)[: n + 1]
        self.temp = np.array([v.temp_bytes for v in nodes], dtype=np.int64)
        self.fixed = model.placeholder_storages | model.output_storages  # live to the end in every plan
        # Backward values that refer to a storage they do not allocate inherit
        # it from what they read: the readers that may inherit a rebuilt copy.
        self.alias_readers = {
            v.name: tuple(u for u in users[v.name] if u not in self.forward and self._aliasing(u))
            for v in nodes
        }
        self.info = {
            v.name: (v.inputs, v.storages, v.allocates, v.storages == v.allocates, v.temp_bytes) for v in nodes
        }
        # Availability classes for walking blocks (as MemoryModel.available): always
        # available, never (refers to a forward-only storage), or unless one of
        # the activations it refers to is recomputed.
        activations = model.activation_set
        self.never = {
            v.name for v in nodes
            if not v.is_placeholder and any(s not in model.placeholder_storages and s not in activations for s in v.storages)
        }  # fmt: skip
        self.watch = {
            v.name: tuple(s for s in v.storages if s in activations) for v in nodes if not v.is_placeholder
        }
        self.outputs: dict[str, list[str]] = {}
        self.random, self.rng_bytes = facts.random, facts.rng_bytes

    def _block(self, a: str, recompute: frozenset[str]) -> tuple[int, tuple[str, ...]]:
        """``(position, nodes)`` of ``MemoryModel.block(a, recompute)``, walked
        with precomputed availability (tests check they agree)."""
        outputs = self.outputs.get(a)
        later = self.model.later_users
        if outputs is None:
            outputs = self.outputs[a] = [v for v in self.aliases[a] if later.get(v)]
        position = min(self.index[u] for v in outputs for u in later[v])
        info, never, watch = self.info, self.never, self.watch
        members: set[str] = set()
        stack = list(outputs)
        while stack:
            v = stack.pop()
            if v in members:
                continue
            members.add(v)
            for i in info[v][0]:
                if i in members:
                    continue
                if i in never or any(s in recompute for s in watch.get(i, ())):
                    stack.append(i)
        return position, tuple(sorted(members, key=self.index.__getitem__))

    def _aliasing(self, name: str) -> bool:
        v = self.node[name]
        return bool(v.storages) and not set(v.storages) <= set(v.allocates) and not v.is_output

    def timeline(self, recompute: frozenset[str], blocks: Iterable[Block] | None = None):
        """The plan's timeline (numpy int64, one entry per schedule step).

        ``blocks``, if given, must be ``MemoryModel.block(a, recompute)`` for
        every ``a`` in ``recompute`` (a planner that maintains them saves the
        walk); only their ``activation``, ``position`` and ``nodes`` are used.
        """
        np = self.np
        model, index, node, forward = self.model, self.index, self.node, self.forward
        n = self.n
        key = lambda b: (b.position, self.creator_index[b.activation], b.activation)  # noqa: E731
        if blocks is None:
            blocks = [_Walked(a, *self._block(a, recompute)) for a in model.check_plan(recompute)]
        blocks = sorted(blocks, key=key)
        for b in blocks:  # as MemoryModel.schedule
            model.check_replayable(b.activation, b.nodes)
        rebuilt: dict[str, str] = {}
        for b in blocks:
            for v in self.aliases[b.activation]:
                if v in forward:
                    rebuilt[v] = b.activation

        # Global step index of each original node and each replayed value.
        inserted = np.zeros(n + 1, dtype=np.int64)
        for b in blocks:
            inserted[b.position] += len(b.nodes)
        g = (np.arange(n, dtype=np.int64) + np.cumsum(inserted)[:n]).tolist()
        size = n + int(inserted.sum())
        end_step = size - 1

        def g_end(i: int) -> int:  # original index -> global, the last index meaning the end
            return end_step if i == n - 1 else g[i]

        # Replayed values: their steps, the last step reading each, what they refer to.
        block_steps: list[int] = []
        block_pos: list[int] = []
        block_temp: list[int] = []
        firsts: list[int] = []
        pending_at: dict[int, int] = {}
        ends: dict[tuple[str, str | None], int] = {}
        refs: dict[tuple[str, str | None], list[tuple[str, str | None]]] = {}
        created: dict[tuple[str, str], int] = {}
        source_end: dict[str, int] = {}
        last_replay: dict[str, int] = {}  # rule 7: random node -> its last replay step
        info, later_users, random = self.info, self.later_users, self.random
        for b in blocks:
            a, position, members_seq = b.activation, b.position, b.nodes
            first = g[position] - int(inserted[position]) + pending_at.get(position, 0)
            pending_at[position] = pending_at.get(position, 0) + len(members_seq)
            firsts.append(first)
            members = set(members_seq)
            last_in: dict[str, int] = {}
            for t, v in enumerate(members_seq, first):
                inputs, storages, allocates, only_allocates, temp_bytes = info[v]
                block_steps.append(t)
                block_pos.append(position)
                if v in random:
                    temp_bytes += self.rng_bytes
                    last_replay[v] = max(t, last_replay.get(v, t))
                block_temp.append(temp_bytes)
                for x in inputs:
                    if x in members:
                        last_in[x] = t  # steps increase: the last assignment is the last read
                    elif source_end.get(x, -1) < t:
                        source_end[x] = t
                if not storages:
                    continue
                value = (v, a)
                if only_allocates:
                    mine = [(s, a) for s in storages]
                    for inst in mine:
                        created[inst] = t
                else:
                    reads = [(x, a) if x in members else (x, None) for x in inputs]
                    mine = []
                    for s in storages:
                        if s in allocates:
                            created[(s, a)] = t
                            mine.append((s, a))
                        else:
                            mine.append(self._inherit(s, reads, refs, created, a))
                refs[value] = mine
                ends[value] = t
            for v in members_seq:
                value = (v, a)
                if value not in ends:
                    continue
                e = max(ends[value], last_in.get(v, -1))
                if rebuilt.get(v) == a:
                    for u in later_users[v]:
                        e = max(e, end_step if node[u].is_output else g[index[u]])
                ends[value] = e
        self.last_steps = (g, firsts, blocks)

        # Backward aliases that inherit from rebuilt values (directly or through other such aliases).
        inheriting: set[str] = set()
        stack = [u for x in rebuilt for u in self.alias_readers[x]]
        while stack:
            u = stack.pop()
            if u not in inheriting:
                inheriting.add(u)
                stack.extend(self.alias_readers[u])
        for y in sorted(inheriting, key=index.__getitem__):
            rec = node[y]
            reads = [(x, rebuilt.get(x)) if x in forward else (x, None) for x in rec.inputs]
            refs[(y, None)] = [(s, None) if s in rec.allocates else self._inherit(s, reads, refs, created, None)
                               for s in rec.storages]  # fmt: skip

        # Original storages whose interval changes.
        touched: set[str] = set()
        for x in rebuilt:
            touched.update(node[x].storages)
        for x in source_end:
            touched.update(node[x].storages)
        for value, rs in refs.items():
            touched.update(s for s, blk in rs)
        touched -= self.fixed
        delta = np.zeros(size + 1, dtype=np.int64)
        base_fix = np.zeros(n + 1, dtype=np.int64)
        cross_fix = np.zeros(n + 2, dtype=np.int64)
        instance_end: dict[tuple[str, str | None], int] = {}
        for (v, blk), rs in refs.items():
            e = ends[(v, blk)] if blk is not None else g_end(self.end0[v])
            for inst in rs:
                if instance_end.get(inst, -1) < e:
                    instance_end[inst] = e
        for s in touched:
            c, b, e0 = self.creator_index[s], self.bytes[s], self.storage_end[s]
            base_fix[c] -= b
            base_fix[e0 + 1] += b
            cross_fix[c + 1] -= b
            cross_fix[e0 + 1] += b
            end = max(g[c], instance_end.get((s, None), -1))
            for v in self.aliases[s]:
                if v in forward or node[v].is_placeholder:
                    if v in rebuilt:
                        e = g[self.fw_last[v]]
                    else:
                        e = g_end(self.end0[v])
                        if v in source_end:
                            e = max(e, source_end[v])
                elif v in inheriting:
                    continue  # counted through instance_end, to whichever copy it refers
                else:
                    e = g_end(self.end0[v])
                if e > end:
                    end = e
            delta[g[c]] += b
            delta[end + 1] -= b
        for inst, t0 in created.items():
            b = self.bytes[inst[0]]
            delta[t0] += b
            delta[max(t0, instance_end.get(inst, t0)) + 1] -= b
        for v, t1 in last_replay.items():
            delta[g[index[v]]] += self.rng_bytes
            delta[t1 + 1] -= self.rng_bytes

        out = np.empty(size, dtype=np.int64)
        out[g] = self.base + np.cumsum(base_fix)[:n] + self.temp
        if block_steps:
            cross = self.cross + np.cumsum(cross_fix)[: n + 1]
            out[block_steps] = cross[block_pos] + np.asarray(block_temp, dtype=np.int64)
        out += np.cumsum(delta)[:size]
        return out

    def locate(self, step: int) -> tuple[str, str | None, Region]:
        """Node, block and region (as in :class:`Simulation`) of a global step of
        the plan last passed to :meth:`timeline`."""
        import bisect

        g, firsts, blocks = self.last_steps
        i = bisect.bisect_left(g, step)
        if i < len(g) and g[i] == step:
            name = self.model.profile.nodes[i].name
            return name, None, self.node[name].region
        for first, b in zip(firsts, blocks):
            if first <= step < first + len(b.nodes):
                return b.nodes[step - first], b.activation, self.model.profile.nodes[b.position].region
        raise AssertionError(f"step {step} is in no block")  # pragma: no cover

    def _inherit(self, s, reads, refs, created, block):
        for r in reads:
            for inst in refs.get(r, ((t, None) for t in self.node[r[0]].storages) if r[1] is None else ()):
                if inst[0] == s:
                    return inst
        if block is not None and (s, block) in created:
            return (s, block)
        return (s, None)


@dataclasses.dataclass(frozen=True, slots=True)
class _Walked:
    """A block as the fast path needs it."""

    activation: str
    position: int
    nodes: tuple[str, ...]


def _delta(profile: Profile) -> _Delta:
    facts = _facts(profile)
    if facts.delta is None:
        facts.delta = _Delta(profile, facts)
    return facts.delta
