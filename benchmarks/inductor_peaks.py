"""Simulated (eager memory model) vs measured peak of acopt's compiled step, with
acopt's segmentation and settings and with two things it turns off
(docs/memory-model.md, "Compiled steps").

    python benchmarks/inductor_peaks.py mlp 512 100% 95%
    python benchmarks/inductor_peaks.py transformer 32 100% 50% 40%
    python benchmarks/inductor_peaks.py cnn 32 90% floor

Per budget ("floor": the eager floor): the greedy's plan (eager model, no
margin), the simulated peak, the measured peak of the eager rewritten step, and
the measured peak of the compiled step:

* ``acopt``: the recompute blocks compiled inside the backward graphs around
  them, both of inductor's reorderings off (acopt's setting);
* ``blocks cut``: each recompute block ends its compiled graph
  (``cut_blocks=True``, what ``fit_compiled`` compiles again when a plan
  measures above the eager model);
* ``inductor reorderings on``: acopt's segments, inductor's default
  ``reorder_for_locality`` and ``reorder_for_peak_memory``.

Then the step time of ``blocks cut`` over ``acopt`` (medians of
alternating calls; the cost of the extra graph boundaries).
"""

from __future__ import annotations

import functools
import statistics
import sys

import torch

import acopt
from acopt import models
from acopt.inductor import _inductor_segment, compile_inductor, measure_graph_peak
from acopt.measure import time_paired

VARIANTS = {
    "acopt": (False, {}),
    "blocks cut": (True, {}),
    "inductor reorderings on": (False, {"reorder_for_locality": True, "reorder_for_peak_memory": True}),
}


def main(argv: list[str]) -> None:
    name, batch_size, *budgets = argv
    torch.set_num_threads(1)
    w = models.build(name, batch_size=int(batch_size), device="cpu", seed=0)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch)
    print(f"{name} batch {batch_size}: no-recompute peak {prof.peak_bytes} B, floor {acopt.floor(prof)} B")
    for budget in budgets:
        plan = acopt.plan(prof, budget=acopt.floor(prof) if budget == "floor" else budget)
        rewritten = acopt.rewrite(traced, plan, profile=prof)
        row = [f"{budget}: recompute {len(plan.recompute)}", f"simulated {acopt.simulate(prof, plan).peak_bytes}",
               f"eager measured {measure_graph_peak(rewritten, *w.batch)}"]  # fmt: skip
        steps = {}
        for label, (cut_blocks, patches) in VARIANTS.items():
            compile_segment = functools.partial(_inductor_segment, config_patches=patches)
            step = compile_inductor(rewritten, compile_segment=compile_segment, cut_blocks=cut_blocks)
            row.append(f"{label} {measure_graph_peak(step, *w.batch)} ({step.runner.summary()['compiled_segments']} graphs)")
            steps[label] = step
        inputs = rewritten.flat_inputs(*w.batch)
        saved = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in inputs]

        def run(step, saved=saved):
            with torch.no_grad():
                step._run_graph([t.clone() if isinstance(t, torch.Tensor) else t for t in saved])

        cut, one = time_paired(functools.partial(run, steps["blocks cut"]), functools.partial(run, steps["acopt"]),
                               device="cpu", warmup=1, iterations=7)  # fmt: skip
        row.append(f"time blocks cut / acopt {statistics.median(cut) / statistics.median(one):.2f}")
        print("  " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
