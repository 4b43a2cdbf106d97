"""How the exact planners scale: solve time, status and gap on whole-step profiles.

For each profile and each budget 25/50/75% of the way from the floor to the
no-recompute peak, run the greedy and each exact planner (default options,
``--time-limit`` per solve) and print one row per solve::

    python benchmarks/solver_scaling.py --model resnet152 --model bert-base
    python benchmarks/solver_scaling.py --profile benchmarks/profiles/resnet152_bs8.profile.json.gz
    python benchmarks/solver_scaling.py --synthetic 400 --synthetic 1600

``--model`` traces the built-in workload (acopt.models) and profiles it with
fake tensors (exact memory, estimated times; needs torch, and transformers for
resnet152 / bert-base); ``--cache DIR`` keeps those profiles. ``--synthetic L``
is a torch-free ResNet-like chain of L layers (conv -> norm -> relu, a residual
add every third layer, mirrored backward, SGD).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import acopt  # noqa: E402
from acopt.planning import floor, no_recompute_peak  # noqa: E402
from acopt.records import NodeRecord, Profile, ProfileMeta, Region, Role, StorageRecord  # noqa: E402

F, B, O = Region.FORWARD, Region.BACKWARD, Region.OPTIMIZER


def synthetic(layers: int, *, batch_bytes: int = 1 << 20, seed: int = 0) -> Profile:
    """A ResNet-like whole step of ``layers`` layers, torch-free.

    Forward layer i: ``conv{i}`` (reads the previous output and w{i}),
    ``norm{i}`` (reads conv{i}), ``relu{i}``; every third layer adds the
    output of three layers back before the relu. Sizes and times vary by stage
    (four stages, halving the bytes and doubling the time per element).
    Backward mirrors it: each layer's gradient nodes read the saved conv, norm
    and relu outputs; gradients of the weights are read by the SGD updates.
    """
    import random

    rng = random.Random(seed)
    nodes: list[NodeRecord] = []
    storages: list[StorageRecord] = []

    def node(name, region, inputs, nbytes=None, time_s=0.0, op="op", role=Role.OTHER, **kw):
        alloc = () if nbytes is None else (name,)
        nodes.append(
            NodeRecord(
                name=name, op=op, region=region, inputs=tuple(dict.fromkeys(inputs)),
                storages=kw.pop("storages", alloc), allocates=alloc, time_s=time_s, **kw,
            )
        )  # fmt: skip
        if nbytes is not None:
            storages.append(StorageRecord(name=name, bytes=nbytes, node=name, role=role))

    node("x", F, (), batch_bytes, op="placeholder", role=Role.INPUT)
    for i in range(layers):
        node(f"w{i}", F, (), 4096 * (1 + i % 7), op="placeholder", role=Role.PARAMETER)
    h = "x"
    outs = []
    for i in range(layers):
        stage = min(3, 4 * i // max(1, layers))
        act = batch_bytes >> stage
        t = 1e-4 * (1 + stage) * rng.uniform(0.8, 1.2)
        node(f"conv{i}", F, (h, f"w{i}"), act, 4 * t)
        node(f"norm{i}", F, (f"conv{i}",), act, t)
        pre = f"norm{i}"
        if i % 3 == 2 and i >= 3:
            node(f"add{i}", F, (pre, outs[i - 3]), act, t / 2)
            pre = f"add{i}"
        node(f"relu{i}", F, (pre,), act, t / 2)
        h = f"relu{i}"
        outs.append(h)
    node("loss", F, (h,), 4, 1e-5)
    g = "loss"
    for i in reversed(range(layers)):
        prev = "x" if i == 0 else outs[i - 1]
        node(f"grelu{i}", B, (g, f"relu{i}"), batch_bytes >> min(3, 4 * i // max(1, layers)), 1e-4)
        node(f"gnorm{i}", B, (f"grelu{i}", f"conv{i}", f"norm{i}"), batch_bytes >> min(3, 4 * i // max(1, layers)), 2e-4)
        node(f"gw{i}", B, (f"gnorm{i}", prev), 4096 * (1 + i % 7), 4e-4, role=Role.GRADIENT)
        node(f"gx{i}", B, (f"gnorm{i}", f"w{i}"), batch_bytes >> min(3, 4 * i // max(1, layers)), 4e-4)
        g = f"gx{i}"
    for i in range(layers):
        node(f"step{i}", O, (f"w{i}", f"gw{i}"), None, 1e-5, storages=(f"w{i}",), mutates=(f"w{i}",), recomputable=False)
    node("output", O, ("loss",), None, op="output", recomputable=False)
    return Profile(nodes=tuple(nodes), storages=tuple(storages), meta=ProfileMeta(model=f"synthetic{layers}"))


def model_profile(name: str, batch_size: int, cache: Path | None) -> Profile:
    path = None if cache is None else cache / f"{name}_bs{batch_size}.fake.profile.json"
    if path is not None and path.exists():
        return Profile.from_json(path)
    from acopt import models

    w = models.build(name, batch_size=batch_size, seed=0)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch, fake=True, model_name=name)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.to_json(path)
    return prof


_SIZE = re.compile(
    r"(?P<iters>\d+) solve\(s\), (?P<lazy>\d+) lazy block row\(s\), (?P<cuts>\d+) cut\(s\), "
    r"(?P<pruned>\d+) chain member\(s\) pruned by cost, (?P<rebuilds>\d+) rebuild\(s\), "
    r"(?P<columns>\d+) chain member\(s\) on demand; build (?P<build>[0-9.]+) s, solve (?P<solve>[0-9.]+) s"
)

COLUMNS = (
    "model", "profile", "budget", "budget_bytes", "solver", "status", "cost_s", "greedy_s", "gap", "bound_s",
    "rows", "vars", "build_s", "solve_s", "wall_s", "solves", "rebuilds", "lazy_rows", "cuts", "load1",
)  # fmt: skip


def load_profile(path: str | Path) -> Profile:
    """A saved profile, plain or gzip-compressed JSON."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return Profile.from_dict(json.loads(raw))


def _effort(plan) -> dict:
    """Solves, rebuilds, lazy rows, build and solve time from an exact plan's size note."""
    for note in plan.stats.notes if plan.stats else ():
        m = _SIZE.search(note)
        if m:
            d = m.groupdict()
            return {k: (float(v) if k in ("build", "solve") else int(v)) for k, v in d.items()}
    return {}


def run(profiles, *, fractions, solvers, time_limit: float, options: dict, out_csv: Path | None = None) -> list[dict]:
    """Solve every profile at every budget with the greedy and each planner; print and return one row each."""
    header = (
        f"{'profile':<22} {'budget':>6} {'solver':<7} {'status':<10} {'cost s':>10} {'greedy s':>10} "
        f"{'gap':>7} {'bound s':>10} {'rows':>6} {'vars':>6} {'build':>6} {'solve':>6} {'wall':>6} "
        f"{'solves':>6} {'rebld':>5} {'lazy':>5} {'load':>5}"
    )
    print(header)
    print("-" * len(header), flush=True)
    records = []
    writer = None
    fh = None
    if out_csv is not None:
        fh = open(out_csv, "w", newline="")
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
    try:
        for label, source, prof in profiles:
            lo, hi = floor(prof), no_recompute_peak(prof)
            for frac in fractions:
                budget = int(lo + frac * (hi - lo))
                t0 = time.perf_counter()
                greedy = acopt.plan(prof, budget=budget, solver="greedy")
                rows = [("greedy", greedy, time.perf_counter() - t0)]
                for solver in solvers:
                    t0 = time.perf_counter()
                    plan = acopt.plan(prof, budget=budget, solver=solver, time_limit_s=time_limit, **options)
                    rows.append((solver, plan, time.perf_counter() - t0))
                for solver, plan, took in rows:
                    st = plan.stats
                    eff = _effort(plan)
                    rec = dict(
                        model=label, profile=source, budget=f"{round(100 * frac)}%", budget_bytes=budget,
                        solver=solver, status=plan.status.value, cost_s=plan.recompute_time_s,
                        greedy_s=greedy.recompute_time_s, gap=plan.gap, bound_s=plan.bound,
                        rows=st.constraints if st else None, vars=st.variables if st else None,
                        build_s=eff.get("build"), solve_s=eff.get("solve"), wall_s=took, solves=eff.get("iters"),
                        rebuilds=eff.get("rebuilds"), lazy_rows=eff.get("lazy"), cuts=eff.get("cuts"),
                        load1=os.getloadavg()[0],
                    )  # fmt: skip
                    records.append(rec)
                    if writer is not None:
                        writer.writerow(rec)
                        fh.flush()

                    def f(v, fmt):
                        return "" if v is None else format(v, fmt)

                    print(
                        f"{label:<22} {rec['budget']:>6} {solver:<7} {rec['status']:<10} {rec['cost_s']:>10.6f} "
                        f"{rec['greedy_s']:>10.6f} {f(plan.gap, '.2%'):>7} "
                        f"{f(plan.bound, '.6f'):>10} {f(rec['rows'], 'd'):>6} {f(rec['vars'], 'd'):>6} "
                        f"{f(rec['build_s'], '.1f'):>6} {f(rec['solve_s'], '.1f'):>6} {took:>6.1f} "
                        f"{f(rec['solves'], 'd'):>6} {f(rec['rebuilds'], 'd'):>5} {f(rec['lazy_rows'], 'd'):>5} "
                        f"{rec['load1']:>5.2f}",
                        flush=True,
                    )
    finally:
        if fh is not None:
            fh.close()
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], help="built-in workload, fake-profiled (repeatable)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--profile", action="append", default=[], help="a saved profile, .json or .json.gz (repeatable)")
    ap.add_argument("--synthetic", action="append", type=int, default=[], help="layers of a synthetic chain")
    ap.add_argument("--cache", type=Path, default=None, help="directory to keep --model profiles in")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="fractions floor -> peak")
    ap.add_argument("--solvers", nargs="+", default=["ilp", "cpsat"])
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=None, help="solver threads (default: the planners' own, 2)")
    ap.add_argument(
        "--chain-depth", default=None, help="solvers/model.py Note 10 chain_depth: an int, or 'all' (every member up front)"
    )
    ap.add_argument("--verbose", action="store_true", help="the lazy loop's builds and solves on stderr")
    ap.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV file")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)
    options: dict = {}
    if args.threads is not None:
        options["threads"] = args.threads
    if args.chain_depth is not None:
        options["chain_depth"] = None if args.chain_depth in ("all", "none", "None") else int(args.chain_depth)
    if args.verbose:
        options["verbose"] = True
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cpus, options {options or 'default'}")
    profiles = []
    for name in args.model:
        profiles.append((f"{name}/bs{args.batch_size}", f"fake ({name}, bs {args.batch_size})",
                         model_profile(name, args.batch_size, args.cache)))  # fmt: skip
    for path in args.profile:
        prof = load_profile(path)
        label = prof.meta.model or Path(path).stem
        if prof.meta.batch_size:
            label += f"/bs{prof.meta.batch_size}"
        profiles.append((label, Path(path).name, prof))
    for layers in args.synthetic:
        profiles.append((f"synthetic{layers}", "synthetic", synthetic(layers)))
    if not profiles:
        ap.error("give at least one --model, --profile or --synthetic")
    run(profiles, fractions=args.budgets, solvers=args.solvers, time_limit=args.time_limit, options=options,
        out_csv=args.csv)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
