"""``acopt.compile``: trace, profile, plan and rewrite in one call.

>>> step = acopt.compile(train_step, model, optimizer, x, y, budget="70%")  # doctest: +SKIP
>>> for x, y in loader:                                                     # doctest: +SKIP
...     loss = step(x, y)
>>> print(step.report())                                                    # doctest: +SKIP

A batch of a new shape (or dtype, strides, or device) is traced and planned
again with the same budget and solver; each shape's plan is kept, so
alternating shapes cost one plan each. A budget given in bytes must fit every
shape; a "70%" budget is relative to each shape's own peak. The same happens
when a guard fails (``model.eval()``, a frozen parameter, a swapped module,
``add_param_group``...: :mod:`acopt.guards`): the step is traced and planned
again, with a warning that says why (once per reason).

Logging (``logging.getLogger("acopt")``): every (re-)plan and its reason at
INFO, each guard that a kept variant misses at DEBUG; ``Report.as_dict()``
gives the numbers for tensorboard or wandb.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from acopt import rank_plan
from acopt.errors import GuardFailure, UnsupportedStep
from acopt.plan_cache import obtain_plan
from acopt.planning import Plan, floor, plan
from acopt.profiler import profile
from acopt.records import Profile
from acopt.rewriter import rewrite
from acopt.simulator import simulate
from acopt.tracer import OptimizerSet, TracedStep, trace
from acopt.units import format_bytes

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """What compiling one batch shape did, and what it predicts."""

    batch_shapes: tuple[tuple[int, ...], ...]
    peak_before_bytes: int
    peak_after_bytes: int
    floor_bytes: int  # the lowest peak recomputation reaches (acopt.floor)
    budget_bytes: int
    step_time_s: float
    recompute_time_s: float
    recomputed: int
    activations: int
    solver: str
    status: str
    compile_time_s: float
    backend: str = "eager"
    measured_peak_bytes: int | None = None  # backend="inductor": the compiled step's measured peak

    @property
    def overhead(self) -> float:
        """Predicted step-time overhead of recomputation (fraction of the step)."""
        return self.recompute_time_s / self.step_time_s if self.step_time_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers and strings (``overhead`` included), e.g. for
        ``writer.add_scalars("acopt", {k: v for k, v in r.as_dict().items() if isinstance(v, (int, float))})``
        or ``wandb.log(r.as_dict())``."""
        out = dataclasses.asdict(self)
        out["batch_shapes"] = [list(s) for s in self.batch_shapes]
        out["overhead"] = self.overhead
        return out

    def __str__(self) -> str:
        return (
            f"acopt: peak {format_bytes(self.peak_before_bytes)} -> {format_bytes(self.peak_after_bytes)} "
            f"(budget {format_bytes(self.budget_bytes)}, floor {format_bytes(self.floor_bytes)}), recomputing {self.recomputed}/{self.activations} "
            f"activations, predicted overhead {self.overhead:.1%} "
            f"({self.recompute_time_s * 1e3:.2f} ms of {self.step_time_s * 1e3:.2f} ms), "
            f"solver {self.solver} ({self.status}), compiled in {self.compile_time_s:.1f} s"
            + (
                f"; backend {self.backend}: measured peak {format_bytes(self.measured_peak_bytes)} "
                f"(simulated, eager model: {format_bytes(self.peak_after_bytes)})"
                if self.measured_peak_bytes is not None
                else ""
            )
        )


@dataclasses.dataclass(slots=True)
class _Compiled:
    traced: TracedStep
    profile: Profile
    plan: Plan
    step: TracedStep
    report: Report


_KEEP_PER_SHAPE = 4


class CompiledStep:
    """A training step that runs within a memory budget; call it like ``train_step``
    without the model and optimizer: ``loss = step(*batch)``."""

    def __init__(self, train_step, model, optimizer, *, budget, solver: str, options: dict[str, Any], warmup: int, iterations: int,
                 plan: Plan | str | Path | None = None, cache_dir: str | Path | None = None, backend: str = "eager"):  # fmt: skip
        self._train_step = train_step
        self.model = model
        self._optimizers = OptimizerSet.of(optimizer)  # weak: a re-created optimizer is noticed
        self.budget = budget
        self.solver = solver
        self.options = options
        self._warmup = warmup
        if backend not in ("eager", "inductor"):
            raise ValueError(f"backend must be 'eager' or 'inductor', not {backend!r}")
        self.backend = backend
        self._iterations = iterations
        self._plan_arg = plan  # reused instead of profiling and solving (acopt.plan_cache)
        self._cache_dir = cache_dir
        self._compiled: dict[tuple, list[_Compiled]] = {}
        self._last: _Compiled | None = None
        self._warned: set[str] = set()

    @property
    def optimizer(self) -> Any:
        """The optimizer argument (one optimizer, or the list/tuple/dict of them)."""
        return self._optimizers.rebuild()

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        self._optimizers.live()  # a dropped optimizer is an error, never a retrace
        failure = None
        for compiled in reversed(self._compiled.get(_signature(batch), [])):
            try:
                inputs = compiled.step.flat_inputs(*batch)  # checks every guard
            except GuardFailure as e:
                logger.debug("a kept variant does not serve this call: %s", e)
                failure = e
                continue
            self._last = compiled
            return compiled.step.run(inputs)
        if failure is not None:
            reason = str(failure)
            logger.info("tracing and planning the step again: %s", reason)
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"acopt: tracing and planning the step again: {reason}", stacklevel=2)
        compiled = self._compile(batch)
        self._last = compiled
        return compiled.step(*batch)

    def _compile(self, batch) -> _Compiled:
        start = time.perf_counter()
        traced = trace(self._train_step, self.model, self.optimizer, *batch)
        ranks = rank_plan.active(traced)  # one plan for all ranks (docs/usage.md, "Distributed")
        if ranks:
            rank_plan.check_same_graph(traced)
        measured = budget_bytes = None
        if self.backend == "inductor":  # plan, compile, verify by measuring (acopt.inductor)
            from acopt.inductor import fit_compiled

            if ranks:
                raise UnsupportedStep(
                    "backend='inductor' under torch.distributed: each rank would choose its plan by its own "
                    "measurements, and ranks must run one plan; use the eager backend"
                )
            prof = profile(traced, *batch, warmup=self._warmup, iterations=self._iterations)
            fitted = fit_compiled(traced, prof, batch, budget=self.budget, solver=self.solver, options=self.options)
            chosen, step, measured = fitted.plan, fitted.step, fitted.measured_peak_bytes
            budget_bytes = fitted.budget_bytes  # the plan's own is the budget it was planned for
        else:
            prof, chosen, _ = obtain_plan(
                traced, batch, budget=self.budget, solver=self.solver, options=self.options, plan=self._plan_arg,
                cache_dir=None if ranks else self._cache_dir,  # a cache hit on one rank only would leave the others waiting
                warmup=self._warmup, iterations=self._iterations, strict=not self._compiled,
                planner=functools.partial(rank_plan.plan_on_rank0, plan) if ranks else plan,
            )  # fmt: skip
            step = rewrite(traced, chosen, profile=prof)
            if ranks:  # a plan given per rank must be the same everywhere
                rank_plan.check_same_rewrite(step)
        sim = simulate(prof, chosen.recompute)
        report = Report(
            batch_shapes=tuple(tuple(b.shape) for b in pytree.tree_leaves(batch) if isinstance(b, torch.Tensor)),
            peak_before_bytes=prof.peak_bytes,
            peak_after_bytes=sim.peak_bytes,
            floor_bytes=floor(prof),
            budget_bytes=budget_bytes or chosen.budget_bytes,
            step_time_s=prof.total_time_s,
            recompute_time_s=sim.recompute_time_s,
            recomputed=len(chosen.recompute),
            activations=len(prof.activations),
            solver=chosen.solver,
            status=chosen.status.value,
            compile_time_s=time.perf_counter() - start,
            backend=self.backend,
            measured_peak_bytes=measured,
        )
        logger.info("compiled for batch shapes %s: %s", list(report.batch_shapes), report)
        compiled = _Compiled(traced, prof, chosen, step, report)
        entries = self._compiled.setdefault(_signature(batch), [])
        entries.append(compiled)
        del entries[:-_KEEP_PER_SHAPE]  # old variants (e.g. a swapped module's) are not kept forever
        return compiled

    def compile_for(self, *batch: torch.Tensor) -> CompiledStep:
        """Trace and plan for ``batch`` now (without running a step)."""
        if not self._compiled.get(_signature(batch)):
            self._last = self._compile(batch)
        return self

    def _current(self) -> _Compiled:
        if self._last is None:
            raise RuntimeError("nothing compiled yet: call the step once")
        return self._last

    def report(self) -> Report:
        return self._current().report

    @property
    def plan(self) -> Plan:
        return self._current().plan

    @property
    def profile(self) -> Profile:
        return self._current().profile

    @property
    def traced(self) -> TracedStep:
        """The rewritten step that runs (its ``print_readable()`` shows the blocks)."""
        return self._current().step


def _signature(batch) -> tuple:
    """Which traced variants may serve ``batch``: its structure, and each leaf's
    shape, dtype, device and strides (tensors) or value (constants)."""
    leaves, spec = pytree.tree_flatten(batch)
    return (str(spec),) + tuple(
        (tuple(b.shape), b.dtype, str(b.device), b.stride()) if isinstance(b, torch.Tensor) else repr(b) for b in leaves
    )


def compile(
    train_step: Callable[..., Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *batch: torch.Tensor,
    budget: float | str | None = None,
    solver: str = "greedy",
    warmup: int = 1,
    iterations: int = 3,
    plan: Plan | str | Path | None = None,
    cache_dir: str | Path | None = None,
    backend: str = "eager",
    **options: Any,
) -> CompiledStep:
    """Trace, profile, plan and rewrite ``train_step`` for ``batch``'s shape.

    ``options`` go to the planner (e.g. ``time_limit_s=30`` for ``ilp``).
    ``backend="inductor"`` runs the planned step with inductor's kernels
    (:mod:`acopt.inductor`): planned with the eager memory model, compiled,
    its peak measured, and planned again with a margin if it does not fit.
    Raises :class:`acopt.InfeasibleBudget` if the budget is below the floor.
    ``plan`` (a Plan or its JSON file) is used instead of profiling and
    solving; it must be this step's (:class:`acopt.ArtifactMismatch`).
    ``cache_dir`` (default ``$ACOPT_CACHE_DIR``) keeps plans keyed by the
    step's graph fingerprint, budget and solver (:mod:`acopt.plan_cache`).
    """
    if budget is None and plan is None:
        raise TypeError("acopt.compile needs a budget (or a plan to reuse)")
    if backend == "inductor" and plan is not None:
        raise ValueError(
            "plan= is for the eager backend: backend='inductor' chooses its plan by measuring the compiled "
            "step (acopt.inductor); drop plan= or use backend='eager'"
        )
    step = CompiledStep(
        train_step, model, optimizer, budget=budget, solver=solver, options=options, warmup=warmup,
        iterations=iterations, plan=plan, cache_dir=cache_dir, backend=backend,
    )  # fmt: skip
    return step.compile_for(*batch)
