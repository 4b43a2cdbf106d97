"""Peak memory and step time of the training loops people write, on a built-in model.

    python benchmarks/loops.py --model transformer --batch-size 64 --budget 60% --threads 1

Rows: one batch of b in fp32; k micro-batches of b/k (gradient accumulation
inside one step); the forward under bf16 autocast; both. For each: the
no-recompute peak (measured by the profiler's storage accounting, equal to
the simulator), the peak of acopt's plan at ``--budget`` (simulated and
measured), and the median step time of the plain traced step and the
rewritten one, timed in alternation, and how many picks are casts
(autocast's low-precision copies). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import acopt
from acopt import models
from acopt.units import format_bytes


def _time(step, batch) -> float:
    t = time.perf_counter()
    step(*batch)
    return time.perf_counter() - t


def _creator_op(prof, activation: str) -> str:
    return prof.node_by_name[prof.storage_by_name[activation].node].op


def row(model: str, batch_size: int, budget: str, micro_batches: int, amp: str | None, repeats: int) -> dict:
    w = models.build(model, batch_size=batch_size, seed=0).with_loop(micro_batches=micro_batches, amp=amp)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch, warmup=1, iterations=3)
    plan = acopt.plan(prof, budget=budget)
    sim = acopt.simulate(prof, plan)
    step = acopt.rewrite(traced, plan, profile=prof)
    measured = acopt.profile(step, *w.batch, warmup=0, iterations=1).peak_bytes
    _time(traced, w.batch), _time(step, w.batch)
    plain, planned = [], []
    for _ in range(repeats):
        plain.append(_time(traced, w.batch))
        planned.append(_time(step, w.batch))
    return {
        "loop": f"{micro_batches} x {batch_size // micro_batches}" + (f", {amp}" if amp else ", fp32"),
        "peak, no plan": format_bytes(prof.peak_bytes),
        f"peak, plan at {budget} (sim / measured)": f"{format_bytes(sim.peak_bytes)} / {format_bytes(measured)}",
        "step, no plan": f"{statistics.median(plain) * 1e3:.1f} ms",
        "step, plan": f"{statistics.median(planned) * 1e3:.1f} ms",
        "recomputed": f"{len(plan.recompute)} / {len(prof.activations)}",
        "of which casts": str(sum(1 for a in plan.recompute if _creator_op(prof, a) == "aten._to_copy.default")),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--model", default="transformer")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--budget", default="60%")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [
        row(args.model, args.batch_size, args.budget, k, amp, args.repeats)
        for k, amp in [(1, None), (args.micro_batches, None), (1, "bf16"), (args.micro_batches, "bf16")]
    ]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(r[k] for k in keys) + " |")


if __name__ == "__main__":
    main()
