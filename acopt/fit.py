"""Will it fit? A training step's memory from a model config alone, before the GPU is rented.

:func:`will_it_fit` builds the model on the meta device (no weights are ever
allocated), traces one whole training step and profiles it on fake tensors:
the memory is exact under the memory model (docs/memory-model.md): params,
buffers, gradients, optimizer state, activations and temporaries the graph
holds, but not the CUDA context, the allocator's caching and fragmentation or
kernels' internal workspace (the ``reserve`` margin is for those). Times are a
roofline ESTIMATE of a named GPU (:data:`GPUS`, or peak FLOP/s and bandwidth),
never measurements.

It reports, at the requested batch: the no-recompute peak, the floor (the
smallest peak recomputation reaches, :func:`acopt.floor`) and the plan that
fits the device with its predicted overhead; and the largest batch that fits
without and with a plan, found exactly: every answer ``b`` is verified by
profiling ``b`` (fits) and ``b + 1`` (does not).

Attention: ``F.scaled_dot_product_attention`` is traced as a fused
flash-attention op (PyTorch's CPU flash kernel, same outputs and saved tensors
as the CUDA one: O(sequence) memory) as it runs on a GPU, not as the
O(sequence^2) math fallback that the meta device would otherwise choose
(``attention="math"`` keeps that fallback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["GPU", "GPUS", "Evaluation", "FitInputError", "FitReport", "largest_fitting", "roofline_of", "will_it_fit"]


@dataclasses.dataclass(frozen=True)
class GPU:
    """A GPU's published peak numbers: dense 16-bit tensor-core FLOP/s (no
    sparsity), memory bandwidth (bytes/s) and memory (bytes, as the datasheet
    says it: 80 GB is 80e9 bytes)."""

    name: str
    flops_per_s: float
    bytes_per_s: float
    memory_bytes: int


#: Datasheet numbers (NVIDIA H100/H200/A100/L40S datasheets: dense BF16 tensor core, HBM/GDDR bandwidth).
GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM5 80GB", 989.4e12, 3.35e12, 80 * 10**9),
    "h100-pcie": GPU("H100 PCIe 80GB", 756.0e12, 2.0e12, 80 * 10**9),
    "h200": GPU("H200 SXM 141GB", 989.4e12, 4.8e12, 141 * 10**9),
    "a100": GPU("A100 SXM4 80GB", 312.0e12, 2.039e12, 80 * 10**9),
    "a100-40gb": GPU("A100 SXM4 40GB", 312.0e12, 1.555e12, 40 * 10**9),
    "l40s": GPU("L40S 48GB", 362.05e12, 0.864e12, 48 * 10**9),
}


def roofline_of(gpu: str | None = "h100", *, flops: float | None = None, bandwidth: float | None = None,
                overhead_s: float = 2e-6):  # fmt: skip
    """The :class:`acopt.profiler.Roofline` of a preset GPU, with ``flops`` (FLOP/s)
    and ``bandwidth`` (bytes/s) overriding its numbers; ``gpu=None`` needs both."""
    from acopt.profiler import Roofline

    if gpu is not None and gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; presets: {', '.join(GPUS)} (or give flops= and bandwidth=)")
    base = GPUS.get(gpu) if gpu is not None else None
    if base is None and (flops is None or bandwidth is None):
        raise ValueError("without a GPU preset, give both flops (FLOP/s) and bandwidth (bytes/s)")
    return Roofline(
        flops_per_s=float(flops if flops is not None else base.flops_per_s),
        bytes_per_s=float(bandwidth if bandwidth is not None else base.bytes_per_s),
        overhead_s=float(overhead_s),
    )


# ---- fused attention while tracing -------------------------------------------------
def _register_flop_formulas() -> None:
    """FLOPs of PyTorch's CPU flash-attention ops (the CUDA ones have formulas; these not)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd, bwd = aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """While active, ``F.scaled_dot_product_attention`` without dropout runs as
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (grouped-query heads
    natively, as flash attention on a GPU); with dropout it is left as it is."""
    import torch
    import torch.nn.functional as F

    _register_flop_formulas()
    original = F.scaled_dot_product_attention
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p or query.dim() != 4 or (query.shape[1] != key.shape[1] and not enable_gqa):
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)  # fmt: skip
        return flash(query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# ---- the search -----------------------------------------------------------------------
def largest_fitting(value: Callable[[int], int], limit: int, *, start: int = 1, max_batch: int = 65536,
                    seen: dict[int, int] | None = None) -> int:  # fmt: skip
    """The largest ``b`` in ``[0, max_batch]`` with ``value(b) <= limit``, for a
    ``value`` that grows with ``b`` (peak bytes vs batch size).

    Exact at the answer: ``value(b) <= limit`` was evaluated, and so was
    ``value(b + 1) > limit`` (unless ``b == max_batch``); 0 means batch 1 does
    not fit. Probes: the batch where the line through the two known points
    nearest the limit meets it, with its neighbour across the boundary (exact
    in one round when value is affine in the batch); bisection (doubling
    upwards) after a round that did not halve the interval, after 4 rounds,
    or where no line is known. ``seen`` caches
    evaluations, batch -> value (and is filled).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    seen = {} if seen is None else seen
    lo, hi = 0, max_batch + 1  # value(lo) <= limit (0: trivially), value(hi) > limit (max_batch + 1: by convention)

    def probe(b: int) -> bool:
        nonlocal lo, hi
        if b not in seen:
            seen[b] = value(b)
        fits = seen[b] <= limit
        lo, hi = (max(lo, b), hi) if fits else (lo, min(hi, b))
        return fits

    for b in [b for b in seen if 1 <= b <= max_batch]:
        probe(b)
    if not any(1 <= b <= max_batch for b in seen):
        probe(min(max(start, 1), max_batch))
    rounds, stalled = 0, False
    while hi - lo > 1:
        guess = None if stalled or rounds >= 4 else _secant(seen, limit, lo, hi)
        if guess is not None and hi <= max_batch and not lo < guess < hi:
            guess = None  # the line points outside the bracket (a peak that is not convex): bisect
        rounds += guess is not None
        width, bracketed = hi - lo, hi <= max_batch
        if guess is None:
            if hi <= max_batch:  # bisection; geometric while the bracket spans more than a factor 4
                guess = math.isqrt(lo * hi) if lo and hi > 4 * lo else (lo + hi) // 2
            elif sum(1 for b in seen if 1 <= b <= max_batch) < 2:
                guess = lo + 1  # a second point, for the line
            else:
                guess = min(2 * lo, max_batch)
            probe(min(max(guess, lo + 1), hi - 1))
            stalled = False
            continue
        b = min(max(guess, lo + 1), hi - 1)
        if probe(b):
            if b + 1 < hi:
                probe(b + 1)
        elif b - 1 > lo:
            probe(b - 1)
        stalled = bracketed and (hi - lo) * 2 > width  # the line missed: bisect next
    return lo


def _secant(seen: dict[int, int], limit: int, lo: int, hi: int) -> int | None:
    """Where a line through known points meets the limit: the slope of the known
    neighbours (b, b + 1) nearest the boundary from above, else from below, else
    the line through the nearest point on each side (or two on one side). A
    peak is a maximum of terms affine in the batch (convex, piecewise affine):
    the first is exact once both points lie on the piece that crosses."""
    pairs = [b for b in seen if b + 1 in seen and b >= 1]
    above = [b for b in pairs if seen[b] > limit]
    below = [b for b in pairs if seen[b + 1] <= limit]
    if above:
        p = min(above)
        q = p + 1
    elif below:
        p = max(below)
        q = p + 1
    else:
        under = sorted((b for b, val in seen.items() if val <= limit and 1 <= b <= lo), reverse=True)
        over = sorted(b for b, val in seen.items() if val > limit and b >= hi)
        if under and over:
            p, q = under[0], over[0]
        elif len(under) >= 2:
            p, q = under[1], under[0]
        elif len(over) >= 2:
            p, q = over[0], over[1]
        else:
            return None
    slope = (seen[q] - seen[p]) / (q - p)
    if slope <= 0:
        return None
    return math.floor(p + (limit - seen[p]) / slope)


# ---- one evaluation -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A fake profile at one batch size: its no-recompute peak, floor and estimated step time."""

    batch_size: int
    peak_bytes: int
    floor_bytes: int
    step_time_s: float
    seconds: float  # wall time of build + trace + profile + floor


@dataclasses.dataclass(frozen=True)
class PlanSummary:
    """The plan for ``budget_bytes`` at one batch size (estimated times)."""

    batch_size: int
    budget_bytes: int
    solver: str
    status: str
    recomputed: int
    activations: int
    predicted_peak_bytes: int
    recompute_time_s: float
    step_time_s: float

    @property
    def overhead(self) -> float:
        """Recompute time / no-recompute step time (both estimates)."""
        return self.recompute_time_s / self.step_time_s if self.step_time_s else 0.0


@dataclasses.dataclass(frozen=True)
class FitReport:
    """What :func:`will_it_fit` found. Bytes are whole-step peaks (memory model); times are roofline estimates."""

    model: str
    description: str
    batch_size: int
    gpu: str
    roofline: str
    device_memory_bytes: int
    reserve_bytes: int
    parameters: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    peak_bytes: int
    floor_bytes: int
    step_time_s: float
    plan: PlanSummary | None  # at batch_size, for the usable memory; None where none is needed or none fits
    max_batch_no_plan: int
    max_batch_with_plan: int
    plan_at_max_batch: PlanSummary | None
    max_batch: int
    evaluations: tuple[Evaluation, ...]
    seconds: float

    @property
    def usable_bytes(self) -> int:
        return self.device_memory_bytes - self.reserve_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Evaluator:
    """Builds, traces and fake-profiles the step at a batch size. Keeps the
    Profiles a plan may be made for (the requested batch's, and the largest
    batch's whose floor fits ``usable``); the others are dropped (memory)."""

    def __init__(self, make_workload: Callable[[int], Any], *, roofline, attention: str, batch_size: int,
                 usable: int, progress=None):  # fmt: skip
        self.make_workload = make_workload
        self.batch_size = batch_size
        self.usable = usable
        self.roofline = roofline
        self.attention = attention
        self.progress = progress
        self.profiles: dict[int, Any] = {}
        self.evaluations: dict[int, Evaluation] = {}

    def __call__(self, batch_size: int) -> Evaluation:
        if batch_size in self.evaluations:
            return self.evaluations[batch_size]
        import acopt

        t0 = time.perf_counter()
        w = self.make_workload(batch_size)
        ctx = fused_attention() if self.attention == "flash" else contextlib.nullcontext()
        with ctx:
            traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
        prof = acopt.profile(traced, *w.batch, fake=True, roofline=self.roofline, model_name=w.name)
        del traced, w
        gc.collect()
        floor = acopt.floor(prof)
        ev = Evaluation(batch_size, prof.peak_bytes, floor, prof.total_time_s, time.perf_counter() - t0)
        self.profiles[batch_size] = prof
        self.evaluations[batch_size] = ev
        fitting = [b for b, e in self.evaluations.items() if e.floor_bytes <= self.usable]
        keep = {self.batch_size, max(fitting, default=self.batch_size)}
        for b in [b for b in self.profiles if b not in keep]:
            del self.profiles[b]
        if self.progress is not None:
            self.progress(ev)
        return ev


def _summarise(prof, batch_size: int, budget: int, solver: str, options: dict[str, Any]) -> PlanSummary:
    import acopt

    plan = acopt.plan(prof, budget=budget, solver=solver, **options)
    sim = acopt.simulate(prof, plan)  # an INFEASIBLE plan's peak is over the budget: the rows say so
    return PlanSummary(
        batch_size=batch_size, budget_bytes=budget, solver=solver, status=plan.status.value,
        recomputed=len(plan.recompute), activations=len(prof.activations), predicted_peak_bytes=sim.peak_bytes,
        recompute_time_s=sim.recompute_time_s, step_time_s=prof.total_time_s,
    )  # fmt: skip


def _workload_factory(model: str | None, *, hf: str | None, config: dict | None, seq_len: int | None,
                      dtype: str | None, optimizer: str | None, foreach: bool | None, model_args: dict | None):  # fmt: skip
    """(name, description, batch_size -> Workload on the meta device), checking the arguments once."""
    import inspect

    import torch

    from acopt import hf_workloads, models

    if (model is None) == (hf is None):
        raise ValueError("give either model (a built-in, see `acopt models`) or hf (an HF preset or model type)")
    if dtype is not None and dtype not in hf_workloads.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(hf_workloads.DTYPES)}, got {dtype!r}")
    if hf is not None:
        foreach = True if foreach is None else foreach  # PyTorch's default on CUDA (on the meta device it is a loop)
        if model_args:
            raise ValueError("model_args are for built-in models; an HF model takes config overrides (config=)")
        if seq_len is None:
            raise ValueError("an HF model needs seq_len")
        opt = optimizer or "adamw"
        hf_workloads.make_config(hf, config)  # unknown type or key: a clear error now, not per batch size
        kind = f"{opt} ({'foreach' if foreach else 'for-loop'})"
        desc = f"HF {hf} ({hf_workloads.resolve(hf, config)[0]}), seq {seq_len}, {dtype or 'fp32'}, {kind}"

        def make(b: int):
            return hf_workloads.build(hf, batch_size=b, seq_len=seq_len, config=config, dtype=dtype,
                                      optimizer=opt, foreach=foreach)  # fmt: skip

        return f"hf:{hf}", desc, make
    if config:
        raise ValueError("config overrides are for HF models (hf=); a built-in takes model_args")
    if optimizer is not None or foreach is not None:
        raise ValueError("a built-in model brings its own optimizer: optimizer/foreach are for HF models")
    kw = dict(model_args or {})
    factory = models.MODELS.get(model) if ":" not in model else models._load_factory(model)
    if factory is None:
        raise ValueError(f"unknown model {model!r}; built-ins: {', '.join(models.names())} (or hf=...)")
    if seq_len is not None:
        if "seq_len" not in inspect.signature(factory).parameters:
            raise ValueError(f"{model} takes no seq_len")
        kw["seq_len"] = seq_len
    desc = f"{model}" + "".join(f", {k}={v}" for k, v in kw.items()) + f", {dtype or 'fp32'}"

    def make(b: int):
        with torch.device("meta"):
            w = models.build(model, batch_size=b, device="meta", **kw)
        if dtype is not None:
            dt = hf_workloads.DTYPES[dtype]
            w.model.to(dt)
            cast = tuple(t.to(dt) if t.is_floating_point() else t for t in w.batch)
            w = dataclasses.replace(w, batch=cast)
        return w

    return model, desc, make


class FitInputError(ValueError):
    """An argument of :func:`will_it_fit` it cannot use (found before any profiling)."""


def _check_inputs(model, *, hf, config, batch_size, seq_len, dtype, optimizer, foreach, model_args, device_memory,
                  reserve, gpu, flops, bandwidth, overhead_s, solver, solver_options, attention, max_batch):  # fmt: skip
    from acopt.units import parse_bytes

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(max_batch, int) or max_batch < batch_size:
        raise ValueError(f"max_batch must be an int >= batch_size ({batch_size}), got {max_batch!r}")
    if attention not in ("flash", "math"):
        raise ValueError(f"attention must be 'flash' or 'math', got {attention!r}")
    roofline = roofline_of(gpu, flops=flops, bandwidth=bandwidth, overhead_s=overhead_s)
    if device_memory is None:
        if gpu is None:
            raise ValueError("give device_memory (no GPU preset to take it from)")
        device_memory = GPUS[gpu].memory_bytes
    memory = parse_bytes(device_memory)
    reserve_bytes = parse_bytes(reserve)
    usable = memory - reserve_bytes
    if usable <= 0:
        raise ValueError(f"reserve ({reserve_bytes} B) leaves nothing of device_memory ({memory} B)")
    from acopt.planning import get_planner, make_options

    make_options(get_planner(solver), solver_options or {})  # unknown solver or option: an error now
    name, desc, make = _workload_factory(
        model, hf=hf, config=config, seq_len=seq_len, dtype=dtype, optimizer=optimizer, foreach=foreach,
        model_args=model_args,
    )  # fmt: skip
    return roofline, memory, reserve_bytes, name, desc, make


def will_it_fit(
    model: str | None = None,
    *,
    hf: str | None = None,
    config: dict[str, Any] | None = None,
    batch_size: int = 1,
    seq_len: int | None = None,
    dtype: str | None = None,
    optimizer: str | None = None,
    foreach: bool | None = None,
    model_args: dict[str, Any] | None = None,
    device_memory: int | str | None = None,
    reserve: int | str = 0,
    gpu: str | None = "h100",
    flops: float | None = None,
    bandwidth: float | None = None,
    overhead_s: float = 2e-6,
    solver: str = "mu-two",
    solver_options: dict[str, Any] | None = None,
    attention: str = "flash",
    max_batch: int = 65536,
    progress: Callable[[Evaluation], None] | None = None,
) -> FitReport:
    """Will ``model`` (built-in) or ``hf`` (HF preset or model type + ``config``) train on a GPU?

    ``device_memory``: bytes or a size ("80GiB"; default the preset GPU's);
    ``reserve``: bytes kept free for what the memory model does not count
    (CUDA context, allocator caching and fragmentation, kernel workspace).
    Fits means whole-step peak <= device_memory - reserve. ``dtype`` ("bf16",
    "fp16", "fp32"): parameters' (and so gradients' and optimizer state's)
    dtype. ``optimizer`` ("adamw", "sgd") and ``foreach`` (default True, as
    PyTorch picks on CUDA) are an HF model's; a built-in brings its own. Times: roofline of ``gpu`` (or ``flops`` FLOP/s, ``bandwidth``
    bytes/s), estimates. ``solver``: the planner of the plans (default
    mu-two, the reference greedy: a few seconds on an 8B model, where the
    default greedy, which recomputes less, takes several times longer).
    Raises :class:`FitInputError` (a ValueError) for bad input.
    """
    t0 = time.perf_counter()
    try:  # every check of the arguments, before the first profile
        roofline, memory, reserve_bytes, name, desc, make = _check_inputs(
            model, hf=hf, config=config, batch_size=batch_size, seq_len=seq_len, dtype=dtype, optimizer=optimizer,
            foreach=foreach, model_args=model_args, device_memory=device_memory, reserve=reserve, gpu=gpu,
            flops=flops, bandwidth=bandwidth, overhead_s=overhead_s, solver=solver, solver_options=solver_options,
            attention=attention, max_batch=max_batch,
        )  # fmt: skip
        w = make(batch_size)  # a factory's refusal of its arguments shows here; on meta, cheap
    except (ValueError, TypeError) as e:
        raise FitInputError(str(e)) from e
    n_params = sum(p.numel() for p in {id(p): p for p in w.model.parameters()}.values())
    del w
    usable = memory - reserve_bytes
    evaluate = _Evaluator(make, roofline=roofline, attention=attention, batch_size=batch_size, usable=usable,
                          progress=progress)  # fmt: skip
    here = evaluate(batch_size)
    prof = evaluate.profiles[batch_size]
    peaks: dict[int, int] = {}
    floors: dict[int, int] = {}
    for b, ev in evaluate.evaluations.items():
        peaks[b], floors[b] = ev.peak_bytes, ev.floor_bytes

    def peak(b: int) -> int:
        ev = evaluate(b)
        floors.setdefault(b, ev.floor_bytes)
        return ev.peak_bytes

    def floor(b: int) -> int:
        ev = evaluate(b)
        peaks.setdefault(b, ev.peak_bytes)
        return ev.floor_bytes

    max_no_plan = largest_fitting(peak, usable, start=batch_size, max_batch=max_batch, seen=peaks)
    floors.update({b: e.floor_bytes for b, e in evaluate.evaluations.items()})
    max_plan = largest_fitting(floor, usable, start=max(max_no_plan, batch_size), max_batch=max_batch, seen=floors)

    plan_here = None
    if here.peak_bytes > usable >= here.floor_bytes:
        plan_here = _summarise(prof, batch_size, usable, solver, solver_options or {})
    plan_max = None
    if max_plan > max_no_plan:
        plan_max = _summarise(evaluate.profiles[max_plan], max_plan, usable, solver, solver_options or {})

    from acopt.records import Role

    def role_bytes(role: Role) -> int:
        return sum(s.bytes for s in prof.storages if s.role == role)

    return FitReport(
        model=name, description=desc, batch_size=batch_size, gpu=gpu or "custom", roofline=roofline.describe(),
        device_memory_bytes=memory, reserve_bytes=reserve_bytes, parameters=n_params,
        parameter_bytes=role_bytes(Role.PARAMETER), gradient_bytes=role_bytes(Role.GRADIENT),
        optimizer_state_bytes=role_bytes(Role.OPTIMIZER_STATE), peak_bytes=here.peak_bytes,
        floor_bytes=here.floor_bytes, step_time_s=here.step_time_s, plan=plan_here,
        max_batch_no_plan=max_no_plan, max_batch_with_plan=max_plan, plan_at_max_batch=plan_max,
        max_batch=max_batch, evaluations=tuple(sorted(evaluate.evaluations.values(), key=lambda e: e.batch_size)),
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


def report_rows(r: FitReport) -> list[tuple[str, str]]:
    """(what, value) rows for people; estimated times say so."""
    from acopt.units import format_bytes as fb

    usable = r.usable_bytes
    by_batch = {e.batch_size: e for e in r.evaluations}

    def verdict(nbytes: int) -> str:
        return f"{fb(nbytes)} ({'fits' if nbytes <= usable else 'does not fit'})"

    def boundary(b: int, attr: str) -> str:
        if b == 0:
            return f"none (batch 1: {fb(getattr(by_batch[1], attr))})"
        after = by_batch.get(b + 1)
        upper = f", batch {b + 1}: {fb(getattr(after, attr))}" if after is not None else f" (the --max-batch {r.max_batch})"
        return f"{b} (batch {b}: {fb(getattr(by_batch[b], attr))}{upper})"

    def plan_text(p: PlanSummary | None) -> str:
        if p is None:
            return "-"
        fits = "" if p.predicted_peak_bytes <= p.budget_bytes else f" (status {p.status}: DOES NOT FIT)"
        return (
            f"{p.solver}: {p.recomputed}/{p.activations} activations recomputed, peak {fb(p.predicted_peak_bytes)}{fits}, "
            f"overhead ESTIMATE {p.overhead:.1%} ({p.recompute_time_s * 1e3:.1f} ms of {p.step_time_s * 1e3:.1f} ms)"
        )

    b = r.batch_size
    batches = ", ".join(str(e.batch_size) for e in r.evaluations)
    if r.peak_bytes <= usable:
        here = "not needed: the step fits without recomputation"
    elif r.floor_bytes > usable:
        here = "none: even the floor does not fit"
    else:
        here = plan_text(r.plan)
    rows = [
        ("model", r.description),
        ("device memory", f"{fb(r.device_memory_bytes)} - reserve {fb(r.reserve_bytes)} = usable {fb(usable)}"),
        ("parameters", f"{r.parameters:,} ({fb(r.parameter_bytes)})"),
        ("gradients, optimizer state", f"{fb(r.gradient_bytes)}, {fb(r.optimizer_state_bytes)}"),
        (f"peak, no recompute (batch {b})", verdict(r.peak_bytes)),
        (f"floor (batch {b})", verdict(r.floor_bytes)),
        (f"plan at batch {b}", here),
        ("largest batch, no plan", boundary(r.max_batch_no_plan, "peak_bytes")),
        ("largest batch, with a plan (floor)", boundary(r.max_batch_with_plan, "floor_bytes")),
        (f"step time ESTIMATE (batch {b})", f"{r.step_time_s * 1e3:.1f} ms, {r.roofline} ({r.gpu})"),
        ("fake profiles", f"{len(r.evaluations)} (batches {batches}), {r.seconds:.0f} s in all"),
    ]  # fmt: skip
    if r.plan_at_max_batch is not None:
        rows.insert(-2, (f"plan at batch {r.max_batch_with_plan}", plan_text(r.plan_at_max_batch)))
    return rows


#: What "fits" means, printed under the report.
FITS_MEANS = (
    "fits = whole-step peak <= usable memory: parameters, buffers, gradients, optimizer state, activations and "
    "temporaries of the traced step (docs/memory-model.md). Not counted: the CUDA context, the allocator's "
    "caching and fragmentation, kernels' internal workspace: keep --reserve for them. Times are roofline "
    "ESTIMATES from the GPU's peak numbers, not measurements."
)


# ---- command line (acopt fit) ----------------------------------------------------------
def add_fit_arguments(sp) -> None:
    """``acopt fit``'s arguments on the argparse (sub)parser ``sp``."""
    from acopt.cli import _budget, _key_value, _positive_int

    def size(text: str) -> str:
        if "%" in text:
            raise argparse_error(f"{text!r}: a size like 80GiB or 80GB, not a percentage")
        return _budget(text)

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse_error(f"invalid number: {text!r} (e.g. 989e12)") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse_error(f"must be a positive number, got {text!r}")
        return value

    def pairs(text: str) -> list[tuple[str, Any]]:
        return [_key_value(part) for part in text.split(",") if part.strip()]

    sp.add_argument("fit_model", nargs="?", metavar="MODEL", help="a built-in model (see `acopt models`); or use --hf")
    sp.add_argument("--hf", metavar="NAME", help=f"an HF model: a preset ({', '.join(_preset_names())}) or a "
                    "transformers model type (llama, mistral, qwen2, gpt2, bert...), built from its config (no download)")  # fmt: skip
    sp.add_argument("--config", type=pairs, action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE...]",
                    help="HF config overrides, e.g. hidden_size=4096,num_hidden_layers=32 (repeatable)")  # fmt: skip
    sp.add_argument("--batch-size", type=_positive_int, default=1, help="the batch to report on (default 1)")
    sp.add_argument("--seq-len", type=_positive_int, help="sequence length (HF models; built-ins that take seq_len)")
    sp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="parameters' dtype (and so gradients' and "
                    "optimizer state's); default: as built (fp32)")  # fmt: skip
    sp.add_argument("--optimizer", choices=["adamw", "sgd"], help="HF models' optimizer (default adamw)")
    sp.add_argument("--no-foreach", dest="foreach", action="store_false", default=None,
                    help="HF models: the optimizer's for-loop implementation (default foreach, as PyTorch picks on "
                    "CUDA: AdamW then holds a parameter-sized temporary)")  # fmt: skip
    sp.add_argument("--model-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                    help="built-in model factory argument, e.g. d_model=128 (repeatable)")  # fmt: skip
    sp.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="roofline and default memory of this GPU "
                    "(datasheet numbers; default h100)")  # fmt: skip
    sp.add_argument("--flops", type=number, help="peak FLOP/s for the roofline (overrides --gpu's)")
    sp.add_argument("--bandwidth", type=number, help="memory bandwidth in bytes/s for the roofline (overrides --gpu's)")
    sp.add_argument("--device-memory", type=size, help="device memory, e.g. 80GiB (default: --gpu's datasheet size)")
    sp.add_argument("--reserve", type=size, default="0", help="memory kept free for the CUDA context, allocator "
                    "fragmentation and workspace, e.g. 2GiB (default 0)")  # fmt: skip
    sp.add_argument("--solver", default="mu-two", help="planner for the plans (default mu-two: fast; greedy "
                    "recomputes less but takes several times longer on an 8B model's profile)")  # fmt: skip
    sp.add_argument("--option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                    help="planner option, e.g. max_simulations=0 for greedy (repeatable)")  # fmt: skip
    sp.add_argument("--attention", choices=["flash", "math"], default="flash",
                    help="trace SDPA as a fused flash kernel as on a GPU (default), or as the math fallback")  # fmt: skip
    sp.add_argument("--max-batch", type=_positive_int, default=65536, help="largest batch searched (default 65536)")
    sp.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def argparse_error(message: str):
    import argparse

    return argparse.ArgumentTypeError(message)


def _preset_names() -> list[str]:
    from acopt.hf_workloads import PRESETS

    return list(PRESETS)


def run_cli(args, console) -> int:
    """Run :func:`will_it_fit` with ``acopt fit``'s arguments and print the report (rich ``console``)."""
    import json
    import os

    from rich.table import Table

    from acopt.units import format_bytes

    config = {k: v for group in args.config for k, v in group}
    if args.max_batch < args.batch_size:
        raise FitInputError(f"--max-batch {args.max_batch} is below --batch-size {args.batch_size}")

    def progress(ev: Evaluation) -> None:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        console.print(
            f"  batch {ev.batch_size}: peak {format_bytes(ev.peak_bytes)}, floor {format_bytes(ev.floor_bytes)} "
            f"({ev.seconds:.0f} s; this process's max RSS so far {format_bytes(rss)})"
        )

    console.print("fake-profiling the step (no weights are allocated):")
    report = will_it_fit(
        args.fit_model, hf=args.hf, config=config or None, batch_size=args.batch_size, seq_len=args.seq_len,
        dtype=args.dtype, optimizer=args.optimizer, foreach=args.foreach, model_args=dict(args.model_arg) or None,
        device_memory=args.device_memory, reserve=args.reserve, gpu=args.gpu, flops=args.flops,
        bandwidth=args.bandwidth, solver=args.solver, solver_options=dict(args.option), attention=args.attention,
        max_batch=args.max_batch, progress=progress,
    )  # fmt: skip
    custom = args.flops is not None or args.bandwidth is not None
    table = Table(title=f"Will it fit? {report.model} on {GPUS[args.gpu].name}{' (custom roofline)' if custom else ''}")
    table.add_column("")
    table.add_column("")
    for what, value in report_rows(report):
        table.add_row(_escape(what), _escape(value))
    console.print(table)
    console.print(_escape(FITS_MEANS))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
        console.print(f"wrote {args.json}")
    return 0


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
