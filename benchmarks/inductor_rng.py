"""Random ops inside the compiled graphs (acopt.inductor_rng) vs an eager graph cut at
each of them: compiled-segment count, measured peak and step time of acopt's
compiled step, the two variants built from the same plan and timed interleaved.

    PYTHONPATH=. python benchmarks/inductor_rng.py transformer 32 100% 70% 50%
    PYTHONPATH=. python benchmarks/inductor_rng.py gpt2 8 seq_len=128 vocab_size=8192 d_model=256 n_layers=4 n_heads=4 act50%

Arguments after the batch size: model arguments (``key=value``, integers) and
budgets (acopt's syntax, e.g. ``70%``, ``act50%``, or bytes).

Per budget: the greedy's plan (eager model, no margin), then per variant the number
of compiled graphs, of nodes run eagerly (the optimizer's included), the measured
peak (acopt.inductor.measure_graph_peak) and the median thread CPU time of a step
over ``ROUNDS`` alternating rounds; the last column is the time ratio in-graph /
cut. (Both variants draw eager PyTorch's masks: tests/test_inductor.py checks them.)
"""

from __future__ import annotations

import functools
import sys

import torch

import acopt
from acopt import models
from acopt.inductor import compile_inductor, measure_graph_peak, segments_of
from acopt.measure import time_interleaved

ROUNDS = 30


def _variants(rewritten):
    cut = compile_inductor(rewritten)
    cut.runner.segments = segments_of(rewritten.graph_module, compile_random=False)
    return {"cut": cut, "in-graph": compile_inductor(rewritten)}


def main(argv: list[str]) -> None:
    name, batch_size, *rest = argv
    model_args = {k: int(v) for k, v in (a.split("=") for a in rest if "=" in a)}
    budgets = [int(b) if b.isdigit() else b for b in rest if "=" not in b]
    torch.set_num_threads(1)
    w = models.build(name, batch_size=int(batch_size), device="cpu", seed=0, **model_args)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch)
    print(f"{name} batch {batch_size}: no-recompute peak {prof.peak_bytes} B, floor {acopt.floor(prof)} B")
    for budget in budgets:
        plan = acopt.plan(prof, budget=budget)
        rewritten = acopt.rewrite(traced, plan, profile=prof)
        steps = _variants(rewritten)
        for label, step in steps.items():
            peak = measure_graph_peak(step, *w.batch)  # compiles, then measures
            s = step.runner.summary()
            print(f"  {budget} (recompute {len(plan.recompute)}) {label}: {s['compiled_segments']} compiled graphs, "
                  f"{s['eager_nodes']} eager nodes, measured peak {peak} B", flush=True)  # fmt: skip
        med = time_interleaved({k: functools.partial(step, *w.batch) for k, step in steps.items()}, rounds=ROUNDS)
        print(f"  {budget}: step time (median thread CPU s) cut {med['cut']:.4f}, in-graph {med['in-graph']:.4f}, "
              f"ratio in-graph/cut {med['in-graph'] / med['cut']:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
