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

Note P9 (closures: walks that do not grow with the chains). Near the floor
most candidates are picked, so rule 4's chains run back many layers and a
block can hold most of the forward graph; a change re-walks every block it
touches (Note P6), and a walk from the block's activation back to its
sources visits every node of it: on Llama-shaped profiles at floor+10% the
walks visited 0.7 M, 7 M and 30 M nodes at 4, 8 and 16 layers, and the
32-layer one planned for more than 20 minutes. Instead a block is the union
of its outputs' *closures*: a node's closure under R is the node and,
through its inputs that are not available under R, the closures of those
inputs. It depends only on R's choice for the candidates that the inputs it
looked at refer to (its ``deps``), so it is kept with R restricted to them
(``key``) and reused for every plan that agrees there, the few most recent
per node (``_CLOSURES_KEPT``). What a closure reaches through inputs that
are never available (forward-only storages) is the same under every plan:
it is computed once per node (``_local_closure``), so closures are kept
only for candidates' outputs and the nodes that refer to candidates. Sets
are Python ints used as bit sets (nodes by index, candidates by rank), so a
closure is the OR of its inputs', and a change computes only the closures
it changes (on a chain, about two per block it touches) however long the
blocks are. A block's time is still its
nodes' times added one after another in graph order, the very float a walk
gives, kept per member set; its name sets (``nodes``, ``sources``,
``chain``, ``held``) are made from the bits when read. The plans are the
walks' plans, bit for bit.

Determinism: every loop runs over picks and candidates in creation order or
sorted by (value, creation order), never in set order, and the effort limits
count simulations and moves, not seconds: the same profile and budget give
the same plan on any machine and under any hash seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
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


class _Bits:
    """Names of the bits the plan's sets are made of (Note P9): node ``i`` of
    the profile is bit ``i`` of a member set, candidate of rank ``r`` bit ``r``
    of a candidate set, ``held[k]`` bit ``k`` of a held set. Shared by the
    blocks of one plan."""

    def __init__(self, names, times, candidates, held, random: int):
        self.names, self.candidates, self.held, self.random = names, candidates, held, random
        self.time_list = list(times)
        self.times = np.asarray(self.time_list, dtype=np.float64)
        self._time: dict[int, float] = {}

    @staticmethod
    def members(bits: int) -> list[int]:
        """The set bits of ``bits``, in increasing order (fast for few)."""
        out = []
        while bits:
            low = bits & -bits
            out.append(low.bit_length() - 1)
            bits ^= low
        return out

    @staticmethod
    def _array(bits: int) -> np.ndarray:
        """The set bits of ``bits``, in increasing order (fast for many)."""
        raw = np.frombuffer(bits.to_bytes((bits.bit_length() + 7) // 8, "little"), dtype=np.uint8)
        return np.flatnonzero(np.unpackbits(raw, bitorder="little"))

    def indices(self, bits: int) -> list[int]:
        return self.members(bits) if bits.bit_count() <= _FEW else self._array(bits).tolist()

    def time_of(self, members: int) -> float:
        """The summed time of the member nodes, added one after another in graph
        order, as ``sum()`` over ``MemoryModel.block``'s nodes adds them (so the
        same float: ``cumsum`` adds in order too); remembered by member set."""
        t = self._time.get(members)
        if t is None:
            if len(self._time) >= _TIMES_KEPT:
                self._time.clear()
            if members.bit_count() <= _FEW:
                t = sum([self.time_list[i] for i in self.members(members)])
            else:
                t = float(np.cumsum(self.times[self._array(members)])[-1])
            self._time[members] = t
        return t


@dataclasses.dataclass(frozen=True, eq=False)
class _Block:
    """``MemoryModel.block(activation, R)``, as the fast path reads it, plus
    the candidate storages its sources and its members refer to (Note P6).
    The sets are kept as bits (Note P9); their names are derived on demand."""

    activation: str
    position: int
    time_s: float
    member_bits: int  # by node index
    source_bits: int  # by candidate rank: picking one of these grows the block
    chain_bits: int  # by candidate rank: dropping one of these shrinks it
    held_bits: int  # activations its sources refer to: kept alive until the block (Note P1)
    bits: _Bits = dataclasses.field(repr=False)

    @functools.cached_property
    def nodes(self) -> tuple[str, ...]:  # in graph order
        names = self.bits.names
        return tuple([names[i] for i in self.bits.indices(self.member_bits)])

    @functools.cached_property
    def sources(self) -> frozenset[str]:
        return frozenset(self.bits.candidates[r] for r in self.bits.indices(self.source_bits))

    @functools.cached_property
    def chain(self) -> frozenset[str]:
        return frozenset(self.bits.candidates[r] for r in self.bits.indices(self.chain_bits))

    @functools.cached_property
    def held(self) -> frozenset[str]:
        return frozenset(self.bits.held[k] for k in self.bits.indices(self.held_bits))

    @functools.cached_property
    def random(self) -> frozenset[str]:
        """Random nodes it replays: their generator states are kept until then (rule 7)."""
        return frozenset(self.bits.names[i] for i in self.bits.members(self.member_bits & self.bits.random))

    @functools.cached_property
    def holds(self) -> tuple:
        """What it keeps alive until it runs (Note P1): ``held``, and ``("rng", v)``
        for each random node ``v`` it replays."""
        return (*self.held, *(("rng", v) for v in sorted(self.random)))


@dataclasses.dataclass(frozen=True, slots=True)
class _Change:
    """Adding ``add`` to the plan and dropping ``drop``: the new blocks, and the
    recompute time it adds (negative: it saves)."""

    add: frozenset[str]
    drop: frozenset[str]
    blocks: dict[str, _Block]
    delta_s: float


_CLOSURES_KEPT = 4  # Note P9: closures remembered per node
_TIMES_KEPT = 50_000  # Note P9: block times remembered by member set
_FEW_DEPS = 16  # Note P9: cached changes that depend on at most this many candidates are indexed
_FEW = 64  # Note P9: sets of at most this many bits are read bit by bit, larger ones by numpy


class _Plan:
    """A plan R with the exact block of every pick, changed by adds and drops (Note P6)."""

    def __init__(self, profile: Profile, model: MemoryModel):
        nodes = profile.nodes
        index = self.index = profile.node_index
        self.replayable = model._replayable_cached
        self.candidates = model.candidates
        self.rank = {c: i for i, c in enumerate(self.candidates)}
        self.cbit = {c: 1 << i for i, c in enumerate(self.candidates)}
        candidate_set = set(self.candidates)
        placeholder, activations = model.placeholder_storages, model.activation_set
        # Note P9: per node index, as bits. As MemoryModel.available: a node is
        # never available (it refers to a forward-only storage), or available
        # unless a candidate storage it refers to is recomputed (``watch``);
        # placeholders always are. ``hold``: the kept activations it refers to.
        # Blocks replay forward nodes and what they read, which comes earlier:
        # only the nodes up to the last forward one are needed.
        head = 1 + max((k for k, n in enumerate(nodes) if n.region == Region.FORWARD), default=-1)
        never, watch, hold = [False] * head, [0] * head, [0] * head
        held_names: list[str] = []
        held_id: dict[str, int] = {}
        outputs, cbit = model.output_storages, self.cbit
        for k, n in enumerate(nodes[:head]):
            if n.is_placeholder:
                continue
            for s in n.storages:
                if s in activations:
                    if s in candidate_set:
                        watch[k] |= cbit[s]
                    if s not in outputs:
                        if s not in held_id:
                            held_id[s] = len(held_names)
                            held_names.append(s)
                        hold[k] |= 1 << held_id[s]
                elif s not in placeholder:
                    never[k] = True
        self._watch, self._hold = watch, hold
        random = 0
        if profile.rng_state_bytes:
            for k, n in enumerate(nodes[:head]):
                if n.random:
                    random |= 1 << k
        self.bits = _Bits([n.name for n in nodes], [n.time_s for n in nodes], self.candidates, held_names, random)
        self._closures: list[list[tuple]] = [[] for _ in range(head)]  # Note P9
        self._local: list[tuple | None] = [None] * head  # Note P9: _local_closure, when known
        # Per node: its inputs that are never available and what the always
        # available ones (no candidate storage) hold; its other inputs, with
        # the candidates they refer to.
        self._fixed: list[tuple[tuple[int, ...], int]] = []
        self._watched: list[tuple[tuple[int, int], ...]] = []
        for n in nodes[:head]:
            never_inputs, held_fixed, watched = [], 0, []
            for i in map(index.__getitem__, n.inputs):
                if never[i]:
                    never_inputs.append(i)
                elif watch[i]:
                    watched.append((i, watch[i]))
                else:
                    held_fixed |= hold[i]
            self._fixed.append((tuple(never_inputs), held_fixed))
            self._watched.append(tuple(watched))
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
        self._outputs = {c: tuple(index[v] for v in self.outputs[c]) for c in self.candidates}
        # Candidates whose spans overlap free the shared storages once (Note P1).
        self.shares = {c: frozenset(q for q in self.candidates if q != c and self.span[q].keys() & self.span[c].keys())
                       for c in self.candidates if len(self.span[c]) > 1}  # fmt: skip
        for c, qs in list(self.shares.items()):
            for q in qs:
                self.shares[q] = self.shares.get(q, frozenset()) | {c}
        self.recompute: set[str] = set()
        self.recompute_bits = 0
        self.blocks: dict[str, _Block] = {}
        # by candidate rank: the picks (bits) whose blocks' sources, or members, refer to it
        self.src_readers = [0] * len(self.candidates)
        self.chain_readers = [0] * len(self.candidates)
        # Note P6: the time adding one candidate or dropping one pick changes,
        # cached, with the candidates its walks looked at: few of them are
        # indexed by candidate rank (``_deps``: rank -> entries), many kept as
        # bits (``_wide``) and scanned at each commit (Note P9).
        self._changes: dict[tuple[str, str], _Change | None] = {}
        self._invalid: set[tuple[str, str]] = set()
        self._deps: list[set[tuple[str, str]]] = [set() for _ in self.candidates]
        self._wide: dict[tuple[str, str], int] = {}
        self.added = np.full(len(self.candidates), np.nan)  # added_time by rank, nan: not known
        # Note P9, the work: blocks walked, their nodes (what walking each from
        # scratch would visit), and the closures computed for them.
        self.walks = self.walked_nodes = self.closures = 0

    def _closure(self, v: int, recompute: int) -> tuple:
        """Note P9: the closure of node ``v`` under the plan ``recompute`` (bits),
        ``(deps, key, members, sources, chain, held, bad)``: ``v`` and, through
        the inputs that are not available, everything they read back to the
        available ones; the candidates whose state it looked at (``deps``; it
        holds for every plan that agrees with ``recompute`` on them: ``key``);
        the candidate bits of the available inputs (sources) and of the members
        (chain); the kept activations the available inputs refer to; whether a
        member cannot be replayed."""
        memo = self._closures
        for k, e in enumerate(memo[v]):
            if recompute & e[0] == e[1]:
                if k:
                    memo[v].insert(0, memo[v].pop(k))
                return e
        local, hold = self._local, self._hold
        known: dict[int, tuple] = {}  # closures under ``recompute`` met in this call
        stack = [v]
        while stack:
            u = stack[-1]
            if u in known:
                stack.pop()  # reached twice (two readers were on the stack)
                continue
            here = local[u] if local[u] is not None else self._local_closure(u)
            deps = sources = 0
            held = here[2]
            found = []
            missing = False
            for i, w in here[1]:
                deps |= w
                if w & recompute:  # not available: a member
                    e = known.get(i)
                    if e is None:
                        for e in memo[i]:
                            if recompute & e[0] == e[1]:
                                known[i] = e
                                break
                        else:
                            stack.append(i)
                            missing = True
                            continue
                    found.append(e)
                else:  # available: a source
                    sources |= w
                    held |= hold[i]
            if missing:
                continue
            stack.pop()
            self.closures += 1
            members, chain, bad = here[0], here[3], here[4]
            for e in found:
                deps |= e[0]
                members |= e[2]
                sources |= e[3]
                chain |= e[4]
                held |= e[5]
                bad = bad or e[6]
            entry = known[u] = (deps, recompute & deps, members, sources, chain, held, bad)
            memo[u].insert(0, entry)
            del memo[u][_CLOSURES_KEPT:]
        return known[v]

    def _local_closure(self, u: int) -> tuple:
        """Note P9: what node ``u``'s closure holds whatever the plan: ``u`` and,
        through its inputs that are never available, their inputs of the same
        kind, ``(members, watched, held, chain, bad)``: those nodes, the inputs
        they read that refer to candidates (with their candidate bits), what
        their always-available inputs hold, the candidates the nodes refer to,
        and whether one cannot be replayed."""
        fixed, watched, watch, names, replayable = (
            self._fixed,
            self._watched,
            self._watch,
            self.bits.names,
            self.replayable,
        )
        members = held = chain = 0
        bad = False
        reads: dict[int, int] = {}
        seen: set[int] = set()
        stack = [u]
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            members |= 1 << x
            chain |= watch[x]
            bad = bad or not replayable(names[x])
            never_inputs, held_fixed = fixed[x]
            held |= held_fixed
            stack.extend(never_inputs)
            for i, w in watched[x]:
                reads[i] = w
        out = self._local[u] = (members, tuple(sorted(reads.items())), held, chain, bad)
        return out

    def walk(self, a: str, recompute: int) -> _Block | None:
        """``MemoryModel.block(a, R)`` for the plan ``R`` given as candidate bits
        (``a`` in it), or None if it would replay a node that cannot be
        replayed: the union of its outputs' closures (Note P9)."""
        self.walks += 1
        members = sources = chain = held = 0
        for o in self._outputs[a]:
            e = self._closure(o, recompute)
            if e[6]:
                return None
            members |= e[2]
            sources |= e[3]
            chain |= e[4]
            held |= e[5]
        self.walked_nodes += members.bit_count()
        return _Block(
            activation=a, position=self.position[a], time_s=self.bits.time_of(members), member_bits=members,
            source_bits=sources, chain_bits=chain & ~self.cbit[a], held_bits=held, bits=self.bits,
        )  # fmt: skip

    def _bits(self, names) -> int:
        out = 0
        for c in names:
            out |= self.cbit[c]
        return out

    def change(self, add=(), drop=()) -> _Change | None:
        """What adding ``add`` and dropping ``drop`` would do (None: a block could
        not be replayed). Only the blocks it touches are walked (Note P6)."""
        add, drop = frozenset(add), frozenset(drop)
        add_bits, drop_bits = self._bits(add), self._bits(drop)
        after = (self.recompute_bits | add_bits) & ~drop_bits
        readers = 0  # the picks whose blocks it changes: sources it adds, members it drops
        for c in add:
            readers |= self.src_readers[self.rank[c]]
        for c in drop:
            readers |= self.chain_readers[self.rank[c]]
        touched = set(add).union(self.candidates[r] for r in _Bits.members(readers))
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
            deps = self.cbit[c]
            for b in ch.blocks.values():
                deps |= b.source_bits | b.chain_bits
            if deps.bit_count() <= _FEW_DEPS:
                for r in _Bits.members(deps):
                    self._deps[r].add(key)
            else:
                self._wide[key] = deps
        return ch

    def commit(self, ch: _Change) -> None:
        """Apply ``ch``. A cached add of ``c`` depends on the blocks with ``c``
        among their sources, a cached drop of ``p`` on ``p``'s block and the blocks
        with ``p`` among their members, and both on what their walks looked at."""
        changed_bits = self._bits(ch.add | ch.drop)
        walked = sources = chain = 0  # of the blocks it changes, before and after
        for a in sorted(ch.drop | set(ch.blocks), key=self.rank.__getitem__):
            bit = self.cbit[a]
            walked |= bit
            old = self.blocks.pop(a, None)
            old_sources, old_chain = (old.source_bits, old.chain_bits) if old is not None else (0, 0)
            new = ch.blocks.get(a)
            new_sources, new_chain = (new.source_bits, new.chain_bits) if new is not None else (0, 0)
            if new is not None:
                self.blocks[a] = new
            sources |= old_sources | new_sources
            chain |= old_chain | new_chain
            for r in _Bits.members(old_sources ^ new_sources):
                self.src_readers[r] ^= bit
            for r in _Bits.members(old_chain ^ new_chain):
                self.chain_readers[r] ^= bit
        self.recompute = (self.recompute | ch.add) - ch.drop
        self.recompute_bits = self._bits(self.recompute)
        stale = set(self._invalid) if ch.drop else set()
        if ch.drop:
            self._invalid = set()
        cands = self.candidates
        stale.update(("add", cands[r]) for r in _Bits.members(changed_bits | sources))
        stale.update(("drop", cands[r]) for r in _Bits.members(changed_bits | chain | walked))
        for r in _Bits.members(changed_bits):
            stale |= self._deps[r]  # (and entries since recomputed: they are computed again)
            self._deps[r] = set()
        stale.update(key for key, deps in self._wide.items() if deps & changed_bits)
        for key in stale:
            if key in self._changes:
                del self._changes[key]
                self._wide.pop(key, None)
                self._invalid.discard(key)
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
        return block.holds

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
            b = self.plan.blocks.get(a)
            if b is not None:
                touched.update(self._holds(b))
        added: dict[object, list[int]] = {}  # what the changed blocks hold, until they run
        for a, b in ch.blocks.items():
            for key in self._holds(b):
                added.setdefault(key, []).append(int(self.end[self.rank[a]]))
        touched.update(added)
        for key in sorted(touched, key=str):
            holders = self.holders.get(key, {})
            now = list(holders.values())
            then = [step for a, step in holders.items() if a not in changed]
            then += added.get(key, [])
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
        for lo, hi in itertools.pairwise(cuts):
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
            ch = self.plan.change(
                add=set(g.prefix(k)) - self.plan.recompute, drop=self.plan.recompute - set(g.prefix(k))
            )
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
                + (
                    ", then no candidate was dead at the peak: restarted from mu-TWO's plan (Note P8)"
                    if n["fallback"]
                    else ""
                )
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
