"""Per-rank peak memory and step time of the built-in transformer (acopt/models.py)
on 2 gloo ranks (CPU, 127.0.0.1), four ways:

* ``none``: eager ``DistributedDataParallel``;
* ``acopt``: ``acopt.compile(train_step, DDP(model), ...)`` at ``--budget``;
* ``sharded``: ``acopt.shard(model)`` run eagerly (ZeRO-3-style: every unit
  gathered in the forward, its gradient reduce-scattered);
* ``sharded+acopt``: the sharded model compiled by acopt at ``--budget``
  (the planner chooses per unit whether to keep or re-gather its weights).

``peak`` is the whole step's, from the allocator (benchmarks/memory.py:
torch.profiler allocation events on top of the live parameters, gradients,
optimizer state and batch; DDP's own bucket buffers are not counted). With
gloo it is an upper bound: a collective's last references are often dropped
on gloo's worker thread, whose frees the profiler does not see (docs/results.md,
"Distributed"). ``accounted`` is acopt's storage accounting of the rewritten
step run on copies (acopt.profile), ``sim`` the simulated peak.
``state`` is the rank's parameter + optimizer-state bytes; ``recomputed`` the
plan's recomputed activations of the recomputable ones, ``re-gathered`` of
those the units' gathered weights. ``first loss == none`` compares the first
step's loss with eager DDP's (same seed).

    python -m benchmarks.distributed --batch-size 32 --budget 70%
    python -m benchmarks.distributed --batch-size 8 --d-model 256 --budget floor --units block
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import acopt
from acopt import models
from acopt.units import format_bytes
from benchmarks.memory import measure_peak, state_tensors, time_steps

METHODS = ("none", "acopt", "sharded", "sharded+acopt")


def _state_bytes(model, optimizer) -> int:
    tensors = list(model.parameters()) + [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _budget(budget: str) -> str | int:
    """``floor``: first ask for 1 byte; the planner's InfeasibleBudget names the floor."""
    return 1 if budget == "floor" else budget


def _one(method: str, args, rank: int) -> dict:
    w = models.transformer(batch_size=args.batch_size, seed=0, n_layers=args.layers, d_model=args.d_model)
    batch = w.make_batch(rank + 1)  # each rank its own data
    model = w.model
    if method.startswith("sharded"):
        acopt.shard(model, units=(models.PreLNBlock,) if args.units == "block" else ())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        stepped = model
    else:
        optimizer = w.optimizer
        stepped = torch.nn.parallel.DistributedDataParallel(model)
    row: dict = {"method": method, "rank": rank, "sim": None, "accounted": None}
    start = time.perf_counter()
    if method.endswith("acopt"):
        try:
            compiled = acopt.compile(w.train_step, stepped, optimizer, *batch, budget=_budget(args.budget))
        except acopt.InfeasibleBudget as e:  # raised on every rank (rank 0 plans, the error is broadcast)
            if args.budget != "floor":
                return row | {"infeasible": f"budget below the floor {format_bytes(e.floor_bytes)}"}
            compiled = acopt.compile(w.train_step, stepped, optimizer, *batch, budget=e.floor_bytes)
        row["sim"] = compiled.report().peak_after_bytes
        row["accounted"] = acopt.profile(compiled.traced, *batch, warmup=0, iterations=1).peak_bytes
        gathers = [a.name for a in compiled.profile.activations if a.recomputable and a.name.startswith("all_gather")]
        row["regathered"] = f"{sum(g in compiled.plan.recompute for g in gathers)}/{len(gathers)}" if gathers else "-"
        row["recomputed"] = f"{len(compiled.plan.recompute)}/{sum(a.recomputable for a in compiled.profile.activations)}"

        def step():
            return compiled(*batch)
    else:

        def step():
            return w.train_step(stepped, optimizer, *batch)

    row["prepare_s"] = time.perf_counter() - start
    torch.manual_seed(100 + rank)
    row["first_loss"] = float(step())
    times = time_steps(step, device="cpu", warmup=1, iterations=args.iterations)
    row["step_s"] = statistics.median(times)
    row["peak"] = measure_peak(step, device="cpu", alive=lambda: state_tensors(model, optimizer, batch)).peak_bytes
    row["state"] = _state_bytes(model, optimizer)
    return row


def _rank_main(rank: int, world: int, args) -> None:
    rows = [_one(m, args, rank) for m in args.methods]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank:
        return
    none = {r["rank"]: r["first_loss"] for rows_ in gathered for r in rows_ if r["method"] == "none"}
    print(
        f"transformer (d_model {args.d_model}, {args.layers} layers), batch {args.batch_size} per rank, "
        f"{world} gloo ranks, budget {args.budget}, shard units: {args.units}, "
        f"{torch.get_num_threads()} thread(s) per rank"
    )
    header = (
        f"{'method':<14} {'rank':>4} {'peak':>10} {'accounted':>10} {'sim':>10} {'state':>10} {'step ms':>8} {'recomputed':>10} "
        f"{'re-gathered':>11} {'first loss == none':>18}"
    )
    print(header)
    for r in sorted((r for rows_ in gathered for r in rows_), key=lambda r: (METHODS.index(r["method"]), r["rank"])):
        if "infeasible" in r:
            print(f"{r['method']:<14} {r['rank']:>4} infeasible: {r['infeasible']}")
            continue
        sim = format_bytes(r["sim"]) if r["sim"] else "-"
        accounted = format_bytes(r["accounted"]) if r["accounted"] else "-"
        same = r["first_loss"] == none.get(r["rank"]) if none else "-"
        print(
            f"{r['method']:<14} {r['rank']:>4} {format_bytes(r['peak']):>10} {accounted:>10} {sim:>10} "
            f"{format_bytes(r['state']):>10} "
            f"{r['step_s'] * 1e3:>8.1f} {r.get('recomputed', '-'):>10} {r.get('regathered', '-'):>11} {same!s:>18}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--budget", default="70%", help='bytes, "70%%", or "floor" (the smallest plannable peak)')
    parser.add_argument(
        "--units", choices=("module", "block"), default="module",
        help="acopt.shard units: every module owning parameters, or each transformer block whole",
    )  # fmt: skip
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--timeout-s", type=float, default=600)
    args = parser.parse_args(argv)
    from tests import ranks

    ranks.run(_rank_main, args, timeout_s=args.timeout_s, group_timeout_s=120)


if __name__ == "__main__":
    main()
