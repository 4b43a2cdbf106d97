"""acopt: fit a PyTorch training step into a memory budget by recomputing activations.

Pipeline (docs/usage.md)::

    traced = acopt.trace(train_step, model, optimizer, *batch)
    prof = acopt.profile(traced, *batch)
    plan = acopt.plan(prof, budget="6GiB", solver="greedy")
    sim = acopt.simulate(prof, plan)
    step = acopt.rewrite(traced, plan)
    loss = step(*batch)

or all at once: ``step = acopt.compile(train_step, model, optimizer, *batch, budget="70%")``.
Module mode (the loop stays eager): ``model = acopt.wrap(model, *example_inputs, budget="70%")``.

Names are imported lazily so that ``import acopt`` and the torch-free parts
(Profile, plan, simulate) stay cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # torch-free
    "Profile": "acopt.records",
    "NodeRecord": "acopt.records",
    "StorageRecord": "acopt.records",
    "ActivationRecord": "acopt.records",
    "Region": "acopt.records",
    "Role": "acopt.records",
    "InvalidPlan": "acopt.schedule",
    "ArtifactMismatch": "acopt.fingerprint",
    "RankMismatch": "acopt.rank_plan",
    "simulate": "acopt.simulator",
    "Simulation": "acopt.simulator",
    "Plan": "acopt.planning",
    "PlanStatus": "acopt.planning",
    "plan": "acopt.planning",
    "floor": "acopt.planning",
    "InfeasibleBudget": "acopt.planning",
    "register_planner": "acopt.planning",
    "planners": "acopt.planning",
    "parse_bytes": "acopt.units",
    # torch
    "trace": "acopt.tracer",
    "TracedStep": "acopt.tracer",
    "UnsupportedStep": "acopt.errors",
    "GuardFailure": "acopt.errors",
    "profile": "acopt.profiler",
    "rewrite": "acopt.rewriter",
    "compile": "acopt.compiler",
    "wrap": "acopt.module_mode",
    "WrappedModule": "acopt.module_mode",
    "shard": "acopt.sharding",
    "will_it_fit": "acopt.fit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'acopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from acopt.compiler import compile
    from acopt.errors import GuardFailure, UnsupportedStep
    from acopt.fingerprint import ArtifactMismatch
    from acopt.fit import will_it_fit
    from acopt.module_mode import WrappedModule, wrap
    from acopt.planning import (
        InfeasibleBudget,
        Plan,
        PlanStatus,
        floor,
        plan,
        planners,
        register_planner,
    )
    from acopt.profiler import profile
    from acopt.rank_plan import RankMismatch
    from acopt.records import (
        ActivationRecord,
        NodeRecord,
        Profile,
        Region,
        Role,
        StorageRecord,
    )
    from acopt.rewriter import rewrite
    from acopt.schedule import InvalidPlan
    from acopt.sharding import shard
    from acopt.simulator import Simulation, simulate
    from acopt.tracer import TracedStep, trace
    from acopt.units import parse_bytes
