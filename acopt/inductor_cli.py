"""``acopt run MODEL --backend inductor``: plan, compile with inductor, check, measure.

The check is against EAGER PyTorch: the model's own ``train_step`` run
eagerly and the compiled planned step run ``--steps`` steps from the same
state with the same seeds (dropout included) must agree at inductor's
tolerance (``rtol=1e-4, atol=1e-5``, reported as the largest difference).
Peaks: the eager memory model's (simulated) and the compiled step's
measured one, side by side; the measured one must be within the budget.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from rich.table import Table

RTOL, ATOL = 1e-4, 1e-5


def run_inductor(args, console, build, options) -> int:
    """The body of ``acopt run --backend inductor`` (``build``/``options``: the CLI's helpers)."""
    import acopt
    from acopt.inductor import fit_compiled
    from acopt.units import format_bytes

    t0 = time.perf_counter()
    w = build(args)
    with console.status("tracing and profiling"):
        traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
        prof = acopt.profile(traced, *w.batch, warmup=1, iterations=args.iterations, model_name=args.model)
    with console.status(f"planning with {args.solver}, compiling with inductor, measuring"):
        fitted = fit_compiled(traced, prof, tuple(w.batch), budget=args.budget, solver=args.solver, options=options(args.option))
    compiled = fitted.step
    # after tracing, which creates the optimizer state the traced step reads (as `acopt run` does)
    snapshot = (copy.deepcopy(w.model.state_dict()), copy.deepcopy(w.optimizer.state_dict()))

    def restore():
        w.model.load_state_dict(snapshot[0])
        w.optimizer.load_state_dict(copy.deepcopy(snapshot[1]))

    def run_steps(step, n):
        restore()
        losses = []
        for i in range(n):
            torch.manual_seed(i)
            losses.append(step(*w.make_batch(i)))
        return losses, copy.deepcopy(w.model.state_dict())

    def eager(*batch):
        return w.train_step(w.model, w.optimizer, *batch)

    with console.status("checking against eager PyTorch"):
        base_losses, base_state = run_steps(eager, args.steps)
        new_losses, new_state = run_steps(compiled, args.steps)
    pairs = [*zip(base_losses, new_losses), *((base_state[k], new_state[k]) for k in base_state)]
    pairs = [(a, b) for a, b in pairs if isinstance(a, torch.Tensor) and a.is_floating_point()]
    diff = max(((a.double() - b.double()).abs().max().item() for a, b in pairs), default=0.0)
    close = all(torch.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in pairs)

    def timed(step) -> float:
        sync = torch.cuda.synchronize if w.batch[0].device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        step(*w.batch)
        sync()
        return time.perf_counter() - t

    with console.status("timing (alternating steps)"):
        timed(eager), timed(compiled)
        base_times, new_times = [], []
        for _ in range(args.timing_steps):
            base_times.append(timed(eager))
            new_times.append(timed(compiled))
    restore()
    t_before, t_after = statistics.median(base_times), statistics.median(new_times)
    plan = fitted.plan
    table = Table(title=f"acopt run {args.model} --backend inductor (batch {args.batch_size}, {prof.meta.device}, budget {args.budget})")
    table.add_column("")
    table.add_column("eager, no recomputation", justify="right")
    table.add_column(f"acopt {args.solver} + inductor", justify="right")
    table.add_row("budget (planned for)", "", f"{format_bytes(fitted.budget_bytes)} ({format_bytes(plan.budget_bytes)})")
    table.add_row("peak, simulated (eager memory model)", format_bytes(prof.peak_bytes), format_bytes(fitted.simulated_peak_bytes))
    table.add_row("peak, measured", format_bytes(prof.peak_bytes), format_bytes(fitted.measured_peak_bytes))
    table.add_row("plans compiled and measured", "", str(fitted.attempts))
    table.add_row(f"step time (median of {args.timing_steps})", f"{t_before * 1e3:.2f} ms", f"{t_after * 1e3:.2f} ms ({t_after / t_before - 1:+.1%})")
    table.add_row("recomputed activations", f"0 / {len(prof.activations)}", f"{len(plan.recompute)} / {len(prof.activations)}")
    table.add_row("compiled graphs, nodes compiled / eager", "", "{compiled_segments}, {compiled_nodes} / {eager_nodes}".format(**compiled.runner.summary()))
    table.add_row(f"equal to eager PyTorch over {args.steps} steps (rtol {RTOL:g}, atol {ATOL:g})", "", f"{'yes' if close else 'NO'} (max diff {diff:.2g})")
    console.print(table)
    console.print(f"({time.perf_counter() - t0:.0f} s)")
    if not close or fitted.measured_peak_bytes > fitted.budget_bytes:
        console.print("[red]check failed: the compiled step differs from eager PyTorch or exceeds its budget[/red]")
        return 1
    return 0
