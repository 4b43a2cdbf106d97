"""The ``ilp`` planner: the exact model of solvers/model.py, solved by PuLP's CBC.

Same model, same lazy loop and same Plan as ``cpsat`` (solvers/exact.py); only
the solver differs. Only PuLP's bundled CBC (``pulp.PULP_CBC_CMD``) is used:
``pulp.HiGHS`` / ``highspy`` is never imported (it crashes beside OR-Tools' own
HiGHS in one process).

>>> plan = acopt.plan(profile, budget="60%", solver="ilp", time_limit_s=30)   # doctest: +SKIP
>>> plan.status.value, plan.gap                                               # doctest: +SKIP
('optimal', 0.0)

CBC reads and writes files: each solve writes the model as an MPS file, so a
lazy re-solve starts from scratch (with the incumbent as MIP start). Memory
rows are written in bytes; CBC's tolerances can let a plan over the budget by a
few bytes through, which the simulator check catches (a no-good cut, noted in
the plan's stats). The objective is scaled so that CBC's printed bound has
enough digits.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Sequence

from acopt.planning import Plan, PlannerSpec
from acopt.records import Profile

from .exact import ExactOptions, run
from .model import BINARY, FREE, Formulation

INSTALL = "pip install 'acopt[solvers]'"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class IlpOptions(ExactOptions):
    """Options of the ``ilp`` planner: :class:`acopt.solvers.exact.ExactOptions`
    (``threads`` are CBC's, ``msg`` shows CBC's log)."""


def _import_pulp():
    try:
        import pulp
    except ImportError as e:
        raise ImportError(f"the 'ilp' planner needs PuLP: {INSTALL}") from e
    return pulp


def ilp(*, profile: Profile, budget_bytes: int, options: IlpOptions) -> Plan:
    """Plan with the exact model solved by CBC (see the module docstring)."""
    pulp = _import_pulp()
    return run(
        profile=profile, budget_bytes=budget_bytes, options=options, solver="ilp",
        make_backend=lambda f: PulpBackend(pulp, f, options),
    )  # fmt: skip


class PulpBackend:
    """A PuLP problem that mirrors a Formulation; new rows are appended before each solve."""

    def __init__(self, pulp, f: Formulation, options: IlpOptions):
        self.pulp = pulp
        self.f = f
        self.options = options
        self.prob = pulp.LpProblem("acopt", pulp.LpMinimize)
        self.v: dict = {}
        self.rows_done = 0
        self.nonzeros = 0  # of the constraints added so far (PuLP 3.3 deprecates reading them back)
        self.io_s_per_nonzero = 2e-5  # PuLP's file I/O per nonzero, measured after each solve
        # Bytes go to CBC in units of 2**k bytes, so that the budget is about 1e4
        # units: with raw bytes (1e9 and more) CBC's tolerances make it fix
        # variables on reduced cost wrongly and claim optima that are not (seen
        # on BERT-base). A plan that CBC's tolerance lets a few hundred bytes
        # over the budget is caught by the simulator (a no-good cut).
        top = f.budget if f.budget is not None else max(f.base, default=1)
        self.mscale = float(2 ** max(0, int(math.log2(max(top, 1))) - 13))
        if f.peak_var is not None:
            self.scale = 1.0 / self.mscale
        else:
            total = sum(f.objective.values()) or 1.0
            self.scale = 10.0 ** round(6 - math.log10(total))  # CBC prints %.8f
        unit = {v: self.mscale if f.vars[v].kind == FREE else 1.0 for v in f.objective}
        self.prob += pulp.LpAffineExpression([(self._var(v), c * self.scale * unit[v]) for v, c in f.objective.items()])

    def _var(self, v: int):
        got = self.v.get(v)
        if got is None:
            spec = self.f.vars[v]
            cat = self.pulp.LpBinary if spec.kind == BINARY else self.pulp.LpContinuous
            lb, ub = spec.lb, spec.ub
            if spec.kind == FREE:  # bytes
                lb, ub = lb / self.mscale, ub / self.mscale
            if hasattr(self.prob, "add_variable"):  # PuLP >= 3.3
                got = self.prob.add_variable(f"v{v}", lowBound=lb, upBound=ub, cat=cat)
            else:
                got = self.pulp.LpVariable(f"v{v}", lowBound=lb, upBound=ub, cat=cat)
            self.v[v] = got
        return got

    def _sync(self) -> None:
        f, pulp = self.f, self.pulp
        for j in range(self.rows_done, len(f.rows)):
            row = f.rows[j]
            k = 1.0 / self.mscale if row.in_bytes else 1.0
            # a byte-valued variable is already in units: its coefficient stays
            expr = pulp.LpAffineExpression(
                [(self._var(v), c if f.vars[v].kind == FREE else c * k) for v, c in row.terms]
            )
            if row.memory:
                if f.peak_var is None:
                    self.prob += (expr <= (f.budget - row.const) * k, f"c{j}")
                else:  # the peak variable is in scaled units already
                    self.prob += (expr - self._var(f.peak_var) <= -row.const * k, f"c{j}")
            elif row.lo is not None and row.hi is not None and row.lo == row.hi:
                self.prob += (expr == row.lo * k, f"c{j}")
            else:
                if row.lo is not None:
                    self.prob += (expr >= row.lo * k, f"c{j}")
                if row.hi is not None:
                    self.prob += (expr <= row.hi * k, f"c{j}h")
            two_sided = not row.memory and row.lo is not None and row.hi is not None and row.lo != row.hi
            self.nonzeros += (1 + two_sided) * (len(row.terms) + (row.memory and f.peak_var is not None))
        self.rows_done = len(f.rows)

    def solve(self, *, time_limit_s: float, hint: Sequence[float] | None):
        from .exact import FEASIBLE, INFEASIBLE, OPTIMAL, UNKNOWN, Solved

        pulp = self.pulp
        self._sync()
        warm = self.options.warm_start and hint is not None
        for v, var in self.v.items():
            var.varValue = None
            if warm:
                val = hint[v]
                kind = self.f.vars[v].kind
                val = round(val) if kind == BINARY else val / self.mscale if kind == FREE else val
                var.setInitialValue(val, check=False)
        # CBC's -sec counts CBC's own time only; PuLP's writing the MPS file and
        # reading the solution come on top (tens of seconds for 10**6 nonzeros).
        nonzeros = self.nonzeros
        limit = max(1, math.floor(time_limit_s - self.io_s_per_nonzero * nonzeros))
        fd, log = tempfile.mkstemp(suffix=".log", prefix="acopt_cbc_")
        os.close(fd)
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # PuLP 3.3 deprecates the bundled CBC for 4.0; it is the one we want
                warnings.simplefilter("ignore", DeprecationWarning)
                solver = pulp.PULP_CBC_CMD(
                    msg=self.options.msg, timeLimit=limit, threads=self.options.threads,
                    gapRel=self.options.rel_gap, warmStart=warm, logPath=log,
                )  # fmt: skip
                self.prob.solve(solver)
            with open(log) as fh:
                text = fh.read()
            if self.options.msg:
                print(text)  # CBC writes its log to logPath only
        finally:
            os.unlink(log)
        cbc_s = _parse(text, "(Wallclock seconds):")
        if cbc_s is not None and nonzeros:
            overhead = max(0.0, time.perf_counter() - started - cbc_s)
            self.io_s_per_nonzero = max(self.io_s_per_nonzero, overhead / nonzeros)
        sol = self.prob.sol_status
        if self.prob.status == pulp.LpStatusInfeasible or sol == pulp.LpSolutionInfeasible:
            return Solved(status=INFEASIBLE, x=None, objective=None, bound=None)
        bound = _parse(text, "Lower bound:")
        objective = _parse(text, "Objective value:")
        if sol == pulp.LpSolutionOptimal and "Stopped on" not in text:
            status = OPTIMAL
        elif sol in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            status = FEASIBLE
        else:
            return Solved(status=UNKNOWN, x=None, objective=None, bound=None if bound is None else bound / self.scale)
        x = [0.0] * len(self.f.vars)
        for v, var in self.v.items():
            val = var.value()
            x[v] = 0.0 if val is None else float(val) * (self.mscale if self.f.vars[v].kind == FREE else 1.0)
        if status == OPTIMAL and bound is None:
            bound = objective
        return Solved(
            status=status, x=x,
            objective=None if objective is None else objective / self.scale,
            bound=None if bound is None else bound / self.scale,
        )  # fmt: skip


def _parse(text: str, label: str) -> float | None:
    m = re.search(re.escape(label) + r"\s*([-+0-9.eE]+)", text)
    if not m:
        return None
    try:
        val = float(m.group(1))
    except ValueError:
        return None
    return val if math.isfinite(val) else None


SPEC = PlannerSpec(
    name="ilp",
    planner=ilp,
    options_type=IlpOptions,
    exact=True,
    requires=("pulp",),
    install=INSTALL,
    description="exact: mixed-integer model of the memory model, lazy block rows, CBC (PuLP)",
)
