"""Plans, the planner protocol, the planner registry, and ``acopt.plan``.

>>> plan = acopt.plan(profile, budget="70%")                   # doctest: +SKIP
>>> plan.status.value, len(plan.recompute), plan.fits           # doctest: +SKIP
('heuristic', 12, True)
>>> acopt.plan(profile, budget="1KiB")                         # doctest: +SKIP
Traceback (most recent call last):
InfeasibleBudget: budget 1.00 KiB (1024 bytes) is below the floor 3.05 MiB ...

A planner turns ``(profile, budget_bytes, options)`` into a :class:`Plan`
(STYLE point 4: one keyword-only signature for all). ``plan()`` does the work
every planner shares, once:

1. look the planner up in the registry (built-ins, :func:`register_planner`,
   then the entry-point group ``acopt.planners``), check its optional modules;
2. build its options dataclass from ``**options`` (unknown names and wrong
   types are a ``TypeError``);
3. resolve the budget (:func:`resolve_budget`); a budget that holds the
   no-recompute peak gets the empty plan (optimal: nothing to pay); a budget
   below :func:`floor` raises :class:`InfeasibleBudget` (memory model, rule 6);
4. call the planner, then check its plan with the simulator
   (:func:`check_plan`) before returning it.

Planners assemble their result with :func:`assemble_plan`, which times the
solve, simulates the plan and fills the predicted peak and recompute time.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import numbers
import re
import time
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from acopt.records import Profile, Region, from_plain
from acopt.schedule import InvalidPlan
from acopt.simulator import Simulation, memory_model, peak_bytes, peak_location, simulate
from acopt.simulator import _facts as _profile_facts
from acopt.units import format_bytes, parse_budget

logger = logging.getLogger(__name__)  # acopt.planning: one INFO line per plan

PLAN_FORMAT_VERSION = 1
ENTRY_POINT_GROUP = "acopt.planners"


class PlanStatus(str, enum.Enum):
    """How good a plan is known to be."""

    OPTIMAL = "optimal"  # proven minimal recompute time (exact solvers; the empty plan)
    FEASIBLE = "feasible"  # fits; proven within the solver's gap tolerance
    TIME_LIMIT = "time_limit"  # fits; the solver stopped at its time limit
    HEURISTIC = "heuristic"  # fits; no optimality claim (greedy)
    INFEASIBLE = "infeasible"  # the planner found no plan that fits


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SolverStats:
    """Model size and effort of an exact solve (or notes from any planner)."""

    variables: int | None = None
    constraints: int | None = None
    objective: float | None = None
    iterations: int | None = None
    build_time_s: float | None = None
    notes: tuple[str, ...] = ()


OptionValue = bool | int | float | str | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Which activations to recompute, and what a planner knows about that choice.

    ``recompute`` names activations (storage names, ``Profile.activations``).
    ``predicted_peak_bytes`` and ``recompute_time_s`` are the simulator's
    (:func:`acopt.simulate`); ``solve_time_s`` is the planner's wall time.
    ``bound`` is a proven lower bound on the recompute time at this budget and
    ``gap`` = (recompute_time_s - bound) / recompute_time_s (exact solvers).
    ``profile_id`` is :func:`profile_fingerprint` of the profile planned for,
    ``graph_fingerprint`` its ``meta.graph_fingerprint`` (the traced graph's,
    "" for hand-built profiles): :func:`acopt.rewrite` and :func:`acopt.simulate`
    refuse the plan for any other profile or graph. ``options`` the planner options used, as (name, value) pairs.
    """

    recompute: frozenset[str]
    solver: str
    status: PlanStatus
    budget_bytes: int
    predicted_peak_bytes: int
    recompute_time_s: float
    solve_time_s: float = 0.0
    bound: float | None = None
    gap: float | None = None
    stats: SolverStats | None = None
    batch_size: int = 0
    profile_id: str = ""
    graph_fingerprint: str = ""
    options: tuple[tuple[str, OptionValue], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.recompute, str):
            raise TypeError("Plan.recompute must be a collection of activation names, not a string")
        if not isinstance(self.recompute, frozenset):
            object.__setattr__(self, "recompute", frozenset(self.recompute))
        if not isinstance(self.status, PlanStatus):
            object.__setattr__(self, "status", PlanStatus(self.status))

    @property
    def fits(self) -> bool:
        """Whether the predicted peak is within the budget."""
        return self.predicted_peak_bytes <= self.budget_bytes

    # ---- serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "acopt.Plan",
            "version": PLAN_FORMAT_VERSION,
            "recompute": sorted(self.recompute),
            "solver": self.solver,
            "status": self.status.value,
            "budget_bytes": self.budget_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "recompute_time_s": self.recompute_time_s,
            "solve_time_s": self.solve_time_s,
            "bound": self.bound,
            "gap": self.gap,
            "stats": None if self.stats is None else {
                **{f.name: getattr(self.stats, f.name) for f in dataclasses.fields(SolverStats)},
                "notes": list(self.stats.notes),
            },
            "batch_size": self.batch_size,
            "profile_id": self.profile_id,
            "graph_fingerprint": self.graph_fingerprint,
            "options": {k: v for k, v in self.options},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Read :meth:`to_dict`'s output, checking every field's type
        (:func:`acopt.records.from_plain`); ``options`` and ``graph_fingerprint``
        may be missing (older files)."""
        if not isinstance(data, Mapping) or data.get("format") != "acopt.Plan":
            raise ValueError("not an acopt plan (missing 'format': 'acopt.Plan')")
        if data.get("version") != PLAN_FORMAT_VERSION:
            raise ValueError(f"unsupported plan format version {data.get('version')!r}")
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        try:
            return from_plain(cls, body, optional={cls: {"options", "graph_fingerprint"}})
        except ValueError as e:
            raise ValueError(f"corrupt acopt plan: {e}") from e

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"corrupt acopt plan {path}: {e}") from e
        return cls.from_dict(data)


def profile_fingerprint(profile: Profile) -> str:
    """A short content hash of a profile's graph and bytes (not its times).

    Two profiles of the same traced step at the same shapes share it, so a plan
    can be checked against the graph it is applied to; another graph, batch
    size or dtype gives another fingerprint. Hashed: every node's name, op,
    region, inputs, storages, allocations, mutations, replay flags and
    workspace bytes, every storage's name, bytes and creator, and the size of
    a saved generator state.
    """
    facts = _profile_facts(profile)
    if facts.fingerprint is None:
        # repr of tuples of str/int/bool is canonical and much faster than JSON
        text = repr(
            (
                [(n.name, n.op, n.region.value, n.inputs, n.storages, n.allocates, n.mutates,
                  n.recomputable, n.replay, n.random, n.temp_bytes) for n in profile.nodes],
                [(s.name, s.bytes, s.node) for s in profile.storages],
                profile.rng_state_bytes,
            )
        )  # fmt: skip
        facts.fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    return facts.fingerprint


# ---- budgets and the floor -----------------------------------------------------
class InfeasibleBudget(ValueError):
    """The budget is below the floor (memory model, rule 6): no plan can fit.

    ``floor_bytes`` is :func:`floor`; ``peak_node`` and ``peak_region`` say
    where the peak sits when every candidate is recomputed.
    """

    def __init__(
        self,
        message: str,
        *,
        floor_bytes: int | None = None,
        budget_bytes: int | None = None,
        peak_node: str = "",
        peak_region: Region | None = None,
    ):
        super().__init__(message)
        self.floor_bytes = floor_bytes
        self.budget_bytes = budget_bytes
        self.peak_node = peak_node
        self.peak_region = peak_region


def no_recompute_peak(profile: Profile) -> int:
    """The simulated peak of the empty plan (equals ``profile.peak_bytes`` when measured)."""
    return peak_bytes(profile, frozenset())


def floor(profile: Profile) -> int:
    """The smallest peak the planners promise to reach (memory model, rule 6).

    The simulated peak when every candidate (``MemoryModel.candidates``) is
    recomputed (or, where that plan is invalid because a chain would replay a
    node that cannot be replayed, every candidate the greedy can pick); or
    the no-recompute peak, in the rare profile where
    recomputing everything raises the peak above it (a backward peak that
    recompute blocks make higher). A budget below it raises
    :class:`InfeasibleBudget`. Costs one simulation of the every-candidate
    schedule (fast path), cached per profile.
    """
    return min(peak_bytes(profile, _most_recomputed(profile)), peak_bytes(profile, frozenset()))


def _most_recomputed(profile: Profile) -> frozenset[str]:
    """Every candidate, or where that plan is invalid (a chain would replay a
    node that cannot be replayed), every candidate the greedy can pick (its
    Note G4)."""
    everything = frozenset(memory_model(profile).candidates)
    try:
        peak_bytes(profile, everything)
    except InvalidPlan:
        from acopt.mu_two import pick_order

        return frozenset(pick_order(profile).order)
    return everything


_REGION_WORDS = {Region.FORWARD: "forward pass", Region.BACKWARD: "backward pass", Region.OPTIMIZER: "optimizer step"}


def check_budget(profile: Profile, budget_bytes: int) -> None:
    """Raise :class:`InfeasibleBudget` if ``budget_bytes`` is below :func:`floor`."""
    floor_bytes = floor(profile)
    if budget_bytes >= floor_bytes:
        return
    candidates = memory_model(profile).candidates
    most = _most_recomputed(profile)
    peak, node, block, region = peak_location(profile, most if floor_bytes < no_recompute_peak(profile) else ())
    where = node if block is None else f"{node} in the recompute block for {block}"
    which = f"all {len(candidates)}" if len(most) == len(candidates) else f"{len(most)} of the {len(candidates)}"
    raise InfeasibleBudget(
        f"budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) is below the floor "
        f"{format_bytes(floor_bytes)} ({floor_bytes} bytes): with {which} recomputable "
        f"activations recomputed the peak is still {format_bytes(floor_bytes)}, at {where} "
        f"({_REGION_WORDS[region]}); the no-recompute peak is {format_bytes(no_recompute_peak(profile))}",
        floor_bytes=floor_bytes,
        budget_bytes=budget_bytes,
        peak_node=node,
        peak_region=region,
    )


def resolve_budget(profile: Profile, budget: int | float | str) -> int:
    """Budget in bytes (rounded down) from any form :func:`acopt.units.parse_budget`
    reads: bytes, a size (``"6GiB"``), a share of the no-recompute simulated peak
    (``"70%"``, ``0.7``) or of the way from the floor to it (``"floor+50%"``)."""
    spec = parse_budget(budget)
    if spec.of == "bytes":
        return spec.bytes
    peak = no_recompute_peak(profile)
    if spec.of == "peak":
        return math.floor(peak * spec.share)
    low = floor(profile)
    return low + math.floor(max(0, peak - low) * spec.share)


# ---- planners and the registry ---------------------------------------------------
class Planner(Protocol):
    """A planner: one keyword-only call from a profile and a budget to a :class:`Plan`.

    It may assume ``floor(profile) <= budget_bytes`` (``plan()`` checks), must
    return a plan whose simulated peak fits unless its status is INFEASIBLE,
    and should build it with :func:`assemble_plan`.
    """

    def __call__(self, *, profile: Profile, budget_bytes: int, options: Any) -> Plan: ...


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PlannerSpec:
    """A registered planner and its declared capabilities (STYLE point 6).

    ``options_type`` is the planner's frozen options dataclass; ``exact`` says
    whether it proves optimality; ``requires`` lists the importable modules it
    needs (checked before it is called); ``install`` is the advice shown when
    one is missing (default: derived from acopt's extras, else the module name).
    """

    name: str
    planner: Planner
    options_type: type
    exact: bool = False
    requires: tuple[str, ...] = ()
    install: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a planner needs a non-empty name")
        if not callable(self.planner):
            raise TypeError(f"planner {self.name!r}: planner must be callable")
        if not (isinstance(self.options_type, type) and dataclasses.is_dataclass(self.options_type)):
            raise TypeError(f"planner {self.name!r}: options_type must be a dataclass type")
        object.__setattr__(self, "requires", tuple(self.requires))


class PlannerUnavailable(ImportError):
    """A registered planner cannot run here: a module it needs is missing or broken."""


class PlanCheckError(RuntimeError):
    """A planner returned a plan that the simulator contradicts (a planner bug)."""


_REGISTRY: dict[str, PlannerSpec] = {}
_BROKEN: dict[str, str] = {}  # entry-point name -> why it could not be loaded
_SEEN_ENTRY_POINTS: set[str] = set()
_BUILTINS_LOADED = False


def register_planner(spec: PlannerSpec, *, replace: bool = False) -> PlannerSpec:
    """Make ``spec`` available to :func:`plan` as ``solver=spec.name``.

    Registering a different spec under a taken name is a ``ValueError`` unless
    ``replace=True``. Returns ``spec``.
    """
    if not isinstance(spec, PlannerSpec):
        raise TypeError(f"register_planner expects a PlannerSpec, not {type(spec).__name__}")
    _load_builtins()
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec and not replace:
        raise ValueError(f"a planner named {spec.name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[spec.name] = spec
    _BROKEN.pop(spec.name, None)
    return spec


def unregister_planner(name: str) -> None:
    """Remove a planner registered under ``name`` (for tests and plugins)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from acopt.greedy import SPEC as greedy
        from acopt.mu_two import SPEC as mu_two

        _REGISTRY.setdefault(greedy.name, greedy)
        _REGISTRY.setdefault(mu_two.name, mu_two)


def _load_entry_points(name: str | None = None) -> None:
    """Load entry points of group ``acopt.planners`` (all, or the one named ``name``).

    A broken entry point is remembered with its error and never breaks the
    other planners (STYLE point 7).
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if (name is not None and ep.name != name) or ep.name in _SEEN_ENTRY_POINTS:
            continue
        _SEEN_ENTRY_POINTS.add(ep.name)
        if ep.name in _REGISTRY:
            continue  # registered in code (or built in): that one wins
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - any failure of a plugin import must be contained
            _BROKEN[ep.name] = _load_error(ep, e)
            continue
        if not isinstance(obj, PlannerSpec):
            _BROKEN[ep.name] = f"entry point {ep.value} is a {type(obj).__name__}, not an acopt PlannerSpec"
        elif obj.name != ep.name:
            _BROKEN[ep.name] = f"entry point {ep.name!r} ({ep.value}) names its planner {obj.name!r}"
        else:
            _REGISTRY.setdefault(obj.name, obj)


def _load_error(ep, e: Exception) -> str:
    why = f"{type(e).__name__}: {e}"
    missing = getattr(e, "name", None) if isinstance(e, ImportError) else None
    top = (missing or "").split(".")[0]
    if top and top != ep.value.split(":")[0].split(".")[0]:  # a dependency, not the plugin itself
        return f"entry point {ep.value} could not be imported ({why}); {_install_advice(top, ep)}"
    return f"entry point {ep.value} could not be imported ({why})"


def _install_advice(module: str, ep=None, hint: str = "") -> str:
    """What to pip install for ``module``: the spec's hint, acopt's extra that lists it, or the module."""
    if hint:
        return f"install it with: {hint}"
    try:
        from importlib.metadata import distribution

        dist = getattr(ep, "dist", None) or distribution("acopt")
        for req in dist.requires or ():
            m = re.match(r"^([A-Za-z0-9_.\-]+)[^;]*;\s*extra\s*==\s*['\"]([^'\"]+)['\"]", req)
            if m and m[1].lower().replace("-", "_") == module.lower().replace("-", "_"):
                return f"install it with: pip install '{dist.name}[{m[2]}]' (or pip install {m[1]})"
    except Exception:  # noqa: BLE001 - advice is best effort
        pass
    return f"install it with: pip install {module}"


def planners() -> dict[str, PlannerSpec]:
    """Every planner that can be looked up, by name (built-ins, registered, entry points).

    Entry points that fail to load are left out; :func:`planner_errors` says why.
    """
    _load_builtins()
    _load_entry_points()
    return dict(_REGISTRY)


def planner_errors() -> dict[str, str]:
    """Entry-point planners that could not be loaded, by name, with the reason."""
    _load_builtins()
    _load_entry_points()
    return dict(_BROKEN)


def get_planner(name: str) -> PlannerSpec:
    """The spec registered as ``name``, loading only what is needed to find it.

    Unknown names are a ``ValueError`` listing the registered planners; a
    planner whose module or required modules are missing is a
    :class:`PlannerUnavailable` (an ``ImportError``) saying what to install.
    """
    _load_builtins()
    spec = _REGISTRY.get(name)
    if spec is None:
        _load_entry_points(name)
        spec = _REGISTRY.get(name)
    if spec is None:
        if name in _BROKEN:
            raise PlannerUnavailable(f"planner {name!r} is unavailable: {_BROKEN[name]}")
        known = planners()
        broken = planner_errors()
        msg = f"unknown solver {name!r}; registered planners: {', '.join(sorted(known)) or 'none'}"
        if broken:
            msg += f" (unavailable: {', '.join(sorted(broken))})"
        raise ValueError(msg)
    for module in spec.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise PlannerUnavailable(
                f"planner {name!r} needs the Python module {module!r}, which is not installed; "
                f"{_install_advice(module, hint=spec.install)}"
            )
    return spec


def make_options(spec: PlannerSpec, options: Mapping[str, Any]) -> Any:
    """``spec.options_type(**options)`` after checking names and types.

    Unknown names and values of the wrong type (``bool`` is not an ``int``
    here: STYLE point 4) raise ``TypeError`` naming the valid options.
    """
    cls = spec.options_type
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    valid = ", ".join(f"{k}: {_type_name(hints.get(k, Any))}" for k in fields) or "none"
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for planner {spec.name!r}; valid options: {valid}"
        )
    for key, value in options.items():
        if not _conforms(value, hints.get(key, Any)):
            raise TypeError(
                f"option {key!r} of planner {spec.name!r} must be {_type_name(hints[key])}, "
                f"not {type(value).__name__} {value!r}"
            )
    return cls(**options)


def _conforms(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(hint))
    if origin is not None:
        return isinstance(value, origin)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _plain_options(options: Any) -> tuple[tuple[str, OptionValue], ...]:
    """An options dataclass as (name, JSON scalar) pairs, for :attr:`Plan.options`."""
    if options is None:
        return ()
    out = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        if not isinstance(value, (bool, int, float, str, type(None))):
            value = repr(value)
        out.append((f.name, value))
    return tuple(out)


# ---- the shared work -------------------------------------------------------------
def assemble_plan(
    profile: Profile,
    recompute: Any,
    *,
    solver: str,
    status: PlanStatus,
    budget_bytes: int,
    started: float | None = None,
    solve_time_s: float | None = None,
    bound: float | None = None,
    gap: float | None = None,
    stats: SolverStats | None = None,
    options: Any = None,
    check: bool = True,
) -> Plan:
    """The :class:`Plan` a planner returns: simulated, timed, checked.

    ``started`` is the planner's ``time.perf_counter()`` at its start (the solve
    time is measured up to now, before simulating), or give ``solve_time_s``.
    The predicted peak and recompute time are the simulator's. With
    ``check`` (default), a plan that does not fit while its status claims it
    does raises :class:`PlanCheckError`.
    """
    if started is not None:
        solve_time_s = time.perf_counter() - started
    sim = simulate(profile, recompute)
    result = Plan(
        recompute=sim.recompute,
        solver=solver,
        status=PlanStatus(status),
        budget_bytes=int(budget_bytes),
        predicted_peak_bytes=sim.peak_bytes,
        recompute_time_s=sim.recompute_time_s,
        solve_time_s=float(solve_time_s or 0.0),
        bound=bound,
        gap=gap,
        stats=stats,
        batch_size=profile.meta.batch_size,
        profile_id=profile_fingerprint(profile),
        graph_fingerprint=profile.meta.graph_fingerprint,
        options=_plain_options(options),
    )
    if check:
        check_plan(profile, result)
    return result


def check_plan(profile: Profile, result: Any, *, budget_bytes: int | None = None) -> Simulation:
    """Check a planner's result against the simulator; return the simulation.

    The plan must be a :class:`Plan` for this profile (and ``budget_bytes``, if
    given), name only recomputable activations, fit its budget unless its
    status is INFEASIBLE, and state the simulator's peak and recompute time.
    Raises :class:`PlanCheckError` otherwise.
    """
    if not isinstance(result, Plan):
        raise PlanCheckError(f"a planner returned {type(result).__name__}, not an acopt Plan")
    who = f"planner {result.solver!r}"
    fingerprint = profile_fingerprint(profile)
    if result.profile_id != fingerprint:
        raise PlanCheckError(f"{who} returned a plan for profile {result.profile_id!r}, not {fingerprint!r}")
    if result.graph_fingerprint and result.graph_fingerprint != profile.meta.graph_fingerprint:
        raise PlanCheckError(
            f"{who} returned a plan for graph {result.graph_fingerprint!r}, not {profile.meta.graph_fingerprint!r}"
        )
    if budget_bytes is not None and result.budget_bytes != budget_bytes:
        raise PlanCheckError(f"{who} planned for budget {result.budget_bytes}, not {budget_bytes}")
    try:
        sim = simulate(profile, result.recompute)
    except InvalidPlan as e:
        raise PlanCheckError(f"{who} returned an invalid plan: {e}") from e
    if result.status != PlanStatus.INFEASIBLE and sim.peak_bytes > result.budget_bytes:
        raise PlanCheckError(
            f"{who} returned a {result.status.value} plan whose simulated peak {sim.peak_bytes} "
            f"exceeds its budget {result.budget_bytes} by {sim.peak_bytes - result.budget_bytes} bytes"
        )
    if result.predicted_peak_bytes != sim.peak_bytes:
        raise PlanCheckError(
            f"{who} predicts peak {result.predicted_peak_bytes}, the simulator finds {sim.peak_bytes}"
        )
    if not math.isclose(result.recompute_time_s, sim.recompute_time_s, rel_tol=1e-9, abs_tol=1e-12):
        raise PlanCheckError(
            f"{who} states recompute time {result.recompute_time_s!r} s, "
            f"the simulator finds {sim.recompute_time_s!r} s"
        )
    return sim


def plan(profile: Profile, *, budget: int | float | str, solver: str = "greedy", **options: Any) -> Plan:
    """Choose activations to recompute so that ``profile``'s step fits ``budget``.

    ``budget``: bytes, a size like ``"6GiB"``, ``"70%"`` (or ``0.7``) of the
    no-recompute peak, or ``"floor+50%"`` (:func:`resolve_budget`). ``solver``: a registered planner (:func:`planners`). ``options``: the
    planner's options (e.g. ``search="linear"`` for greedy).

    Raises :class:`InfeasibleBudget` below the floor, ``ValueError`` for an
    unknown solver, ``TypeError`` for unknown or mistyped options, and
    :class:`PlannerUnavailable` (an ``ImportError``) when a solver's optional
    modules are missing.
    """
    spec = get_planner(solver)
    opts = make_options(spec, options)
    budget_bytes = resolve_budget(profile, budget)
    started = time.perf_counter()
    if budget_bytes >= no_recompute_peak(profile):
        return assemble_plan(
            profile, frozenset(), solver=spec.name, status=PlanStatus.OPTIMAL, budget_bytes=budget_bytes,
            started=started, bound=0.0, gap=0.0, options=opts,
            stats=SolverStats(notes=("the budget holds the no-recompute peak: nothing to recompute",)),
        )  # fmt: skip
    check_budget(profile, budget_bytes)
    result = spec.planner(profile=profile, budget_bytes=budget_bytes, options=opts)
    check_plan(profile, result, budget_bytes=budget_bytes)
    logger.info(
        "%s: %s, %d of %d recomputed, budget %s (floor %s, peak %s), %.2f s", spec.name, result.status.value,
        len(result.recompute), len(memory_model(profile).candidates), format_bytes(budget_bytes),
        format_bytes(floor(profile)), format_bytes(no_recompute_peak(profile)), result.solve_time_s,
    )  # fmt: skip
    return result
