"""Measured peak of acopt's compiled step with and without
``acopt.inductor.without_shape_only_reads`` (docs/memory-model.md, "Compiled
steps": an input a compiled graph never reads).

    python benchmarks/inductor_shape_only.py mlp 4096 100% 85% floor

Per budget: the greedy's plan, its simulated (eager model) peak, and the
compiled step's measured peak without and with the pass. Memory only: the
numbers do not depend on the machine's load.
"""

from __future__ import annotations

import sys

import torch

import acopt
from acopt import inductor, models
from acopt.planning import floor, plan
from acopt.profiler import profile
from acopt.rewriter import rewrite
from acopt.simulator import simulate


def main(name: str, batch_size: int, budgets: list[str]) -> None:
    torch.set_num_threads(1)
    w = getattr(models, name)(batch_size=batch_size)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = profile(traced, *w.batch)
    keep = inductor.without_shape_only_reads
    print("budget,recomputed,simulated_B,measured_without_pass_B,measured_with_pass_B")
    for budget in budgets:
        chosen = plan(prof, budget=floor(prof) if budget == "floor" else budget, solver="greedy")
        rewritten = rewrite(traced, chosen, profile=prof)
        measured = []
        for with_pass in (False, True):
            inductor.without_shape_only_reads = keep if with_pass else (lambda gm: gm)
            try:
                measured.append(inductor.measure_graph_peak(inductor.compile_inductor(rewritten), *w.batch))
            finally:
                inductor.without_shape_only_reads = keep
        sim = simulate(prof, chosen).peak_bytes
        print(f"{budget},{len(chosen.recompute)},{sim},{measured[0]},{measured[1]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] or ["100%", "floor"])
