"""Simulated (eager memory model) vs measured peak of acopt's compiled step, with
acopt's segmentation and settings and with two things it turns off
(docs/memory-model.md, "Compiled steps").

    python benchmarks/inductor_peaks.py mlp 512 100% 95%
    python benchmarks/inductor_peaks.py transformer 32 100% 50% 40%
    python benchmarks/inductor_peaks.py cnn 32 90% floor

Per budget ("floor": the eager floor): the greedy's plan (eager model, no
margin), the simulated peak, the measured peak of the eager rewritten step, and
the measured peak of the compiled step:

* ``acopt``: a recompute block ends its compiled graph, both of inductor's
  reorderings off (acopt's setting);
* ``blocks in one graph``: the recompute blocks compiled inside the backward
  graphs around them (acopt before it cut at block boundaries);
* ``inductor reorderings on``: acopt's segments, inductor's default
  ``reorder_for_locality`` and ``reorder_for_peak_memory``.

Then the step time of ``blocks in one graph`` over ``acopt`` (medians of
alternating calls; the cost of the extra graph boundaries).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys

import torch

import acopt
from acopt import inductor, models
from acopt.inductor import _inductor_segment, compile_inductor, measure_graph_peak
from acopt.measure import time_paired


@contextlib.contextmanager
def _blocks_in_one_graph():
    """segments_of as before the block cut: no node carries the block key it looks for."""
    key = inductor.BLOCK_KEY
    inductor.BLOCK_KEY = "acopt_no_such_key"
    try:
        yield
    finally:
        inductor.BLOCK_KEY = key


VARIANTS = {
    "acopt": (contextlib.nullcontext, {}),
    "blocks in one graph": (_blocks_in_one_graph, {}),
    "inductor reorderings on": (contextlib.nullcontext, {"reorder_for_locality": True, "reorder_for_peak_memory": True}),
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
        for label, (segmentation, patches) in VARIANTS.items():
            with segmentation():
                step = compile_inductor(rewritten, compile_segment=functools.partial(_inductor_segment, config_patches=patches))
            row.append(f"{label} {measure_graph_peak(step, *w.batch)} ({step.runner.summary()['compiled_segments']} graphs)")
            steps[label] = step
        inputs = rewritten.flat_inputs(*w.batch)
        saved = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in inputs]

        def run(step, saved=saved):
            with torch.no_grad():
                step._run_graph([t.clone() if isinstance(t, torch.Tensor) else t for t in saved])

        one, cut = time_paired(functools.partial(run, steps["blocks in one graph"]), functools.partial(run, steps["acopt"]),
                               device="cpu", warmup=1, iterations=7)  # fmt: skip
        row.append(f"time blocks-in-one-graph / acopt {statistics.median(one) / statistics.median(cut):.2f}")
        print("  " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
