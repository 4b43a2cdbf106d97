"""What the exact planners share: the lazy loop and the Plan it becomes.

``ilp`` and ``cpsat`` differ only in the solver that a :class:`Backend`
wraps. Everything else lives here once (STYLE point 4): the greedy warm start,
the lazy loop of solvers/model.py Note 5 (solve, add the block rows the plan
violates, re-solve; check every plan with the simulator), the time limit, the
minimum-peak solve behind an INFEASIBLE answer, and the Plan with its bound,
gap and model size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from acopt.planning import Plan, PlanStatus, SolverStats, assemble_plan
from acopt.records import Profile
from acopt.schedule import InvalidPlan
from acopt.simulator import peak_bytes, simulate

from .model import Formulation, ModelSize

logger = logging.getLogger(__name__)  # acopt.solvers.exact: one line per build and solve (DEBUG)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ExactOptions:
    """Options shared by the exact planners (``ilp``, ``cpsat``).

    ``time_limit_s``: wall-clock limit for the whole solve (the best plan so far
    is returned with status ``time_limit``). ``threads``: solver threads.
    ``rel_gap``: stop when proven within this relative gap (status
    ``feasible`` unless the gap closes). ``warm_start``: start from the greedy
    plan (also its cost prunes chains, solvers/model.py Note 6). ``msg``: show
    the solver's log. ``chain_depth``: chain members (solvers/model.py Note 10)
    the first model holds, by how many other candidates' creators lie on the
    way; the rest are added when a plan needs them. None: all up front.
    ``verbose``: one line per build and solve of the lazy loop on stderr.
    """

    time_limit_s: float = 60.0
    threads: int = 2
    rel_gap: float = 0.0
    warm_start: bool = True
    msg: bool = False
    chain_depth: int | None = 1
    verbose: bool = False

    def __post_init__(self) -> None:
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be positive, not {self.time_limit_s!r}")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.threads!r}")
        if not 0 <= self.rel_gap < 1:
            raise ValueError(f"rel_gap must be in [0, 1), not {self.rel_gap!r}")
        if self.chain_depth is not None and self.chain_depth < 0:
            raise ValueError(f"chain_depth must be None or at least 0, not {self.chain_depth!r}")

OPTIMAL = "optimal"
FEASIBLE = "feasible"  # a solution, not proven optimal (time limit)
INFEASIBLE = "infeasible"
UNKNOWN = "unknown"  # no solution and nothing proven (time limit)
TIME_LIMIT = "time_limit"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Solved:
    """One backend solve: status, variable values (None without a solution),
    the model's objective and the proven bound, in the model's units."""

    status: str
    x: list[float] | None
    objective: float | None
    bound: float | None


class Backend(Protocol):
    """Mirrors a :class:`Formulation` (its rows so far) into one solver and solves."""

    def solve(self, *, time_limit_s: float, hint: Sequence[float] | None) -> Solved: ...


MakeBackend = Callable[[Formulation], Backend]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What the lazy loop found. ``objective`` and ``bound`` are seconds of
    recompute time, or bytes of peak in minimum-peak mode."""

    recompute: frozenset[str] | None
    status: str  # OPTIMAL, FEASIBLE (within rel_gap), TIME_LIMIT, INFEASIBLE
    objective: float | None  # the simulator's value for ``recompute``
    bound: float | None
    gap: float | None
    peak_bytes: int | None  # simulated
    model_peak_bytes: int | None  # the model's (model.py Notes 3-4)
    size: ModelSize
    exact_model: bool  # False: Note 7's relaxation was needed (still exact after the simulator's cuts)
    iterations: int
    lazy_rows: int
    no_goods: int
    pruned: int
    build_time_s: float
    solve_time_s: float
    notes: tuple[str, ...]
    rebuilds: int = 0  # model.py Note 10
    columns: int = 0  # chain members added by the rebuilds (Note 10)


def solve(
    profile: Profile,
    *,
    budget: int | None,
    make_backend: MakeBackend,
    time_limit_s: float,
    rel_gap: float = 0.0,
    incumbent: frozenset[str] | None = None,
    chain_depth: int | None = 1,
    log: Callable[[str], None] | None = None,
    growth: str = "step",
    frontier: bool = True,
) -> Outcome:
    """Minimise recompute time under ``budget``, or (``budget=None``) the peak.

    ``incumbent`` must fit the budget (it is checked); it is the warm start,
    the answer at the time limit, and the cost bound of model.py Note 6.
    ``chain_depth``: start with chains through at most this many other
    candidates and add members as plans need them (model.py Note 10); None
    builds every chain member up front. ``growth``: what a rebuild adds
    besides the members the plan needs: ``"step"`` also raises the depth by
    one for every block, ``"missing"`` adds nothing more, ``"full"`` builds
    every member (model.py Note 10). ``log``: called with one line per build
    and per solve (model size, solver status, time, what the loop did).
    """
    if growth not in ("step", "missing", "full"):
        raise ValueError(f"growth must be 'step', 'missing' or 'full', not {growth!r}")
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    peak_mode = budget is None
    notes: list[str] = []

    def value(plan: frozenset[str]) -> tuple[int, float]:
        sim = simulate(profile, plan)
        return sim.peak_bytes, float(sim.peak_bytes) if peak_mode else sim.recompute_time_s

    best, best_value = None, math.inf
    if incumbent is not None:
        try:
            peak, val = value(incumbent)
        except InvalidPlan as e:
            notes.append(f"warm start ignored: {e}")
            incumbent = None
    if incumbent is not None:
        if peak_mode or peak <= budget:
            best, best_value = incumbent, val
        else:
            notes.append(f"warm start ignored: its simulated peak {peak} exceeds the budget")
    base = Formulation(profile, incumbent_cost=None if peak_mode or best is None else best_value)
    allowed = None if chain_depth is None else [set(a) for a in base.initial_allowed(chain_depth)]
    if base.irregular:
        notes.append(
            f"model.py Note 7: {len(base.irregular)} forward value(s) read later refer to several storages "
            f"(e.g. {base.irregular[0]!r}); their memory is relaxed and plans are settled by the simulator"
        )
    bound = -math.inf
    status = TIME_LIMIT
    iterations = lazy = columns = rebuilds = 0
    kept_rows: set[tuple[int, int]] = set()
    cuts: list[tuple[frozenset[str], int | None]] = []  # no-goods (plan, None) and peak cuts
    build_time = time.perf_counter() - t0  # the analysis (and the warm start's check)
    solve_t0 = t0
    rebuild, f = True, None
    while rebuild and (f is None or deadline > time.perf_counter()):  # one build even past the deadline
        # (Re)build: Note 10 adds chain members the model left out, keeping the
        # lazy block rows and cuts found so far.
        rebuild = False
        b0 = time.perf_counter()
        f = base.fresh()
        f.build(budget=budget, allowed=allowed, frontier=frontier)
        for k, w in sorted(kept_rows):
            if w in f._member_sets[k]:  # else pruned since (Note 6)
                f.activate_block_row(k, w)
        for plan, peak in cuts:
            f.add_no_good(plan) if peak is None else f.add_peak_cut(plan, peak)
        backend = make_backend(f)
        build_time += time.perf_counter() - b0
        if log is not None:
            sz = f.size()
            log(
                f"build {rebuilds}: {sz.variables} vars ({sz.binaries} binary), {sz.rows} rows, "
                f"{sz.nonzeros} nonzeros, {f.omitted} chain member(s) left out (Note 10, {f.frontier} frontier), "
                f"{time.perf_counter() - b0:.2f} s"
            )
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            iterations += 1
            hint = None
            if best is not None:
                hint = f.assignment(best)
                if peak_mode:
                    hint[f.peak_var] = best_value
            s0 = time.perf_counter()
            rows_before = len(f.rows)
            res = backend.solve(time_limit_s=left, hint=hint)
            if log is not None:
                log(
                    f"solve {iterations}: {res.status}, objective {res.objective}, bound {res.bound}, "
                    f"{rows_before} rows, {time.perf_counter() - s0:.2f} s"
                )
            if res.status == INFEASIBLE:
                if best is None:
                    status = INFEASIBLE
                else:  # the incumbent satisfies every row, so this is a solver fault
                    notes.append("the solver called the model infeasible although the warm start fits it")
                break
            if res.bound is not None:
                bound = max(bound, res.bound)
            if res.x is None:
                break
            plan = frozenset(c.name for k, c in enumerate(f.candidates) if res.x[f.r(k)] > 0.5)
            missing = f.missing_members(plan) if allowed is not None else {}
            if missing:
                for k, nodes in missing.items():
                    allowed[k] |= nodes
                    columns += len(nodes)
                if growth == "step":
                    chain_depth += 1
                    for k, a in enumerate(base.initial_allowed(chain_depth)):
                        allowed[k] |= a
                elif growth == "full":
                    allowed = None
                kept_rows |= {key for key, at in f._block_rows.items() if at is not None}
                if log is not None:
                    log(f"  plan replays {sum(map(len, missing.values()))} chain member(s) left out")
                # The relaxed model's plan is still a plan: the simulator says
                # whether it fits, and if it beats the incumbent it becomes the
                # warm start and its cost prunes chains harder (Note 6).
                if not peak_mode and _improves(profile, f, plan, budget, best_value):
                    peak, val = value(plan)  # the full simulator has the last word
                    if peak <= budget and val < best_value:
                        best, best_value = plan, val
                        if time.perf_counter() < deadline:  # else no rebuild follows
                            base = base.with_incumbent(best_value)
                        if log is not None:
                            log(f"  that plan fits: new incumbent {best_value:.6g} s, {base.pruned_count} pruned")
                if best is not None and bound >= best_value - 1e-9 * abs(best_value):
                    status = OPTIMAL  # a relaxation's bound meets a plan the simulator accepts: no rebuild needed
                    if log is not None:
                        log("  the relaxed model's bound meets the incumbent: optimal")
                    break
                rebuilds += 1
                rebuild = True
                break
            limit = res.x[f.peak_var] if peak_mode else budget
            new = f.violated(plan, budget=limit)
            if new:
                for k, w in new:
                    lazy += f.activate_block_row(k, w)
                if log is not None:
                    log(f"  plan violates {len(new)} block row(s) not in the model: added")
                continue
            try:
                peak, val = value(plan)
            except InvalidPlan as e:  # cannot happen with Note 11; never accept it
                notes.append(f"cut off an invalid plan: {e}")
                cuts.append((plan, None))
                f.add_no_good(plan)
                continue
            if peak > limit + (0.5 if peak_mode else 0):
                model_peak = f.predicted_peak(plan)
                why = "numerical tolerance" if model_peak > limit else "model.py Note 7 relaxation"
                notes.append(f"cut off a plan the model placed under {limit:.0f} bytes, simulated {peak} ({why})")
                cuts.append((plan, peak if peak_mode else None))
                if peak_mode:
                    f.add_peak_cut(plan, peak)
                else:
                    f.add_no_good(plan)
                if log is not None:
                    log(f"  {notes[-1]}")
                continue
            if val < best_value or best is None:
                best, best_value = plan, val
            if res.status == OPTIMAL:
                status = OPTIMAL
                if res.objective is not None:
                    bound = max(bound, min(res.bound if res.bound is not None else res.objective, res.objective))
            break
    if columns:
        notes.append(
            f"model.py Note 10: {columns} chain member(s) needed beyond the first model, {rebuilds} rebuild(s)"
        )
    solve_time = time.perf_counter() - solve_t0
    size = f.size()
    common = dict(
        size=size, exact_model=not f.irregular, iterations=iterations, lazy_rows=lazy, no_goods=len(cuts),
        pruned=f.pruned_count, build_time_s=build_time, solve_time_s=solve_time - build_time,
        rebuilds=rebuilds, columns=columns,
    )  # fmt: skip
    if best is None:
        return Outcome(
            recompute=None, status=status, objective=None, bound=None if bound == -math.inf else bound,
            gap=None, peak_bytes=None, model_peak_bytes=None, notes=tuple(notes), **common,
        )  # fmt: skip
    peak, val = value(best)
    if bound == -math.inf:
        bound_out = None
    else:
        bound_out = max(0.0, min(bound, val))  # CP-SAT rounds times: never above what we found
    gap = None if bound_out is None else (0.0 if val <= 0 else max(0.0, (val - bound_out) / val))
    if status == OPTIMAL and rel_gap > 0 and gap is not None and gap > 1e-9:
        status = FEASIBLE  # the solver stopped within rel_gap
    if status == TIME_LIMIT and gap is not None and gap <= 1e-9:
        status = OPTIMAL  # the bound closed the gap
    if status == OPTIMAL:
        # proven; what is left is float noise (CP-SAT's integer times, cpsat.py)
        bound_out, gap = val, 0.0
    represented = allowed is None or not f.missing_members(best)
    return Outcome(
        recompute=best, status=status, objective=val, bound=bound_out, gap=gap, peak_bytes=peak,
        model_peak_bytes=f.predicted_peak(best) if represented else None, notes=tuple(notes), **common,
    )  # fmt: skip


def _improves(profile: Profile, f: Formulation, plan: frozenset[str], budget: int, best_value: float) -> bool:
    """Whether ``plan`` is valid, fits ``budget`` and costs less than ``best_value``
    (its real blocks, the fast-path simulator; the caller simulates it in full)."""
    mm = f.mm
    try:
        blocks = [mm.block(a, plan) for a in plan]
    except InvalidPlan:
        return False
    if sum(b.time_s for b in blocks) >= best_value:
        return False
    idx = profile.node_index
    if not all(f.replayable(idx[v]) for b in blocks for v in b.nodes):
        return False
    return peak_bytes(profile, plan, blocks=blocks) <= budget


def run(
    *,
    profile: Profile,
    budget_bytes: int,
    options: Any,
    solver: str,
    make_backend: MakeBackend,
) -> Plan:
    """An exact planner's whole job: warm start, solve, map back to a checked Plan.

    ``options`` has ``time_limit_s``, ``rel_gap`` and ``warm_start``.
    """
    started = time.perf_counter()
    incumbent, greedy_note = None, ""
    if options.warm_start:
        from acopt.greedy import GreedyOptions, greedy

        try:
            warm = greedy(profile=profile, budget_bytes=budget_bytes, options=GreedyOptions())
        except ValueError as e:  # InfeasibleBudget below the floor: no warm start
            greedy_note = f"no greedy warm start ({type(e).__name__})"
        else:
            if warm.fits:
                incumbent = warm.recompute
                greedy_note = f"greedy warm start: {warm.recompute_time_s:.6g} s"
    log = _log if logger.isEnabledFor(logging.DEBUG) else None
    if getattr(options, "verbose", False):
        log = _verbose_log
    logger.debug("%s: budget %d bytes, limit %g s; %s", solver, budget_bytes, options.time_limit_s, greedy_note)
    out = solve(
        profile, budget=budget_bytes, make_backend=make_backend, time_limit_s=options.time_limit_s,
        rel_gap=options.rel_gap, incumbent=incumbent, chain_depth=getattr(options, "chain_depth", 1), log=log,
    )  # fmt: skip
    notes = [greedy_note] if greedy_note else []
    notes += list(out.notes)
    if out.status == INFEASIBLE:
        return _infeasible(profile, budget_bytes, options, solver, make_backend, out, notes, started)
    recompute = out.recompute
    status = {OPTIMAL: PlanStatus.OPTIMAL, FEASIBLE: PlanStatus.FEASIBLE, TIME_LIMIT: PlanStatus.TIME_LIMIT}[out.status]
    if recompute is None:  # time limit before any plan: fall back on the greedy
        from acopt.greedy import GreedyOptions, greedy

        try:
            recompute = greedy(profile=profile, budget_bytes=budget_bytes, options=GreedyOptions()).recompute
        except ValueError as e:  # below the floor too: no plan to return
            raise TimeoutError(
                f"{solver}: time limit {options.time_limit_s:g} s before any plan was found or the budget "
                f"proven infeasible, and the greedy has none either ({e})"
            ) from e
        notes.append("time limit before the solver found a plan: the greedy plan is returned")
        status = PlanStatus.TIME_LIMIT
    notes.append(_size_note(out))
    sim = simulate(profile, recompute)
    if out.model_peak_bytes is not None and recompute == out.recompute:
        notes.append(f"peak: model {out.model_peak_bytes} bytes, simulator {sim.peak_bytes} bytes")
    bound, gap = out.bound, out.gap
    if recompute != out.recompute:
        gap = None if bound is None or sim.recompute_time_s <= 0 else (sim.recompute_time_s - bound) / sim.recompute_time_s
    return assemble_plan(
        profile, recompute, solver=solver, status=status, budget_bytes=budget_bytes, started=started,
        bound=bound, gap=gap, options=options,
        stats=SolverStats(
            variables=out.size.variables, constraints=out.size.rows, objective=out.objective,
            iterations=out.iterations, build_time_s=out.build_time_s, notes=tuple(notes),
        ),
    )  # fmt: skip


def _log(line: str) -> None:
    """Solver progress, one DEBUG record of the ``acopt.solvers.exact`` logger per build and solve."""
    logger.debug("%s", line)


def _verbose_log(line: str) -> None:
    import sys

    _log(line)
    print(f"[exact] {line}", file=sys.stderr, flush=True)


def _size_note(out: Outcome) -> str:
    s = out.size
    return (
        f"model: {s.variables} variables ({s.binaries} binary), {s.rows} rows, {s.nonzeros} nonzeros; "
        f"{out.iterations} solve(s), {out.lazy_rows} lazy block row(s), {out.no_goods} cut(s), "
        f"{out.pruned} chain member(s) pruned by cost, {out.rebuilds} rebuild(s), {out.columns} "
        f"chain member(s) on demand; build {out.build_time_s:.2f} s, solve {out.solve_time_s:.2f} s"
    )


def _infeasible(profile, budget_bytes, options, solver, make_backend, out, notes, started) -> Plan:
    """No plan fits: find the smallest peak any plan reaches (model.py Note 8)."""
    from acopt.planning import floor
    from acopt.simulator import memory_model

    left = max(1.0, options.time_limit_s - (time.perf_counter() - started))
    all_cands = frozenset(memory_model(profile).candidates)
    starts = []
    for p in (frozenset(), all_cands):
        try:
            starts.append((simulate(profile, p).peak_bytes, len(starts), p))
        except InvalidPlan:  # a chain replays a node that cannot be replayed (model.py Note 11)
            pass
    start = min(starts)[2]
    low = solve(profile, budget=None, make_backend=make_backend, time_limit_s=left, incumbent=start)
    rule6 = floor(profile)
    if low.status == OPTIMAL:
        what = f"the smallest peak any plan reaches is {low.peak_bytes} bytes (proven)"
    else:
        lo = None if low.bound is None else math.ceil(low.bound)
        what = f"the smallest peak any plan reaches is between {lo} and {low.peak_bytes} bytes"
    message = (
        f"no plan fits the budget of {budget_bytes} bytes (proven infeasible); {what}; "
        f"the floor of memory model rule 6 (everything recomputed) is {rule6} bytes"
    )
    notes = [message, *notes, *low.notes, _size_note(out)]
    plan = low.recompute if low.recompute is not None else start
    return assemble_plan(
        profile, plan, solver=solver, status=PlanStatus.INFEASIBLE, budget_bytes=budget_bytes, started=started,
        bound=None, gap=None, options=options,
        stats=SolverStats(
            variables=out.size.variables, constraints=out.size.rows, objective=None, iterations=out.iterations,
            build_time_s=out.build_time_s, notes=tuple(notes),
        ),
    )  # fmt: skip
