"""The acopt command line: profile, plan, sweep, run (and compare, bench).

    acopt run transformer --batch-size 32 --budget 60%   # the main job, about 20 s on CPU
    acopt run mlp --batch-size 512 --budget 90%          # a few seconds
    acopt profile resnet152 --batch-size 8 --fake --out out/
    acopt plan out/resnet152_bs8_fake.profile.json --budget 1GiB --solver greedy --out out/
    acopt sweep out/resnet152_bs8_fake.profile.json --solver greedy --out out/
    acopt fit gpt2 --batch-size 8 --dtype bf16 --gpu a100     # will it fit? (fake tensors, estimated times)
    acopt models; acopt solvers

Exit status: 0 done; 1 `acopt run`'s check failed, or an internal error (with
its traceback); 2 a usage error, or a budget, step or file acopt cannot handle
(one line on stderr: add --debug for the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(markup=False, soft_wrap=True)  # text, not markup ("acopt[models]" stays whole); paths unbroken


class UsageError(Exception):
    """A user error the CLI found: reported as one line on stderr, exit status 2.

    ``parser``, when given, is the (sub)command's parser: its usage line is
    printed first, as argparse does for its own errors.
    """

    def __init__(self, message: str, parser: argparse.ArgumentParser | None = None):
        super().__init__(message)
        self.parser = parser


# ---- argparse types: an invalid value is an argparse error naming the option ----
def _key_value(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value), the value parsed as int, float, bool or str."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return key, cast(value)
    return key, {"true": True, "false": False}.get(value.lower(), value)


def _options(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Parsed ``--option``/``--model-arg`` pairs as a dict (a later key wins)."""
    return dict(pairs or [])


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value
_non_negative_int = _int_at_least(0, "0 or more")


def _budget(text: str) -> str:
    """A budget as acopt.plan takes it (acopt.units.parse_budget's forms), checked, kept as text."""
    from acopt.units import parse_budget

    try:
        parse_budget(text)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _build(args, *, device: str | None = None):
    from acopt import models

    try:
        w = models.build(
            args.model, batch_size=args.batch_size, device=device or args.device, seed=args.seed, **_options(args.model_arg)
        )
    except (ImportError, ValueError) as e:  # a missing extra (transformers), or a model argument the factory refuses
        raise UsageError(f"cannot build model {args.model!r}: {e}") from e
    try:
        return w.with_loop(micro_batches=getattr(args, "micro_batches", 1), amp=getattr(args, "amp", None))
    except ValueError as e:
        raise UsageError(f"--micro-batches/--amp: {e}") from e


def _load_profile(path: str):
    import acopt

    try:
        return acopt.Profile.from_json(path)
    except ValueError as e:  # corrupt JSON, or not a profile (FieldError is a ValueError)
        raise UsageError(f"cannot read profile {path}: {e}") from e


def _plan(prof, args):
    """acopt.plan with the CLI's arguments; below the floor, the error says which budget fits."""
    import acopt
    from acopt.planning import InfeasibleBudget, no_recompute_peak
    from acopt.units import format_bytes

    try:
        return acopt.plan(prof, budget=args.budget, solver=args.solver, **_planner_options(args))
    except InfeasibleBudget as e:
        peak = no_recompute_peak(prof)
        floor = getattr(e, "floor_bytes", None)
        if floor is None or peak <= 0:
            raise
        if floor >= peak:
            hint = "recomputation cannot lower this step's peak (a larger --batch-size gives activations more weight)"
        else:
            pct = math.ceil(floor * 100 / peak)
            hint = f"the smallest budget that fits is {format_bytes(floor)}: try --budget {pct}% or more, or --budget floor"
        raise UsageError(f"{e}; {hint}") from e


def _planner_options(args) -> dict[str, Any]:
    """--option KEY=VALUE pairs, with --time-limit as the exact planners' time_limit_s."""
    options = _options(args.option)
    if getattr(args, "time_limit", None) is not None:
        options["time_limit_s"] = args.time_limit
    return options


def _options_help() -> str:
    """Each registered planner's option names, for --help (defaults: `acopt solvers`)."""
    try:
        from acopt.planning import planners

        listed = "; ".join(f"{name}: {', '.join(_option_fields(spec))}" for name, spec in planners().items())
    except Exception as e:  # noqa: BLE001 - a broken plugin must not break --help
        listed = f"(cannot list them: {e})"
    return f"{listed.replace('%', '%%')} (defaults: `acopt solvers`)"


def _option_fields(spec) -> dict[str, Any]:
    """A planner's options and their defaults (its options dataclass)."""
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(spec.options_type)}


def _prefix(args) -> str:
    """Output file stem: model, batch size and any --model-arg (seq_len=128 -> _seq_len128)."""
    extra = "".join(f"_{k}{_model_label(str(v))}" for k, v in sorted(_options(args.model_arg).items()))
    if getattr(args, "micro_batches", 1) > 1:
        extra += f"_mb{args.micro_batches}"
    if getattr(args, "amp", None):
        extra += f"_{args.amp}"
    return f"{_model_label(args.model)}_bs{args.batch_size}{extra}"


def _without_batch(stem: str, prof) -> str:
    """A file stem less its ``_bs{N}`` (the decisions file's name has it first)."""
    return stem.replace(f"_bs{prof.meta.batch_size}", "", 1)


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
    _plot(plot_timelines, prof, {}, out / f"{prefix}_timeline.png")
    from acopt.schedule import MemoryModel
    from acopt.units import format_bytes

    table = Table(title=f"profile of {args.model}, batch {args.batch_size} ({'fake, estimated times' if args.fake else prof.meta.device})")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("nodes", str(len(prof.nodes)))
    table.add_row("activations (recomputable)", f"{len(prof.activations)} ({len(MemoryModel(prof).candidates)})")
    table.add_row("peak", format_bytes(prof.peak_bytes))
    table.add_row("floor (all recomputable recomputed)", format_bytes(acopt.floor(prof)))
    table.add_row("step time" + (" (estimated)" if args.fake else ""), f"{prof.total_time_s * 1e3:.1f} ms")
    table.add_row("trace + profile time", f"{time.perf_counter() - t0:.1f} s (trace {t_trace:.1f} s)")
    console.print(table)
    console.print(f"wrote {out / (prefix + '.profile.json')} and CSVs/PNG with prefix {prefix}")
    return 0


def cmd_plan(args) -> int:
    import acopt
    from acopt.plan_outputs import plot_timelines, write_decisions_csv
    from acopt.progress import working

    prof = _load_profile(args.profile)
    with working(f"planning with {args.solver}"):
        plan = _plan(prof, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sim = acopt.simulate(prof, plan)
    stem = Path(args.profile).name.removesuffix(".gz").removesuffix(".json").removesuffix(".profile")
    plan.to_json(out / f"{stem}.{args.solver}.plan.json")
    decisions = write_decisions_csv(prof, plan, out, label=_without_batch(stem, prof))
    _plot(plot_timelines, prof, {f"{args.solver} ({len(plan.recompute)} recomputed)": plan}, out / f"{stem}.{args.solver}_timeline.png")
    console.print(_plan_table(prof, {args.solver: plan}))
    _print_modules(prof, plan)
    console.print(f"peak sits at {sim.peak_node} ({sim.peak_region.value}); wrote {decisions}")
    return 0


def _plan_table(prof, plans: dict[str, Any]) -> Table:
    import acopt
    from acopt.planning import no_recompute_peak
    from acopt.units import format_bytes

    table = Table(title=f"plans (no-recompute peak {format_bytes(no_recompute_peak(prof))}, floor {format_bytes(acopt.floor(prof))})")
    for col in ("solver", "status", "budget", "predicted peak", "recomputed", "recompute time", "solve time"):
        table.add_column(col, justify="right")
    for name, plan in plans.items():
        sim = acopt.simulate(prof, plan)
        table.add_row(
            name, plan.status.value, format_bytes(plan.budget_bytes), format_bytes(sim.peak_bytes),
            str(len(plan.recompute)), f"{sim.recompute_time_s * 1e3:.2f} ms", f"{plan.solve_time_s:.2f} s",
        )  # fmt: skip
    return table


def _plot(fn, *args) -> None:
    """Write a plot, or say once how to get plots (matplotlib is the optional ``plots`` extra)."""
    from acopt import plots

    if plots.available():
        fn(*args)
    elif not getattr(_plot, "said", False):
        _plot.said = True
        print(f"acopt: no PNG plots without matplotlib: {plots.INSTALL}", file=sys.stderr)


def _print_modules(prof, plan, top: int = 10) -> None:
    """The recomputed activations by the module that made them (nothing for profiles without module names)."""
    from acopt.plan_outputs import recompute_by_module
    from acopt.units import format_bytes

    if not plan.recompute or not any(a.module for a in prof.activations):
        return
    frame = recompute_by_module(prof, plan)
    table = Table(title=f"recomputed, by module ({len(frame)} modules{f', top {top}' if len(frame) > top else ''})")
    for col in ("module", "activations", "bytes", "recompute time"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for row in frame.head(top).itertuples():
        table.add_row(row.module or "(outside any submodule)", str(row.recomputed),
                      format_bytes(row.size_bytes), f"{row.block_time_s * 1e3:.2f} ms")  # fmt: skip
    console.print(table)


def cmd_sweep(args) -> int:
    import acopt
    from acopt.plan_outputs import plot_sweep, sweep
    from acopt.progress import working
    from acopt.units import format_bytes

    prof = _load_profile(args.profile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = acopt.floor(prof), prof.peak_bytes
    budgets = [int(lo + (hi - lo) * i / (args.points - 1)) for i in range(args.points)]
    with working(f"sweeping {args.points} budgets with {args.solver}"):
        frame = sweep(prof, solver=args.solver, budgets=budgets, **_planner_options(args))
    stem = Path(args.profile).name.removesuffix(".gz").removesuffix(".json").removesuffix(".profile")
    frame.to_csv(out / f"{stem}.{args.solver}_sweep.csv", index=False)
    _plot(plot_sweep, frame, out / f"{stem}.{args.solver}_sweep.png")
    console.print(frame.to_string(index=False))
    console.print(f"floor {format_bytes(lo)} ({lo} bytes), no-recompute peak {format_bytes(hi)} ({hi} bytes)")
    return 0


def cmd_run(args) -> int:
    """The main job: trace, profile, plan, rewrite, check, measure, report."""
    import torch

    import acopt
    from acopt.exports import write_profile_csvs
    from acopt.plan_outputs import plot_timelines, write_decisions_csv
    from acopt.profiler import allocator_peak_bytes
    from acopt.progress import working
    from acopt.units import format_bytes

    if args.backend == "inductor":
        from acopt.inductor_cli import run_inductor

        return run_inductor(args, console, _build, _options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    w = _build(args)
    with console.status("tracing"):
        traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch, warmup=1, iterations=args.iterations, model_name=args.model, progress=True)
    if getattr(args, "plan", None):  # a saved plan: no solving (its graph must be this step's)
        from acopt.plan_cache import adopt_plan

        plan = adopt_plan(args.plan, prof)
    else:
        with working(f"planning with {args.solver}"):
            plan = _plan(prof, args)
    sim = acopt.simulate(prof, plan)
    rewritten = acopt.rewrite(traced, plan, profile=prof)
    prefix = _prefix(args)
    prof.to_json(out / f"{prefix}.profile.json")
    plan.to_json(out / f"{prefix}.{args.solver}.plan.json")
    write_profile_csvs(prof, out, prefix)
    write_decisions_csv(prof, plan, out, label=_without_batch(prefix, prof))
    _plot(plot_timelines, prof, {f"{args.solver}": plan}, out / f"{prefix}_timeline.png")
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
    loop = (f", {args.micro_batches} micro-batches" if args.micro_batches > 1 else "") + (f", autocast {args.amp}" if args.amp else "")
    table = Table(title=f"acopt run {args.model} (batch {args.batch_size}{loop}, {prof.meta.device}, budget {args.budget})")
    table.add_column("")
    table.add_column("no recomputation", justify="right")
    table.add_column(f"acopt {args.solver}", justify="right")
    table.add_row("peak, simulated", format_bytes(prof.peak_bytes), format_bytes(sim.peak_bytes))
    table.add_row("peak, measured (storage accounting)", format_bytes(prof.peak_bytes), format_bytes(measured.peak_bytes))
    table.add_row("peak, allocator", format_bytes(alloc_before), format_bytes(alloc_after))
    table.add_row("floor (lowest reachable peak, simulated)", "", format_bytes(acopt.floor(prof)))
    table.add_row(f"step time (median of {args.timing_steps})", f"{t_before * 1e3:.2f} ms", f"{t_after * 1e3:.2f} ms ({t_after / t_before - 1:+.1%})")
    table.add_row("recompute time (profiled)", "0", f"{sim.recompute_time_s * 1e3:.2f} ms")
    table.add_row("recomputed activations", f"0 / {len(prof.activations)}", f"{len(plan.recompute)} / {len(prof.activations)}")
    table.add_row("solver, status", "", f"{plan.solver}, {plan.status.value} ({plan.solve_time_s:.2f} s)")
    table.add_row("bitwise equal over %d steps" % args.steps, "", "yes" if same else "NO")
    console.print(table)
    _print_modules(prof, plan)
    console.print(f"peak now sits at {sim.peak_node} ({sim.peak_region.value}); files in {out}/ ({time.perf_counter() - t0:.0f} s)")
    if not same or measured.peak_bytes != sim.peak_bytes:
        console.print("check failed: the rewritten step differs from the plan or the original", style="red")
        return 1
    return 0


# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="acopt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    # Each subcommand takes --debug too; SUPPRESS keeps a top-level --debug from being overwritten.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, **kw):
        sp = sub.add_parser(name, parents=[common], allow_abbrev=False, **kw)
        sp.set_defaults(parser=sp)
        return sp

    def model_args(sp, batch_default):
        sp.add_argument("model", help="built-in model (see `acopt models`) or package.module:factory")
        sp.add_argument("--batch-size", type=_positive_int, default=batch_default, help=f"(default {batch_default})")
        sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--micro-batches", type=_positive_int, default=1, metavar="K",
                        help="train each step as K micro-batches of batch-size/K (gradient accumulation; default 1)")
        sp.add_argument("--amp", choices=["bf16", "fp16"], help="forward and loss under torch.autocast in this dtype")
        sp.add_argument("--model-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="extra model factory argument, e.g. seq_len=128 (repeatable)")  # fmt: skip

    sp = add("profile", help="trace and profile a model's training step")
    model_args(sp, 8)
    sp.add_argument("--fake", action="store_true", help="fake tensors on the meta device: exact memory, estimated times")
    sp.add_argument("--warmup", type=_non_negative_int, default=2)
    sp.add_argument("--iterations", type=_positive_int, default=3)
    sp.add_argument("--out", default="out")
    sp.set_defaults(fn=cmd_profile)

    def plan_args(sp):
        sp.add_argument("--solver", default="greedy", help="a registered planner (see `acopt solvers`; default greedy)")
        sp.add_argument("--time-limit", type=_positive_float, metavar="SECONDS",
                        help="wall-clock limit of an exact solve (ilp, cpsat; default 60): the best plan found by "
                             "then is returned, status time_limit")  # fmt: skip
        sp.add_argument("--option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="planner option (repeatable): " + _options_help())  # fmt: skip
        sp.add_argument("--out", default="out")

    budget_help = 'bytes or a size ("6GiB"); a share of the no-recompute peak ("70%%" or 0.7); or of the way from the floor to it ("floor+50%%")'
    sp = add("plan", help="choose activations to recompute for a budget")
    sp.add_argument("profile", help="a .profile.json written by `acopt profile`")
    sp.add_argument("--budget", type=_budget, required=True, help=budget_help)
    plan_args(sp)
    sp.set_defaults(fn=cmd_plan)

    sp = add("sweep", help="peak vs recompute time over budgets from the floor to the peak")
    sp.add_argument("profile", help="a .profile.json written by `acopt profile`")
    sp.add_argument("--points", type=_int_at_least(2, "at least 2 (the floor and the peak)"), default=9,
                    help="budgets, evenly spaced from the floor to the peak (default 9)")  # fmt: skip
    plan_args(sp)
    sp.set_defaults(fn=cmd_sweep)

    sp = add("run", help="the main job: plan, rewrite, check and measure a model's step")
    model_args(sp, 32)
    sp.add_argument("--budget", type=_budget, default="70%", help=budget_help + " (default 70%%)")
    sp.add_argument("--steps", type=_positive_int, default=3, help="steps compared bitwise")
    sp.add_argument("--timing-steps", type=_positive_int, default=10, help="steps timed, alternating plain and rewritten")
    sp.add_argument("--iterations", type=_positive_int, default=3)
    sp.add_argument("--plan", metavar="FILE", default=None,
                    help="run a saved plan (*.plan.json) instead of solving; it must be this step's")  # fmt: skip
    sp.add_argument("--backend", choices=["eager", "inductor"], default="eager",
                    help="inductor: run the planned step with compiled kernels, checked against eager PyTorch")  # fmt: skip
    plan_args(sp)
    sp.set_defaults(fn=cmd_run)

    sp = add("fit", help="will it fit? peak, floor and largest batch on a GPU, from a config alone (fake tensors)")
    _fit_module().add_fit_arguments(sp)
    sp.set_defaults(fn=cmd_fit)

    sp = add("models", help="list the built-in models")
    sp.set_defaults(fn=lambda a: print("\n".join(__import__("acopt.models", fromlist=["names"]).names())) or 0)

    sp = add("solvers", help="list the registered planners")
    sp.set_defaults(fn=cmd_solvers)

    sp = add("compare", help="compare acopt's and PyTorch's solvers on saved profiles (docs/solvers.md)")
    from acopt.compare import add_compare_arguments

    add_compare_arguments(sp)
    sp.set_defaults(fn=cmd_compare)

    sub.add_parser("bench", add_help=False, help="benchmark harness: memory, time, numerics vs baselines (acopt bench --help)")
    # main() hands `acopt bench ...` to the harness's own parser before this one sees it.
    return p


# ---- checks after parsing: arguments that need a file, a planner or a model to judge ----
def check_args(args) -> None:
    """Raise :class:`UsageError` naming the argument, before any slow work."""
    parser = getattr(args, "parser", None)

    def fail(message: str):
        raise UsageError(message, parser)

    if isinstance(getattr(args, "plan", None), str) and not Path(args.plan).is_file():
        fail(f"argument --plan: no such file: {args.plan!r}")
    if getattr(args, "plan", None) and getattr(args, "backend", "eager") == "inductor":
        fail("argument --plan: a saved plan runs on the eager backend; --backend inductor chooses its plan by "
             "measuring the compiled step")  # fmt: skip
    for path in [args.profile] if isinstance(getattr(args, "profile", None), str) else []:
        if not Path(path).is_file():
            fail(f"argument profile: {'not a file' if Path(path).exists() else 'no such file'}: {path!r}")
    if args.command == "compare":
        missing = [p for p in getattr(args, "profiles", []) if not Path(p).is_file()]
        if missing:
            fail(f"argument profiles: no such profile file: {', '.join(missing)}")
    if hasattr(args, "solver"):
        from acopt.planning import PlannerUnavailable, get_planner, make_options

        try:
            spec = get_planner(args.solver)
        except (PlannerUnavailable, ValueError) as e:
            fail(f"argument --solver: {e}")
        if getattr(args, "time_limit", None) is not None and "time_limit_s" not in _option_fields(spec):
            fail(f"argument --time-limit: {spec.name} has no time limit (the exact planners have: see `acopt solvers`)")
        try:
            make_options(spec, _planner_options(args))
        except (TypeError, ValueError) as e:
            fail(f"argument --option: {e} ({spec.name}'s options: see `acopt solvers`)")
    if hasattr(args, "model"):
        _check_model(args, fail)
        if args.device == "cuda" and not getattr(args, "fake", False):
            import torch

            if not torch.cuda.is_available():
                fail(f"argument --device: cuda is not available ({_no_cuda_reason()})")


def _no_cuda_reason() -> str:
    import torch

    why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
    return f"{why}; torch {torch.__version__}"


def _check_model(args, fail) -> None:
    """The model exists and its factory takes the --model-arg names (values are the factory's to judge)."""
    from acopt import models

    if ":" in args.model:
        try:
            factory = models._load_factory(args.model)
        except ValueError as e:
            fail(f"argument model: {e}")
    else:
        factory = models.MODELS.get(args.model)
        if factory is None:
            known = ", ".join(models.names())
            fail(f"argument model: unknown model {args.model!r}; built-ins: {known} (or package.module:factory)")
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(batch_size=args.batch_size, device=args.device, seed=args.seed, **_options(args.model_arg))
    except TypeError as e:
        own = {"batch_size", "device", "seed"}
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        takes = [n for n, prm in sig.parameters.items() if n not in own and prm.kind in kinds]
        fail(f"argument --model-arg: {e} ({args.model} takes: {', '.join(takes) or 'nothing'})")
    for key, value in _options(args.model_arg).items():
        prm = sig.parameters.get(key)
        default = prm.default if prm is not None else None
        if default is None or default is prm.empty:
            continue
        # The default's type says what the factory expects: 64 takes an int, 0.1 an int or float.
        ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
        if ok is not None and (not isinstance(value, ok) or (isinstance(value, bool) and type(default) is not bool)):
            kind = {bool: "true or false", int: "an int", float: "a number", str: "a string"}[type(default)]
            fail(f"argument --model-arg: {key}={value!r} should be {kind}, like {key}={default!r}")


def _fit_module():
    import acopt.fit

    return acopt.fit


def cmd_fit(args) -> int:
    """``acopt fit``: the whole step's peak, floor and largest batch on a named GPU (acopt.fit)."""
    fit = _fit_module()
    try:
        return fit.run_cli(args, console)
    except fit.FitInputError as e:  # its checks of the arguments (model, config keys, sizes), before any work
        raise UsageError(str(e), getattr(args, "parser", None)) from e


def cmd_solvers(args) -> int:
    """Each registered planner: kind, what it needs, what it does, and its options (--option KEY=VALUE)."""
    from acopt.planning import planners

    for name, spec in planners().items():
        kind = "exact" if spec.exact else "heuristic"
        needs = ", ".join(spec.requires) or "-"
        print(f"{name:10s} {kind:9s} needs: {needs}")
        if spec.description:
            print(f"    {spec.description}")
        options = " ".join(f"{k}={v!r}" for k, v in _option_fields(spec).items())
        print(f"    options: {options or '-'}" + ("  (--time-limit sets time_limit_s)" if "time_limit_s" in options else ""))
    return 0


def cmd_compare(args) -> int:
    """``acopt compare ...`` (acopt/compare.py): every plan simulated, CSV/markdown/PNG."""
    from acopt import compare
    from acopt.progress import working

    try:
        with working("comparing"):
            return compare.cmd_run(args)
    except ValueError as e:  # compare's own checks of its arguments (budgets, solvers, the corpus)
        raise UsageError(str(e)) from e


def cmd_bench(argv: list[str]) -> int:
    """``acopt bench ...``: the benchmark harness (acopt/bench.py)."""
    from acopt import bench as harness

    # The harness parses its own arguments; check the device first, as the other commands do.
    args, _ = harness.build_parser().parse_known_args(argv)  # --help and argparse errors exit here, as in the harness
    device = str(getattr(args, "device", "cpu"))
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"argument --device: {device} is not available ({_no_cuda_reason()})")
    return harness.main(argv)


def _user_error(e: BaseException) -> str | None:
    """The one-line message for an error that is the user's to fix; None for anything else (a bug)."""
    from acopt.planning import InfeasibleBudget, PlannerUnavailable
    from acopt.schedule import InvalidPlan

    if isinstance(e, (UsageError, InfeasibleBudget, PlannerUnavailable)):
        return str(e)
    if isinstance(e, InvalidPlan):
        return f"invalid plan: {e}"
    unsupported = tuple(  # only where already imported: acopt.tracer imports torch
        getattr(sys.modules.get(m), "UnsupportedStep", None) for m in ("acopt.errors", "acopt.tracer")
    )
    if any(isinstance(t, type) and isinstance(e, t) for t in unsupported):
        return f"unsupported training step: {e}"
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
    return None


def _exit_status(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)  # sys.exit("message"), as the interpreter would print it
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (a user error is one line on stderr, status 2).

    Errors that are the user's to fix (bad arguments, a missing file, a budget
    below the floor, a step acopt cannot trace, a missing optional planner) are
    reported as ``acopt: error: ...`` without a traceback; anything else is a
    bug and propagates with its traceback. ``--debug`` shows every traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = argv[:1] == ["--debug"]
    try:
        if argv[int(debug) : int(debug) + 1] == ["bench"]:  # all its options belong to the harness's own parser
            return cmd_bench(argv[int(debug) + 1 :])
        args = build_parser().parse_args(argv)
        debug = args.debug
        check_args(args)
        return int(args.fn(args) or 0)
    except SystemExit as e:  # argparse's own errors (status 2, usage on stderr) and --help (0)
        return _exit_status(e)
    except KeyboardInterrupt:
        if debug:
            raise
        print("acopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = None if debug else _user_error(e)
        if message is None:
            raise
        parser = getattr(e, "parser", None)
        if parser is not None:
            parser.print_usage(sys.stderr)
        print(f"{parser.prog if parser is not None else 'acopt'}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
