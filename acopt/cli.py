"""The ``acopt`` command line: profile, plan, sweep, run (and compare, bench).

    acopt run mlp --budget 70%                 # the main job, about a minute on CPU
    acopt profile resnet152 --batch-size 8 --fake --out out/
    acopt plan out/resnet152_bs8_fake.profile.json --budget 6GiB --solver greedy --out out/
    acopt sweep out/resnet152_bs8_fake.profile.json --solver greedy --out out/
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def _options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs to planner options; values parsed as int, float, bool or str."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"option {pair!r} is not key=value")
        for cast in (int, float):
            with contextlib.suppress(ValueError):
                out[key] = cast(value)
                break
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _build(args, *, device: str | None = None):
    from acopt import models

    kw = _options(args.model_arg)
    return models.build(args.model, batch_size=args.batch_size, device=device or args.device, seed=args.seed, **kw)


def _prefix(args) -> str:
    """Output file stem: model, batch size and any --model-arg (seq_len=128 -> _seq_len128)."""
    extra = "".join(f"_{k}{_model_label(str(v))}" for k, v in sorted(_options(args.model_arg).items()))
    return f"{_model_label(args.model)}_bs{args.batch_size}{extra}"


def _model_label(name: str) -> str:
    return name.replace(":", "_").replace(".", "_").replace("/", "_")


# ---------------------------------------------------------------------------
def cmd_profile(args) -> int:
    import torch

    import acopt
    from acopt.exports import write_profile_csvs
    from acopt.plan_outputs import plot_timelines

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with console.status(f"building {args.model}"):
        if args.fake:
            with torch.device("meta"):
                w = _build(args, device="meta")
        else:
            w = _build(args)
    with console.status("tracing the training step"):
        traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    t_trace = time.perf_counter() - t0
    prof = acopt.profile(
        traced, *w.batch, warmup=args.warmup, iterations=args.iterations, fake=args.fake,
        model_name=args.model, progress=True,
    )  # fmt: skip
    prefix = _prefix(args) + ("_fake" if args.fake else "")
    prof.to_json(out / f"{prefix}.profile.json")
    write_profile_csvs(prof, out, prefix)
    plot_timelines(prof, {}, out / f"{prefix}_timeline.png")
    from acopt.schedule import MemoryModel
    from acopt.units import format_bytes

    table = Table(title=f"profile of {args.model}, batch {args.batch_size} ({'fake, estimated times' if args.fake else prof.meta.device})")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("nodes", str(len(prof.nodes)))
    table.add_row("activations (recomputable)", f"{len(prof.activations)} ({len(MemoryModel(prof).candidates)})")
    table.add_row("peak", format_bytes(prof.peak_bytes))
    table.add_row("step time" + (" (estimated)" if args.fake else ""), f"{prof.total_time_s * 1e3:.1f} ms")
    table.add_row("trace + profile time", f"{time.perf_counter() - t0:.1f} s (trace {t_trace:.1f} s)")
    console.print(table)
    console.print(f"wrote {out / (prefix + '.profile.json')} and CSVs/PNG with prefix {prefix}")
    return 0


def cmd_plan(args) -> int:
    import acopt
    from acopt.plan_outputs import plot_timelines, write_decisions_csv

    prof = acopt.Profile.from_json(args.profile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = acopt.plan(prof, budget=args.budget, solver=args.solver, **_options(args.option))
    sim = acopt.simulate(prof, plan)
    stem = Path(args.profile).name.removesuffix(".json").removesuffix(".profile")
    plan.to_json(out / f"{stem}.{args.solver}.plan.json")
    decisions = write_decisions_csv(prof, plan, out)
    plot_timelines(prof, {f"{args.solver} ({len(plan.recompute)} recomputed)": plan}, out / f"{stem}.{args.solver}_timeline.png")
    console.print(_plan_table(prof, {args.solver: plan}))
    console.print(f"peak sits at {sim.peak_node} ({sim.peak_region.value}); wrote {decisions}")
    return 0


def _plan_table(prof, plans: dict[str, Any]) -> Table:
    import acopt
    from acopt.units import format_bytes

    table = Table(title="plans")
    for col in ("solver", "status", "budget", "predicted peak", "recomputed", "recompute time", "solve time"):
        table.add_column(col, justify="right")
    for name, plan in plans.items():
        sim = acopt.simulate(prof, plan)
        table.add_row(
            name, plan.status.value, format_bytes(plan.budget_bytes), format_bytes(sim.peak_bytes),
            str(len(plan.recompute)), f"{sim.recompute_time_s * 1e3:.2f} ms", f"{plan.solve_time_s:.2f} s",
        )  # fmt: skip
    return table


def cmd_sweep(args) -> int:
    import acopt
    from acopt.plan_outputs import plot_sweep, sweep

    prof = acopt.Profile.from_json(args.profile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = acopt.floor(prof), prof.peak_bytes
    budgets = [int(lo + (hi - lo) * i / (args.points - 1)) for i in range(args.points)]
    frame = sweep(prof, solver=args.solver, budgets=budgets, **_options(args.option))
    stem = Path(args.profile).name.removesuffix(".json").removesuffix(".profile")
    frame.to_csv(out / f"{stem}.{args.solver}_sweep.csv", index=False)
    plot_sweep(frame, out / f"{stem}.{args.solver}_sweep.png")
    console.print(frame.to_string(index=False))
    return 0


def cmd_run(args) -> int:
    """The main job: trace, profile, plan, rewrite, check, measure, report."""
    import torch

    import acopt
    from acopt.exports import write_profile_csvs
    from acopt.plan_outputs import plot_timelines, write_decisions_csv
    from acopt.profiler import allocator_peak_bytes
    from acopt.units import format_bytes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    w = _build(args)
    with console.status("tracing"):
        traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch, warmup=1, iterations=args.iterations, model_name=args.model, progress=True)
    with console.status(f"planning with {args.solver}"):
        plan = acopt.plan(prof, budget=args.budget, solver=args.solver, **_options(args.option))
    sim = acopt.simulate(prof, plan)
    rewritten = acopt.rewrite(traced, plan, profile=prof)
    prefix = _prefix(args)
    prof.to_json(out / f"{prefix}.profile.json")
    plan.to_json(out / f"{prefix}.{args.solver}.plan.json")
    write_profile_csvs(prof, out, prefix)
    write_decisions_csv(prof, plan, out)
    plot_timelines(prof, {f"{args.solver}": plan}, out / f"{prefix}_timeline.png")
    (out / f"{prefix}.rewritten.py").write_text(rewritten.print_readable())

    # Check: the rewritten step trains exactly as the plain traced step.
    snapshot = (copy.deepcopy(w.model.state_dict()), copy.deepcopy(w.optimizer.state_dict()))

    def run_steps(step, n):
        w.model.load_state_dict(snapshot[0])
        w.optimizer.load_state_dict(copy.deepcopy(snapshot[1]))
        losses = []
        for i in range(n):
            torch.manual_seed(i)
            losses.append(step(*w.make_batch(i)))
        return losses, copy.deepcopy(w.model.state_dict())

    def timed(step) -> float:
        sync = torch.cuda.synchronize if w.batch[0].device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        step(*w.batch)
        sync()
        return time.perf_counter() - t

    with console.status("checking equivalence"):
        base_losses, base_state = run_steps(traced, args.steps)
        new_losses, new_state = run_steps(rewritten, args.steps)
    same = all(torch.equal(a, b) for a, b in zip(base_losses, new_losses)) and all(
        torch.equal(base_state[k], new_state[k]) for k in base_state
    )
    with console.status("timing (alternating steps)"):
        timed(traced), timed(rewritten)  # warm-up
        base_times, new_times = [], []
        for _ in range(args.timing_steps):
            base_times.append(timed(traced))
            new_times.append(timed(rewritten))
    measured = acopt.profile(rewritten, *w.batch, warmup=0, iterations=1)
    alloc_before = allocator_peak_bytes(traced, *w.batch)
    alloc_after = allocator_peak_bytes(rewritten, *w.batch)
    w.model.load_state_dict(snapshot[0])  # leave the model as it was built
    w.optimizer.load_state_dict(snapshot[1])

    t_before, t_after = statistics.median(base_times), statistics.median(new_times)
    table = Table(title=f"acopt run {args.model} (batch {args.batch_size}, {prof.meta.device}, budget {args.budget})")
    table.add_column("")
    table.add_column("no recomputation", justify="right")
    table.add_column(f"acopt {args.solver}", justify="right")
    table.add_row("peak, simulated", format_bytes(prof.peak_bytes), format_bytes(sim.peak_bytes))
    table.add_row("peak, measured (storage accounting)", format_bytes(prof.peak_bytes), format_bytes(measured.peak_bytes))
    table.add_row("peak, allocator", format_bytes(alloc_before), format_bytes(alloc_after))
    table.add_row(f"step time (median of {args.timing_steps})", f"{t_before * 1e3:.2f} ms", f"{t_after * 1e3:.2f} ms ({t_after / t_before - 1:+.1%})")
    table.add_row("recompute time (profiled)", "0", f"{sim.recompute_time_s * 1e3:.2f} ms")
    table.add_row("recomputed activations", f"0 / {len(prof.activations)}", f"{len(plan.recompute)} / {len(prof.activations)}")
    table.add_row("solver, status", "", f"{plan.solver}, {plan.status.value} ({plan.solve_time_s:.2f} s)")
    table.add_row("bitwise equal over %d steps" % args.steps, "", "yes" if same else "NO")
    console.print(table)
    console.print(f"peak now sits at {sim.peak_node} ({sim.peak_region.value}); files in {out}/ ({time.perf_counter() - t0:.0f} s)")
    if not same or measured.peak_bytes != sim.peak_bytes:
        console.print("[red]check failed: the rewritten step differs from the plan or the original[/red]")
        return 1
    return 0


# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acopt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, batch_default):
        sp.add_argument("model", help="built-in model (see `acopt models`) or package.module:factory")
        sp.add_argument("--batch-size", type=int, default=batch_default)
        sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="extra model factory argument")

    sp = sub.add_parser("profile", help="trace and profile a model's training step")
    model_args(sp, 8)
    sp.add_argument("--fake", action="store_true", help="fake tensors on the meta device: exact memory, estimated times")
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--iterations", type=int, default=3)
    sp.add_argument("--out", default="out")
    sp.set_defaults(fn=cmd_profile)

    def plan_args(sp):
        sp.add_argument("--solver", default="greedy")
        sp.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="planner option")
        sp.add_argument("--out", default="out")

    sp = sub.add_parser("plan", help="choose activations to recompute for a budget")
    sp.add_argument("profile", help="a .profile.json written by `acopt profile`")
    sp.add_argument("--budget", required=True, help='bytes, "6GiB", or "70%%" of the no-recompute peak')
    plan_args(sp)
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("sweep", help="peak vs recompute time over budgets from the floor to the peak")
    sp.add_argument("profile")
    sp.add_argument("--points", type=int, default=9)
    plan_args(sp)
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser("run", help="the main job: plan, rewrite, check and measure a model's step")
    model_args(sp, 32)
    sp.add_argument("--budget", default="70%")
    sp.add_argument("--steps", type=int, default=3, help="steps compared bitwise")
    sp.add_argument("--timing-steps", type=int, default=10, help="steps timed, alternating plain and rewritten")
    sp.add_argument("--iterations", type=int, default=3)
    plan_args(sp)
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("models", help="list the built-in models")
    sp.set_defaults(fn=lambda a: print("\n".join(__import__("acopt.models", fromlist=["names"]).names())) or 0)

    sp = sub.add_parser("solvers", help="list the registered planners")
    sp.set_defaults(fn=cmd_solvers)

    sp = sub.add_parser("compare", help="compare acopt's and PyTorch's solvers on saved profiles (docs/solvers.md)")
    try:
        _compare_module().add_compare_arguments(sp)
    except ImportError:  # an install without the repository's benchmarks/: the other commands still work
        sp.add_argument("args", nargs=argparse.REMAINDER)
        sp.set_defaults(fn=lambda a: _compare_module())  # raises the ImportError, which main() reports
    else:
        sp.set_defaults(fn=cmd_compare)

    sp = sub.add_parser("bench", add_help=False, help="benchmark harness: memory, time, numerics vs baselines (acopt bench --help)")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=lambda a: cmd_bench(a.args))
    return p


def cmd_solvers(args) -> int:
    from acopt.planning import planners

    for name, spec in planners().items():
        kind = "exact" if spec.exact else "heuristic"
        needs = ", ".join(spec.requires) or "-"
        print(f"{name:10s} {kind:9s} needs: {needs}")
    return 0


def _compare_module():
    """benchmarks/compare.py of the repository (on sys.path, or next to an editable install)."""
    try:
        import benchmarks.compare as compare
    except ImportError:
        root = Path(__file__).resolve().parent.parent
        if not (root / "benchmarks" / "compare.py").exists():
            raise ImportError("acopt compare needs the repository's benchmarks/ (run it from a source checkout)") from None
        sys.path.insert(0, str(root))
        import benchmarks.compare as compare
    return compare


def cmd_compare(args) -> int:
    """``acopt compare ...`` = ``python -m benchmarks.compare run ...``: every plan simulated, CSV/markdown/PNG."""
    return _compare_module().cmd_run(args)


def cmd_bench(argv: list[str]) -> int:
    """``acopt bench ...`` = ``python -m benchmarks.harness ...`` (benchmarks/ of the repository)."""
    try:
        from benchmarks.harness import main as bench_main
    except ImportError:
        root = Path(__file__).resolve().parent.parent  # the repository of an editable install
        if not (root / "benchmarks" / "harness.py").exists():
            raise ImportError("acopt bench needs the repository's benchmarks/ (run it from a source checkout)") from None
        sys.path.insert(0, str(root))
        from benchmarks.harness import main as bench_main
    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # all its options belong to the harness's own parser
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    from acopt.planning import InfeasibleBudget
    from acopt.tracer import UnsupportedStep

    try:
        return int(args.fn(args) or 0)
    except (InfeasibleBudget, UnsupportedStep, ValueError, ImportError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
