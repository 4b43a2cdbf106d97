"""How much tracing and profiling cost, against eager training steps.

    python benchmarks/profile_overhead.py resnet152 --batch-size 8
    python benchmarks/profile_overhead.py bert-base --batch-size 16 --fake

Real mode prints: eager step time (median), trace time, profile time (warmup
+ iterations + one workspace pass), their ratio to the same number of eager
steps, and the interpreter's overhead per node (a recording pass of the
profiler's interpreter against the graph's own generated code on the same
inputs, medians of 3, over the node count). Fake mode builds the model
on the meta device and prints fake-profile time, peak RSS and the predicted
peak. Both print node and activation counts.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import acopt
from acopt import models
from acopt.profiler import StepInterpreter
from acopt.schedule import MemoryModel


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fake", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--model-arg", action="append", default=[])
    args = ap.parse_args()
    kw = dict(a.split("=", 1) for a in args.model_arg)
    kw = {k: int(v) if v.isdigit() else v for k, v in kw.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model}, batch {args.batch_size}")

    if args.fake:
        t0 = time.perf_counter()
        with torch.device("meta"):
            w = models.build(args.model, batch_size=args.batch_size, device="meta", **kw)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
        t_trace = time.perf_counter() - t0
        t0 = time.perf_counter()
        prof = acopt.profile(traced, *w.batch, fake=True)
        t_prof = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"build (meta) {t_build:.1f} s, trace {t_trace:.1f} s, fake profile {t_prof:.1f} s, "
              f"trace+profile {t_trace + t_prof:.1f} s")  # fmt: skip
        print(f"peak RSS {format_bytes(rss)}; predicted step peak {format_bytes(prof.peak_bytes)}")
    else:
        w = models.build(args.model, batch_size=args.batch_size, **kw)
        import copy

        snapshot = (copy.deepcopy(w.model.state_dict()), copy.deepcopy(w.optimizer.state_dict()))
        n = args.warmup + args.iterations
        eager = []
        for i in range(n):
            t0 = time.perf_counter()
            w.train_step(w.model, w.optimizer, *w.batch)
            eager.append(time.perf_counter() - t0)
        w.model.load_state_dict(snapshot[0])
        w.optimizer.load_state_dict(snapshot[1])
        for p in w.model.parameters():
            p.grad = None
        t0 = time.perf_counter()
        traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
        t_trace = time.perf_counter() - t0
        t0 = time.perf_counter()
        prof = acopt.profile(traced, *w.batch, warmup=args.warmup, iterations=args.iterations)
        t_prof = time.perf_counter() - t0
        # interpreter overhead: a profiled pass against the graph's own generated
        # code on the same inputs (medians of 3), per node
        inputs = [t.detach().clone() for t in traced.flat_inputs(*w.batch)]
        interp = StepInterpreter(traced.graph_module, device=torch.device("cpu"))
        walls, plain = [], []
        with torch.no_grad():
            for _ in range(3):
                t0 = time.perf_counter()
                interp.run(inputs)
                walls.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                traced.graph_module(*inputs)
                plain.append(time.perf_counter() - t0)
        overhead = (statistics.median(walls) - statistics.median(plain)) / len(interp.nodes)
        eager_total = sum(eager)
        print(f"eager step median {statistics.median(eager):.3f} s ({n} steps: {eager_total:.1f} s)")
        print(f"trace {t_trace:.1f} s, profile {t_prof:.1f} s ({n} passes + 1 workspace pass)")
        print(f"trace+profile / {n} eager steps = {(t_trace + t_prof) / eager_total:.2f}x")
        print(f"interpreter overhead per node: {overhead * 1e6:.1f} us")
        print(f"measured peak {format_bytes(prof.peak_bytes)}")
    mm = MemoryModel(prof)
    print(f"nodes {len(prof.nodes)}, activations {len(prof.activations)}, recomputable {len(mm.candidates)}")


if __name__ == "__main__":
    main()
