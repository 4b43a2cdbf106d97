"""The exact planners' shared formulation: built once from a Profile, solver-free.

``ilp`` (PuLP/CBC) and ``cpsat`` (OR-Tools CP-SAT) solve the same abstract
mixed-integer model, built here from a :class:`~acopt.records.Profile` and
:class:`~acopt.schedule.MemoryModel` alone (STYLE point 8: build here, solve
in solvers/ilp.py or solvers/cpsat.py, map back in solvers/exact.py). Nothing
here imports torch or a solver.

The model is the memory model of docs/memory-model.md (rules 1-4) as the
simulator counts it (acopt/simulator.py: aliasing flows through reads), written
as linear rows. Its notes are referenced from the code as "Note N". In short:
cost is exact; memory is exact at every node of the schedule, original or
replayed (Notes 3-4), except for one pattern that traced graphs never contain,
where it is a relaxation settled by the simulator (Note 7).

Note 1 (decisions and cost). One binary ``r[a]`` per candidate. ``y[a, v]``
("block(a) replays v") exists for every node v that block(a) may replay under
*some* plan: the nodes reachable backwards from a's block outputs through
inputs that can be unavailable. The nodes of block(a, {a}) (the *core*) are
replayed whenever a is recomputed, so their ``y`` *is* ``r[a]``; the others
(*extra*: reached only through other recomputed activations, mu-TWO chains)
get a variable in [0, 1]. Cost = sum of the replayed nodes' times, exactly
``sum(block(a, R).time_s for a in R)``.

Note 2 (implications). ``u[i]`` = "node i's forward value is unavailable
after the forward region": 1 if i refers to a forward-only storage, else the
OR of ``r`` over the candidate storages it refers to (``u = r[t]`` for the
usual single storage). ``y[a, i] >= y[a, v] + u[i] - 1`` for each input i of
each possible member v. Every other row only *charges* for ``y`` (time and
memory grow with it), so at an optimum ``y`` is the exact block membership;
the continuous ``y``, ``u``, ``z``, ``l`` are integral once ``r`` is.

Note 3 (memory at original nodes: exact). Let ``base[i]`` be the live bytes at
node i of the unmodified step (including the node's workspace). A plan changes
them only in two ways:
  (a) a recomputed activation a is dead on ``(last forward use, block
      position)``: its forward copy dies after its last forward read; every
      later read, and every later view of it, refers to the rebuilt copy, which
      lives from its block to the original's last use. ``- bytes(a) * r[a]``
      on that interval;
  (b) a kept storage s whose last use is before some block that reads it as a
      source lives until that block: ``+ bytes(s) * l[s, j]`` where ``l[s, j]``
      = "s is read by a block at or after s's j-th possible read point".
Part (a) is a sparse recurrence, one continuous ``W`` per segment of nodes
where no term starts or ends (Checkmate's U variables); only each segment's
largest ``base`` needs a row.

Note 4 (memory inside recompute blocks: exact). At node w of block(a) at
position p: the bytes alive before p (those alive at node p, minus what node p
itself allocates and its workspace, minus the rebuilt copies of the blocks at
p that have not run yet), + kept sources still to be read at or after this
point (``l``), + block(a)'s own live storages at w, + w's workspace. A storage
s made by member u is alive at w iff some alias x of s replayed in block(a)
(u <= x <= w) is w itself, is read by a replayed w' >= w, or is a block output
(read later): ``z >= y[a, x] + y[a, u] + y[a, w'] - 2`` (an OR of ANDs, exact
since rows only charge for ``z``). Blocks at one position run one after the
other, each keeping only its output. There are as many such rows as (block,
possible member) pairs, so they are added lazily (Note 5). The one
approximation: a replayed view of a *source* that refers to several storages
keeps the source alive to its own last read; only the direct reads are counted
(a lower bound, so never wrong, Note 5).

Note 5 (lazy rows, exactness). The solver starts with every row of Note 3 and
the block rows of core members. After each solve, :meth:`Formulation.violated`
evaluates every block row of the returned plan; violated ones are added and the
model is re-solved. Each row is exact or a lower bound on the true memory, so
the model is a relaxation of the memory model throughout: its bound is valid,
and its optimum, once the simulator confirms it fits, is the optimum. A plan
the model places under the budget but the simulator does not (only possible
with Note 7's relaxation, or from solver tolerances) is cut off by a no-good
row, valid since that plan does not fit; the planner's notes count them.

Note 6 (pruning by cost, exact). With an incumbent of cost C (the greedy plan,
checked by the simulator), y[a, v] is fixed to 0 when every plan that puts v
into block(a) costs more than C. The bound: a's core time plus the cheapest
path from a's core back to v, where a node at depth d costs its time (1 + d -
cores that hold it) times and a candidate's creator adds that candidate's core
time once and one depth: the path's nodes are unavailable, so every candidate
whose creator it passes is recomputed and its own block replays the rest of
the path too. (A label-setting search over (node, depth).) The incumbent
survives, so the optimum is kept; on ResNet-152 this removes most chain
variables.

Note 7 (several storages read later, relaxed). A forward value read after the
forward region that refers to several storages, one a candidate (a tuple-
returning node read directly; traced fx graphs read tuples through getitem, so
real profiles never have one), lets one recompute block change the lives of
*sibling* storages and of other blocks' rebuilt copies. For the storages of
such values the model is a relaxation instead: the original copy of s is dead
after its last forward read whenever any candidate that could redirect a read
of s is recomputed (``u[s]``), rebuilt copies count only while their block
reads them, and those candidates' rebuilt copies are not counted at original
nodes. The simulator and Note 5's no-goods make the answer exact.

Note 8 (minimum peak). ``build(budget=None)`` bounds every memory row by a
peak variable and minimises it, with the same lazy loop: how an INFEASIBLE
answer states the least peak any plan reaches (which can be below rule 6's
floor: recomputing everything is not always the smallest peak).

Note 9 (dense rows). The recurrence of Note 3 keeps the model sparse but hides
from the solvers that the rows near the peak are knapsack rows over the ``r``
(CBC finds no cover cuts, and its LP bound stays put while it branches among
ResNet's many look-alike layers). The rows of the few segments with the most
base bytes are therefore also written out in full, ``base + sum(bytes * r) +
...`` (redundant, exact). On ResNet-152 this takes CBC from a 4% gap after
60 s to a proven optimum in 10 s.

Note 10 (chain members on demand, exact). Most extra members (Note 1) sit
behind long chains of other candidates: block(a) replays them only if every
candidate on the way is recomputed too. ``build(allowed=...)`` writes the
``y`` of only the extra members reached through at most ``chain_depth``
other candidates' creators (a 0-1 breadth-first search); for the others the
implication of Note 2 is left out, so the model lets the block stop there
(less time, less memory: a relaxation, and its bound stays valid). When a
solve returns a plan whose real blocks (``MemoryModel.block``) replay a
member the model left out, exact.py adds those members, rebuilds, keeps the
lazy rows and cuts found so far, and solves again. A plan is only accepted
once the model represents every node its blocks replay, so the optimum is
the optimum of the full model. Three things keep the rebuilds few (exact.py):
the node where a block stops is its *frontier*, and the block pays for it
(``y`` of the frontier node, with only the implication that puts it there
and its time in the objective: still a relaxation, since the real block
replays it too, and much tighter on long chains); a rebuild adds the
members the plan needs and raises the depth by one for every block
(``growth="step"``: look-alike layers come in together); and the relaxed
plan, which is still a plan, is simulated: if it fits and beats the
incumbent it becomes the incumbent (and Note 6 prunes with its cost), and
if its cost meets the relaxed model's bound it is optimal, with no rebuild.

Note 11 (members that cannot be replayed, exact). Every node of a
candidate's own block is replayable (that makes it a candidate), but a chain
can reach a node that is not (a side effect, or a value written in place
later): a plan whose block would replay it is invalid (``MemoryModel.schedule``
raises). Such extra members get ``y = 0``, so by Note 2 the plan never makes
them unavailable on the way; they are in the model from the first build
(Note 10 never leaves them out), and Note 6 may prune them as usual.

Note 12 (generator states, exact). Memory model rule 7: a random node v
that some block replays keeps its generator state (``rng_state_bytes``)
from its forward step to its last replay, and each replay holds one more
during v. The saved state is written as a storage ``rng-state:v`` that dies
just before v in the unmodified step and is read by every block that may
replay v (read literal ``y[k, v]``), so Note 3 (b) and Note 4 count it with
the ``l`` variables of kept sources; the replay's state is workspace of v in
the block rows.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import heapq
import math
from collections.abc import Iterable, Sequence
from functools import cached_property

from acopt.records import Profile, Region
from acopt.schedule import MemoryModel

# ---------------------------------------------------------------------------
# The abstract model: variables, rows, objective.

BINARY = "binary"  # r[a]
UNIT = "unit"  # continuous in [0, 1], integral at the optimum (Note 2)
FREE = "free"  # memory recurrence (bytes), continuous / integer


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Var:
    name: str
    kind: str
    lb: int
    ub: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """``lo <= sum(coef * var) <= hi``; ``None`` is unbounded. Coefficients and
    bounds are integers (bytes, or 0/1 logic).

    A *memory* row reads ``sum(coef * var) + const <= budget``: live bytes at
    one point of the schedule. ``budget`` is the byte budget, or the peak
    variable when the model minimises the peak (:meth:`Formulation.build`).
    """

    name: str
    terms: tuple[tuple[int, int], ...]
    lo: int | None = None
    hi: int | None = None
    const: int = 0
    memory: bool = False
    in_bytes: bool = False  # coefficients are bytes (memory rows, the recurrence, peak cuts)

    def __post_init__(self) -> None:
        if self.memory:
            object.__setattr__(self, "in_bytes", True)

    def value(self, x: Sequence[float]) -> float:
        return sum(c * x[v] for v, c in self.terms) + self.const

    def violation(self, x: Sequence[float], budget: float | None = None) -> float:
        val = self.value(x)
        out = 0.0
        if self.memory:
            return max(0.0, val - budget)
        if self.hi is not None:
            out = max(out, val - self.hi)
        if self.lo is not None:
            out = max(out, self.lo - val)
        return out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelSize:
    variables: int
    binaries: int
    rows: int
    nonzeros: int


# Literals: a variable id or the constant 1 (``ONE``).
ONE = -1
RNG_STATE = "rng-state:"  # Note 12: pseudo-storage names of saved generator states


def _and_row(name: str, z: int, lits: Sequence[int]) -> Row:
    """``z >= sum(lits) - (len - 1)``: z is at least the AND of the literals (ONE is true)."""
    lits = [v for v in sorted(set(lits)) if v != ONE]
    if not lits:
        return Row(name=name, terms=((z, 1),), lo=1)
    terms = [(z, 1)] + [(v, -1) for v in lits]
    return Row(name=name, terms=tuple(terms), lo=-(len(lits) - 1))


# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One recomputable activation, as the model sees it (ranks are node indices)."""

    name: str
    bytes: int
    created: int
    last_fw: int  # the forward copy's last step (Note 3 (a))
    rebuilt_end: int  # the rebuilt copy's last step
    death: int  # last use in the unmodified step
    events: tuple[tuple[int, int], ...]  # (node, change in live bytes from there on) when recomputed
    position: int  # its block runs just before this node
    order: int  # rank of its block in schedule order
    outputs: tuple[int, ...]
    core: tuple[int, ...]  # block(a, {a}) members
    extra: tuple[int, ...]  # other possible members (chains)
    core_time_s: float


class Formulation:
    """Everything both exact planners need from a profile, computed once, and
    the rows of the abstract model (Notes 1-6).

    >>> f = Formulation(profile)                               # doctest: +SKIP
    >>> f.build(budget=2**20)                                  # doctest: +SKIP
    """

    def __init__(self, profile: Profile, *, incumbent_cost: float | None = None):
        self.profile = profile
        self.mm = MemoryModel(profile)
        self.incumbent_cost = incumbent_cost
        nodes = profile.nodes
        self.n = len(nodes)
        self._idx = profile.node_index
        self._inputs = [tuple(self._idx[i] for i in n.inputs) for n in nodes]
        self._users: list[list[int]] = [[] for _ in nodes]
        for j, ins in enumerate(self._inputs):
            for i in ins:
                self._users[i].append(j)
        self._time = [n.time_s for n in nodes]
        self._temp = [getattr(n, "temp_bytes", 0) for n in nodes]
        self._sbytes = {s.name: s.bytes for s in profile.storages}
        self._screator = {s.name: self._idx[s.node] for s in profile.storages}
        self._analyse()
        # model state (mutable: rows are added lazily)
        self.vars: list[Var] = []
        self.rows: list[Row] = []
        self.objective: dict[int, float] = {}
        self._defs: list[tuple] = []  # evaluator definitions, per var
        self._var_by_key: dict[tuple, int] = {}
        self._block_rows: dict[tuple[int, int], int | None] = {}
        self._active_vars: set[int] = set()
        self.no_goods = 0
        self.budget: int | None = None
        self.peak_var: int | None = None

    # ---- profile analysis (torch- and solver-free) -------------------------
    def _analyse(self) -> None:
        p, mm, nodes, idx = self.profile, self.mm, self.profile.nodes, self._idx
        n = self.n
        # Liveness of every storage in the unmodified step (memory model, rule 1).
        last_use = [max(u, default=j) for j, u in enumerate(self._users)]
        out_read = set()
        for j, node in enumerate(nodes):
            if node.is_output:
                out_read.update(self._inputs[j])
        death: dict[str, int] = {}
        for s, aliases in mm.aliases.items():
            c = self._screator[s]
            d = c
            forever = s in mm.placeholder_storages
            for v in aliases:
                j = idx[v]
                if j in out_read:
                    forever = True
                d = max(d, last_use[j])
            death[s] = n - 1 if forever else d
        self.death = death
        base = [0] * (n + 1)
        alloc = [0] * n
        for s, b in self._sbytes.items():
            c = self._screator[s]
            base[c] += b
            base[death[s] + 1] -= b
            alloc[c] += b
        run = 0
        self.base = []
        for j in range(n):
            run += base[j]
            self.base.append(run + self._temp[j])
        self.alloc = alloc

        self.candidate_names = mm.candidates
        cand_id = {a: k for k, a in enumerate(self.candidate_names)}
        self.cand_id = cand_id
        act_set = mm.activation_set
        ph = mm.placeholder_storages
        # Note 2: unavailability of each node's forward value.
        self.always_unavailable: set[int] = set()
        self.unavail_by: dict[int, tuple[int, ...]] = {}
        for j, node in enumerate(nodes):
            if node.is_placeholder or node.region != Region.FORWARD:
                continue
            ks = []
            always = False
            for s in node.storages:
                if s in ph:
                    continue
                if s not in act_set:
                    always = True
                elif s in cand_id:
                    ks.append(cand_id[s])
            if always:
                self.always_unavailable.add(j)
            elif ks:
                self.unavail_by[j] = tuple(sorted(set(ks)))

        # Note 7: forward values read later that refer to several storages, one
        # of them a candidate (never in traced fx graphs: tuples are read
        # through getitem). Their storages get the relaxed treatment.
        irregular = []
        self.irregular_storages: dict[str, set[int]] = {}
        for j, node in enumerate(nodes):
            own = [s for s in node.storages if s not in ph]
            if (
                node.region == Region.FORWARD
                and not node.is_placeholder
                and len(own) > 1
                and any(s in cand_id for s in own)
                and any(nodes[u].region != Region.FORWARD for u in self._users[j])
            ):
                irregular.append(node.name)
                ks = {cand_id[s] for s in own if s in cand_id}
                for s in own:
                    self.irregular_storages.setdefault(s, set()).update(ks)
                    if s in cand_id:
                        self.irregular_storages[s].add(cand_id[s])
        self.irregular = tuple(irregular)
        self.fw_end: dict[str, int] = {}
        for s in self.irregular_storages:
            end = self._screator[s]
            for v in mm.aliases[s]:
                j = idx[v]
                if nodes[j].region == Region.FORWARD:
                    end = max(end, j, *(u for u in self._users[j] if nodes[u].region == Region.FORWARD))
            self.fw_end[s] = end

        # Blocks: positions, order, core and extra members.
        cands = []
        raw = []
        for a in self.candidate_names:
            blk = mm.block(a, frozenset({a}))
            raw.append((blk.position, idx[p.storage_by_name[a].node], a, blk))
        order = {a: o for o, (_, _, a, _) in enumerate(sorted(raw))}
        for pos, created, a, blk in raw:
            aliases = mm.aliases[a]
            fw = [idx[v] for v in aliases if nodes[idx[v]].region == Region.FORWARD]
            # Note 3 (a): the forward copy lives to its last forward read; every
            # later read, and every later view (aliasing flows through reads),
            # refers to the rebuilt copy, which so lives to the original death.
            last_fw = created
            for j in fw:
                last_fw = max(last_fw, j)
                for u in self._users[j]:
                    if nodes[u].region == Region.FORWARD:
                        last_fw = max(last_fw, u)
            rebuilt_end = max(pos, death[a])
            b = self._sbytes[a]
            ev: dict[int, int] = {}
            if a not in self.irregular_storages:  # else Note 7's storage events
                for at, db in ((last_fw + 1, -b), (pos, b), (rebuilt_end + 1, -b), (death[a] + 1, b)):
                    if at < n:
                        ev[at] = ev.get(at, 0) + db
            outputs = tuple(idx[v] for v in blk.outputs)
            core = tuple(idx[v] for v in blk.nodes)
            possible = self._possible_members(outputs)
            extra = tuple(sorted(possible - set(core)))
            cands.append(
                Candidate(
                    name=a,
                    bytes=self._sbytes[a],
                    created=created,
                    last_fw=last_fw,
                    rebuilt_end=rebuilt_end,
                    death=death[a],
                    events=tuple(sorted((at, db) for at, db in ev.items() if db)),
                    position=pos,
                    order=order[a],
                    outputs=outputs,
                    core=core,
                    extra=extra,
                    core_time_s=blk.time_s,
                )
            )
        self.candidates: tuple[Candidate, ...] = tuple(cands)
        self.by_order = sorted(range(len(cands)), key=lambda k: cands[k].order)
        self.at_position: dict[int, list[int]] = {}
        for k in self.by_order:
            self.at_position.setdefault(cands[k].position, []).append(k)
        self._all_candidates = self.candidates  # before Note 6's pruning
        self._creators = {c.created for c in self.candidates}
        self._replay_memo: dict[int, bool] = {}
        self._prune_extra()
        self._chains()
        # Note 3 (a) and Note 7: what each decision changes at original nodes, as
        # (key, ((node, bytes from there on), ...)); key ("r", k) or ("us", s).
        self.event_lists: list[tuple[tuple, tuple[tuple[int, int], ...]]] = [
            (("r", k), c.events) for k, c in enumerate(self.candidates) if c.events
        ]
        for s in sorted(self.irregular_storages):
            lo, hi, b = self.fw_end[s] + 1, self.death[s] + 1, self._sbytes[s]
            if lo < hi and b:
                ev = ((lo, -b),) + (((hi, b),) if hi < n else ())
                self.event_lists.append((("us", s), ev))

    def replayable(self, v: int) -> bool:
        """Whether a block may replay node v (``MemoryModel.replayable``, memoised)."""
        got = self._replay_memo.get(v)
        if got is None:
            got = self._replay_memo[v] = self.mm.replayable(self.profile.nodes[v].name)
        return got

    def _chains(self) -> None:
        """What depends on the extra members that Note 6 kept: the members no
        block may replay (Note 11) and each member's chain depth (Note 10)."""
        self.unreplayable: list[frozenset[int]] = [
            frozenset(v for v in c.extra if not self.replayable(v)) for c in self.candidates
        ]
        self.extra_depth = [self._chain_depths(k, c) for k, c in enumerate(self.candidates)]

    def with_incumbent(self, cost: float) -> Formulation:
        """A fresh copy (:meth:`fresh`) whose Note 6 pruning uses a better
        incumbent's cost: fewer chain members survive."""
        new = self.fresh()
        new.incumbent_cost = cost
        new.candidates = self._all_candidates
        new._prune_extra()
        new._chains()
        return new

    def _possible_members(self, outputs: Iterable[int]) -> set[int]:
        members: set[int] = set()
        stack = list(outputs)
        while stack:
            v = stack.pop()
            if v in members:
                continue
            members.add(v)
            for i in self._inputs[v]:
                if i not in members and (i in self.always_unavailable or i in self.unavail_by):
                    stack.append(i)
        return members

    def _prune_extra(self) -> None:
        """Note 6: drop extra members that no plan as cheap as the incumbent replays."""
        self.pruned: list[frozenset[int]] = [frozenset() for _ in self.candidates]
        self.pruned_count = 0
        if self.incumbent_cost is None or not math.isfinite(self.incumbent_cost):
            return
        limit = self.incumbent_cost * (1 + 1e-9) + 1e-12
        cands = self.candidates = self._all_candidates
        in_cores = [0] * self.n
        creator_of: dict[int, int] = {}
        for c in cands:
            for v in c.core:
                in_cores[v] += 1
        for i, ks in self.unavail_by.items():
            if len(ks) == 1 and cands[ks[0]].created == i:
                creator_of[i] = ks[0]
        new = []
        for k, c in enumerate(cands):
            if not c.extra:
                new.append(c)
                continue
            dist = self._chain_costs(k, c, limit, in_cores, creator_of)
            keep = tuple(v for v in c.extra if dist.get(v, math.inf) <= limit)
            self.pruned[k] = frozenset(c.extra) - frozenset(keep)
            self.pruned_count += len(c.extra) - len(keep)
            new.append(dataclasses.replace(c, extra=keep))
        self.candidates = tuple(new)

    def _chain_depths(self, k: int, c: Candidate) -> dict[int, int]:
        """Note 10: for each extra member, the fewest other candidates' creators a
        path from k's core to it passes (a 0-1 breadth-first search)."""
        extra = set(c.extra)
        if not extra:
            return {}
        creators = self._creators

        def weight(i: int) -> int:
            return 1 if i in creators and i != c.created else 0

        best: dict[int, int] = {}
        queue: collections.deque[tuple[int, int]] = collections.deque()
        for v in c.core:
            for i in self._inputs[v]:
                if i in extra and best.get(i, math.inf) > weight(i):
                    best[i] = weight(i)
                    queue.append((i, best[i]))
        while queue:
            v, d = queue.popleft()
            if d > best[v]:
                continue
            for i in self._inputs[v]:
                if i in extra:
                    nd = d + weight(i)
                    if nd < best.get(i, math.inf):
                        best[i] = nd
                        (queue.append if nd > d else queue.appendleft)((i, nd))
        return best

    def _chain_costs(self, k, c, limit, in_cores, creator_of, depth_cap: int = 48) -> dict[int, float]:
        """Note 6: a lower bound on the cost of any plan whose block k replays
        extra node v, for the v where it is at most ``limit``.

        Label-setting search over (node, depth) from k's core backwards, where
        depth counts the candidates whose creators the path has passed: each of
        them is recomputed and its block replays the rest of the path too (the
        path's nodes are unavailable, so they are pushed into that block as
        well), so a node at depth d costs its time (1 + d - in_cores) times
        (in_cores: how many cores hold it, which may have counted it already),
        and a creator adds its candidate's core time once.
        """
        extra = set(c.extra)
        best: dict[int, list[tuple[float, int]]] = {}
        out: dict[int, float] = {}
        heap: list[tuple[float, int, int]] = []

        def push(i: int, d: int, cost: float) -> None:
            cost += self._time[i] * (1 + max(0, d - in_cores[i]))
            nd = d
            t2 = creator_of.get(i)
            if t2 is not None and t2 != k:
                cost += self.candidates[t2].core_time_s
                nd = min(d + 1, depth_cap)
            if cost > limit:
                return
            b = best.setdefault(i, [])
            if any(bc <= cost and bd <= nd for bc, bd in b):
                return
            b.append((cost, nd))
            heapq.heappush(heap, (cost, i, nd))

        for v in c.core:
            for i in self._inputs[v]:
                if i in extra:
                    push(i, 0, c.core_time_s)
        while heap:
            cost, v, d = heapq.heappop(heap)
            if v not in out:
                out[v] = cost
            for i in self._inputs[v]:
                if i in extra:
                    push(i, d, cost)
        return out

    # ---- variables -----------------------------------------------------------
    def _var(self, key: tuple, kind: str, lb: int, ub: int, definition: tuple) -> int:
        v = self._var_by_key.get(key)
        if v is None:
            v = len(self.vars)
            self.vars.append(Var(name="_".join(str(x) for x in key), kind=kind, lb=lb, ub=ub))
            self._defs.append(definition)
            self._var_by_key[key] = v
        return v

    def r(self, k: int) -> int:
        return self._var(("r", k), BINARY, 0, 1, ("r", k))

    def y(self, k: int, v: int) -> int:
        """The literal "block k replays node v" (r[k] for core members)."""
        key = ("y", k, v)
        got = self._var_by_key.get(key)
        if got is not None:
            return got
        if v in self._core_set(k):
            return self.r(k)
        return self._var(key, UNIT, 0, 1, ("y", k, v))

    def _core_set(self, k: int) -> frozenset[int]:
        return self._core_sets[k]

    @cached_property
    def _core_sets(self) -> list[frozenset[int]]:
        return [frozenset(c.core) for c in self.candidates]

    def fresh(self) -> Formulation:
        """A copy that shares this one's analysis of the profile, with no model
        built yet (Note 10 rebuilds the model when chain members are added)."""
        new = copy.copy(self)
        new.vars, new.rows, new.objective, new._defs = [], [], {}, []
        new._var_by_key, new._block_rows, new._active_vars = {}, {}, set()
        new.no_goods, new.budget, new.peak_var = 0, None, None
        return new

    def initial_allowed(self, max_depth: int) -> list[frozenset[int]]:
        """Note 10: the extra members reached through at most ``max_depth`` other
        candidates' creators, and every member no block may replay (Note 11)."""
        return [
            frozenset(v for v, d in depths.items() if d <= max_depth) | bad
            for depths, bad in zip(self.extra_depth, self.unreplayable)
        ]

    def missing_members(self, recompute: frozenset[str]) -> dict[int, set[int]]:
        """Note 10: nodes the plan's blocks replay that the model leaves out."""
        out = {}
        for a in recompute:
            k = self.cand_id[a]
            nodes = {self._idx[v] for v in self.mm.block(a, recompute).nodes}
            miss = nodes - self._member_sets[k]
            if miss:
                out[k] = miss
        return out

    def u(self, i: int) -> int | None:
        """Literal "node i is unavailable": ONE, an r, a u var, or None (never)."""
        if i in self.always_unavailable:
            return ONE
        ks = self.unavail_by.get(i)
        if not ks:
            return None
        if len(ks) == 1:
            return self.r(ks[0])
        key = ("u", i)
        if key in self._var_by_key:
            return self._var_by_key[key]
        v = self._var(key, UNIT, 0, 1, ("u", tuple(self.r(k) for k in ks)))
        return v

    def _event_var(self, key: tuple) -> int:
        if key[0] == "r":
            return self.r(key[1])
        ks = sorted(self.irregular_storages[key[1]])
        if len(ks) == 1:
            return self.r(ks[0])
        return self._var(("us", key[1]), UNIT, 0, 1, ("u", tuple(self.r(k) for k in ks)))

    # ---- building ------------------------------------------------------------
    def build(
        self,
        *,
        budget: int | None,
        dense_rows: int = 10,
        allowed: Sequence[frozenset[int]] | None = None,
        frontier: bool = True,
    ) -> None:
        """Rows of Notes 1-3 and the core block rows (Note 4).

        With ``budget=None`` the memory rows bound a peak variable
        :attr:`peak_var` instead and the objective is that peak (minimum-peak
        mode, Note 8); rows that cannot exceed a lower bound on the peak are
        left out either way. ``allowed`` keeps only those extra members of each
        block (Note 10; default all).
        """
        self.extra_of = [
            c.extra if allowed is None else tuple(v for v in c.extra if v in allowed[k])
            for k, c in enumerate(self.candidates)
        ]
        self._member_sets = [frozenset(c.core) | frozenset(e) for c, e in zip(self.candidates, self.extra_of)]
        self.omitted = sum(len(c.extra) - len(e) for c, e in zip(self.candidates, self.extra_of))
        self.frontier = 0
        self.budget = None if budget is None else int(budget)
        self.threshold = self.peak_lower_bound() if budget is None else int(budget)
        cands = self.candidates
        if budget is None:
            top = max(self.base, default=0) + sum(c.bytes for c in cands) * 2 + max(self._temp, default=0)
            self.peak_var = self._var(("B",), FREE, self.threshold, top, ("B",))
        for k in range(len(cands)):
            self.r(k)
        # Note 1: objective; Note 2: implications.
        for k, c in enumerate(cands):
            self.objective[self.r(k)] = self.objective.get(self.r(k), 0.0) + c.core_time_s
            members = self._member_sets[k]
            pruned = self.pruned[k]
            for v in self.extra_of[k]:
                yv = self.y(k, v)
                if self._time[v]:
                    self.objective[yv] = self.objective.get(yv, 0.0) + self._time[v]
                if v in self.unreplayable[k]:  # Note 11
                    self._add_row(Row(name=f"noreplay_{k}_{v}", terms=((yv, 1),), hi=0))
            for v in (*c.core, *self.extra_of[k]):
                yv = self.y(k, v)
                for i in self._inputs[v]:
                    if i in self._core_sets[k]:
                        continue
                    ui = self.u(i)
                    if ui is None:
                        continue
                    if i not in members:
                        if i not in pruned:
                            # left out for now (Note 10): the block may stop here,
                            # but it pays for the node it stops at (the frontier)
                            if frontier and self._time[i]:
                                fi = self.y(k, i)
                                if fi not in self.objective:
                                    self.objective[fi] = self._time[i]
                                    self.frontier += 1
                                if ui == ONE:
                                    self._add_row(Row(name=f"front_{k}_{v}_{i}", terms=((fi, 1), (yv, -1)), lo=0))
                                else:
                                    self._add_row(
                                        Row(name=f"front_{k}_{v}_{i}", terms=((fi, 1), (yv, -1), (ui, -1)), lo=-1)
                                    )
                            continue
                        # pruned (Note 6): v and u[i] cannot both hold in block k
                        if ui == ONE:
                            self._add_row(Row(name=f"prune_{k}_{v}_{i}", terms=((yv, 1),), hi=0))
                        else:
                            self._add_row(Row(name=f"prune_{k}_{v}_{i}", terms=((yv, 1), (ui, 1)), hi=1))
                        continue
                    yi = self.y(k, i)
                    if ui == ONE:
                        self._add_row(Row(name=f"imp_{k}_{v}_{i}", terms=((yi, 1), (yv, -1)), lo=0))
                    else:
                        self._add_row(
                            Row(name=f"imp_{k}_{v}_{i}", terms=((yi, 1), (yv, -1), (ui, -1)), lo=-1)
                        )
        self._build_reads()
        self._build_original_rows()
        self._add_dense_rows(dense_rows)
        for k, c in enumerate(cands):
            for w in c.core:
                self.activate_block_row(k, w)
        if budget is None:
            self.time_objective = self.objective
            self.objective = {self.peak_var: 1.0}
            self._activate_var(self.peak_var)

    def _add_row(self, row: Row) -> None:
        for v, _ in row.terms:
            self._activate_var(v)
        self.rows.append(row)

    def _activate_var(self, v: int) -> None:
        if v in self._active_vars:
            return
        self._active_vars.add(v)
        d = self._defs[v]
        kind = d[0]
        if kind == "u":
            rs = d[1]
            for r in rs:
                self._add_row(Row(name=f"ulo_{v}_{r}", terms=((v, 1), (r, -1)), lo=0))
            self._add_row(Row(name=f"uhi_{v}", terms=((v, 1), *((r, -1) for r in rs)), hi=0))
        elif kind == "z":
            for j, lits in enumerate(d[1]):
                self._add_row(_and_row(f"z_{v}_{j}", v, lits))
        elif kind == "l":
            _, reads, nxt = d
            for j, (yv, ux) in enumerate(reads):
                terms = [(v, 1), (yv, -1)]
                if ux is None:
                    self._add_row(Row(name=f"l_{v}_{j}", terms=((v, 1), (yv, -1)), lo=0))
                elif ux == ONE:
                    continue
                else:
                    terms.append((ux, 1))
                    self._add_row(Row(name=f"l_{v}_{j}", terms=tuple(terms), lo=0))
            if nxt is not None:
                self._add_row(Row(name=f"lnext_{v}", terms=((v, 1), (nxt, -1)), lo=0))

    # ---- Note 3 (b) / Note 4: kept sources read by blocks ---------------------
    def _build_reads(self) -> None:
        """For each storage, its possible source-read points after its last use:
        sorted by schedule order, each with the literals (y[k, v], u[x])."""
        mm, nodes = self.mm, self.profile.nodes
        ph, outs = mm.placeholder_storages, mm.output_storages
        points: dict[str, dict[tuple[int, int, int], list]] = {}
        for k, c in enumerate(self.candidates):
            for v in (*c.core, *self.extra_of[k]):
                for x in self._inputs[v]:
                    if x in self.always_unavailable or nodes[x].is_placeholder:
                        continue  # never a source / lives for the whole step
                    for s in nodes[x].storages:
                        if s in ph or s in outs or self.death[s] >= c.position:
                            continue
                        key = (c.position, c.order, v)
                        points.setdefault(s, {}).setdefault(key, []).append((k, v, x))
        # Note 12: a replayed random node's saved generator state, read by each
        # block that replays it, as a storage that dies just before the node.
        state = self.profile.rng_state_bytes
        if state:
            for k, c in enumerate(self.candidates):
                for v in (*c.core, *self.extra_of[k]):
                    if nodes[v].random:
                        s = f"{RNG_STATE}{nodes[v].name}"
                        self.death[s], self._sbytes[s] = v - 1, state
                        points.setdefault(s, {}).setdefault((c.position, c.order, v), []).append((k, v, None))
        # l[s, j] chain per storage (later points first so "next" exists)
        self.read_points: dict[str, list[tuple[tuple[int, int, int], int]]] = {}
        for s, pts in points.items():
            keys = sorted(pts)
            chain: list[tuple[tuple[int, int, int], int]] = []
            nxt = None
            for j in range(len(keys) - 1, -1, -1):
                key = keys[j]
                reads = []
                for k, v, x in pts[key]:
                    reads.append((self.y(k, v), None if x is None else self.u(x)))
                lv = self._var(("l", s, j), UNIT, 0, 1, ("l", tuple(reads), nxt))
                chain.append((key, lv))
                nxt = lv
            chain.reverse()
            self.read_points[s] = chain

    def _first_read(self, s: str, key: tuple[int, int, int]) -> int | None:
        """l var of the first read point of s at or after schedule key."""
        chain = self.read_points.get(s)
        if not chain:
            return None
        lo, hi = 0, len(chain)
        while lo < hi:
            mid = (lo + hi) // 2
            if chain[mid][0] < key:
                lo = mid + 1
            else:
                hi = mid
        return chain[lo][1] if lo < len(chain) else None

    # ---- Note 3: rows at original nodes ------------------------------------------
    def _build_original_rows(self) -> None:
        n = self.n
        starts: dict[int, list[tuple[int, int]]] = {}
        breaks = {0}
        self.w_events = [(self._event_var(key), ev) for key, ev in self.event_lists]
        for var, ev in self.w_events:
            for at, db in ev:
                starts.setdefault(at, []).append((var, db))
                breaks.add(at)
        for s, chain in self.read_points.items():
            breaks.add(self.death[s] + 1)
            for key, _ in chain:
                breaks.add(key[0])
        breaks = sorted(b for b in breaks if b < n)
        self.segments: list[tuple[int, int]] = []
        self.segment_of = [0] * n
        self.w_vars: list[int] = []
        prev = None
        span = sum(abs(db) for _, ev in self.event_lists for _, db in ev)
        lower, upper = -span, span
        # the most a plan can add at each node (Note 3 (a))
        diff = [0] * (n + 1)
        for _, ev in self.event_lists:
            level, since = 0, 0
            for at, db in ev:
                diff[since] += max(level, 0)
                diff[at] -= max(level, 0)
                level += db
                since = at
        self.w_max: list[int] = []
        level = 0
        wmax_at = []
        for i in range(n):
            level += diff[i]
            wmax_at.append(level)
        for j, b in enumerate(breaks):
            e = breaks[j + 1] if j + 1 < len(breaks) else n
            self.segments.append((b, e))
            self.w_max.append(wmax_at[b])
            for i in range(b, e):
                self.segment_of[i] = j
            w = self._var(("W", j), FREE, lower, upper, ("W", j))
            self.w_vars.append(w)
            terms = [(w, 1)]
            if prev is not None:
                terms.append((prev, -1))
            delta: dict[int, int] = {}
            for rv, b_ in starts.get(b, ()):
                delta[rv] = delta.get(rv, 0) + b_
            terms += [(rv, -c) for rv, c in delta.items() if c]
            self._add_row(Row(name=f"W_{j}", terms=tuple(terms), lo=0, hi=0, in_bytes=True))
            prev = w
        # one row per segment at its largest base
        for j, (b, e) in enumerate(self.segments):
            m = max(self.base[b:e])
            terms = [(self.w_vars[j], 1)]
            ext_ub = 0
            for s, chain in self.read_points.items():
                if self.death[s] < b:
                    lv = self._first_read(s, (b + 1, -1, -1))
                    if lv is not None:
                        terms.append((lv, self._sbytes[s]))
                        ext_ub += self._sbytes[s]
            if m + ext_ub + self.w_max[j] <= self.threshold:
                continue
            self._add_row(Row(name=f"mem_{b}", terms=tuple(terms), const=m, memory=True))

    def _add_dense_rows(self, count: int) -> None:
        """Note 9: the ``count`` original-node rows with the most base bytes again,
        with the recurrence expanded into the decisions it sums."""
        rows = sorted((r for r in self.rows if r.memory and r.name.startswith("mem_")), key=lambda r: -r.const)
        w_set = set(self.w_vars)
        for row in rows[:count]:
            at = int(row.name.split("_")[1])
            terms: dict[int, int] = {}
            for var, ev in self.w_events:
                level = sum(db for pos, db in ev if pos <= at)
                if level:
                    terms[var] = terms.get(var, 0) + level
            for v, c in row.terms:
                if v not in w_set:
                    terms[v] = terms.get(v, 0) + c
            items = tuple((v, c) for v, c in terms.items() if c)
            self._add_row(Row(name=f"dense_{at}", terms=items, const=row.const, memory=True))

    # ---- Note 4: rows inside blocks ---------------------------------------------
    def block_expr(self, k: int, w: int) -> tuple[dict[int, int], int, int]:
        """Live bytes at node w of block k as ``(terms, constant, upper bound)``."""
        c = self.candidates[k]
        p = c.position
        nodes = self.profile.nodes
        members = self._member_sets[k]
        terms: dict[int, int] = {}

        def add(v: int, coef: int) -> None:
            if coef:
                terms[v] = terms.get(v, 0) + coef

        const = self.base[p] - self._temp[p] - self.alloc[p]
        ub = const + self.w_max[self.segment_of[p]]  # the r terms below are <= 0
        add(self.w_vars[self.segment_of[p]], 1)
        for k2 in self.at_position[p]:
            c2 = self.candidates[k2]
            if c2.order >= c.order and c2.name not in self.irregular_storages:
                add(self.r(k2), -c2.bytes)  # its rebuilt copy is not made yet (Note 7: never counted)
        # kept sources still to be read (Note 3 (b))
        key = (p, c.order, w)
        for s in self.read_points:
            if self.death[s] < p:
                lv = self._first_read(s, key)
                if lv is not None:
                    add(lv, self._sbytes[s])
                    ub += self._sbytes[s]
        # the block's own storages alive at w, and w's workspace (with the
        # generator state a random node's replay holds, Note 12)
        temp = self._temp[w] + (self.profile.rng_state_bytes if nodes[w].random else 0)
        if temp:
            add(self.y(k, w), temp)
            ub += temp
        for u in sorted(members):
            if u > w:
                break
            for s in nodes[u].allocates:
                b = self._sbytes[s]
                if not b:
                    continue
                conjs = self._alive_conjunctions(k, s, u, w)
                if not conjs:
                    continue
                ub += b
                conjs = [tuple(sorted(set(cj))) for cj in conjs]
                rk = self.r(k)
                if any(cj == (rk,) for cj in conjs):
                    add(rk, b)
                elif len(conjs) == 1 and len(conjs[0]) == 1:
                    add(conjs[0][0], b)
                else:
                    z = self._var(("z", k, s, w), UNIT, 0, 1, ("z", tuple(conjs)))
                    add(z, b)
        return terms, const, ub

    def block_row(self, k: int, w: int) -> Row | None:
        """The memory row at node w of block k (built, not added); None if it can
        never bind."""
        terms, const, ub = self.block_expr(k, w)
        if ub <= self.threshold:
            return None
        items = tuple((v, cf) for v, cf in terms.items() if cf)
        return Row(name=f"blk_{k}_{w}", terms=items, const=const, memory=True)

    def _alive_conjunctions(self, k: int, s: str, u: int, w: int) -> list[tuple[int, ...]]:
        """Note 4: conjunctions of literals, one of which holds iff block k's copy
        of storage s (made by member u <= w) is alive at w."""
        c = self.candidates[k]
        relaxed = s in self.irregular_storages  # Note 7: only reads inside the block count
        if s == c.name and not relaxed:
            return [(self.r(k),)]
        members = self._member_sets[k]
        outputs = set() if relaxed else set(c.outputs)
        out = []
        for x_name in self.mm.aliases[s]:
            x = self._idx[x_name]
            if x not in members or x > w or x < u:
                continue
            base = [self.y(k, x)]
            if x != u:  # x refers to the block's copy iff the block made it
                base.append(self.y(k, u))
            if x == w or x in outputs:
                out.append(tuple(base))
                continue
            for w2 in self._users[x]:
                if w2 >= w and w2 in members:
                    out.append(tuple(base + [self.y(k, w2)]))
        return out

    def activate_block_row(self, k: int, w: int) -> bool:
        """Add the row for node w of block k if not yet added; True if added."""
        key = (k, w)
        if key in self._block_rows:
            return False
        row = self.block_row(k, w)
        self._block_rows[key] = None if row is None else len(self.rows)
        if row is None:
            return False
        self._add_row(row)
        return True

    def add_no_good(self, recompute: frozenset[str]) -> None:
        """Cut off exactly this plan (Note 5)."""
        terms = []
        inside = 0
        for k, c in enumerate(self.candidates):
            if c.name in recompute:
                terms.append((self.r(k), -1))
                inside += 1
            else:
                terms.append((self.r(k), 1))
        self.no_goods += 1
        self._add_row(Row(name=f"nogood_{self.no_goods}", terms=tuple(terms), lo=1 - inside))

    def add_peak_cut(self, recompute: frozenset[str], peak: int) -> None:
        """Minimum-peak mode: the peak is at least ``peak`` if the plan is exactly
        ``recompute`` (Note 5's no-good, for a plan the model underestimates)."""
        big = max(0, peak - self.threshold)
        terms = [(self.peak_var, 1)]
        inside = 0
        for k, c in enumerate(self.candidates):
            if c.name in recompute:
                terms.append((self.r(k), -big))
                inside += 1
            else:
                terms.append((self.r(k), big))
        self.no_goods += 1
        self._add_row(Row(name=f"peakcut_{self.no_goods}", terms=tuple(terms), lo=peak - big * inside, in_bytes=True))

    # ---- evaluation: the model's values for a plan ---------------------------
    def assignment(self, recompute: frozenset[str]) -> list[float]:
        """The canonical value of every variable for plan ``recompute`` (Note 2)."""
        x = [0.0] * len(self.vars)
        rset = {self.cand_id[a] for a in recompute}
        blocks = {k: {self._idx[v] for v in self.mm.block(self.candidates[k].name, recompute).nodes} for k in rset}
        rank = {"r": 0, "y": 1, "u": 1, "z": 2, "l": 3, "W": 4, "B": 5}
        order = sorted(range(len(self.vars)), key=lambda v: rank[self._defs[v][0]])
        lvars = []
        for v in order:
            d = self._defs[v]
            kind = d[0]
            if kind == "r":
                x[v] = 1.0 if d[1] in rset else 0.0
            elif kind == "y":
                x[v] = 1.0 if d[1] in rset and d[2] in blocks[d[1]] else 0.0
            elif kind == "u":
                x[v] = max(x[r] for r in d[1])
            elif kind == "z":
                x[v] = max(min(1.0 if lit == ONE else x[lit] for lit in conj) for conj in d[1])
            elif kind == "l":
                lvars.append(v)
        # l chains: evaluate from the last point backwards
        done: dict[int, float] = {}

        def lval(v: int) -> float:
            if v in done:
                return done[v]
            stack = [v]
            while stack:
                t = stack[-1]
                _, reads, nxt = self._defs[t]
                if nxt is not None and nxt not in done:
                    stack.append(nxt)
                    continue
                val = done[nxt] if nxt is not None else 0.0
                for yv, ux in reads:
                    uval = 0.0 if ux is None else (1.0 if ux == ONE else x[ux])
                    val = max(val, x[yv] - uval)
                done[t] = val
                stack.pop()
            return done[v]

        for v in lvars:
            x[v] = lval(v)
        # W recurrence (Note 3 (a))
        wv = 0.0
        deltas: dict[int, float] = {}
        for var, ev in self.w_events:
            if x[var]:
                for at, db in ev:
                    deltas[at] = deltas.get(at, 0) + db * x[var]
        for j, w in enumerate(self.w_vars):
            b, _ = self.segments[j]
            wv += deltas.get(b, 0)
            x[w] = wv
        return x

    def objective_value(self, x: Sequence[float]) -> float:
        return sum(c * x[v] for v, c in self.objective.items())

    def violated(self, recompute: frozenset[str], *, budget: float) -> list[tuple[int, int]]:
        """Block rows (k, w) of plan ``recompute`` that the model has not added yet
        and in which the plan exceeds ``budget`` (Note 5). Adds nothing."""
        rset = [self.cand_id[a] for a in recompute]
        out = []
        pending = []
        for k in rset:
            blk = self.mm.block(self.candidates[k].name, recompute)
            for v in blk.nodes:
                w = self._idx[v]
                if (k, w) in self._block_rows:
                    continue
                pending.append((k, w))
        if not pending:
            return out
        rows = {}
        for k, w in pending:
            row = self.block_row(k, w)
            if row is not None:
                rows[(k, w)] = row
        if not rows:
            for key in pending:
                self._block_rows[key] = None
            return out
        x = self.assignment(recompute)
        for key, row in rows.items():
            if row.violation(x, budget) > 0:
                out.append(key)
        return out

    def predicted_peak(self, recompute: frozenset[str]) -> int:
        """The model's peak for a plan: max over original nodes and block nodes."""
        exprs = []
        for a in recompute:
            k = self.cand_id[a]
            for v in self.mm.block(a, recompute).nodes:
                exprs.append(self.block_expr(k, self._idx[v]))
        x = self.assignment(recompute)
        peak = 0.0
        for j, (b, e) in enumerate(self.segments):
            val = max(self.base[b:e]) + x[self.w_vars[j]]
            for s in self.read_points:
                if self.death[s] < b:
                    lv = self._first_read(s, (b + 1, -1, -1))
                    if lv is not None:
                        val += self._sbytes[s] * x[lv]
            peak = max(peak, val)
        for terms, const, _ in exprs:
            peak = max(peak, const + sum(cf * x[v] for v, cf in terms.items()))
        return int(round(peak))

    def peak_lower_bound(self) -> int:
        """A lower bound on every plan's peak: each original node's base bytes
        minus every recomputed activation that could be dead there (Note 3)."""
        n = self.n
        diff = [0] * (n + 1)
        for _, ev in self.event_lists:
            run, prev = 0, 0
            for at, db in ev:  # keep only where a decision lowers memory
                diff[prev] += min(run, 0)
                diff[at] -= min(run, 0)
                run += db
                prev = at
            diff[prev] += min(run, 0)
            diff[n] -= min(run, 0)
        run, best = 0, 0
        for i in range(n):
            run += diff[i]
            best = max(best, self.base[i] + run)
        return best

    def size(self) -> ModelSize:
        return ModelSize(
            variables=len(self.vars),
            binaries=sum(1 for v in self.vars if v.kind == BINARY),
            rows=len(self.rows),
            nonzeros=sum(len(r.terms) for r in self.rows),
        )
