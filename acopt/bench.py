"""The benchmark harness: peak memory, step time and numerics of one training step
under acopt and under the baselines, per model, batch size, method and budget.

    acopt bench --suite cpu-small --threads 1  # docs/results.md's CPU numbers
    acopt bench --suite cpu-large --threads 1  # (resnet152, bert-base, gpt2)
    acopt bench --suite cuda --device cuda     # the GPU sizes
    acopt bench mlp --batch-sizes 256 1024 --cap 8MiB
    acopt bench mlp --batch-sizes 256 1024 --fast

(``python -m benchmarks.harness`` in a source checkout runs the same.)

Methods (each prepares a step callable ``step(*batch) -> loss`` for a
:class:`~acopt.models.Workload` and returns it with a cleanup):

    none           eager ``train_step``, no recomputation
    traced         acopt's traced step without recomputation (acopt's own reference)
    acopt-greedy   acopt.plan(..., solver="greedy") + acopt.rewrite, per budget
    acopt-ilp      the same with the exact ILP planner (if registered), ``time_limit_s``
    acopt-cpsat    the same with the CP-SAT planner (if registered), ``time_limit_s``
    ckpt-every     torch.utils.checkpoint (use_reentrant=False) around every block
    ckpt-every2    ... around every other block
    torch-budget   torch.compile(train_step) with
                   torch._functorch.config.activation_memory_budget = the budget's fraction
    acopt-inductor acopt's greedy plan run by inductor (acopt.compile(..., backend="inductor"):
                   planned with the eager memory model, compiled, measured, re-planned
                   with a margin if over the budget; acopt.inductor), per budget
    ckpt-every-compiled  torch.compile(train_step) of the ckpt-every step (inductor;
                   the paired eager step runs checkpointed too)

Budgets (for acopt-* and torch-budget), with P the no-recompute peak and F the
floor (:func:`acopt.floor`) of acopt's profile of the step:

    "70%"      0.70 * P (acopt's own meaning of a percentage budget)
    "floor+50%" F + 0.50 * (P - F): half of the memory that recomputation can remove
               (also written "act50%", this harness's older spelling)
    "0.7"      0.70 * P, as torch's activation_memory_budget writes it
    "64MiB"    bytes
    "match:M"  (added automatically, acopt-greedy only) the measured peak of method
               row M at the same batch size: acopt at equal peak; acopt-inductor
               likewise at the peaks of the compiled baselines (torch-budget,
               ckpt-every-compiled)

torch-budget gets, for a budget of B bytes, activation_memory_budget =
clip((B - F) / (P - F), 0, 1): 0.5 for "act50%". Its own meaning of the
fraction is "of the activation memory its default partitioner saves".

Per row: peak memory of the whole step (acopt/measure.py), median step
time, the thread count and 1-minute load average, and numerics: K steps from one initial state with the same batches and
RNG seeds as ``none``; loss and parameter max abs differences from ``none``,
and bitwise equality with the reference (``traced`` for acopt rows, ``none``
for the others).

acopt rows also report ``rng_states``: generator states the rewritten step keeps
for replayed random ops (acopt.rng; on CPU 5056 B each, counted by the
simulator, docs/memory-model.md rule 7), and ``measured_minus_sim_bytes``.

Outputs under ``--out`` (default benchmarks/results/): ``{tag}.csv`` (rows
above), ``{tag}_maxbatch.csv`` (largest batch under ``--cap`` per method),
plots ``{tag}_{model}_peak.png``, ``_time.png``, ``_pareto.png`` and
``{tag}_maxbatch.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import gc
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from acopt.checkpoint_baselines import apply_torch_checkpoint
from acopt.measure import (
    max_abs_diff,
    measure_peak,
    median,
    state_tensors,
    sync,
    time_paired,
)

__all__ = [
    "COLUMNS",
    "METHODS",
    "Config",
    "ModelRun",
    "Prepared",
    "available_methods",
    "main",
    "max_batch",
    "run",
    "SUITES",
]

BUDGETED = ("acopt-greedy", "acopt-ilp", "acopt-cpsat", "torch-budget", "acopt-inductor")
ALL_METHODS = (
    "none", "traced", "acopt-greedy", "acopt-ilp", "acopt-cpsat", "ckpt-every", "ckpt-every2", "torch-budget",
    "acopt-inductor", "ckpt-every-compiled",
)  # fmt: skip
MATCHED = ("ckpt-every", "ckpt-every2", "torch-budget")  # acopt-greedy is run again at their measured peaks
MATCHED_COMPILED = ("torch-budget", "ckpt-every-compiled")  # acopt-inductor is run again at their measured peaks
COMPILED_LAST = ("torch-budget", "ckpt-every-compiled")  # torch.compile methods (dynamo caches reset after each)

COLUMNS = [
    "device", "device_name", "torch_version", "acopt_commit", "model", "model_args", "batch_size",
    "method", "budget", "budget_bytes", "torch_budget_fraction", "status", "error",
    "peak_bytes", "base_bytes", "added_peak_bytes", "peak_vs_none", "budget_slack",
    "sim_peak_bytes", "no_recompute_sim_peak_bytes", "floor_bytes",
    "step_time_s", "step_time_min_s", "step_time_max_s", "timed_steps", "paired_none_step_time_s",
    "overhead_vs_none", "overhead_vs_traced",
    "first_step_s", "prepare_s", "recomputed", "activations", "plan_status", "predicted_recompute_s",
    "numerics_steps", "loss", "loss_max_abs_diff_vs_none", "param_max_abs_diff_vs_none", "reference",
    "bitwise_vs_reference", "memory_how", "torch_backend", "notes",
    "measured_minus_sim_bytes", "rng_states", "rng_state_bytes", "threads", "load_avg_1m",
]  # fmt: skip
"""The CSV's columns, in order (docs/results.md describes each)."""


# ---------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelRun:
    """One model: the batch sizes swept, factory arguments, and the cap for the max-batch search."""

    name: str
    batch_sizes: tuple[int, ...]
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    cap_bytes: int | None = None
    max_batch_limit: int = 1 << 16  # the search stops here (a batch this large "fits")
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # Config fields for this model only


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    models: tuple[ModelRun, ...]
    methods: tuple[str, ...] = ALL_METHODS
    budgets: tuple[str, ...] = ("50%", "70%", "85%", "act50%")
    match: bool = True
    device: str = "cpu"
    seed: int = 0
    numerics_steps: int = 3
    warmup: int = 2
    iterations: int = 20
    profile_iterations: int = 3
    time_limit_s: float = 30.0
    torch_backend: str = "inductor"
    max_batch_methods: tuple[str, ...] = ("none", "acopt-greedy", "ckpt-every", "ckpt-every2", "torch-budget")
    max_batch_torch_fraction: float | None = None  # None: the sweep's lowest-peak fraction at the largest batch
    out: Path = Path("benchmarks/results")
    tag: str = ""
    plots: bool = True
    verbose: bool = True
    threads: int | None = None  # torch.set_num_threads for the run (None: torch's default)
    deterministic: bool | None = None  # deterministic kernels (None: on CUDA only), for the bitwise checks

    def log(self, *msg: object) -> None:
        if self.verbose:
            print(*msg, file=sys.stderr, flush=True)


FAST = dict(numerics_steps=2, warmup=1, iterations=3, profile_iterations=1, time_limit_s=10.0)

MiB = 1 << 20

# resnet152, bert-base and gpt2 on a 2-core CPU, one size each that runs in minutes: a step
# takes 2-7 s at threads=1 and torch.compile (inductor) minutes, hence fewer steps, aot_eager,
# no exact planners (their 30 s limits times budgets) and no max-batch search. At CPU sizes
# gpt2's and bert-base's peak is AdamW's step unless the batch has >~1000 tokens (a step of
# 10-30 s here): gpt2 at 4 x 128 tokens shows that case (floor = peak), bert-base at 8 x 128
# has ~14% removable memory; resnet152 at 32 x 64x64 images ~23%.
_BIG_CPU: dict[str, Any] = dict(
    budgets=("85%", "act50%"), numerics_steps=2, warmup=1, iterations=3, profile_iterations=1,
    torch_backend="aot_eager",
    methods=("none", "traced", "acopt-greedy", "ckpt-every", "ckpt-every2", "torch-budget"),
)  # fmt: skip

_SMALL_CPU = (
    ModelRun(name="mlp", batch_sizes=(1024, 4096, 16384), cap_bytes=32 * MiB),
    ModelRun(name="cnn", batch_sizes=(8, 32, 64), cap_bytes=64 * MiB),
    ModelRun(name="transformer", batch_sizes=(8, 32, 64), cap_bytes=64 * MiB),
)
_LARGE_CPU = (
    ModelRun(name="resnet152", batch_sizes=(32,), model_args={"image_size": 64}, overrides=_BIG_CPU),
    ModelRun(
        name="bert-base", batch_sizes=(8,), model_args={"seq_len": 128},
        overrides={**_BIG_CPU, "budgets": ("act50%",), "iterations": 2,
                   "methods": ("none", "traced", "acopt-greedy", "ckpt-every")},
    ),
    ModelRun(
        name="gpt2", batch_sizes=(4,), model_args={"seq_len": 128},
        overrides={**_BIG_CPU, "budgets": ("act50%",), "iterations": 2, "match": False,
                   "methods": ("none", "traced", "acopt-greedy", "ckpt-every")},
    ),
)  # fmt: skip

SUITES: dict[str, tuple[ModelRun, ...]] = {
    # docs/results.md: CPU numbers on a 2-core machine
    "cpu": _SMALL_CPU + _LARGE_CPU,
    "cpu-small": _SMALL_CPU,
    "cpu-large": _LARGE_CPU,
    # for a GPU (device cuda): the project's real sizes
    "cuda": (
        ModelRun(name="transformer", batch_sizes=(32, 128, 256), cap_bytes=1 << 30),
        ModelRun(name="gpt2", batch_sizes=(1, 2, 4), model_args={"seq_len": 1024}, cap_bytes=16 << 30, max_batch_limit=64),
        ModelRun(name="resnet152", batch_sizes=(8, 16, 32), cap_bytes=16 << 30, max_batch_limit=512),
        ModelRun(name="bert-base", batch_sizes=(8, 16, 32), model_args={"seq_len": 512}, cap_bytes=16 << 30, max_batch_limit=512),
    ),
}


def available_methods() -> dict[str, str]:
    """Every method name, with '' if it can run here or the reason it cannot."""
    from acopt.planning import planner_errors, planners

    known, broken = planners(), planner_errors()
    out = {}
    for m in ALL_METHODS:
        if m == "acopt-inductor":
            out[m] = ""
        elif m.startswith("acopt-"):
            solver = m.removeprefix("acopt-")
            out[m] = "" if solver in known else f"planner {solver!r} is not registered" + (
                f" ({broken[solver]})" if solver in broken else ""
            )
        else:
            out[m] = ""
    return out


# ---------------------------------------------------------------------------
# the context of one (model, batch size): workload, acopt's trace and profile, snapshot


@dataclasses.dataclass
class Context:
    config: Config
    run: ModelRun
    batch_size: int
    workload: Any
    traced: Any  # acopt.TracedStep (no recomputation)
    profile: Any  # acopt.Profile
    peak_bytes: int  # simulated no-recompute peak
    floor_bytes: int
    snapshot: tuple[dict, dict]
    trace_profile_s: float
    refs: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = dataclasses.field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    def restore(self) -> None:
        """Model and optimizer back to the state after tracing (same for every method)."""
        w = self.workload
        w.model.load_state_dict(self.snapshot[0])
        w.optimizer.load_state_dict(copy.deepcopy(self.snapshot[1]))
        for p in w.model.parameters():
            p.grad = None

    def budget_bytes(self, spec: str) -> int:
        from acopt.planning import resolve_budget

        return resolve_budget(self.profile, spec)  # "act50%" is "floor+50%"

    def torch_fraction(self, budget_bytes: int) -> float:
        span = self.peak_bytes - self.floor_bytes
        if span <= 0:
            return 1.0
        return min(1.0, max(0.0, (budget_bytes - self.floor_bytes) / span))


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def make_context(config: Config, run: ModelRun, batch_size: int, *, analyse: bool = True) -> Context:
    """Build the workload; trace and profile it with acopt (unless ``analyse=False``)."""
    import acopt
    from acopt import models
    from acopt.planning import no_recompute_peak

    t = time.perf_counter()
    w = models.build(run.name, batch_size=batch_size, device=config.device, seed=config.seed, **run.model_args)
    traced = prof = None
    peak = floor = 0
    if analyse:
        traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)  # also creates the optimizer state
        prof = acopt.profile(traced, *w.batch, warmup=1, iterations=config.profile_iterations)
        peak, floor = no_recompute_peak(prof), acopt.floor(prof)
    snapshot = (_to_cpu(w.model.state_dict()), _to_cpu(w.optimizer.state_dict()))
    return Context(
        config=config,
        run=run,
        batch_size=batch_size,
        workload=w,
        traced=traced,
        profile=prof,
        peak_bytes=peak,
        floor_bytes=floor,
        snapshot=snapshot,
        trace_profile_s=time.perf_counter() - t,
    )


# ---------------------------------------------------------------------------
# methods


@dataclasses.dataclass
class Prepared:
    """A step callable ``step(*batch) -> loss`` and what undoes its preparation."""

    step: Callable[..., torch.Tensor]
    cleanup: Callable[[], None] = lambda: None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    reference: str = "none"
    around_eager: Callable[[], contextlib.AbstractContextManager] | None = None  # the eager step runs in it


class Infeasible(Exception):
    """The method cannot meet this budget (acopt: below the floor)."""


def prepare_none(ctx: Context, budget_bytes: int | None) -> Prepared:
    w = ctx.workload
    return Prepared(lambda *b: w.train_step(w.model, w.optimizer, *b))


def prepare_traced(ctx: Context, budget_bytes: int | None) -> Prepared:
    return Prepared(ctx.traced, info={"sim_peak_bytes": ctx.peak_bytes}, reference="none")


def _planner_options(solver: str, config: Config) -> dict[str, Any]:
    from acopt.planning import planners

    spec = planners()[solver]
    fields = {f.name for f in dataclasses.fields(spec.options_type)}
    return {"time_limit_s": config.time_limit_s} if "time_limit_s" in fields else {}


def _rng_saves(step: Any) -> int:
    """Generator states a rewritten step keeps while it runs (one per replayed random node)."""
    return sum(1 for n in step.graph_module.graph.nodes if n.name.startswith("rng_state__"))


def acopt_step(ctx: Context, solver: str, budget_bytes: int) -> Prepared:
    """acopt.plan + acopt.rewrite on the context's traced step (what acopt.compile does,
    sharing one trace and one profile between budgets). ``rng_states``: the generator
    states the rewritten step keeps for replayed random ops, which the simulator
    counts (docs/memory-model.md, rule 7)."""
    import acopt

    try:
        plan = acopt.plan(ctx.profile, budget=budget_bytes, solver=solver, **_planner_options(solver, ctx.config))
    except acopt.InfeasibleBudget as e:
        raise Infeasible(str(e)) from e
    if plan.status.value == "infeasible":
        raise Infeasible(f"{solver} found no plan: {plan.status.value}")
    step = acopt.rewrite(ctx.traced, plan, profile=ctx.profile)
    k = _rng_saves(step)
    sim = acopt.simulate(ctx.profile, plan)
    return Prepared(
        step,
        info={
            "sim_peak_bytes": sim.peak_bytes,
            "recomputed": len(plan.recompute),
            "activations": len(ctx.profile.activations),
            "plan_status": plan.status.value,
            "predicted_recompute_s": sim.recompute_time_s,
            "rng_states": k,
            "rng_state_bytes": k * ctx.profile.rng_state_bytes,
        },
        reference="traced",
    )


def _prepare_acopt(solver: str):
    def prepare(ctx: Context, budget_bytes: int | None) -> Prepared:
        return acopt_step(ctx, solver, budget_bytes)

    prepare.__name__ = f"prepare_acopt_{solver}"
    return prepare


def _prepare_ckpt(every: int):
    def prepare(ctx: Context, budget_bytes: int | None) -> Prepared:
        w = ctx.workload
        restore = [apply_torch_checkpoint(w, every=every)]

        def cleanup() -> None:
            restore[0]()

        @contextlib.contextmanager
        def unpatched():  # the paired eager step runs without the checkpoints
            restore[0]()
            try:
                yield
            finally:
                restore[0] = apply_torch_checkpoint(w, every=every)

        return Prepared(lambda *b: w.train_step(w.model, w.optimizer, *b), cleanup, around_eager=unpatched)

    prepare.__name__ = f"prepare_ckpt_every{every}"
    return prepare


def prepare_torch_budget(ctx: Context, budget_bytes: int | None, *, fraction: float | None = None) -> Prepared:
    """torch.compile(train_step) with the min-cut partitioner's activation memory budget.

    The config is read when dynamo compiles (at the first call and at any
    recompile), so it stays set until cleanup."""
    import torch._dynamo
    import torch._functorch.config as functorch_config

    if fraction is None:
        fraction = ctx.torch_fraction(budget_bytes) if budget_bytes is not None else 1.0
    w = ctx.workload
    torch._dynamo.reset()
    old = functorch_config.activation_memory_budget
    functorch_config.activation_memory_budget = fraction
    compiled = torch.compile(w.train_step, backend=ctx.config.torch_backend)

    def cleanup() -> None:
        functorch_config.activation_memory_budget = old
        torch._dynamo.reset()

    return Prepared(
        lambda *b: compiled(w.model, w.optimizer, *b),
        cleanup,
        info={"torch_budget_fraction": fraction, "torch_backend": ctx.config.torch_backend},
    )


def prepare_acopt_inductor(ctx: Context, budget_bytes: int | None) -> Prepared:
    """acopt's greedy plan run by inductor (:func:`acopt.inductor.fit_compiled`), on the
    context's trace and profile. Compares with eager ``none`` at float rounding."""
    import acopt
    from acopt.inductor import fit_compiled

    w = ctx.workload
    try:
        fitted = fit_compiled(
            ctx.traced, ctx.profile, tuple(w.batch), budget=budget_bytes if budget_bytes is not None else "100%",
            solver="greedy", options=_planner_options("greedy", ctx.config),
        )  # fmt: skip
    except acopt.InfeasibleBudget as e:
        raise Infeasible(str(e)) from e
    k = _rng_saves(fitted.step)
    return Prepared(
        fitted.step,
        info={
            "sim_peak_bytes": fitted.simulated_peak_bytes,
            "recomputed": len(fitted.plan.recompute),
            "activations": len(ctx.profile.activations),
            "plan_status": fitted.plan.status.value,
            "rng_states": k,
            "rng_state_bytes": k * ctx.profile.rng_state_bytes,
            "torch_backend": "inductor",
            "notes": f"plans made {fitted.attempts}; planned for {fitted.planning_budget_bytes} B; "
            + ", ".join(f"{k} {v}" for k, v in fitted.step.runner.summary().items()),
        },
        reference="none",
    )


def prepare_ckpt_compiled(ctx: Context, budget_bytes: int | None) -> Prepared:
    """torch.compile (``--torch-backend``) of the ckpt-every step: the partitioner
    recomputes the checkpointed blocks (and decides the rest itself)."""
    import torch._dynamo

    w = ctx.workload
    torch._dynamo.reset()
    restore = apply_torch_checkpoint(w, every=1)
    compiled = torch.compile(w.train_step, backend=ctx.config.torch_backend)

    def cleanup() -> None:
        restore()
        torch._dynamo.reset()

    return Prepared(
        lambda *b: compiled(w.model, w.optimizer, *b), cleanup, info={"torch_backend": ctx.config.torch_backend}
    )


METHODS: dict[str, Callable[[Context, int | None], Prepared]] = {
    "none": prepare_none,
    "traced": prepare_traced,
    "acopt-greedy": _prepare_acopt("greedy"),
    "acopt-ilp": _prepare_acopt("ilp"),
    "acopt-cpsat": _prepare_acopt("cpsat"),
    "ckpt-every": _prepare_ckpt(1),
    "ckpt-every2": _prepare_ckpt(2),
    "torch-budget": prepare_torch_budget,
    "acopt-inductor": prepare_acopt_inductor,
    "ckpt-every-compiled": prepare_ckpt_compiled,
}


# ---------------------------------------------------------------------------
# one row


def _environment(config: Config) -> dict[str, Any]:
    device = torch.device(config.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    commit = ""
    if (Path(__file__).resolve().parent.parent / "pyproject.toml").is_file():  # a source checkout, not a wheel
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
            ).stdout.strip()
        except Exception:  # noqa: BLE001 - the commit is a label only
            commit = ""
    if not commit:  # an installed wheel: its version
        from importlib.metadata import PackageNotFoundError, version

        with contextlib.suppress(PackageNotFoundError):
            commit = f"acopt {version('acopt')}"
    return {"device": device.type, "device_name": name, "torch_version": torch.__version__, "acopt_commit": commit}


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().to("cpu", copy=True) for p in model.parameters()]


def run_numerics(ctx: Context, step: Callable[..., torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """K steps from the snapshot on batches make_batch(seed+1+i), RNG seeded seed+100+i
    before each; returns the losses, the parameters after, and the first step's time."""
    w, cfg = ctx.workload, ctx.config
    losses, first = [], float("nan")
    for i in range(cfg.numerics_steps):
        batch = w.make_batch(cfg.seed + 1 + i)
        torch.manual_seed(cfg.seed + 100 + i)
        sync(ctx.device)
        t = time.perf_counter()
        loss = step(*batch)
        sync(ctx.device)
        if i == 0:
            first = time.perf_counter() - t
        losses.append(loss.detach().to("cpu", copy=True).reshape(()))
    return losses, _params(w.model), first


def measure_row(
    ctx: Context, method: str, budget: str = "", budget_bytes: int | None = None, env: dict | None = None,
) -> dict[str, Any]:
    """Prepare ``method`` at ``budget``, check its numerics, time it, measure its peak."""
    cfg, w = ctx.config, ctx.workload
    row: dict[str, Any] = dict(env or _environment(cfg))
    row.update(
        model=ctx.run.name,
        model_args=";".join(f"{k}={v}" for k, v in ctx.run.model_args.items()),
        batch_size=ctx.batch_size,
        method=method,
        budget=budget,
        budget_bytes=budget_bytes if budget_bytes is not None else "",
        no_recompute_sim_peak_bytes=ctx.peak_bytes,
        floor_bytes=ctx.floor_bytes,
        numerics_steps=cfg.numerics_steps,
        status="ok",
        threads=torch.get_num_threads(),
        load_avg_1m=os.getloadavg()[0],
    )
    if method in COMPILED_LAST:
        row["torch_backend"] = cfg.torch_backend
    ctx.restore()
    gc.collect()
    prepared = None
    t = time.perf_counter()
    try:
        prepared = METHODS[method](ctx, budget_bytes)
        row["prepare_s"] = time.perf_counter() - t
        row.update(prepared.info)
        losses, params, row["first_step_s"] = run_numerics(ctx, prepared.step)
        row["loss"] = float(losses[-1])
        row["reference"] = prepared.reference
        if "none" in ctx.refs and method != "none":
            ref_losses, ref_params = ctx.refs["none"]
            row["loss_max_abs_diff_vs_none"], _ = max_abs_diff(losses, ref_losses)
            row["param_max_abs_diff_vs_none"], _ = max_abs_diff(params, ref_params)
        elif method == "none":
            row["loss_max_abs_diff_vs_none"] = row["param_max_abs_diff_vs_none"] = 0.0
        if method in ("none", "traced"):
            ctx.refs[method] = (losses, params)
        ref = ctx.refs.get(prepared.reference)
        if method == prepared.reference:
            row["bitwise_vs_reference"] = True
        elif ref is not None:
            _, same_l = max_abs_diff(losses, ref[0])
            _, same_p = max_abs_diff(params, ref[1])
            row["bitwise_vs_reference"] = same_l and same_p

        def one() -> torch.Tensor:
            return prepared.step(*w.batch)

        def eager() -> torch.Tensor:
            return w.train_step(w.model, w.optimizer, *w.batch)

        times, ref_times = time_paired(
            one, None if method == "none" else eager, device=ctx.device, warmup=cfg.warmup,
            iterations=cfg.iterations, around_reference=prepared.around_eager,
        )  # fmt: skip
        row.update(
            step_time_s=median(times), step_time_min_s=min(times), step_time_max_s=max(times), timed_steps=len(times)
        )
        row["paired_none_step_time_s"] = median(ref_times) if ref_times else row["step_time_s"]
        mem = measure_peak(one, device=ctx.device, alive=lambda: state_tensors(w.model, w.optimizer, w.batch))
        row.update(peak_bytes=mem.peak_bytes, base_bytes=mem.base_bytes, added_peak_bytes=mem.added_peak_bytes, memory_how=mem.how)
        if budget_bytes is not None:
            row["budget_slack"] = (budget_bytes - mem.peak_bytes) / budget_bytes
        if row.get("sim_peak_bytes") not in (None, ""):
            row["measured_minus_sim_bytes"] = mem.peak_bytes - int(row["sim_peak_bytes"])
    except Infeasible as e:
        row.update(status="infeasible", error=_one_line(e))
    except Exception as e:  # noqa: BLE001 - a failing method is a result, recorded in its row
        row.update(status="error", error=_one_line(e))
        cfg.log(traceback.format_exc())
    finally:
        if prepared is not None:
            prepared.cleanup()
    return row


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _relative(rows: list[dict]) -> None:
    """Fill peak_vs_none, overhead_vs_none and overhead_vs_traced within each (model, batch)."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            by_key.setdefault((r["model"], r["batch_size"]), {}).setdefault(r["method"], r)
    for r in rows:
        refs = by_key.get((r["model"], r["batch_size"]), {})
        if r["status"] != "ok":
            continue
        if "none" in refs:
            r["peak_vs_none"] = r["peak_bytes"] / refs["none"]["peak_bytes"]
        if r.get("paired_none_step_time_s"):
            r["overhead_vs_none"] = r["step_time_s"] / r["paired_none_step_time_s"] - 1
    for r in rows:
        refs = by_key.get((r["model"], r["batch_size"]), {})
        if r["status"] != "ok":
            continue
        if "traced" in refs and r.get("overhead_vs_none") is not None and refs["traced"].get("overhead_vs_none") is not None:
            # both normalised by their own paired eager steps: (t / t_none) / (t_traced / t_none') - 1
            r["overhead_vs_traced"] = (1 + r["overhead_vs_none"]) / (1 + refs["traced"]["overhead_vs_none"]) - 1


# ---------------------------------------------------------------------------
# a run


def _cleanup_memory(device: torch.device) -> None:
    if device.type == "cuda":  # on CPU the measurement is relative to what is alive: no need
        gc.collect()
        torch.cuda.empty_cache()


def sweep_model(config: Config, run: ModelRun, env: dict) -> list[dict]:
    if run.overrides:
        config = dataclasses.replace(config, **run.overrides)
    rows: list[dict] = []
    methods = [m for m in config.methods if m in METHODS]
    avail = available_methods()
    for bs in run.batch_sizes:
        t0 = time.perf_counter()
        ctx = make_context(config, run, bs)
        config.log(
            f"[{run.name} bs={bs}] traced+profiled in {ctx.trace_profile_s:.1f}s; "
            f"no-recompute peak {ctx.peak_bytes / MiB:.2f} MiB, floor {ctx.floor_bytes / MiB:.2f} MiB"
        )
        # references first, torch.compile last (its caches are reset after it)
        wants_traced = "traced" in methods or any(m.startswith("acopt-") for m in methods)
        order = ["none"] + (["traced"] if wants_traced else [])  # the references: always measured
        order += [m for m in methods if m not in order and m not in COMPILED_LAST]
        order += [m for m in methods if m in COMPILED_LAST]
        ctx_rows: list[dict] = []
        for method in order:
            if avail.get(method):
                row = {**env, "model": run.name, "batch_size": bs, "method": method, "status": "unavailable", "error": avail[method]}
                ctx_rows.append(row)
                continue
            fractions: dict[float, str] = {}
            for budget in config.budgets if method in BUDGETED else [""]:
                b = ctx.budget_bytes(budget) if budget else None
                if method == "torch-budget" and b is not None:
                    f = ctx.torch_fraction(b)
                    if f in fractions:  # another budget already compiled with this fraction
                        config.log(f"  torch-budget  {budget}: same activation_memory_budget {f:.3g} as {fractions[f]}, skipped")
                        continue
                    fractions[f] = budget
                t = time.perf_counter()
                row = measure_row(ctx, method, budget, b, env)
                ctx_rows.append(row)
                config.log(_row_line(row, time.perf_counter() - t))
        if config.match and "acopt-greedy" in methods and not avail["acopt-greedy"]:
            for base in [r for r in ctx_rows if r["method"] in MATCHED and r["status"] == "ok"]:
                label = base["method"] + (f"@{base['budget']}" if base.get("budget") else "")
                t = time.perf_counter()
                row = measure_row(ctx, "acopt-greedy", f"match:{label}", int(base["peak_bytes"]), env)
                ctx_rows.append(row)
                config.log(_row_line(row, time.perf_counter() - t))
        if config.match and "acopt-inductor" in methods:
            for base in [r for r in ctx_rows if r["method"] in MATCHED_COMPILED and r["status"] == "ok"]:
                label = base["method"] + (f"@{base['budget']}" if base.get("budget") else "")
                t = time.perf_counter()
                row = measure_row(ctx, "acopt-inductor", f"match:{label}", int(base["peak_bytes"]), env)
                ctx_rows.append(row)
                config.log(_row_line(row, time.perf_counter() - t))
        rows += ctx_rows
        del ctx
        _cleanup_memory(torch.device(config.device))
        config.log(f"[{run.name} bs={bs}] done in {time.perf_counter() - t0:.1f}s")
    return rows


def _floor_note(row: dict) -> str:
    floor = row.get("floor_bytes")
    return f" (floor {floor / MiB:.2f})" if isinstance(floor, (int, float)) else ""


def _row_line(row: dict, seconds: float) -> str:
    head = f"  {row['method']:13s} {row.get('budget', ''):24s}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('error', '')[:160]} ({seconds:.1f}s)"
    return (
        f"{head} peak {row['peak_bytes'] / MiB:9.2f} MiB{_floor_note(row)}  step {row['step_time_s'] * 1e3:9.2f} ms  "
        f"bitwise={row.get('bitwise_vs_reference', '')} loss diff {row.get('loss_max_abs_diff_vs_none', '')} ({seconds:.1f}s)"
    )


def run(config: Config) -> dict[str, Path]:
    """Run the sweep (and the max-batch search where a model has a cap); write CSVs and plots."""
    config.out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.deterministic or (config.deterministic is None and torch.device(config.device).type == "cuda"):
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    tag = config.tag or f"{config.device}-{'-'.join(m.name for m in config.models)}"
    env = _environment(config)
    rows: list[dict] = []
    caps: list[dict] = []
    t0 = time.perf_counter()
    for model_run in config.models:
        rows += sweep_model(config, model_run, env)
        _relative(rows)
        write_csv(rows, config.out / f"{tag}.csv", COLUMNS)  # after every model: partial results survive
        model_config = dataclasses.replace(config, **model_run.overrides)
        if model_run.cap_bytes is not None and model_config.max_batch_methods:
            caps += max_batch_rows(model_config, model_run, env, rows)
            write_csv(caps, config.out / f"{tag}_maxbatch.csv", MAXBATCH_COLUMNS)
    files = {"csv": config.out / f"{tag}.csv"}
    if caps:
        files["maxbatch_csv"] = config.out / f"{tag}_maxbatch.csv"
    files["summary"] = config.out / f"{tag}_summary.md"
    files["summary"].write_text(summarize(read_csv(files["csv"]), read_csv(files["maxbatch_csv"]) if caps else []))
    from acopt import plots

    if config.plots and not plots.available():
        config.log(f"no plots: {plots.INSTALL}")
    elif config.plots:
        files.update(plot_all(rows, caps, config.out, tag))
    config.log(f"wrote {', '.join(str(p) for p in files.values())} in {time.perf_counter() - t0:.0f}s")
    return files


def write_csv(rows: list[dict], path: Path, columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k, "")) for k in columns})


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# ---------------------------------------------------------------------------
# the largest batch under a memory cap

MAXBATCH_COLUMNS = [
    "device", "device_name", "torch_version", "acopt_commit", "model", "model_args", "cap_bytes", "method",
    "max_batch_size", "peak_at_max_bytes", "first_failing_batch_size", "peak_at_fail_bytes", "fail_reason",
    "probes", "limit_reached", "search_s", "notes",
]  # fmt: skip


def _probe(
    config: Config, run: ModelRun, method: str, batch_size: int, cap: int, fraction: float | None = None
) -> tuple[bool, int | None, str]:
    """Does ``method`` fit one step of batch ``batch_size`` under ``cap`` bytes? (fits, peak, why not)."""
    import acopt

    ctx = None
    prepared = None
    try:
        ctx = make_context(config, run, batch_size, analyse=method.startswith("acopt-") or method == "traced")
        w = ctx.workload
        if method.startswith("acopt-"):
            if ctx.floor_bytes > cap and method != "acopt-inductor":  # (compiled: fusion may fit below it)
                return False, None, f"floor {ctx.floor_bytes} > cap"
            if method == "acopt-inductor":
                prepared = prepare_acopt_inductor(ctx, cap)
            else:
                prepared = acopt_step(ctx, method.removeprefix("acopt-"), cap)
        elif method == "torch-budget":
            prepared = prepare_torch_budget(ctx, None, fraction=0.5 if fraction is None else fraction)
        else:
            prepared = METHODS[method](ctx, None)
        for _ in range(2):  # fills lazily created state; compiles
            prepared.step(*w.batch)
        mem = measure_peak(lambda: prepared.step(*w.batch), device=ctx.device, alive=lambda: state_tensors(w.model, w.optimizer, w.batch))
        detail = ""
        if "sim_peak_bytes" in prepared.info:
            i = prepared.info
            detail = f"simulated {i['sim_peak_bytes']}, {i.get('rng_states', 0)} rng states"
        fits = mem.peak_bytes <= cap
        return fits, mem.peak_bytes, detail if fits else ("measured peak > cap" + (f" ({detail})" if detail else ""))
    except (Infeasible, acopt.InfeasibleBudget) as e:
        return False, None, _one_line(e, 120)
    except torch.OutOfMemoryError as e:
        return False, None, _one_line(e, 120)
    finally:
        if prepared is not None:
            prepared.cleanup()
        ctx = prepared = None  # noqa: F841 - drop the workload before the next probe
        _cleanup_memory(torch.device(config.device))


def max_batch(
    config: Config, run: ModelRun, method: str, cap: int, *, start: int = 1, fraction: float | None = None
) -> dict[str, Any]:
    """Largest batch size whose measured peak fits ``cap``: doubling from ``start``, then
    bisection (exact: the answer fits and the next batch size does not).
    ``fraction``: torch-budget's activation_memory_budget."""
    t0 = time.perf_counter()
    probes: dict[int, tuple[bool, int | None, str]] = {}

    def fits(bs: int) -> bool:
        if bs not in probes:
            probes[bs] = _probe(config, run, method, bs, cap, fraction)
            config.log(f"    {method} bs={bs}: {'fits' if probes[bs][0] else 'no'} (peak {probes[bs][1]})")
        return probes[bs][0]

    lo, hi = 0, None  # lo fits (0: nothing yet), hi does not
    bs = start
    while bs <= run.max_batch_limit:
        if fits(bs):
            lo = bs
            bs *= 2
        else:
            hi = bs
            break
    if hi is not None:  # lo fits (or is 0), hi does not: bisect
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
    return {
        "cap_bytes": cap,
        "method": method,
        "max_batch_size": lo,
        "peak_at_max_bytes": probes.get(lo, (None, ""))[1] if lo else "",
        "first_failing_batch_size": hi if hi is not None else "",
        "peak_at_fail_bytes": probes[hi][1] if hi is not None and probes[hi][1] is not None else "",
        "fail_reason": probes[hi][2] if hi is not None else "",
        "notes": probes[lo][2] if lo else "",
        "probes": len(probes),
        "limit_reached": hi is None,
        "search_s": time.perf_counter() - t0,
    }


def best_torch_fraction(rows: list[dict], model: str) -> float | None:
    """torch-budget's fraction with the lowest measured peak at the model's largest swept batch."""
    ok = [r for r in rows if r["model"] == model and r["method"] == "torch-budget" and r.get("status") == "ok"]
    if not ok:
        return None
    largest = max(r["batch_size"] for r in ok)
    best = min((r for r in ok if r["batch_size"] == largest), key=lambda r: (r["peak_bytes"], -r["torch_budget_fraction"]))
    return float(best["torch_budget_fraction"])


def max_batch_rows(config: Config, run: ModelRun, env: dict, sweep_rows: Sequence[dict] = ()) -> list[dict]:
    """The largest batch under ``run.cap_bytes`` for each of ``config.max_batch_methods``; the
    search starts at the largest swept batch size."""
    rows = []
    avail = available_methods()
    start = max(run.batch_sizes) if run.batch_sizes else 1
    fraction = config.max_batch_torch_fraction
    if fraction is None:
        fraction = best_torch_fraction(list(sweep_rows), run.name)
    for method in config.max_batch_methods:
        base = {**env, "model": run.name, "model_args": ";".join(f"{k}={v}" for k, v in run.model_args.items())}
        if avail.get(method):
            rows.append({**base, "method": method, "cap_bytes": run.cap_bytes, "notes": avail[method]})
            continue
        config.log(f"[{run.name}] largest batch under {run.cap_bytes / MiB:.1f} MiB: {method}")
        try:
            r = max_batch(config, run, method, run.cap_bytes, start=start, fraction=fraction)
        except Exception as e:  # noqa: BLE001 - recorded
            config.log(traceback.format_exc())
            r = {"method": method, "cap_bytes": run.cap_bytes, "notes": f"error: {_one_line(e)}"}
        if method == "torch-budget":
            note = f"activation_memory_budget={0.5 if fraction is None else fraction}, backend {config.torch_backend}"
            r["notes"] = "; ".join(x for x in (r.get("notes", ""), note) if x)
        rows.append({**base, **r})
    return rows


# ---------------------------------------------------------------------------
# plots


def _label(r: dict) -> str:
    b = r.get("budget") or ""
    return r["method"] + (f" @{b}" if b else "")


def plot_all(rows: list[dict], caps: list[dict], out: Path, tag: str) -> dict[str, Path]:
    """Per model: peak vs batch size (bars), step time vs batch size (bars), peak vs time (Pareto);
    and the largest batch under the cap per method."""
    from acopt.plots import pyplot

    plt = pyplot()

    files: dict[str, Path] = {}
    cmap = plt.get_cmap("tab20")
    ok = [r for r in rows if r.get("status") == "ok"]
    for model in dict.fromkeys(r["model"] for r in ok):
        mrows = [r for r in ok if r["model"] == model]
        sizes = sorted({r["batch_size"] for r in mrows})
        plain = [r for r in mrows if not str(r.get("budget", "")).startswith("match:")]
        labels = list(dict.fromkeys(_label(r) for r in plain))
        colors = {lab: cmap(i % 20) for i, lab in enumerate(labels)}
        for what, key, scale, unit in (("peak", "peak_bytes", MiB, "MiB"), ("time", "step_time_s", 1e-3, "ms")):
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(sizes) * len(labels) / 4), 4.5))
            width = 0.8 / max(1, len(labels))
            for j, lab in enumerate(labels):
                xs, ys = [], []
                for i, bs in enumerate(sizes):
                    hit = [r for r in plain if r["batch_size"] == bs and _label(r) == lab]
                    if hit:
                        xs.append(i + (j - (len(labels) - 1) / 2) * width)
                        ys.append(hit[0][key] / scale)
                ax.bar(xs, ys, width, label=lab, color=colors[lab])
            ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
            ax.set_xlabel("batch size")
            ax.set_ylabel(("peak memory of the whole step" if what == "peak" else "step time (median)") + f" [{unit}]")
            dev = mrows[0]["device"]
            ax.set_title(f"{model}: {'peak memory' if what == 'peak' else 'step time'} ({dev}, torch {mrows[0]['torch_version']})")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            path = out / f"{tag}_{model}_{what}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files[f"{model}_{what}"] = path
        fig, axes = plt.subplots(1, len(sizes), figsize=(4.8 * len(sizes), 4.2), squeeze=False)
        markers = {"none": "o", "traced": "s", "ckpt-every": "^", "ckpt-every2": "v", "torch-budget": "D"}
        for ax, bs in zip(axes[0], sizes):
            for r in [r for r in mrows if r["batch_size"] == bs]:
                matched = str(r.get("budget", "")).startswith("match:")
                m = r["method"]
                ax.scatter(
                    1 + float(r.get("overhead_vs_none") or 0.0), r["peak_bytes"] / MiB,
                    marker=markers.get(m, "x" if matched else "*"), s=40 if not matched else 30,
                    color="black" if matched else colors.get(_label(r), "gray"), label=_label(r),
                )  # fmt: skip
            ax.set_xlabel("step time / eager step timed alongside")
            ax.set_ylabel("peak [MiB]")
            ax.set_title(f"{model} bs={bs}")
        handles, labs = [], []
        for ax in axes[0]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labs:
                    handles.append(h)
                    labs.append(lab)
        fig.legend(handles, labs, fontsize=7, loc="center right")
        fig.suptitle(f"{model}: peak vs step time (lower left is better; x = acopt-greedy at a baseline's peak)")
        fig.tight_layout(rect=(0, 0, 0.78, 0.95))
        path = out / f"{tag}_{model}_pareto.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files[f"{model}_pareto"] = path
    good = [c for c in caps if c.get("max_batch_size") not in (None, "")]
    if good:
        models = list(dict.fromkeys(c["model"] for c in good))
        fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models):
            cs = [c for c in good if c["model"] == model]
            ax.bar(range(len(cs)), [c["max_batch_size"] for c in cs], color=[cmap(i) for i in range(len(cs))])
            ax.set_xticks(range(len(cs)), [c["method"] for c in cs], rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{model}: cap {cs[0]['cap_bytes'] / MiB:.0f} MiB")
            ax.set_ylabel("largest batch size under the cap")
        fig.tight_layout()
        path = out / f"{tag}_maxbatch.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files["maxbatch"] = path
    return files


# ---------------------------------------------------------------------------
# summary tables (markdown) and the goals of docs/results.md


def _num(v: Any) -> float | None:
    if v in (None, ""):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _mib(v: Any) -> str:
    x = _num(v)
    return "" if x is None else f"{x / MiB:.2f}"


def _pct(v: Any, signed: bool = True) -> str:
    x = _num(v)
    return "" if x is None else (f"{x:+.1%}" if signed else f"{x:.1%}")


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """A results CSV back as rows (numbers as floats/ints where they parse)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in r.items():
                if v in ("True", "False"):
                    row[k] = v == "True"
                elif k in ("device", "device_name", "torch_version", "acopt_commit", "model", "model_args", "method",
                           "budget", "status", "error", "reference", "memory_how", "torch_backend", "notes", "plan_status",
                           "fail_reason"):  # fmt: skip
                    row[k] = v
                else:
                    x = _num(v)
                    row[k] = v if x is None else (int(x) if x.is_integer() and "." not in v and "e" not in v else x)
            out.append(row)
    return out


def summarize(rows: list[dict], caps: list[dict] | None = None) -> str:
    """Markdown: one table per model (all batch sizes), then the goals, then the caps."""
    lines: list[str] = []
    ok = [r for r in rows if r.get("status") == "ok"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        lines += [
            f"#### {model}" + (f" ({mrows[0]['model_args']})" if mrows[0].get("model_args") else ""),
            "",
            "| batch | method | budget | budget MiB | peak MiB | peak / none | simulated MiB | step ms | overhead vs eager (paired) | recomputed | numerics |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in mrows:
            if r.get("status") != "ok":
                lines.append(
                    f"| {r['batch_size']} | {r['method']} | {r.get('budget', '')} | {_mib(r.get('budget_bytes'))} "
                    f"| {r['status']} | | | | | | {str(r.get('error', ''))[:90]} |"
                )
                continue
            if r.get("bitwise_vs_reference") is True:
                num = "bitwise = " + str(r.get("reference"))
            else:
                num = f"max abs diff {float(r.get('param_max_abs_diff_vs_none') or 0):.1e} (params, vs none)"
            lines.append(
                f"| {r['batch_size']} | {r['method']} | {r.get('budget', '')} | {_mib(r.get('budget_bytes'))} "
                f"| {_mib(r['peak_bytes'])} | {_num(r.get('peak_vs_none')) or 0:.3f} | {_mib(r.get('sim_peak_bytes'))} "
                f"| {float(r['step_time_s']) * 1e3:.2f} | {_pct(r.get('overhead_vs_none'))} "
                f"| {r.get('recomputed', '')} | {num} |"
            )
        lines.append("")
    lines += _goals(ok, caps or [])
    if caps:
        lines += [
            "#### Largest batch under the cap",
            "",
            "| model | cap MiB | method | largest batch | its peak MiB | first that fails | why |",
            "|---|---:|---|---:|---:|---:|---|",
        ]
        for c in caps:
            lines.append(
                f"| {c['model']} | {_mib(c.get('cap_bytes'))} | {c['method']} | {c.get('max_batch_size', '')} "
                f"| {_mib(c.get('peak_at_max_bytes'))} | {c.get('first_failing_batch_size', '')} "
                f"| {c.get('fail_reason', '') or c.get('notes', '')} |"
            )
        lines.append("")
    return "\n".join(lines)


def _goals(ok: list[dict], caps: list[dict]) -> list[str]:
    lines = ["#### Goals", ""]
    by = {(r["model"], r["batch_size"], r["method"], r.get("budget", "")): r for r in ok}
    # 1. at equal measured peak: acopt-greedy at a baseline's peak vs that baseline
    lines += [
        "Equal peak: acopt-greedy planned for each baseline's measured peak, vs that baseline "
        "(overheads are each method's median step time over the eager step timed alternately with it).",
        "",
        "| model | batch | baseline | baseline peak MiB | acopt peak MiB | baseline overhead | acopt overhead | acopt faster? |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in ok:
        b = str(r.get("budget", ""))
        if r["method"] != "acopt-greedy" or not b.startswith("match:"):
            continue
        name = b.removeprefix("match:")
        method, _, budget = name.partition("@")
        base = by.get((r["model"], r["batch_size"], method, budget))
        if base is None:
            continue
        ao, bo = _num(r.get("overhead_vs_none")), _num(base.get("overhead_vs_none"))
        verdict = "" if ao is None or bo is None else ("yes" if ao <= bo else "no")
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {name} | {_mib(base['peak_bytes'])} | {_mib(r['peak_bytes'])} "
            f"| {_pct(bo)} | {_pct(ao)} | {verdict} |"
        )
    lines.append("")
    # 2. budget adherence and simulated vs measured
    lines += [
        "Budgets: measured peak of every acopt row against the budget asked, and against the simulator.",
        "",
        "| model | batch | method | budget | budget MiB | measured MiB | within budget | slack | measured - simulated |",
        "|---|---:|---|---|---:|---:|---|---:|---:|",
    ]
    for r in ok:
        if not r["method"].startswith("acopt-") or _num(r.get("budget_bytes")) is None:
            continue
        bb, pk, sim = float(r["budget_bytes"]), float(r["peak_bytes"]), _num(r.get("sim_peak_bytes"))
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['method']} | {r['budget']} | {_mib(bb)} | {_mib(pk)} "
            f"| {'yes' if pk <= bb else 'NO'} | {(bb - pk) / bb:.1%} | {'' if sim is None else f'{int(pk - sim):+d} B'} |"
        )
    lines.append("")
    # 3. half the activation memory
    lines += [
        "Half the removable memory (budget act50%): step-time overhead.",
        "",
        "| model | batch | method | peak / none | overhead vs eager | overhead vs traced | <= 10%? |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for r in ok:
        if r.get("budget") != "act50%":
            continue
        ov, ot = _num(r.get("overhead_vs_none")), _num(r.get("overhead_vs_traced"))
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['method']} | {_num(r.get('peak_vs_none')) or 0:.3f} "
            f"| {_pct(ov)} | {_pct(ot)} | {'' if ov is None else ('yes' if ov <= 0.10 else 'no')} |"
        )
    lines.append("")
    # 4. largest batch
    if caps:
        lines += ["Largest batch under the cap: acopt-greedy vs the best other method.", "",
                  "| model | cap MiB | acopt-greedy | best other | which | acopt >= best other? |",
                  "|---|---:|---:|---:|---|---|"]  # fmt: skip
        for model in dict.fromkeys(c["model"] for c in caps):
            cs = [c for c in caps if c["model"] == model and _num(c.get("max_batch_size")) is not None]
            mine = [c for c in cs if c["method"] == "acopt-greedy"]
            others = [c for c in cs if not c["method"].startswith("acopt-")]
            if not mine or not others:
                continue
            best = max(others, key=lambda c: float(c["max_batch_size"]))
            a, o = int(mine[0]["max_batch_size"]), int(best["max_batch_size"])
            lines.append(f"| {model} | {_mib(mine[0]['cap_bytes'])} | {a} | {o} | {best['method']} | {'yes' if a >= o else 'no'} |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------
# command line


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="acopt bench", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("models", nargs="*", help="models to run (built-ins or package.module:factory); or use --suite")
    p.add_argument("--suite", choices=sorted(SUITES), help="a predefined set of models, batch sizes and caps")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32], help="for the models given by name")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="factory argument (all named models)")
    p.add_argument("--cap", help="memory cap for the largest-batch search, bytes or e.g. 64MiB (named models)")
    p.add_argument("--max-batch-limit", type=int, default=1 << 16, help="the largest-batch search stops here")
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=list(ALL_METHODS))
    p.add_argument("--max-batch-methods", nargs="*", default=None, choices=list(ALL_METHODS),
                   help="methods for the largest-batch search (default: none acopt-greedy ckpt-every ckpt-every2 torch-budget)")  # fmt: skip
    p.add_argument("--budgets", nargs="+", default=["50%", "70%", "85%", "act50%"],
                   help='as for acopt plan: "70%%" or 0.7 of the no-recompute peak, "floor+50%%" (or "act50%%") of the '
                        'removable memory above the floor, bytes or a size like 64MiB')  # fmt: skip
    p.add_argument("--no-match", action="store_true", help="do not rerun acopt-greedy at the baselines' measured peaks")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="numerics steps K (default 3, fast 2)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None, help="timed steps N (default 20, fast 3)")
    p.add_argument("--time-limit", type=float, default=None, help="time limit of the exact planners, s (default 30)")
    p.add_argument("--torch-backend", default="inductor", help="torch.compile backend of torch-budget (inductor, aot_eager)")
    p.add_argument("--fast", action="store_true", help="fewer steps and iterations (tests, smoke runs)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="file name stem (default: device and models)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.use_deterministic_algorithms (default: on for cuda, off for cpu)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    from acopt.units import parse_bytes

    if args.suite:
        models = SUITES[args.suite]
    elif args.models:
        kw = {}
        for pair in args.model_arg:
            k, _, v = pair.partition("=")
            for cast in (int, float):
                with contextlib.suppress(ValueError):
                    v = cast(v)
                    break
            kw[k] = v
        cap = parse_bytes(args.cap) if args.cap else None
        models = tuple(
            ModelRun(name=m, batch_sizes=tuple(args.batch_sizes), model_args=kw, cap_bytes=cap, max_batch_limit=args.max_batch_limit)
            for m in args.models
        )
    else:
        raise SystemExit("name models to run, or give --suite")
    fast = FAST if args.fast else {}
    kw: dict[str, Any] = dict(fast)
    for key, value in (("numerics_steps", args.steps), ("warmup", args.warmup), ("iterations", args.iterations),
                       ("time_limit_s", args.time_limit)):  # fmt: skip
        if value is not None:
            kw[key] = value
    if args.max_batch_methods is not None:
        kw["max_batch_methods"] = tuple(args.max_batch_methods)
    return Config(
        models=models,
        methods=tuple(args.methods),
        budgets=tuple(args.budgets),
        match=not args.no_match,
        device=args.device,
        seed=args.seed,
        torch_backend=args.torch_backend,
        out=Path(args.out),
        tag=args.tag or (args.suite and (args.suite if args.suite.startswith(args.device) else f"{args.device}-{args.suite}")) or "",
        plots=not args.no_plots,
        threads=args.threads,
        deterministic=args.deterministic,
        verbose=not args.quiet,
        **kw,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    files = run(config_from_args(args))
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
