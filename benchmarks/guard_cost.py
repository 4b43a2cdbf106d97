"""What checking the guards and reading live hyperparameters costs per step.

    python benchmarks/guard_cost.py --model transformer --batch-size 64

Times, interleaved over ``--repeats`` rounds: a whole traced step
(``TracedStep(*batch)``), and ``TracedStep.flat_inputs(*batch)`` alone (every
guard of acopt.guards, reading parameters, buffers, optimizer state and the
live hyperparameters). Prints medians and the guard share of the step; the
goal (issue "Faithful in real training loops") is under 2%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import acopt
from acopt import models


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="transformer")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = models.build(args.model, batch_size=args.batch_size, seed=0)
    step = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    for _ in range(3):
        step(*w.batch)
    steps, guards = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(*w.batch)
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(10):
            step.flat_inputs(*w.batch)
        guards.append((time.perf_counter() - t0) / 10)
    s, g = statistics.median(steps), statistics.median(guards)
    n_params = sum(1 for _ in w.model.parameters())
    n_modules = sum(1 for _ in w.model.modules())
    print(f"model {args.model} bs {args.batch_size}: {n_params} parameters, {n_modules} modules, "
          f"{len(step.guards.input_meta)} guarded tensors")
    print(f"step (median of {args.repeats}): {s * 1e3:.3f} ms")
    print(f"guards + inputs (median):   {g * 1e6:.1f} us = {g / s:.2%} of the step")


if __name__ == "__main__":
    main()
