"""The optimizer step compiled (acopt.inductor_scalars) vs run eagerly node by node
(acopt before it), against eager PyTorch and torch.compile with
``activation_memory_budget``: step time, timed interleaved in one process.

    PYTHONPATH=. python benchmarks/inductor_optimizer.py transformer 32 act50%
    PYTHONPATH=. python benchmarks/inductor_optimizer.py gpt2 8 seq_len=128 vocab_size=8192 d_model=256 n_layers=4 n_heads=4 act50%

Arguments after the batch size: model arguments (``key=value``, integers) and one
budget (acopt's syntax). The greedy's plan for the budget (eager model, no margin)
is compiled three times from the same rewritten step: "optimizer eager" puts every
node of the optimizer's region in an eager segment (what acopt did before: the
optimizer reads live hyperparameters), "optimizer compiled" is today's cut (the
optimizer a compiled graph of its own), "optimizer in backward" compiles it in the
backward's graph (not acopt's choice: measured peaks are printed for each). torch-budget is
``torch.compile(train_step)`` with ``activation_memory_budget`` = (B - F) / (P - F)
(0.5 for ``act50%``), as ``acopt bench`` sets it. Each variant's step is timed by
thread CPU time over ``ROUNDS`` alternating rounds (all update the same model); the
table gives the medians and the ratios to eager PyTorch's step.
"""

from __future__ import annotations

import functools
import sys

import torch

import acopt
from acopt import inductor, models
from acopt.inductor import compile_inductor, measure_graph_peak
from acopt.measure import time_interleaved
from acopt.planning import no_recompute_peak, resolve_budget
from acopt.records import Region
from acopt.tracer import REGION_KEY

ROUNDS = 20


def _optimizer_eager(rewritten):
    """The step with its optimizer run eagerly node by node (the cut before acopt.inductor_scalars)."""
    real = inductor._scalar_values
    optimizer = {n.name for n in rewritten.graph_module.graph.nodes if n.meta.get(REGION_KEY) == Region.OPTIMIZER}
    inductor._scalar_values = lambda gm: real(gm) | optimizer
    try:
        return compile_inductor(rewritten)
    finally:
        inductor._scalar_values = real


def _optimizer_in_backward(rewritten):
    """The step with its optimizer compiled in the backward's graph (not cut where it begins)."""
    nodes = [n for n in rewritten.graph_module.graph.nodes if n.meta.get(REGION_KEY) == Region.OPTIMIZER]
    for n in nodes:
        n.meta[REGION_KEY] = Region.BACKWARD
    try:
        return compile_inductor(rewritten)
    finally:
        for n in nodes:
            n.meta[REGION_KEY] = Region.OPTIMIZER


def main(argv: list[str]) -> None:
    import torch._functorch.config as functorch_config

    name, batch_size, *rest = argv
    model_args = {k: int(v) for k, v in (a.split("=") for a in rest if "=" in a)}
    (budget,) = [b for b in rest if "=" not in b]
    torch.set_num_threads(1)
    w = models.build(name, batch_size=int(batch_size), device="cpu", seed=0, **model_args)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch)
    peak, lowest, target = no_recompute_peak(prof), acopt.floor(prof), resolve_budget(prof, budget)
    plan = acopt.plan(prof, budget=budget)
    rewritten = acopt.rewrite(traced, plan, profile=prof)
    steps = {
        "optimizer eager": _optimizer_eager(rewritten),
        "optimizer compiled": compile_inductor(rewritten),
        "optimizer in backward": _optimizer_in_backward(rewritten),
    }
    for label, step in list(steps.items()):
        try:
            measured = measure_graph_peak(step, *w.batch)  # compiles, then measures
        except Exception as e:  # noqa: BLE001 - in the backward's graph: AOTAutograd may refuse the aliased inputs
            print(f"{name} {batch_size} {budget} {label}: fails: {type(e).__name__}: {str(e)[:200]}", flush=True)
            del steps[label]
            continue
        s = step.runner.summary()
        print(f"{name} {batch_size} {budget} (recompute {len(plan.recompute)}) {label}: {s['compiled_segments']} "
              f"compiled graphs, {s['compiled_nodes']} compiled / {s['eager_nodes']} eager nodes, "
              f"measured peak {measured} B", flush=True)  # fmt: skip
    fraction = min(1.0, max(0.0, (target - lowest) / (peak - lowest))) if peak > lowest else 1.0
    functorch_config.activation_memory_budget = fraction
    torch_budget = torch.compile(w.train_step)
    steps = {
        "eager": lambda *b: w.train_step(w.model, w.optimizer, *b),
        **steps,
        f"torch-budget {fraction:.2f}": lambda *b: torch_budget(w.model, w.optimizer, *b),
    }
    med = time_interleaved(  # the first calls compile
        {k: functools.partial(step, *w.batch) for k, step in steps.items()}, rounds=ROUNDS, warmup=2
    )
    for label, t in med.items():
        print(f"  {label:24s} {t * 1e3:8.2f} ms  step/eager {t / med['eager']:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
