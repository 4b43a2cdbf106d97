"""The ``cpsat`` planner: the exact model of solvers/model.py, solved by OR-Tools CP-SAT.

Same model, same lazy loop and same Plan as ``ilp`` (solvers/exact.py); only
the solver differs. The model is kept between lazy iterations (new rows are
added to it) and the incumbent is given as a hint.

>>> plan = acopt.plan(profile, budget="60%", solver="cpsat", time_limit_s=30)   # doctest: +SKIP
>>> plan.status.value, plan.gap                                                 # doctest: +SKIP
('optimal', 0.0)

Every [0, 1] variable of the model becomes a Boolean and the memory
recurrence an integer in bytes: memory is exact, never scaled. CP-SAT needs
integer objective coefficients, so node times are written in units of
10**-k s with the total near 1e13: each coefficient is off by at most half a
unit, so two plans whose costs differ by less than (number of variables) x
half a unit may be ranked either way. The plan's recompute time and the gap
are the simulator's, never the rounded objective.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from acopt.planning import Plan, PlannerSpec
from acopt.records import Profile

from .exact import ExactOptions, run
from .model import FREE, Formulation

INSTALL = "pip install 'acopt[solvers]'"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CpsatOptions(ExactOptions):
    """Options of the ``cpsat`` planner: :class:`acopt.solvers.exact.ExactOptions`
    (``threads`` are CP-SAT's, ``msg`` shows CP-SAT's log)."""


def _import_cp_model():
    try:
        from ortools.sat.python import cp_model
    except ImportError as e:
        raise ImportError(f"the 'cpsat' planner needs OR-Tools: {INSTALL}") from e
    return cp_model


def cpsat(*, profile: Profile, budget_bytes: int, options: CpsatOptions) -> Plan:
    """Plan with the exact model solved by CP-SAT (see the module docstring)."""
    cp_model = _import_cp_model()
    return run(
        profile=profile, budget_bytes=budget_bytes, options=options, solver="cpsat",
        make_backend=lambda f: CpsatBackend(cp_model, f, options),
    )  # fmt: skip


_SUBSOLVERS = ["max_lp", "default_lp", "reduced_costs", "pseudo_costs", "quick_restart", "core", "no_lp"]


class CpsatBackend:
    """A CpModel that mirrors a Formulation; new rows are added before each solve."""

    def __init__(self, cp_model, f: Formulation, options: CpsatOptions):
        self.cp = cp_model
        self.f = f
        self.options = options
        self.m = cp_model.CpModel()
        self.v: dict = {}
        self.rows_done = 0
        if f.peak_var is not None:
            self.scale = 1.0
        else:
            total = sum(f.objective.values()) or 1.0
            self.scale = 10.0 ** math.floor(13 - math.log10(total))
        coefs = {v: round(c * self.scale) for v, c in f.objective.items()}
        coefs = {v: c for v, c in coefs.items() if c}
        self.m.minimize(cp_model.LinearExpr.weighted_sum([self._var(v) for v in coefs], list(coefs.values())))

    def _var(self, v: int):
        got = self.v.get(v)
        if got is None:
            spec = self.f.vars[v]
            if spec.kind == FREE:
                got = self.m.new_int_var(spec.lb, spec.ub, f"v{v}")
            else:
                got = self.m.new_bool_var(f"v{v}")
            self.v[v] = got
        return got

    def _sync(self) -> None:
        f, cp = self.f, self.cp
        for j in range(self.rows_done, len(f.rows)):
            row = f.rows[j]
            expr = cp.LinearExpr.weighted_sum([self._var(v) for v, _ in row.terms], [c for _, c in row.terms])
            if row.memory:
                if f.peak_var is None:
                    self.m.add(expr <= f.budget - row.const)
                else:
                    self.m.add(expr - self._var(f.peak_var) <= -row.const)
            else:
                lo = row.lo if row.lo is not None else -(2**62)
                hi = row.hi if row.hi is not None else 2**62
                self.m.add_linear_constraint(expr, lo, hi)
        self.rows_done = len(f.rows)

    def solve(self, *, time_limit_s: float, hint: Sequence[float] | None):
        from .exact import FEASIBLE, INFEASIBLE, OPTIMAL, UNKNOWN, Solved

        cp = self.cp
        self._sync()
        self.m.clear_hints()
        if self.options.warm_start and hint is not None:
            for v, var in self.v.items():
                self.m.add_hint(var, round(hint[v]))
        solver = cp.CpSolver()
        solver.parameters.max_time_in_seconds = max(0.01, time_limit_s)
        solver.parameters.num_workers = self.options.threads
        if self.options.threads == 1:
            solver.parameters.linearization_level = 2
        else:
            # With few workers the default portfolio runs no full-LP worker, and
            # the bound stalls (ResNet-152: 8% gap after 60 s on 2 workers; with
            # these two, proven optimal in about 8 s).
            solver.parameters.subsolvers.extend(_SUBSOLVERS[: self.options.threads])
        solver.parameters.relative_gap_limit = self.options.rel_gap
        solver.parameters.log_search_progress = self.options.msg
        code = solver.solve(self.m)
        if code == cp.INFEASIBLE:
            return Solved(status=INFEASIBLE, x=None, objective=None, bound=None)
        if code == cp.MODEL_INVALID:
            raise RuntimeError(f"CP-SAT rejected the model: {self.m.validate()}")
        if code not in (cp.OPTIMAL, cp.FEASIBLE):
            return Solved(status=UNKNOWN, x=None, objective=None, bound=solver.best_objective_bound / self.scale)
        x = [0.0] * len(self.f.vars)
        for v, var in self.v.items():
            x[v] = float(solver.value(var))
        return Solved(
            status=OPTIMAL if code == cp.OPTIMAL else FEASIBLE, x=x,
            objective=solver.objective_value / self.scale, bound=solver.best_objective_bound / self.scale,
        )  # fmt: skip


SPEC = PlannerSpec(
    name="cpsat",
    planner=cpsat,
    options_type=CpsatOptions,
    exact=True,
    requires=("ortools",),
    install=INSTALL,
    description="exact: the same model as ilp, lazy block rows, OR-Tools CP-SAT",
)
