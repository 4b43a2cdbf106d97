"""How the exact planners scale: solve time, status and gap on whole-step profiles.

For each profile and each budget 25/50/75% of the way from the floor to the
no-recompute peak, run the greedy and each exact planner (default options,
``--time-limit`` per solve) and print one row per solve::

    python benchmarks/solver_scaling.py --model resnet152 --model bert-base
    python benchmarks/solver_scaling.py --profile out/resnet152_bs8.profile.json
    python benchmarks/solver_scaling.py --synthetic 400 --synthetic 1600

``--model`` traces the built-in workload (acopt.models) and profiles it with
fake tensors (exact memory, estimated times; needs torch, and transformers for
resnet152 / bert-base); ``--cache DIR`` keeps those profiles. ``--synthetic L``
is a torch-free ResNet-like chain of L layers (conv -> norm -> relu, a residual
add every third layer, mirrored backward, SGD).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import acopt
from acopt.planning import floor, no_recompute_peak
from acopt.records import NodeRecord, Profile, ProfileMeta, Region, Role, StorageRecord
from acopt.simulator import memory_model

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


def run(profiles: list[tuple[str, Profile]], *, fractions, solvers, time_limit: float) -> None:
    header = (
        f"{'profile':<16} {'nodes':>6} {'cands':>5} {'budget':>6} {'solver':<7} {'status':<10} "
        f"{'time s':>7} {'recompute s':>12} {'bound s':>10} {'gap':>7} {'vars':>7} {'rows':>7} {'vs greedy':>9}"
    )
    print(header)
    print("-" * len(header))
    for label, prof in profiles:
        lo, hi = floor(prof), no_recompute_peak(prof)
        n_cands = len(memory_model(prof).candidates)
        for frac in fractions:
            budget = int(lo + frac * (hi - lo))
            t0 = time.perf_counter()
            greedy = acopt.plan(prof, budget=budget, solver="greedy")
            rows = [("greedy", greedy, time.perf_counter() - t0)]
            for solver in solvers:
                t0 = time.perf_counter()
                plan = acopt.plan(prof, budget=budget, solver=solver, time_limit_s=time_limit)
                rows.append((solver, plan, time.perf_counter() - t0))
            for solver, plan, took in rows:
                st = plan.stats
                bound = "" if plan.bound is None else f"{plan.bound:.6f}"
                gap = "" if plan.gap is None else f"{100 * plan.gap:.2f}%"
                ratio = plan.recompute_time_s / greedy.recompute_time_s if greedy.recompute_time_s else 1.0
                print(
                    f"{label:<16} {len(prof.nodes):>6} {n_cands:>5} {int(100 * frac):>5}% {solver:<7} "
                    f"{plan.status.value:<10} {took:>7.1f} {plan.recompute_time_s:>12.6f} {bound:>10} {gap:>7} "
                    f"{(st.variables if st and st.variables else ''):>7} {(st.constraints if st and st.constraints else ''):>7} "
                    f"{ratio:>9.4f}",
                    flush=True,
                )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], help="built-in workload, fake-profiled (repeatable)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--profile", action="append", default=[], help="a saved profile JSON (repeatable)")
    ap.add_argument("--synthetic", action="append", type=int, default=[], help="layers of a synthetic chain")
    ap.add_argument("--cache", type=Path, default=None, help="directory to keep --model profiles in")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="fractions floor -> peak")
    ap.add_argument("--solvers", nargs="+", default=["ilp", "cpsat"])
    ap.add_argument("--time-limit", type=float, default=60.0)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)
    profiles = []
    for name in args.model:
        profiles.append((f"{name}/bs{args.batch_size}", model_profile(name, args.batch_size, args.cache)))
    for path in args.profile:
        prof = Profile.from_json(path)
        profiles.append((prof.meta.model or Path(path).stem, prof))
    for layers in args.synthetic:
        profiles.append((f"synthetic{layers}", synthetic(layers)))
    if not profiles:
        ap.error("give at least one --model, --profile or --synthetic")
    run(profiles, fractions=args.budgets, solvers=args.solvers, time_limit=args.time_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
