"""The default planner: a peak-aware greedy with prune and exchange
(docs/memory-model.md, "The greedy"; registered as ``"greedy"``).

It builds one plan R, always looking at where the simulated peak is:

1. **Peak-aware picks** (Note P2): at the step where the live bytes most
   exceed the budget, pick the candidate dead there with the most bytes that
   count (at most the excess) per second the pick adds to the whole plan's
   recompute time; repeat until the budget holds.
2. **Prune** (Note P3): drop the picks the plan no longer needs, the ones
   whose removal saves the most time first.
3. **Exchange** (Note P4): add one candidate and drop picks it makes
   redundant, while that lowers the recompute time; then **kicks** (Note
   P5): a few exchanges that cost a little, each followed by improving ones,
   kept when they end cheaper.

A linear model of the timeline decides between simulations (Note P1); every
plan is confirmed by the simulator's fast path before it is kept (Note P7),
and ``plan()`` checks the result with :func:`acopt.simulate`. Costs are
exact (Note P6). The mu-TWO greedy it replaced is registered as ``"mu-two"``
(acopt/mu_two.py), unchanged.

Notes referenced from the code:

Note P1 (the linear model). ``T`` is the last simulated timeline, one entry
per step of its schedule (``g[i]``: the step of original node ``i``). A kept
candidate ``a`` is alive from its node to its last reader. Recomputed, its
forward copy dies after its last forward use ``fw_last`` and is rebuilt by a
block just before ``pos``, its first reader outside the forward region: its
*dead range* is the steps ``g[fw_last] + 1`` to ``g[pos - 1]``, the original
nodes between and the blocks that run before them, not those right before
``pos`` (its own among them). What it frees there is its storage, and any
other storage its read-later forward aliases refer to (a multi-output
node's value read as a whole), from the last use of the values that do not
refer to ``a`` and the last block that reads it through a source, if that
comes before; candidates that share such storages free them once. A block
also keeps alive, until it runs, the activations its sources refer to (a
source whose last reader came earlier lives longer; picking it ends that)
and the generator state of each random node it replays (rule 7, from that
node's forward run). Between simulations every change of the
plan moves ``T`` by these ranges. It leaves out the steps of new blocks
(their intermediates), and chains rebuilt inside other blocks; hence the
confirmations.

Note P2 (peak-aware picks). Let ``t`` be the first step where ``T`` is
largest and ``excess = T[t] - budget``. Only candidates whose dead range
covers ``t`` can lower it. Each scores ``min(freed, excess) / added``: the
bytes it frees there, at most the excess (no overshoot: a cheap small pick
beats an expensive big one when the small one is enough), over ``added``,
the plan's recompute time after the pick minus before it (its own block plus
what it adds to the blocks of picks that now replay it: Capuchin's "ext
time"), at least ``min_time_s``. What the pick keeps alive at ``t`` (Note
P1) is taken off ``freed``; as that only lowers a score, candidates are
scored in full in the order of their plain scores until no later one can
win. The best is picked (ties: created first) and ``T`` moves; when ``T``
fits the plan is simulated, and if it does not fit (the peak moved, into a
new block, say) the picks go on from the simulated timeline.

Note P3 (prune). Picks are tried in order of the time their removal saves,
largest first; a drop is taken when ``T`` moved by it (Note P1) stays within
the budget. The drops are confirmed together (Note P7); the first that broke
the plan is not tried again, and rounds go on from the simulated timeline
until one drops nothing (a drop can make room for a pick tried before it).

Note P4 (exchange). For each pick ``p``, ``T`` gives the steps that stop it
from being dropped (``T + freed(p) > budget`` in its dead range): their
first and last step, and the most they exceed by. A candidate ``c`` makes
``p`` redundant when its dead range (extended to the last block that reads
it through a source, whose hold its pick ends) covers those steps and what
it frees covers that excess. For each ``c`` (the ``_EXCHANGE_CANDIDATES`` cheapest to
add), three kinds of moves: add ``c`` and drop the picks it makes redundant
one after another, largest saving first or largest saving per byte first,
each checked against ``T`` as moved by the move so far; and add ``c`` and
drop one of them. Each move gets an estimate (the drops' savings, what ``c``
would have added to their blocks, what ``c``'s block would no longer replay
of them, less ``c``'s added time); the best ``_EXACT_COSTINGS`` by estimate,
and any other whose estimate beats the best found, are costed exactly (Note
P6) and checked against ``T`` in full (Note P1). The cheapest is applied if
it saves time; this repeats until no move does. The moves are confirmed
together (Note P7; the first that broke the plan is not tried again), and
rounds go on until one finds nothing or the simulation allowance
(``max_simulations``) is spent. Then a last prune.

Note P5 (kicks). Exchange stops at a plan no single improving move betters;
the chains of block costs make many such local optima (a cheap pick that
makes its neighbours' blocks long). A kick tries each of the ``kicks``
cheapest moves of Note P4 (they save nothing), then up to ``_DESCENT``
improving moves that do not undo it, and keeps the cheapest plan so reached
if it beats the start and its simulation fits; then exchange and prune
again, and another round of kicks while one is kept. On big profiles each
kick costs more: the number per round is at most ``_KICK_EFFORT`` divided by
the number of candidates.

Note P6 (blocks and costs, exact). The plan keeps every pick's block,
``MemoryModel.block(a, R)``, with the candidate storages its sources and its
members refer to. Adding ``c`` changes only ``c``'s block and the blocks with
``c`` among their sources; dropping ``d`` only the blocks with ``d`` among
their members. So a change walks only the blocks it touches and its
recompute-time difference is exact. The change of adding each candidate or
dropping each pick is cached and forgotten when a block it depends on
changes (a walk that looked at a node referring to a changed storage, or a
block it reads or grows). A change that would make a block replay what
cannot be replayed (a side effect, or a value written in place later:
mu-TWO's Note G4) is refused.

Note P7 (confirmation). Moves are applied in sequence to a plan that was
simulated and fits. If the plan after all of them does not fit, a bisection
over the number of moves kept finds a fitting prefix followed by a failing
one and keeps the fitting one: about log2(moves) simulations. The fast path
is handed the plan's blocks, so a simulation costs O(blocks) in Python and
O(steps) in numpy.

Note P8 (fallback). When no candidate lowers the simulated peak (made by a
block's own intermediates, say) the peak-aware picks stop, and the plan
restarts from mu-TWO's (acopt/mu_two.py), which fits whenever the budget is
at least the floor; prune, exchange and kicks then improve it.

Determinism: every loop runs over picks and candidates in creation order or
sorted by (value, creation order), never in set order, and the effort limits
count simulations and moves, not seconds: the same profile and budget give
the same plan on any machine and under any hash seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time

import numpy as np

from acopt.planning import Plan, PlannerSpec, PlanStatus, SolverStats, assemble_plan
from acopt.records import Profile, Region
from acopt.schedule import MemoryModel
from acopt.simulator import _delta, memory_model


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GreedyOptions:
    """Options of the greedy planner.

    ``max_simulations``: how many fast-path simulations prune, exchange and
    kicks may spend (Notes P3-P5, P7); the peak-aware picks take what they
    need. ``kicks``: the most kicks per round (Note P5; fewer on big
    profiles). Effort limits, not time limits, so the plan does not depend
    on the machine. ``min_time_s``: the added recompute time below which a
    pick counts as free (Note P2).
    """

    max_simulations: int = 40
    kicks: int = 8
    min_time_s: float = 1e-12

    def __post_init__(self) -> None:
        if self.max_simulations < 0:
            raise ValueError(f"max_simulations must be >= 0, not {self.max_simulations!r}")
        if self.kicks < 0:
            raise ValueError(f"kicks must be >= 0, not {self.kicks!r}")
        if not self.min_time_s > 0:
            raise ValueError(f"min_time_s must be positive, not {self.min_time_s!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Block:
    """``MemoryModel.block(activation, R)``, as the fast path reads it, plus
    the candidate storages its sources and its members refer to (Note P6)."""

    activation: str
    position: int
    nodes: tuple[str, ...]  # in graph order
    time_s: float
    sources: frozenset[str]  # picking one of these grows the block
    chain: frozenset[str]  # dropping one of these shrinks it
    held: frozenset[str]  # activations its sources refer to: kept alive until the block (Note P1)
    random: frozenset[str]  # random nodes it replays: their generator states are kept until then (rule 7)


@dataclasses.dataclass(frozen=True, slots=True)
class _Change:
    """Adding ``add`` to the plan and dropping ``drop``: the new blocks, and the
    recompute time it adds (negative: it saves)."""

    add: frozenset[str]
    drop: frozenset[str]
    blocks: dict[str, _Block]
    delta_s: float


class _Plan:
    """A plan R with the exact block of every pick, changed by adds and drops (Note P6)."""

    def __init__(self, profile: Profile, model: MemoryModel):
        nodes = profile.nodes
        index = self.index = profile.node_index
        self.inputs = {n.name: n.inputs for n in nodes}
        self.time = {n.name: n.time_s for n in nodes}
        self.replayable = model._replayable_cached
        self.random = {n.name for n in nodes if n.random} if profile.rng_state_bytes else set()
        self.candidates = model.candidates
        self.rank = {c: i for i, c in enumerate(self.candidates)}
        candidate_set = set(self.candidates)
        placeholder, activations = model.placeholder_storages, model.activation_set
        # As MemoryModel.available: a node is never available (it refers to a
        # forward-only storage), or available unless a candidate storage it
        # refers to is recomputed (``watch``); placeholders always are.
        self.never = {
            n.name for n in nodes
            if not n.is_placeholder and any(s not in placeholder and s not in activations for s in n.storages)
        }  # fmt: skip
        self.watch, self.holds = {}, {}
        for n in nodes:
            cands = tuple(s for s in n.storages if s in candidate_set)
            if cands and not n.is_placeholder:
                self.watch[n.name] = cands
            kept = tuple(s for s in n.storages if s in activations and s not in model.output_storages)
            if kept and not n.is_placeholder:
                self.holds[n.name] = kept
        later, users = model.later_users, profile.users
        forward = {n.name for n in nodes if n.region == Region.FORWARD}
        self.outputs, self.position, self.fw_last, self.freed = {}, {}, {}, {}
        self.span: dict[str, dict[str, int]] = {}  # candidate -> {storage it frees: the node after which}

        def last_forward_use(storage: str) -> int:
            return max(
                max([index[v], *(index[u] for u in users[v] if u in forward)])
                for v in model.aliases[storage] if v in forward
            )  # fmt: skip

        sizes, nodes_by_name = {s.name: s.bytes for s in profile.storages}, profile.node_by_name
        fixed = placeholder | model.output_storages
        for c in self.candidates:
            self.outputs[c] = tuple(v for v in model.aliases[c] if later.get(v))
            self.position[c] = min(index[u] for v in self.outputs[c] for u in later[v])
            # Note P1: what it frees: its storage after its last forward use, and
            # any other storage its read-later forward aliases refer to (a
            # multi-output node's value) after the last use of the values that
            # do not refer to it, if that comes before its block.
            self.fw_last[c] = last_forward_use(c)
            self.span[c] = {c: self.fw_last[c]}
            for s in sorted({s for v in self.outputs[c] for s in nodes_by_name[v].storages} - {c} - fixed):
                others = [v for v in model.aliases[s] if c not in nodes_by_name[v].storages]
                if any(nodes_by_name[u].is_output for v in others for u in users[v]):
                    continue
                last = max([last_forward_use(s), *(max([index[v], *(index[u] for u in users[v])]) for v in others)])
                if last < self.position[c] - 1:
                    self.span[c][s] = last
            self.freed[c] = sum(sizes[s] for s in sorted(self.span[c]))
        # Candidates whose spans overlap free the shared storages once (Note P1).
        self.shares = {c: frozenset(q for q in self.candidates if q != c and self.span[q].keys() & self.span[c].keys())
                       for c in self.candidates if len(self.span[c]) > 1}  # fmt: skip
        for c, qs in list(self.shares.items()):
            for q in qs:
                self.shares[q] = self.shares.get(q, frozenset()) | {c}
        self.recompute: set[str] = set()
        self.blocks: dict[str, _Block] = {}
        self.src_readers: dict[str, set[str]] = {}  # storage -> picks whose sources refer to it
        self.chain_readers: dict[str, set[str]] = {}  # storage -> picks whose members refer to it
        # Note P6: the time adding one candidate or dropping one pick changes,
        # cached; ``_deps`` maps a storage to the cached entries whose walks
        # looked at a node referring to it.
        self._changes: dict[tuple[str, str], _Change | None] = {}
        self._invalid: set[tuple[str, str]] = set()
        self._deps: dict[str, set[tuple[str, str]]] = {}
        self.added = np.full(len(self.candidates), np.nan)  # added_time by rank, nan: not known

    def walk(self, a: str, recompute) -> _Block | None:
        """``MemoryModel.block(a, recompute)``, or None if it would replay a node
        that cannot be replayed."""
        never, watch, inputs, replayable, holds = self.never, self.watch, self.inputs, self.replayable, self.holds
        members: set[str] = set()
        sources: set[str] = set()
        chain: set[str] = set()
        held: set[str] = set()
        stack = list(self.outputs[a])
        while stack:
            v = stack.pop()
            if v in members:
                continue
            if not replayable(v):
                return None
            members.add(v)
            refers = watch.get(v)
            if refers:
                chain.update(refers)
            for i in inputs[v]:
                if i in members:
                    continue
                refers = watch.get(i)
                if i in never or (refers and not recompute.isdisjoint(refers)):
                    stack.append(i)
                    continue
                if refers:  # available: a source
                    sources.update(refers)
                kept = holds.get(i)
                if kept:
                    held.update(kept)
        chain.discard(a)
        ordered = sorted(members, key=self.index.__getitem__)
        time_s = self.time
        return _Block(
            activation=a, position=self.position[a], nodes=tuple(ordered), time_s=sum([time_s[v] for v in ordered]),
            sources=frozenset(sources), chain=frozenset(chain), held=frozenset(held),
            random=frozenset(v for v in ordered if v in self.random) if self.random else frozenset(),
        )  # fmt: skip

    def change(self, add=(), drop=()) -> _Change | None:
        """What adding ``add`` and dropping ``drop`` would do (None: a block could
        not be replayed). Only the blocks it touches are walked (Note P6)."""
        add, drop = frozenset(add), frozenset(drop)
        after = (self.recompute | add) - drop
        touched = set(add)
        for s in add:
            touched |= self.src_readers.get(s, set())
        for s in drop:
            touched |= self.chain_readers.get(s, set())
        touched -= drop
        blocks: dict[str, _Block] = {}
        delta = 0.0
        for a in sorted(touched, key=self.rank.__getitem__):
            b = self.walk(a, after)
            if b is None:
                return None
            blocks[a] = b
            old = self.blocks.get(a)
            delta += b.time_s - (old.time_s if old is not None else 0.0)
        for d in sorted(drop, key=self.rank.__getitem__):
            delta -= self.blocks[d].time_s
        return _Change(add=add, drop=drop, blocks=blocks, delta_s=delta)

    def added_time(self, c: str) -> float:
        """The recompute time that picking ``c`` adds (inf: it cannot be picked)."""
        ch = self.single("add", c)
        return float("inf") if ch is None else ch.delta_s

    def saved_time(self, p: str) -> float:
        """The recompute time that dropping pick ``p`` saves."""
        return -self.single("drop", p).delta_s

    def single(self, kind: str, c: str) -> _Change | None:
        """``change`` adding (``kind="add"``) or dropping one candidate, cached
        until a block it depends on changes (Note P6)."""
        key = (kind, c)
        if key in self._changes:
            return self._changes[key]
        ch = self.change(add=(c,)) if kind == "add" else self.change(drop=(c,))
        self._changes[key] = ch
        if kind == "add":
            self.added[self.rank[c]] = np.inf if ch is None else ch.delta_s
        if ch is None:
            self._invalid.add(key)  # stays so while picks are only added (blocks only grow)
        else:
            for s in {c}.union(*(b.sources | b.chain for b in ch.blocks.values())):
                self._deps.setdefault(s, set()).add(key)
        return ch

    def commit(self, ch: _Change) -> None:
        """Apply ``ch``. A cached add of ``c`` depends on the blocks with ``c``
        among their sources, a cached drop of ``p`` on ``p``'s block and the blocks
        with ``p`` among their members, and both on what their walks looked at."""
        stale: set[tuple[str, str]] = set()
        for s in ch.add | ch.drop:
            stale |= self._deps.pop(s, set())
            stale |= {("add", s), ("drop", s)}
        for a in sorted(ch.drop | set(ch.blocks), key=self.rank.__getitem__):
            stale.add(("drop", a))
            old = self.blocks.pop(a, None)
            if old is not None:
                stale.update(("add", s) for s in old.sources)
                stale.update(("drop", s) for s in old.chain)
                for s in old.sources:
                    self.src_readers[s].discard(a)
                for s in old.chain:
                    self.chain_readers[s].discard(a)
            new = ch.blocks.get(a)
            if new is not None:
                self.blocks[a] = new
                stale.update(("add", s) for s in new.sources)
                stale.update(("drop", s) for s in new.chain)
                for s in new.sources:
                    self.src_readers.setdefault(s, set()).add(a)
                for s in new.chain:
                    self.chain_readers.setdefault(s, set()).add(a)
        self.recompute = (self.recompute | ch.add) - ch.drop
        if ch.drop:
            stale |= self._invalid
            self._invalid = set()
        for key in stale:
            if key in self._changes:
                del self._changes[key]
                if key[0] == "add":
                    self.added[self.rank[key[1]]] = np.nan

    def blocks_with(self, ch: _Change) -> list[_Block]:
        """The plan's blocks after ``ch`` (without committing it)."""
        kept = [b for a, b in self.blocks.items() if a not in ch.drop and a not in ch.blocks]
        return kept + list(ch.blocks.values())

    def cost(self) -> float:
        return sum(self.blocks[a].time_s for a in sorted(self.recompute, key=self.rank.__getitem__))


_EXACT_COSTINGS = 16  # Note P4: exchanges costed exactly even when their estimate says no gain
_DESCENT = 4  # Note P5: improving exchanges after a kick
_EXCHANGE_CANDIDATES = 512  # Note P4: the candidates tried, cheapest to add first
_KICK_EFFORT = 2000  # Note P5: at most this many kicks per round, divided by the number of candidates


def _best_first(score: np.ndarray, keys: np.ndarray):
    """Indices of ``score`` from the largest, ties by ``keys``; sorts only if
    more than the first is asked for (it usually is not)."""
    if not len(score):
        return
    first = int(score.argmax())  # the first of equals: the smallest key, as keys are sorted
    yield first
    for k in np.lexsort((keys, -score)):
        if k != first:
            yield int(k)


class _Search:
    """The search on one plan (Notes P2-P5, P8), with the last simulated
    timeline ``T`` and the linear model (Note P1)."""

    def __init__(self, profile: Profile, budget_bytes: int, options: GreedyOptions):
        self.profile = profile
        self.budget = budget_bytes
        self.options = options
        self.plan = plan = _Plan(profile, memory_model(profile))
        self.delta = _delta(profile)
        self.rank = plan.rank
        cands = plan.candidates
        self.freed = np.array([plan.freed[c] for c in cands], dtype=np.int64)
        self.sizes = {s.name: s.bytes for s in profile.storages}
        self.fw_last = np.array([plan.fw_last[c] for c in cands], dtype=np.int64)  # of each candidate's storage
        self.before_pos = np.array([plan.position[c] - 1 for c in cands], dtype=np.int64)
        self.picked = np.zeros(len(cands), dtype=bool)
        self.simulations = 0
        self.allowance = 0  # the simulation count at which prune and exchange stop
        # Note P5: fewer kicks on big profiles, where each costs more
        self.kicks = min(options.kicks, _KICK_EFFORT // max(1, len(cands)))
        self.tabu: set[str] = set()  # drops (prune) and adds (exchange) that broke a confirmed plan
        self.counts = {"picks": 0, "fallback": 0, "pruned": 0, "exchanges": 0, "kicks": 0}
        self._set_timeline(*self._simulate(plan.blocks.values()))

    # ---- the timeline (Notes P1, P7) --------------------------------------------------
    def _simulate(self, blocks) -> tuple[np.ndarray, np.ndarray]:
        """The exact timeline of the plan made of ``blocks`` (fast path), and ``g``."""
        self.simulations += 1
        blocks = list(blocks)
        timeline = self.delta.timeline(frozenset(b.activation for b in blocks), blocks)
        return timeline, np.asarray(self.delta.last_steps[0], dtype=np.int64)

    def _set_timeline(self, timeline: np.ndarray, g: np.ndarray) -> None:
        self.T, self.g = timeline.copy(), g
        self.start = g[self.fw_last] + 1  # Note P1: the dead range is [start, end)
        self.end = g[self.before_pos] + 1
        self.exact = True
        # Note P1: what each pick's block keeps alive until it runs: the activations
        # its sources refer to, and the generator states of the random nodes it replays.
        self.holders: dict[object, dict[str, int]] = {}
        for a in sorted(self.plan.blocks, key=self.rank.__getitem__):
            for key in self._holds(self.plan.blocks[a]):
                self.holders.setdefault(key, {})[a] = int(self.end[self.rank[a]])

    @staticmethod
    def _holds(block: _Block):
        return [*block.held, *(("rng", v) for v in block.random)]

    def _linear(self, ch: _Change) -> list[tuple[int, int, int]]:
        """Note P1: what ``ch`` does to ``T`` by the linear model, as (first step,
        end step, bytes) ranges: the dead ranges of what it adds and drops, and
        what the blocks it changes keep alive longer or shorter."""
        adds = sorted(ch.add, key=self.rank.__getitem__)
        drops = sorted(ch.drop, key=self.rank.__getitem__)
        after = (self.plan.recompute | ch.add) - ch.drop
        out = []
        for k, c in enumerate(adds):
            for first, end, size in self._frees(c, (self.plan.recompute - ch.drop) | set(adds[:k])):
                out.append((first, end, -size))
        for k, d in enumerate(drops):
            for first, end, size in self._frees(d, after | set(drops[k + 1 :])):
                out.append((first, end, size))
        changed = ch.drop | ch.blocks.keys()
        touched = set()
        for a in changed:
            for b in (self.plan.blocks.get(a), ch.blocks.get(a)):
                if b is not None:
                    touched.update(self._holds(b))
        for key in sorted(touched, key=str):
            holders = self.holders.get(key, {})
            now = list(holders.values())
            then = [step for a, step in holders.items() if a not in changed]
            then += [int(self.end[self.rank[a]]) for a, b in ch.blocks.items() if key in self._holds(b)]
            if isinstance(key, tuple):  # a generator state: from the random node's forward run
                size, first = self.profile.rng_state_bytes, int(self.g[self.plan.index[key[1]]])
            else:  # an activation: alive until its last reader in the graph anyway
                size, first = self.sizes[key], None
                last = int(self.g[self.delta.storage_end[key]])
                now, then = [last, *now], [last, *then]
            before, later = max(now, default=None), max(then, default=None)
            if before == later:
                continue
            if before is None:
                out.append((first, later + 1, size))
            elif later is None:
                out.append((first, before + 1, -size))
            else:
                out.append((min(before, later) + 1, max(before, later) + 1, size if later > before else -size))
        return out

    def _frees(self, c: str, others) -> list[tuple[int, int, int]]:
        """What recomputing ``c`` frees with ``others`` recomputed too, as (first
        step, end step, bytes) ranges (Note P1). A storage that other picks
        free too is freed from the earliest of their first steps to the last
        of their ends: ``c`` adds what it extends of that."""
        i = self.rank[c]
        span = self.plan.span[c]
        shares = self.plan.shares.get(c, ())
        if len(span) == 1 and not shares:
            return [(int(self.start[i]), int(self.end[i]), int(self.freed[i]))]
        out = []
        for s in sorted(span):
            lo, hi = self._freed_range(c, s)
            covering = [self._freed_range(q, s) for q in shares if q in others and s in self.plan.span[q]]
            if not covering:
                out.append((lo, hi, self.sizes[s]))
                continue
            lo0, hi0 = min(r[0] for r in covering), max(r[1] for r in covering)
            if lo < lo0:
                out.append((lo, lo0, self.sizes[s]))
            if hi > hi0:
                out.append((hi0, hi, self.sizes[s]))
        return out

    def _freed_range(self, c: str, s: str) -> tuple[int, int]:
        """The steps where recomputing ``c`` frees storage ``s`` of its span (Note P1)."""
        i = self.rank[c]
        if s == c:
            return int(self.start[i]), int(self.end[i])
        # after the last use of the values that do not refer to c, and of the blocks that read it
        first = max([int(self.g[self.plan.span[c][s]]), *self.holders.get(s, {}).values()]) + 1
        return first, int(self.end[i])

    def _apply(self, ch: _Change, ranges=None) -> None:
        """Commit ``ch`` to the plan and to ``T`` by the linear model (Note P1);
        ``ranges``: ``self._linear(ch)`` if already known."""
        ranges = self._linear(ch) if ranges is None else ranges
        for a in ch.drop | ch.blocks.keys():
            old = self.plan.blocks.get(a)
            for key in self._holds(old) if old is not None else ():
                self.holders[key].pop(a, None)
            new = ch.blocks.get(a)
            for key in self._holds(new) if new is not None else ():
                self.holders.setdefault(key, {})[a] = int(self.end[self.rank[a]])
        self.plan.commit(ch)
        for lo, hi, nbytes in ranges:
            self.T[lo:hi] += nbytes
        for c in ch.add:
            self.picked[self.rank[c]] = True
        for d in ch.drop:
            self.picked[self.rank[d]] = False
        self.exact = False
        for x in sorted(ch.add | ch.drop, key=self.rank.__getitem__):
            for c in self.plan.shares.get(x, ()):  # what each frees now, with the plan as it is
                self.freed[self.rank[c]] = sum(size for _, _, size in self._frees(c, self.plan.recompute - {c}))

    def _fits(self, ch: _Change) -> bool:
        """Whether ``T`` changed by ``ch`` (Note P1) stays within the budget where it rises."""
        ranges = self._linear(ch)
        cuts = sorted({x for lo, hi, _ in ranges for x in (lo, hi)})
        for lo, hi in zip(cuts, cuts[1:]):
            rise = sum(b for a, e, b in ranges if a <= lo and hi <= e)
            if rise > 0 and lo < hi and int(self.T[lo:hi].max()) + rise > self.budget:
                return False
        return True

    def _fits_dropped(self, p: str, adjust=()) -> bool:
        """Whether ``T``, changed by ``adjust`` ((candidate, sign): -1 picked,
        +1 dropped), stays within the budget over ``p``'s dead range once ``p``
        is dropped."""
        i = self.rank[p]
        lo, hi = int(self.start[i]), int(self.end[i])
        if hi <= lo:
            return True
        seg = self.T[lo:hi].copy()
        for c, sign in adjust:
            j = self.rank[c]
            a, b = max(lo, int(self.start[j])), min(hi, int(self.end[j]))
            if a < b:
                seg[a - lo : b - lo] += sign * self.freed[j]
        return int(seg.max()) + int(self.freed[i]) <= self.budget

    def _confirm(self, start: frozenset[str], moves: list[_Change], confirmed) -> int:
        """Note P7. The plan ``start`` fits (its timeline and ``g`` are
        ``confirmed``); ``moves`` were applied to it since. Keep the plan after
        the longest prefix of the moves that the bisection finds to fit, with its
        simulated timeline, and return that prefix's length."""
        plan = self.plan
        known = {0: confirmed}

        def state(k: int) -> set[str]:
            out = set(start)
            for m in moves[:k]:
                out = (out | m.add) - m.drop
            return out

        def fits(k: int) -> bool:
            if k not in known:
                target = state(k)
                ch = plan.change(add=target - plan.recompute, drop=plan.recompute - target)
                known[k] = self._simulate(plan.blocks_with(ch))
            return int(known[k][0].max()) <= self.budget

        lo, hi = 0, len(moves)
        if fits(hi):
            lo = hi
        while hi - lo > 1:  # lo fits, hi does not
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        if lo < len(moves):
            target = state(lo)
            self._apply(plan.change(add=target - plan.recompute, drop=plan.recompute - target))
        self._set_timeline(*known[lo])
        return lo

    # ---- Note P2: peak-aware picks ------------------------------------------------------
    def peak_aware_picks(self) -> bool:
        """Pick until the simulated peak fits (Note P2); False if no candidate lowers the peak."""
        plan, cands = self.plan, self.plan.candidates
        while True:
            t = int(self.T.argmax())
            excess = int(self.T[t]) - self.budget
            if excess <= 0:
                if self.exact:
                    return True
                self._set_timeline(*self._simulate(plan.blocks.values()))
                continue
            covering = np.flatnonzero(~self.picked & (self.start <= t) & (self.end > t))
            added = plan.added[covering]
            for k in np.flatnonzero(np.isnan(added)):  # Note P6: only what a change made stale
                added[k] = plan.added_time(cands[int(covering[k])])
            ok = ~np.isinf(added)  # a pick that would make a block replay what cannot be replayed
            covering, added = covering[ok], added[ok]
            denominator = np.maximum(added, self.options.min_time_s)
            score = np.minimum(self.freed[covering], excess) / denominator
            # The score counts the bytes freed; what the pick keeps alive at t
            # (sources it reads later, generator states) only lowers it, so the
            # candidates are scored in full in that order until none can win.
            best, best_score = None, 0.0
            for k in _best_first(score, covering):
                if score[k] <= best_score:
                    break
                ch = plan.single("add", cands[int(covering[k])])
                ranges = self._linear(ch)
                lowers = -sum(nbytes for lo, hi, nbytes in ranges if lo <= t < hi)
                full = min(lowers, excess) / denominator[k]
                if full > best_score:
                    best, best_score, best_ranges = ch, full, ranges
            if best is None:  # nothing lowers the peak
                if self.exact:
                    return False  # Note P8
                self._set_timeline(*self._simulate(plan.blocks.values()))
                continue
            self._apply(best, best_ranges)
            self.counts["picks"] += 1

    # ---- Note P3: prune ------------------------------------------------------------------
    def prune(self) -> None:
        plan = self.plan
        while self.simulations < self.allowance:
            savings = {p: plan.saved_time(p) for p in plan.recompute if p not in self.tabu}
            order = sorted((p for p, v in savings.items() if v > 0), key=lambda p: (-savings[p], self.rank[p]))
            start, confirmed = frozenset(plan.recompute), (self.T.copy(), self.g)
            dropped, moves = [], []
            for p in order:
                if self._fits(plan.single("drop", p)):
                    moves.append(plan.single("drop", p))
                    self._apply(moves[-1])
                    dropped.append(p)
            if not dropped:
                return
            k = self._confirm(start, moves, confirmed)
            self.counts["pruned"] += k
            if k < len(dropped):
                self.tabu.add(dropped[k])
            # another round: a drop can make room for one tried before it

    # ---- Note P4: exchange -----------------------------------------------------------------
    def exchange(self) -> None:
        plan = self.plan
        while self.simulations < self.allowance:
            start, confirmed = frozenset(plan.recompute), (self.T.copy(), self.g)
            moves = []
            while (ch := self._best_move()) is not None:
                self._apply(ch)
                moves.append(ch)
            if not moves:
                return
            k = self._confirm(start, moves, confirmed)
            self.counts["exchanges"] += k
            if k < len(moves):
                self.tabu |= moves[k].add

    def _best_move(self, *, no_add=(), no_drop=()) -> _Change | None:
        """The exchange that saves the most recompute time, or None (Note P4)."""
        moves = self._moves(no_add=no_add, no_drop=no_drop)
        if moves and -moves[0].delta_s > 1e-9 * self.plan.cost() + 1e-15:
            return moves[0]
        return None

    def _moves(self, *, no_add=(), no_drop=()) -> list[_Change]:
        """Exchanges that the linear model allows, costed exactly, cheapest
        first, never adding ``no_add`` or dropping ``no_drop`` (Note P4)."""
        plan, cands = self.plan, self.plan.candidates
        rows, lo, hi, need, crit, saving = [], [], [], [], [], []
        for p in sorted(plan.recompute, key=self.rank.__getitem__):
            i = self.rank[p]
            a, b = int(self.start[i]), int(self.end[i])
            if b <= a or p in no_drop:
                continue
            over = self.T[a:b] + (int(self.freed[i]) - self.budget)
            k = int(over.argmax())
            if over[k] <= 0:
                continue  # droppable alone: the prune's business (or it broke the plan before)
            saved = plan.saved_time(p)
            if not saved > 0:
                continue
            blocking = np.flatnonzero(over > 0)
            rows.append(p)
            lo.append(a + int(blocking[0]))
            hi.append(a + int(blocking[-1]))
            need.append(int(over[k]))
            crit.append(a + k)
            saving.append(saved)
        if not rows:
            return []
        size_of = [int(self.freed[self.rank[p]]) for p in rows]
        lo_, hi_, need_, crit_ = np.array(lo), np.array(hi), np.array(need), np.array(crit)
        free = ~self.picked
        for c in self.tabu | set(no_add):
            free[self.rank[c]] = False
        # A candidate that blocks read through a source frees it until the last
        # of them too, once it is picked (they replay it instead: Note P1).
        reach = self.end.copy()
        for s in self.holders.keys() & self.rank.keys():
            i = self.rank[s]
            reach[i] = max([int(reach[i]), *(step + 1 for step in self.holders[s].values())])
        # redundant[r, j]: with candidate j picked, pick rows[r] can be dropped (linear model)
        redundant = (
            (self.start[None, :] <= lo_[:, None]) & (reach[None, :] > hi_[:, None])
            & (self.freed[None, :] >= need_[:, None]) & free[None, :]
        )  # fmt: skip
        proposals, singles = [], []
        saving_, size_ = np.array(saving), np.array(size_of, dtype=np.float64)
        row_of = {p: r for r, p in enumerate(rows)}
        by_candidate = np.ascontiguousarray(redundant.T)
        columns = np.flatnonzero(by_candidate.any(axis=1))
        added = np.array([plan.added_time(cands[int(j)]) for j in columns])
        columns = columns[np.lexsort((columns, added))[:_EXCHANGE_CANDIDATES]]  # the cheapest to add
        for j in sorted(columns.tolist()):
            c = cands[j]
            pick = plan.single("add", c)
            if pick is None:
                continue
            own = pick.blocks[c]
            options = np.flatnonzero(by_candidate[j])
            # What dropping each option saves once c is picked: its own saving, what
            # c would have added to its block, and roughly what c's block would
            # no longer replay of it. Exact costing follows.
            value = saving_[options]
            for p in sorted({*pick.blocks, *own.chain} & row_of.keys(), key=row_of.__getitem__):
                k = int(np.searchsorted(options, row_of[p]))
                if k < len(options) and options[k] == row_of[p]:
                    if p in pick.blocks:
                        value[k] += pick.blocks[p].time_s - plan.blocks[p].time_s
                    if p in own.chain:
                        value[k] += plan.blocks[p].time_s
            tried = set()
            for key in (-value, -value / size_[options]):
                drops = tuple(self._drops(c, options[np.lexsort((options, key))], rows, need_, crit_))
                if len(drops) > 1 and drops not in tried:
                    tried.add(drops)
                    estimate = float(value[np.searchsorted(options, drops)].sum()) - pick.delta_s
                    proposals.append((-estimate, int(j), (c,), tuple(rows[r] for r in drops)))
                if len(drops) == len(options):
                    break  # every option taken: the other order takes the same
            singles.append((value - pick.delta_s, np.full(len(options), j), options))  # each drop alone
        if singles:
            estimate, js, rs = (np.concatenate(x) for x in zip(*singles))
            if len(estimate) > 4 * _EXACT_COSTINGS:  # the best by estimate (a deterministic selection)
                keep = np.argpartition(-estimate, 4 * _EXACT_COSTINGS)[: 4 * _EXACT_COSTINGS]
                estimate, js, rs = estimate[keep], js[keep], rs[keep]
            top = np.lexsort((rs, js, -estimate))
            proposals += [(-float(estimate[k]), int(js[k]), (cands[int(js[k])],), (rows[int(rs[k])],)) for k in top]
        # The estimate ignores how the drops and c's block interact (chains): the
        # best few by estimate are costed exactly, and any other whose estimate beats them.
        costed: list[_Change] = []
        best_gain = -np.inf
        for n, (neg_estimate, _, adds, drops) in enumerate(sorted(proposals, key=lambda x: x[:2])):
            if n >= _EXACT_COSTINGS and -neg_estimate <= best_gain:
                break
            ch = plan.change(add=adds, drop=drops)
            if ch is not None and self._fits(ch):
                costed.append(ch)
                best_gain = max(best_gain, -ch.delta_s)
        return sorted(costed, key=lambda ch: ch.delta_s)  # stable: ties keep the estimate's order

    def _drops(self, c: str, options: np.ndarray, rows, need: np.ndarray, crit: np.ndarray) -> list[int]:
        """The rows of ``options``, in that order, that picking ``c`` lets the plan
        drop one after another by the linear model (Note P4). The first always
        can: its blocking steps are in ``c``'s dead range and ``c``'s bytes cover
        its need."""
        room = int(self.freed[self.rank[c]]) - need[options]  # at the step where each needs most
        steps = crit[options]
        adjust = [(c, -1)]
        taken: list[int] = []
        k = 0
        while True:
            r = int(options[k])
            if not taken or self._fits_dropped(rows[r], adjust):
                taken.append(r)
                adjust.append((rows[r], +1))
                i = self.rank[rows[r]]
                room -= int(self.freed[i]) * ((self.start[i] <= steps) & (steps < self.end[i]))
            later = np.flatnonzero(room[k + 1 :] >= 0)  # a necessary condition, checked in full above
            if not len(later):
                return taken
            k += 1 + int(later[0])

    def kick(self) -> bool:
        """Note P5: from the plan, try each of the ``kicks`` exchanges that cost
        least (they save nothing, or exchange would have made them), each
        followed by the improving exchanges that do not undo it; keep the
        cheapest plan reached if it beats the start and fits when simulated.
        Return whether one was kept."""
        plan = self.plan
        start, confirmed, cost0 = frozenset(plan.recompute), (self.T.copy(), self.g), plan.cost()
        picked = self.picked.copy()
        best_cost, best = cost0 - (1e-9 * cost0 + 1e-15), None
        for first in self._moves()[: self.kicks]:
            self._apply(first)
            for _ in range(_DESCENT):
                ch = self._best_move(no_add=first.drop, no_drop=first.add)
                if ch is None:
                    break
                self._apply(ch)
            if plan.cost() < best_cost:
                best_cost, best = plan.cost(), frozenset(plan.recompute)
            self.plan.commit(plan.change(add=start - plan.recompute, drop=plan.recompute - start))
            self.T, self.picked, self.exact = confirmed[0].copy(), picked.copy(), True
        if best is None or self.simulations >= self.allowance:
            return False
        ch = plan.change(add=best - plan.recompute, drop=plan.recompute - best)
        timeline, g = self._simulate(plan.blocks_with(ch))
        if int(timeline.max()) > self.budget:
            return False  # the linear model was wrong on the way
        self._apply(ch)
        self._set_timeline(timeline, g)
        self.counts["kicks"] += 1
        return True

    # ---- the whole search ----------------------------------------------------------------------
    def run(self) -> None:
        if not self.peak_aware_picks():  # Note P8
            from acopt.mu_two import _Greedy, _shortest_fitting_prefix

            g = _Greedy(self.profile, min_time_s=self.options.min_time_s)
            k, _ = _shortest_fitting_prefix(self.profile, g, self.budget, "bisect")  # raises below the floor
            ch = self.plan.change(add=set(g.prefix(k)) - self.plan.recompute, drop=self.plan.recompute - set(g.prefix(k)))
            self._apply(ch)
            self._set_timeline(*self._simulate(self.plan.blocks.values()))
            self.counts["fallback"] = 1
        self.allowance = self.simulations + self.options.max_simulations
        self.prune()
        while True:
            before = frozenset(self.plan.recompute)
            self.exchange()
            if self.plan.recompute != before:
                self.prune()
            if not (self.kicks and self.simulations < self.allowance and self.kick()):
                break


@contextlib.contextmanager
def _no_cyclic_gc():
    """Pause Python's cyclic garbage collector (reference counting goes on).

    The search makes many short-lived sets and blocks, none of them cyclic;
    each full collection then walks every object of the profile, which cost a
    quarter of the planner's time on the 3 000-candidate chain. The
    collector's previous state is restored on exit."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def greedy(*, profile: Profile, budget_bytes: int, options: GreedyOptions) -> Plan:
    """The peak-aware greedy planner (registered as ``"greedy"``, the default).

    Called directly (not through :func:`acopt.plan`), it skips the floor
    check; when it finds no plan that fits (below the floor) it raises
    :class:`~acopt.planning.InfeasibleBudget`.
    """
    started = time.perf_counter()
    with _no_cyclic_gc():
        search = _Search(profile, budget_bytes, options)
        search.run()
        result = frozenset(search.plan.recompute)
    n = search.counts
    return assemble_plan(
        profile,
        result,
        solver="greedy",
        status=PlanStatus.HEURISTIC,
        budget_bytes=budget_bytes,
        started=started,
        options=options,
        stats=SolverStats(
            objective=search.plan.cost(),
            iterations=search.simulations,
            notes=(
                f"{n['picks']} peak-aware picks"
                + (", then no candidate was dead at the peak: restarted from mu-TWO's plan (Note P8)" if n["fallback"] else "")
                + f"; prune dropped {n['pruned']}, exchange made {n['exchanges']} move(s), {n['kicks']} kick(s) kept; "
                f"{len(search.plan.recompute)} of {len(search.plan.candidates)} candidates recomputed, "
                f"{search.simulations} fast-path simulations",
            ),
        ),
    )


SPEC = PlannerSpec(
    name="greedy",
    planner=greedy,
    options_type=GreedyOptions,
    exact=False,
    requires=(),
    description="peak-aware greedy with prune and exchange: picks what is alive at the peak, cheapest per byte that counts",
)
