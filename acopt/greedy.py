"""The default planner: mu-TWO's recompute greedy (docs/memory-model.md, "The greedy").

Repeatedly pick the candidate with the best ratio

    memory saved / recompute time = bytes(a) / block(a, R | {a}).time_s

add it to the plan R, and update the blocks it changes; stop as soon as the
simulated peak fits the budget. A candidate's block grows when an activation
among its sources is picked: the block then replays through the pick's own
block (the paper's Algorithm F for the remaining candidates, Algorithm E for
earlier picks, whose blocks grow the same way).

Notes referenced from the code:

Note G1 (incremental blocks). Each candidate keeps its block's members,
sources and time. An index maps every candidate storage to the candidates
whose blocks read it through a source. Picking ``p`` makes every node that
refers to ``p`` unavailable, so exactly the blocks in ``index[p]`` grow: a
depth-first walk from the sources that refer to ``p`` adds the newly needed
nodes. Blocks only ever grow, so each (block, node) pair is added once:
the whole order costs the sum of the final block sizes, not a rebuild of
every block per pick. The result equals ``MemoryModel.block(a, R | {a})``
(tests/test_greedy.py checks it).

Note G2 (order first, then the stop). The pick order does not depend on the
stop test, so it is computed in full first; the plan is then the shortest
prefix of the order whose simulated peak fits. ``search="bisect"`` finds it
with about 2 log2(k) simulations (galloping from k = 1 up to a fitting prefix,
then bisection between the last prefix that does not fit and the first that
does). It always returns a prefix that the simulator shows to fit; it is the
shortest such prefix when the peak does not rise along the order (usual, but
not guaranteed: a block can lengthen the lives of its sources).
``search="linear"`` simulates every prefix in turn, mu-TWO's own stop rule,
and always returns the shortest fitting prefix.

Note G3 (ties and free recomputes). Ratios are compared after rounding to 12
significant digits, so float noise in summed times does not decide ties;
ties go to the candidate created first. A block time below ``min_time_s``
counts as ``min_time_s``: free recomputes (views, zero-time nodes) rank first,
larger ones before smaller.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from typing import Literal

from acopt.planning import Plan, PlannerSpec, PlanStatus, SolverStats, assemble_plan, check_budget
from acopt.records import Profile
from acopt.schedule import MemoryModel
from acopt.simulator import memory_model, simulate


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GreedyOptions:
    """Options of the greedy planner.

    ``search``: how the stop is found (Note G2): ``"bisect"`` (fast) or
    ``"linear"`` (mu-TWO's stop rule, one simulation per pick).
    ``min_time_s``: the block time below which a recompute counts as free (Note G3).
    """

    search: Literal["bisect", "linear"] = "bisect"
    min_time_s: float = 1e-12

    def __post_init__(self) -> None:
        if self.search not in ("bisect", "linear"):
            raise ValueError(f"search must be 'bisect' or 'linear', not {self.search!r}")
        if not self.min_time_s > 0:
            raise ValueError(f"min_time_s must be positive, not {self.min_time_s!r}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PickOrder:
    """The greedy's full pick order, with what each pick cost when it was made."""

    order: tuple[str, ...]
    ratios: tuple[float, ...]  # bytes / block time at the pick
    block_times_s: tuple[float, ...]  # block(a, R | {a}).time_s at the pick
    total_times_s: tuple[float, ...]  # recompute time of the first k+1 picks (all their blocks)


class _Blocks:
    """Incrementally maintained recompute blocks of every candidate (Note G1)."""

    def __init__(self, profile: Profile, model: MemoryModel):
        nodes = profile.nodes
        self.inputs: dict[str, tuple[str, ...]] = {n.name: n.inputs for n in nodes}
        self.time: dict[str, float] = {n.name: n.time_s for n in nodes}
        placeholder_storages = model.placeholder_storages
        activations = model.activation_set
        self.candidates = model.candidates
        candidate_set = set(self.candidates)
        # A node is always available (placeholder, or refers only to placeholder
        # storages and activations that no plan may drop), always unavailable
        # (refers to a forward-only storage), or available unless one of its
        # candidate storages is recomputed.
        self.always: set[str] = set()
        self.never: set[str] = set()
        self.watch: dict[str, tuple[str, ...]] = {}
        for n in nodes:
            if n.is_placeholder:
                self.always.add(n.name)
                continue
            if any(s not in placeholder_storages and s not in activations for s in n.storages):
                self.never.add(n.name)
                continue
            cands = tuple(s for s in n.storages if s in candidate_set)
            if cands:
                self.watch[n.name] = cands
            else:
                self.always.add(n.name)
        self.aliases = model.aliases
        self.recomputed: set[str] = set()
        self.members: dict[str, set[str]] = {}
        self.sources: dict[str, set[str]] = {}
        self.block_time: dict[str, float] = {}
        self.readers: dict[str, set[str]] = {c: set() for c in self.candidates}  # storage -> candidates
        for c in self.candidates:
            outputs = model.block(c, frozenset({c})).outputs
            self.members[c] = set()
            self.sources[c] = set()
            self.block_time[c] = 0.0
            self._grow(c, outputs)

    def _available(self, node: str, owner: str) -> bool:
        if node in self.always:
            return True
        if node in self.never:
            return False
        recomputed = self.recomputed
        return not any(s == owner or s in recomputed for s in self.watch[node])

    def _grow(self, c: str, starts) -> float:
        """Add ``starts`` and the unavailable nodes they need to block ``c``; return the added time."""
        members, sources, inputs = self.members[c], self.sources[c], self.inputs
        added = 0.0
        stack = [v for v in starts if v not in members]
        while stack:
            v = stack.pop()
            if v in members:
                continue
            members.add(v)
            sources.discard(v)
            added += self.time[v]
            for i in inputs[v]:
                if i in members:
                    continue
                if self._available(i, c):
                    if i not in sources:
                        sources.add(i)
                        for s in self.watch.get(i, ()):
                            self.readers[s].add(c)
                else:
                    stack.append(i)
        self.block_time[c] += added
        return added

    def pick(self, p: str) -> tuple[list[str], float]:
        """Recompute ``p``; grow the blocks that read it. Returns the grown
        candidates and the time added to the blocks of earlier picks."""
        self.recomputed.add(p)
        grown, added_to_picks = [], 0.0
        aliases = self.aliases[p]
        for c in sorted(self.readers.pop(p, ())):
            if c == p:
                continue
            starts = [x for x in aliases if x in self.sources[c]]
            if not starts:
                continue  # stale index entry: that source became a member
            added = self._grow(c, starts)
            grown.append(c)
            if c in self.recomputed:
                added_to_picks += added
        return grown, added_to_picks


def pick_order(profile: Profile, *, min_time_s: float = 1e-12) -> PickOrder:
    """mu-TWO's pick order over all candidates (Notes G1, G3)."""
    model = memory_model(profile)
    blocks = _Blocks(profile, model)
    sizes = {s.name: s.bytes for s in profile.storages}
    rank = {c: i for i, c in enumerate(blocks.candidates)}

    def key(c: str) -> tuple[float, int]:
        ratio = sizes[c] / max(blocks.block_time[c], min_time_s)
        return (-float(f"{ratio:.12g}"), rank[c])

    heap = [(*key(c), c) for c in blocks.candidates]
    heapq.heapify(heap)
    order, ratios, block_times, totals = [], [], [], []
    total = 0.0
    picked: set[str] = set()
    while heap:
        neg_ratio, r, c = heapq.heappop(heap)
        if c in picked or (neg_ratio, r) != key(c):
            continue  # stale entry: its block grew since it was pushed
        picked.add(c)
        order.append(c)
        ratios.append(-neg_ratio)
        block_times.append(blocks.block_time[c])
        grown, added_to_picks = blocks.pick(c)
        total += blocks.block_time[c] + added_to_picks
        totals.append(total)
        for g in grown:
            if g not in picked:
                heapq.heappush(heap, (*key(g), g))
    return PickOrder(
        order=tuple(order), ratios=tuple(ratios), block_times_s=tuple(block_times), total_times_s=tuple(totals)
    )


def shortest_fitting_prefix(
    profile: Profile, order: tuple[str, ...], budget_bytes: int, *, search: str = "bisect"
) -> tuple[int, int]:
    """``(k, simulations)``: the length of the shortest prefix of ``order`` that
    fits (Note G2), and how many simulations finding it took."""
    known: dict[int, bool] = {}

    def fits(k: int) -> bool:
        if k not in known:
            known[k] = simulate(profile, order[:k]).peak_bytes <= budget_bytes
        return known[k]

    n = len(order)
    if fits(0):
        return 0, len(known)
    if search == "linear":
        k = next((k for k in range(1, n + 1) if fits(k)), None)
    else:
        hi = 1
        while hi < n and not fits(hi):  # gallop: 1, 2, 4, ... n
            hi = min(2 * hi, n)
        k = hi if hi <= n and fits(hi) else None
        if k is not None:
            lo = max(j for j, ok in known.items() if not ok and j < hi)
            while hi - lo > 1:  # bisect: lo does not fit, hi fits
                mid = (lo + hi) // 2
                if fits(mid):
                    hi = mid
                else:
                    lo = mid
            k = hi
    if k is None:
        raise ValueError(f"no prefix of the pick order fits {budget_bytes} bytes (is the budget below the floor?)")
    return k, len(known)


def greedy(*, profile: Profile, budget_bytes: int, options: GreedyOptions) -> Plan:
    """The greedy planner (registered as ``"greedy"``)."""
    started = time.perf_counter()
    check_budget(profile, budget_bytes)
    t0 = time.perf_counter()
    picks = pick_order(profile, min_time_s=options.min_time_s)
    t_order = time.perf_counter() - t0
    k, sims = shortest_fitting_prefix(profile, picks.order, budget_bytes, search=options.search)
    n = len(picks.order)
    return assemble_plan(
        profile,
        picks.order[:k],
        solver="greedy",
        status=PlanStatus.HEURISTIC,
        budget_bytes=budget_bytes,
        started=started,
        options=options,
        stats=SolverStats(
            objective=picks.total_times_s[k - 1] if k else 0.0,
            iterations=sims,
            notes=(
                f"ordered {n} candidates in {t_order:.3f} s",
                f"{options.search} search: prefix {k} of {n} fits after {sims} simulations",
            ),
        ),
    )


SPEC = PlannerSpec(
    name="greedy",
    planner=greedy,
    options_type=GreedyOptions,
    exact=False,
    requires=(),
    description="mu-TWO recompute greedy: best memory saved per recompute second first",
)
