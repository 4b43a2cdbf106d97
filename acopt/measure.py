"""Measuring one training step: peak memory, step time, numerics.

Peak memory always means the whole step: everything alive when it starts
(parameters, buffers, gradients, optimizer state, the batch) plus everything
it allocates (activations, temporaries, new gradients).

* CUDA: ``torch.cuda.reset_peak_memory_stats()`` before the step and
  ``torch.cuda.max_memory_allocated()`` after it (the caching allocator's
  own peak of allocated bytes, which already includes what was alive).
* CPU: ``torch.profiler.profile(profile_memory=True)`` records every
  allocation and free of the CPU allocator during the step; the running sum of
  those events, in time order, peaks at the bytes the step added on top of
  what was alive. To that we add :func:`live_bytes` of what was alive before
  the step: the untyped storages of the model's parameters, buffers and
  gradients, the optimizer's state and the batch, each storage counted once.
  This is the event-tree walk of :func:`acopt.profiler.allocator_peak_bytes`,
  applied to any step callable (eager, checkpointed, torch.compile'd, acopt).

Times are medians of ``time.perf_counter`` around each step, with
``torch.cuda.synchronize()`` on CUDA, after warm-up steps; :func:`time_paired`
alternates a method's step with the eager reference step so that both see
the same machine load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = [
    "StepMemory",
    "live_bytes",
    "max_abs_diff",
    "measure_peak",
    "state_tensors",
    "sync",
    "time_paired",
    "time_steps",
]


def _tensors(obj) -> Iterable[torch.Tensor]:
    """Every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: Sequence = ()) -> list[torch.Tensor]:
    """Parameters, their gradients, buffers, optimizer state and the batch."""
    out: list[torch.Tensor] = []
    for p in model.parameters():
        out.append(p)
        if p.grad is not None:
            out.append(p.grad)
    out.extend(model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            out.extend(_tensors(state))
    out.extend(_tensors(list(batch)))
    return out


def live_bytes(tensors: Iterable[torch.Tensor], device: torch.device | str | None = None) -> int:
    """Bytes of the distinct untyped storages behind ``tensors`` (on ``device``, if given)."""
    device = None if device is None else torch.device(device)
    seen: dict[int, int] = {}
    for t in tensors:
        if device is not None and t.device.type != device.type:
            continue
        if t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()  # the StorageImpl: shared by every view and alias
    return sum(seen.values())


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass(frozen=True, slots=True)
class StepMemory:
    """Peak of one step: ``peak_bytes`` = ``base_bytes`` (alive before) + ``added_peak_bytes``."""

    peak_bytes: int
    base_bytes: int
    added_peak_bytes: int
    how: str  # "cuda max_memory_allocated" or "cpu profiler allocation events"


_MARK = "acopt.measure.measured_step"


def _allocation_events(prof) -> list[tuple[int, int]]:
    """(time, bytes) of the CPU allocator's allocations (+) and frees (-) inside the
    ``_MARK`` range (every thread: events are kept by time, not by nesting)."""
    from torch._C._profiler import _EventType

    roots = list(prof.profiler.kineto_results.experimental_event_tree())
    stack, marks, allocs = list(roots), [], []
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            if e.extra_fields.device.type == "cpu":
                allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
        elif e.name == _MARK:
            marks.append((e.start_time_ns, e.end_time_ns))
        stack.extend(e.children)
    if len(marks) != 1:
        raise RuntimeError(f"expected one measured step in the profile, found {len(marks)}")
    start, end = marks[0]
    return sorted((t, size) for t, size in allocs if start <= t <= end)


def measure_peak(
    step: Callable[[], object],
    *,
    device: torch.device | str,
    alive: Callable[[], Iterable[torch.Tensor]],
) -> StepMemory:
    """Run ``step()`` (twice on CPU) and measure one whole step's peak memory.

    ``alive()`` lists the tensors alive before the step (model, optimizer,
    batch: :func:`state_tensors`); on CPU their storages are the base, on CUDA
    the allocator already counts them.

    On CPU the profiler cannot see the free of a block allocated before it
    started (it warns "Memory block of unknown size..."), and every step frees
    the previous step's gradients first. So the profiler runs one unmeasured
    step, then the measured one inside a ``record_function`` range: the
    gradients (and whatever else the measured step frees) were then allocated
    under the profiler, and their frees count.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return StepMemory(peak, base, peak - base, "cuda max_memory_allocated")

    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
        del out
        base = live_bytes(alive(), device)
        with record_function(_MARK):
            out = step()
            del out
    current = peak = 0
    for _, size in _allocation_events(prof):
        current += size
        peak = max(peak, current)
    return StepMemory(base + peak, base, peak, "cpu profiler allocation events")


def time_steps(step: Callable[[], object], *, device: torch.device | str, warmup: int, iterations: int) -> list[float]:
    """Wall-clock seconds of ``iterations`` calls of ``step()`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(iterations):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def time_paired(
    step: Callable[[], object],
    reference: Callable[[], object] | None,
    *,
    device: torch.device | str,
    warmup: int,
    iterations: int,
    around_reference: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[list[float], list[float]]:
    """Time ``step`` and ``reference`` alternately, one call each per iteration.

    On a shared machine the load drifts; alternating puts both under the same
    load, so the ratio of their medians is steadier than two separate runs.
    ``around_reference()`` gives a context the reference runs in (e.g. one that
    takes a checkpoint patch off the model for the eager step).
    """
    around = around_reference or contextlib.nullcontext

    def timed(fn) -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    for _ in range(warmup):
        step()
        if reference is not None:
            with around():
                reference()
    times, ref_times = [], []
    for _ in range(iterations):
        times.append(timed(step))
        if reference is not None:
            with around():
                ref_times.append(timed(reference))
    return times, ref_times


def time_interleaved(
    steps: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 0, clock: Callable[[], float] = time.thread_time
) -> dict[str, float]:
    """Median seconds per call of each step, timed in turn ``rounds`` times (after
    ``warmup`` calls each) so that all see the same load; ``clock`` is thread CPU
    time by default (steadier than wall time on a shared machine, CPU only)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            t0 = clock()
            step()
            times[label].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple[float, bool]:
    """(max |a - b| over all elements, whether every pair is bitwise equal)."""
    worst, same = 0.0, True
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape or x.dtype != y.dtype:
            return float("inf"), False
        if not torch.equal(x, y):
            same = False
            if x.is_floating_point() or x.is_complex():
                d = (x.double() - y.double()).abs()
                d = torch.nan_to_num(d, nan=float("inf"))
                worst = max(worst, float(d.max()) if d.numel() else 0.0)
            else:
                worst = max(worst, float((x.long() - y.long()).abs().max()))
    return worst, same
