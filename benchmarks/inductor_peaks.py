"""Simulated (eager memory model) vs measured peak of acopt's compiled step, with and
without inductor's reordering passes (docs/memory-model.md, "Compiled steps").

    python benchmarks/inductor_peaks.py mlp 512 100% 95%
    python benchmarks/inductor_peaks.py transformer 32 100% 85% 70% 50%
    python benchmarks/inductor_peaks.py cnn 32 100% 90%

Per budget: the greedy's plan (eager model, no margin), the simulated peak, the
measured peak of the eager rewritten step, and the measured peak of the
compiled step with acopt's settings (both reorderings off) and with inductor's
defaults (both on).
"""

from __future__ import annotations

import functools
import sys

import torch

import acopt
from acopt import models
from acopt.inductor import _inductor_segment, compile_inductor, measure_graph_peak

VARIANTS = {
    "acopt (reorderings off)": {},
    "inductor defaults": {"reorder_for_locality": True, "reorder_for_peak_memory": True},
}


def main(argv: list[str]) -> None:
    name, batch_size, *budgets = argv
    torch.set_num_threads(1)
    w = models.build(name, batch_size=int(batch_size), device="cpu", seed=0)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch)
    print(f"{name} batch {batch_size}: no-recompute peak {prof.peak_bytes} B, floor {acopt.floor(prof)} B")
    for budget in budgets:
        plan = acopt.plan(prof, budget=budget)
        rewritten = acopt.rewrite(traced, plan, profile=prof)
        row = [f"{budget}: recompute {len(plan.recompute)}", f"simulated {acopt.simulate(prof, plan).peak_bytes}",
               f"eager measured {measure_graph_peak(rewritten, *w.batch)}"]  # fmt: skip
        for label, patches in VARIANTS.items():
            step = compile_inductor(rewritten, compile_segment=functools.partial(_inductor_segment, config_patches=patches))
            row.append(f"{label} {measure_graph_peak(step, *w.batch)}")
        print("  " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
