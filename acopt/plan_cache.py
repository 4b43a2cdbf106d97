"""Reusing plans: a plan given by the caller, or a cache directory of plans.

A plan is only as good as the graph it was made for, so reuse is keyed by the
traced graph's fingerprint (:func:`acopt.fingerprint.graph_fingerprint`):

* ``plan=`` (a :class:`~acopt.planning.Plan` or a path to its JSON) skips
  profiling and solving; a plan made for another graph (another model, batch
  shape, dtype, torch version's decomposition...) is an
  :class:`~acopt.fingerprint.ArtifactMismatch`. Without the plan's own profile
  the step's memory is read from a fake-tensor profile (exact storages,
  estimated times).
* ``cache_dir=`` (or the environment variable ``ACOPT_CACHE_DIR``) keeps each
  plan with the profile it was made from, under
  ``{graph fingerprint}-{budget}-{solver}[-{options}].plan.json`` and
  ``{graph fingerprint}.profile.json``. A second run of the same job finds
  both and neither profiles nor solves again; the rewriter checks the cached
  profile against the graph node by node.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from acopt.fingerprint import ArtifactMismatch, graph_fingerprint
from acopt.planning import Plan
from acopt.planning import plan as make_plan
from acopt.profiler import profile as make_profile
from acopt.records import Profile

ENV_VAR = "ACOPT_CACHE_DIR"


def load_plan(plan: Plan | str | os.PathLike) -> Plan:
    """A :class:`Plan`, or one read from its JSON file."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return Plan.from_json(Path(plan))
    raise TypeError(f"plan must be an acopt.Plan or a path to its JSON file, not {type(plan).__name__}")


def adopt_plan(plan: Plan | str | os.PathLike, profile: Profile) -> Plan:
    """A saved plan applied to a new profile of the same step (``acopt run --plan``):
    the graph fingerprints must match (:class:`ArtifactMismatch` otherwise); the
    plan is then bound to this profile, whose measured times it is judged by."""
    chosen = load_plan(plan)
    ours = profile.meta.graph_fingerprint
    if chosen.graph_fingerprint != ours:
        raise ArtifactMismatch(
            f"the plan was made for another traced graph (graph fingerprint {chosen.graph_fingerprint or 'none'!r}, "
            f"this step's is {ours!r}{_batch_note(chosen, profile.meta)}): plan this step again, or pass the "
            "plan made for this model, batch size and dtype"
        )
    return dataclasses.replace(chosen, profile_id=_profile_id(profile))


def cache_directory(cache_dir: str | os.PathLike | None) -> Path | None:
    """``cache_dir``, else ``$ACOPT_CACHE_DIR``, else None (no cache)."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(ENV_VAR) or None
    return Path(chosen) if chosen is not None else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "x"


def plan_key(fingerprint: str, budget: Any, solver: str, options: dict[str, Any]) -> str:
    """The cache file stem of a plan: graph fingerprint, budget as given, solver, options."""
    key = f"{fingerprint}-{_slug(str(budget))}-{_slug(solver)}"
    if options:
        digest = hashlib.sha256(repr(sorted(options.items())).encode()).hexdigest()[:8]
        key += f"-{digest}"
    return key


def obtain_plan(
    traced,
    batch: tuple,
    *,
    budget: Any,
    solver: str,
    options: dict[str, Any],
    plan: Plan | str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    warmup: int = 1,
    iterations: int = 3,
    strict: bool = True,
    planner: Callable[..., Plan] = make_plan,
) -> tuple[Profile, Plan, str]:
    """(profile, plan, source) for ``traced``: from ``plan``, from the cache, or
    profiled and planned now (and then cached). ``source`` says which.
    ``strict=False`` (a later shape or guard variant of a step whose first
    graph took ``plan``): a ``plan`` of another graph is passed over, with a
    warning, and the step is planned for ``budget`` (refused without one).
    ``planner`` makes a new plan (``acopt.plan``; one rank's, broadcast, under
    torch.distributed)."""
    fingerprint = graph_fingerprint(traced.graph_module)
    directory = cache_directory(cache_dir)
    if plan is not None and not strict and budget is not None:
        chosen = load_plan(plan)
        if chosen.graph_fingerprint != fingerprint:
            warnings.warn(
                "acopt: the plan given does not fit this variant of the step (another batch shape, or a "
                "guard changed); planning it for the budget instead",
                stacklevel=3,
            )
            plan = None
    if plan is not None:
        chosen = load_plan(plan)
        if chosen.graph_fingerprint != fingerprint:
            raise ArtifactMismatch(
                f"the plan was made for another traced graph (graph fingerprint {chosen.graph_fingerprint or 'none'!r}, "
                f"this step's is {fingerprint!r}{_batch_note(chosen, traced)}): the model, batch shapes, dtypes or "
                "the step changed since it was made; plan again (drop plan=) or pass the plan for this step"
            )
        prof = _cached_profile(directory, fingerprint)
        if prof is None or prof.meta.graph_fingerprint != fingerprint or _profile_id(prof) != chosen.profile_id:
            from acopt.rewriter import structure_profile

            prof = structure_profile(traced)
            chosen = _detached(chosen)
        return prof, chosen, "plan argument"
    if directory is not None:
        path = directory / f"{plan_key(fingerprint, budget, solver, options)}.plan.json"
        prof = _cached_profile(directory, fingerprint)
        if path.exists() and prof is not None:
            chosen = Plan.from_json(path)
            if chosen.graph_fingerprint == fingerprint and chosen.profile_id == _profile_id(prof):
                return prof, chosen, "cache"
    prof = make_profile(traced, *batch, warmup=warmup, iterations=iterations)
    chosen = planner(prof, budget=budget, solver=solver, **options)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        _write(directory / f"{fingerprint}.profile.json", prof.to_json)
        _write(directory / f"{plan_key(fingerprint, budget, solver, options)}.plan.json", chosen.to_json)
    return prof, chosen, "planned"


def _cached_profile(directory: Path | None, fingerprint: str) -> Profile | None:
    if directory is None:
        return None
    path = directory / f"{fingerprint}.profile.json"
    if not path.exists():
        return None
    try:
        return Profile.from_json(path)
    except (OSError, ValueError, KeyError, TypeError):  # a damaged cache file is ignored (profiled again and overwritten)
        return None


def _profile_id(prof: Profile) -> str:
    from acopt.planning import profile_fingerprint

    return profile_fingerprint(prof)


def _detached(chosen: Plan) -> Plan:
    """The plan without its profile id, so that it applies to the step's fake
    profile (its graph fingerprint, checked above, still ties it to the graph)."""
    return dataclasses.replace(chosen, profile_id="")


def _batch_note(chosen: Plan, traced) -> str:
    ours = getattr(traced, "batch_size", 0)
    if chosen.batch_size and ours and chosen.batch_size != ours:
        return f"; it was made at batch size {chosen.batch_size}, this step's is {ours}"
    return ""


def _write(path: Path, writer) -> None:
    """Write through a temporary file, so that concurrent jobs never read half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer(tmp)
    os.replace(tmp, path)
