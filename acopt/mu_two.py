"""The reference heuristic: mu-TWO's recompute greedy, registered as ``"mu-two"``
(docs/memory-model.md, "The mu-TWO greedy"). It was acopt's default planner
until the peak-aware greedy (acopt/greedy.py) replaced it; it is kept unchanged
as the baseline that the default is compared with.

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

Note G2 (order, then the stop). The pick order does not depend on the stop
test, so the plan is the shortest prefix of the order whose simulated peak
fits. The order is built lazily, only as far as the search looks.
``search="bisect"`` finds the prefix with about 2 log2(k) simulations:
galloping (k = 1, 2, 4, ..., each step at most doubling the schedule's
length) up to a fitting prefix, then bisection between the last prefix that
does not fit and the first that does. The simulations use the simulator's
fast path (``peak_bytes``), handed the prefix's blocks from the growth
history (a block's nodes under the first k picks are those added before pick
k + 1). It always returns a prefix that the simulator shows to fit; it is the
shortest such prefix when the peak does not rise along the order (usual, but
not guaranteed: a block can lengthen the lives of its sources).
``search="linear"`` simulates every prefix in turn, mu-TWO's own stop rule,
and always returns the shortest fitting prefix.

Note G3 (ties and free recomputes). Ratios are compared after rounding to 12
significant digits, so float noise in summed times does not decide ties;
ties go to the candidate created first. A block time below ``min_time_s``
counts as ``min_time_s``: free recomputes (views, zero-time nodes) rank first,
larger ones before smaller.

Note G4 (chains that cannot be replayed). A block may grow, through other
picks, to a node that no block may replay (``MemoryModel.replayable``: a
side effect, or a value written in place later); such a plan is invalid. A
candidate whose own block would, or whose pick would grow an earlier pick's
block that far, is skipped for good (blocks only grow, so the conflict
stays): the order can end before every candidate is picked.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from typing import Literal

from acopt.planning import Plan, PlannerSpec, PlanStatus, SolverStats, assemble_plan, check_budget
from acopt.records import Profile
from acopt.schedule import MemoryModel
from acopt.simulator import memory_model, peak_bytes


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MuTwoOptions:
    """Options of the mu-TWO greedy planner.

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
    """The greedy's pick order (or a prefix of it), with what each pick cost.

    ``total_times_s[k-1]`` and ``steps[k-1]`` are the recompute time and the
    schedule length of the plan made of the first ``k`` picks (every block
    included, as grown by the later picks of that prefix).
    """

    order: tuple[str, ...]
    ratios: tuple[float, ...]  # bytes / block time, at the pick
    block_times_s: tuple[float, ...]  # block(a, R | {a}).time_s, at the pick
    total_times_s: tuple[float, ...]
    steps: tuple[int, ...]


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
        # storages and activations that no plan may drop), never available
        # (refers to a forward-only storage), or available unless one of its
        # candidate storages is recomputed (``watch``).
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
        self.picks = 0
        self.members: dict[str, set[str]] = {}
        self.added: dict[str, list[tuple[int, str]]] = {}  # (pick count when added, node), in order
        self.sources: dict[str, set[str]] = {}
        self.block_time: dict[str, float] = {}
        self.position: dict[str, int] = {}
        self.readers: dict[str, set[str]] = {c: set() for c in self.candidates}  # storage -> candidates
        index, later = profile.node_index, model.later_users
        for c in self.candidates:
            outputs = [v for v in self.aliases[c] if later.get(v)]  # as MemoryModel.block
            self.position[c] = min(index[u] for v in outputs for u in later[v])
            self.members[c] = set()
            self.added[c] = []
            self.sources[c] = set()
            self.block_time[c] = 0.0
            self._grow(c, outputs)

    def _grow(self, c: str, starts) -> tuple[float, int]:
        """Add ``starts`` and the unavailable nodes they need to block ``c``;
        return the time and the number of nodes added."""
        members, sources, inputs = self.members[c], self.sources[c], self.inputs
        always, never, watch, recomputed, readers = self.always, self.never, self.watch, self.recomputed, self.readers
        history, when = self.added[c], self.picks
        added, count = 0.0, 0
        stack = [v for v in starts if v not in members]
        while stack:
            v = stack.pop()
            if v in members:
                continue
            members.add(v)
            history.append((when, v))
            sources.discard(v)
            added += self.time[v]
            count += 1
            for i in inputs[v]:
                if i in members:
                    continue
                if i in always or (
                    i not in never and not any(s == c or s in recomputed for s in watch[i])
                ):  # available under R | {c}
                    if i not in sources:
                        sources.add(i)
                        for s in watch.get(i, ()):
                            readers[s].add(c)
                else:
                    stack.append(i)
        self.block_time[c] += added
        return added, count

    def conflicts(self, p: str, replayable) -> bool:
        """Whether recomputing ``p`` would make a block of the plan replay a node
        that cannot be replayed (``replayable(node)`` false): ``p``'s own block,
        or the growth of an earlier pick's block through ``p`` (walked without
        changing anything; blocks only grow, so a conflict never goes away)."""
        if not all(replayable(v) for v in self.members[p]):
            return True
        inputs, always, never, watch = self.inputs, self.always, self.never, self.watch
        recomputed = self.recomputed | {p}
        for c in self.readers.get(p, ()):
            if c not in self.recomputed:
                continue
            members = self.members[c]
            seen: set[str] = set()
            stack = [x for x in self.aliases[p] if x in self.sources[c]]
            while stack:
                v = stack.pop()
                if v in members or v in seen:
                    continue
                if not replayable(v):
                    return True
                seen.add(v)
                for i in inputs[v]:
                    if i in members or i in seen:
                        continue
                    if i in always or (i not in never and not any(s == c or s in recomputed for s in watch[i])):
                        continue
                    stack.append(i)
        return False

    def pick(self, p: str) -> tuple[list[str], float, int]:
        """Recompute ``p`` and grow the blocks that read it. Returns the grown
        candidates, and the time and nodes added to the blocks of earlier picks."""
        self.recomputed.add(p)
        self.picks += 1
        grown, added_time, added_nodes = [], 0.0, 0
        aliases = self.aliases[p]
        for c in sorted(self.readers.pop(p, ())):
            if c == p:
                continue
            starts = [x for x in aliases if x in self.sources[c]]
            if not starts:
                continue  # stale entry: that source has become a member
            time_s, nodes = self._grow(c, starts)
            grown.append(c)
            if c in self.recomputed:
                added_time += time_s
                added_nodes += nodes
        return grown, added_time, added_nodes


@dataclasses.dataclass(frozen=True, slots=True)
class _PrefixBlock:
    """What the simulator's fast path reads of a block."""

    activation: str
    position: int
    nodes: tuple[str, ...]


class _Greedy:
    """The pick order, computed lazily: only as far as the stop needs (Note G2)."""

    def __init__(self, profile: Profile, *, min_time_s: float):
        model = memory_model(profile)
        self.blocks_ = _Blocks(profile, model)
        self.replayable = model._replayable_cached
        self.skipped: set[str] = set()  # candidates that would make the plan invalid (Note G4)
        self.index = profile.node_index
        self.sizes = {s.name: s.bytes for s in profile.storages}
        self.rank = {c: i for i, c in enumerate(self.blocks_.candidates)}
        self.min_time_s = min_time_s
        self.heap = [(*self._key(c), c) for c in self.blocks_.candidates]
        heapq.heapify(self.heap)
        self.order: list[str] = []
        self.ratios: list[float] = []
        self.block_times: list[float] = []
        self.totals: list[float] = []
        self.steps: list[int] = []
        self._total = 0.0
        self._steps = len(profile.nodes)

    def _key(self, c: str) -> tuple[float, int]:
        ratio = self.sizes[c] / max(self.blocks_.block_time[c], self.min_time_s)
        return (-float(f"{ratio:.12g}"), self.rank[c])  # Note G3

    @property
    def n(self) -> int:
        return len(self.blocks_.candidates)

    def extend(self, k: int) -> None:
        """Make the first ``min(k, n)`` picks."""
        blocks, heap = self.blocks_, self.heap
        while len(self.order) < k and heap:
            neg_ratio, rank, c = heapq.heappop(heap)
            if c in blocks.recomputed or (neg_ratio, rank) != self._key(c):
                continue  # stale: its block grew since this entry was pushed
            if c in self.skipped or blocks.conflicts(c, self.replayable):
                self.skipped.add(c)  # Note G4: never pickable again
                continue
            self.order.append(c)
            self.ratios.append(-neg_ratio)
            self.block_times.append(blocks.block_time[c])
            grown, added_time, added_nodes = blocks.pick(c)
            self._total += blocks.block_time[c] + added_time
            self._steps += len(blocks.members[c]) + added_nodes
            self.totals.append(self._total)
            self.steps.append(self._steps)
            for g in grown:
                if g not in blocks.recomputed:
                    heapq.heappush(heap, (*self._key(g), g))

    def prefix(self, k: int) -> tuple[str, ...]:
        self.extend(k)
        return tuple(self.order[:k])

    def blocks(self, k: int) -> list[_PrefixBlock]:
        """``MemoryModel.block(a, R_k)`` for each ``a`` of the first ``k`` picks
        (``R_k``), from the growth history: a block's nodes under ``R_k`` are the
        ones added before the (k+1)-th pick (blocks only grow, Note G1)."""
        self.extend(k)
        index, out = self.index, []
        for a in self.order[:k]:
            nodes = [v for when, v in self.blocks_.added[a] if when <= k]
            out.append(_PrefixBlock(activation=a, position=self.blocks_.position[a], nodes=tuple(sorted(nodes, key=index.__getitem__))))
        return out

    def result(self) -> PickOrder:
        return PickOrder(
            order=tuple(self.order), ratios=tuple(self.ratios), block_times_s=tuple(self.block_times),
            total_times_s=tuple(self.totals), steps=tuple(self.steps),
        )  # fmt: skip


def pick_order(profile: Profile, *, min_time_s: float = 1e-12) -> PickOrder:
    """mu-TWO's pick order over every candidate it can pick (Notes G1, G3, G4)."""
    g = _Greedy(profile, min_time_s=min_time_s)
    g.extend(g.n)
    return g.result()


def _shortest_fitting_prefix(profile: Profile, g: _Greedy, budget_bytes: int, search: str) -> tuple[int, int]:
    """``(k, simulations)``: the length of the shortest prefix of the pick
    order that fits (Note G2), and how many simulations finding it took."""
    known: dict[int, bool] = {}

    def fits(k: int) -> bool:
        if k not in known:
            known[k] = peak_bytes(profile, g.prefix(k), blocks=g.blocks(k)) <= budget_bytes
        return known[k]

    def has(k: int) -> bool:  # the order has k picks (it can end early: Note G4)
        g.extend(k)
        return len(g.order) >= k

    if fits(0):
        return 0, len(known)
    k = None
    if search == "linear":
        k = next((k for k in range(1, g.n + 1) if has(k) and fits(k)), None)
    elif has(1):
        lo, hi = 0, 1
        while not fits(hi):  # gallop: double k, but at most double the schedule's length
            if not has(hi + 1):
                break
            lo = hi
            limit = 2 * g.steps[hi - 1]
            nxt = hi + 1
            while nxt < 2 * hi and has(nxt + 1):
                if g.steps[nxt] > limit:
                    break
                nxt += 1
            hi = nxt
        if fits(hi):
            while hi - lo > 1:  # bisect: lo does not fit, hi fits
                mid = (lo + hi) // 2
                if fits(mid):
                    hi = mid
                else:
                    lo = mid
            k = hi
    if k is None:
        check_budget(profile, budget_bytes)  # raises InfeasibleBudget: below the floor
        raise ValueError(f"no prefix of the pick order fits {budget_bytes} bytes")  # pragma: no cover
    return k, len(known)


def mu_two(*, profile: Profile, budget_bytes: int, options: MuTwoOptions) -> Plan:
    """The mu-TWO greedy planner (registered as ``"mu-two"``).

    Called directly (not through :func:`acopt.plan`), it skips the floor check
    and returns the shortest fitting prefix even below the floor; when no
    prefix fits it raises :class:`~acopt.planning.InfeasibleBudget`.
    """
    started = time.perf_counter()
    g = _Greedy(profile, min_time_s=options.min_time_s)
    k, sims = _shortest_fitting_prefix(profile, g, budget_bytes, options.search)
    return assemble_plan(
        profile,
        g.prefix(k),
        solver="mu-two",
        status=PlanStatus.HEURISTIC,
        budget_bytes=budget_bytes,
        started=started,
        options=options,
        stats=SolverStats(
            objective=g.totals[k - 1] if k else 0.0,
            iterations=sims,
            notes=(
                f"{options.search} search: the first {k} of the {g.n} candidates in pick order fit, "
                f"after {len(g.order)} picks and {sims} simulations",
                *([f"Note G4: {len(g.skipped)} candidate(s) skipped: recomputing them with earlier picks "
                   "would replay a node that cannot be replayed"] if g.skipped else []),
            ),
        ),
    )


SPEC = PlannerSpec(
    name="mu-two",
    planner=mu_two,
    options_type=MuTwoOptions,
    exact=False,
    requires=(),
    description="mu-TWO recompute greedy: best memory saved per recompute second first",
)
