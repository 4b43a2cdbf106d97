"""The planners on deep Llama-3-8B-shaped fake profiles near the floor.

    python -m benchmarks.greedy_deep_llama --layers 4 8 16 32 --budget floor+10%
    python -m benchmarks.greedy_deep_llama --layers 32 --budget floor+1% floor+5% 80GiB

For each layer count: a Llama-3-8B-shaped causal LM (hidden 4096, 8 KV heads,
vocabulary 128 256) built on the meta device in bf16 with foreach AdamW,
batch 4 x 4096 tokens, SDPA traced as the flash op (as ``acopt fit`` does),
fake-profiled; its floor computed (timed apart: ``acopt.plan`` computes it
once per profile); then ``acopt.plan`` with ``mu-two`` and ``greedy`` timed at
the budget, wall clock and this thread's CPU time (the steadier on a shared
machine). Memory is exact (fake tensors); the planners' times are measured;
in brackets the picks and the plan's recompute time (estimated: roofline).
The greedy's rule-4 chains grow with the depth; docs/memory-model.md, "The
greedy", has the numbers and what made them grow faster before.
"""

from __future__ import annotations

import argparse
import time

import acopt
from acopt import hf_workloads
from acopt.fit import fused_attention


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.greedy_deep_llama", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--budget", nargs="+", default=["floor+10%"], help="one or more budgets (a row each)")
    p.add_argument("--planners", nargs="+", default=["mu-two", "greedy"])
    args = p.parse_args(argv)
    print(
        f"{'layers':>6} {'nodes':>6} {'candidates':>10} {'floor':>7} {'budget':>10} "
        + " ".join(f"{s:>44}" for s in args.planners)
    )
    for layers in args.layers:
        w = hf_workloads.build("llama3-8b", batch_size=4, seq_len=4096, config={"num_hidden_layers": layers},
                               dtype="bf16", foreach=True)  # fmt: skip
        with fused_attention():
            traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
            prof = acopt.profile(traced, *w.batch, fake=True, model_name=f"llama3-8b-{layers}l")
        t0 = time.perf_counter()
        acopt.floor(prof)
        floor_s = time.perf_counter() - t0
        for budget in args.budget:
            cells = []
            for solver in args.planners:
                t0, c0 = time.perf_counter(), time.thread_time()
                plan = acopt.plan(prof, budget=budget, solver=solver)
                took, cpu = time.perf_counter() - t0, time.thread_time() - c0
                cells.append(
                    f"{took:6.2f} s, cpu {cpu:6.2f} s ({len(plan.recompute):3d} picked, +{plan.recompute_time_s:.0f} s)"
                )
            print(f"{layers:>6} {len(prof.nodes):>6} {len(prof.activations):>10} {floor_s:5.2f} s {budget:>10} "
                  + " ".join(f"{c:>44}" for c in cells), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
