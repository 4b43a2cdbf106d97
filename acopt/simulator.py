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
from acopt.schedule import MemoryModel, Schedule
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
    runs before. ``peak_live`` names the storage instances alive at the peak.
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

    @property
    def peak_block(self) -> str | None:
        """The recompute block running at the peak, or ``None`` for an original node."""
        return self.step_nodes[self.peak_step][1]


# ---- per-profile cache --------------------------------------------------------
_NODE, _PLACEHOLDER, _OUTPUT = 0, 1, 2


class _Facts:
    """What the simulator and planners reuse across calls for one profile."""

    __slots__ = ("model", "sims", "pinned", "peaks", "fingerprint", "node_info", "storage_bytes", "__weakref__")

    def __init__(self, profile: Profile):
        self.model = MemoryModel(profile)
        self.sims: OrderedDict[frozenset[str], Simulation] = OrderedDict()  # recent plans (LRU)
        self.pinned: dict[frozenset[str], Simulation] = {}  # the empty plan, every candidate (the floor)
        self.peaks: OrderedDict[frozenset[str], int] = OrderedDict()  # peak_bytes() results (LRU)
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


def peak_bytes(profile: Profile, recompute: Any) -> int:
    """``simulate(profile, recompute).peak_bytes`` without the event log and the
    :class:`Simulation`: what a planner's search needs. Cached per profile."""
    recompute = as_recompute(recompute)
    facts = _facts(profile)
    hit = facts.pinned.get(recompute) or facts.sims.get(recompute)
    if hit is not None:
        return hit.peak_bytes
    peak = facts.peaks.get(recompute)
    if peak is None:
        timeline, _, _ = _measure(facts, facts.model.schedule(recompute))
        peak = max(timeline, default=0)
        facts.peaks[recompute] = peak
        if len(facts.peaks) > _PEAK_CACHE_SIZE:
            facts.peaks.popitem(last=False)
    else:
        facts.peaks.move_to_end(recompute)
    return peak


def _measure(facts: _Facts, schedule: Schedule) -> tuple[list[int], dict[StorageRef, int], dict[StorageRef, int]]:
    """The live-bytes timeline of ``schedule``, and each storage instance's first and last live step."""
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
    timeline = []
    live = 0
    for t in range(n_steps):
        live += delta[t]
        timeline.append(live + temp[t])
    return timeline, start, end


def _simulate(profile: Profile, facts: _Facts, recompute: frozenset[str]) -> Simulation:
    schedule = facts.model.schedule(recompute)
    steps = schedule.steps
    n_steps = len(steps)
    nodes = profile.node_by_name
    nbytes = facts.storage_bytes
    timeline, start, end = _measure(facts, schedule)

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

