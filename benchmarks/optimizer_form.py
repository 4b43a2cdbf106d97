"""Adam's traced form against eager: eager's own form vs the capturable one (a benchmark, not a test).

acopt traces an optimizer in eager's own form (acopt/optimizer_form.py): for
AdamW the step count is read on the host (``aten._local_scalar_dense``) and
the bias corrections are Python floats, as eager computes them. Before, it
forced the capturable form (a tensor step count: per parameter ``pow``,
``rsub``, ``reciprocal``, ``mul``, ``neg``, ``sqrt`` on one-element tensors).
This script times, in one process and interleaved round by round, four
copies of the same workload (same seed): eager, the trace in eager's form,
the trace with the capturable form forced (the tracer's fallback path,
entered for every optimizer that has the option), and eager run with the
"being compiled" flag the trace sets for library code
(``torch.compiler._is_compiling_flag``; off inside ``optimizer.step()`` as in
the trace), under which transformers picks other kernels (docs/results.md,
finding 6). Per model it prints the
medians of wall time and of the thread's CPU time (``time.thread_time``: with
one intra-op thread, less sensitive to other processes on a loaded machine),
each trace's ratio to eager, the top-level aten ops one step dispatches
(profiler) and the traced graph's call nodes::

    python benchmarks/optimizer_form.py --models llama mixtral gpt2 bert --rounds 40
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.compiler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import acopt  # noqa: E402
from acopt import tracer  # noqa: E402
from acopt.optimizer_form import has_capturable_form  # noqa: E402
from benchmarks import hf_models  # noqa: E402
from benchmarks.fidelity import HF_BATCH, dispatched  # noqa: E402


def trace_capturable(train_step, model, optimizer, *batch):
    """``acopt.trace`` with every optimizer that has the option in its capturable form."""
    real = tracer._trace_twice

    def forced(args, added_state, capturable, host_rng):
        capturable |= {i for i, o in enumerate(args[3]) if has_capturable_form(o)}
        return real(args, added_state, capturable, host_rng)

    tracer._trace_twice = forced
    try:
        return acopt.trace(train_step, model, optimizer, *batch)
    finally:
        tracer._trace_twice = real


@contextlib.contextmanager
def compiling_flag(value: bool):
    old = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = value
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = old


def eager_with_flag(w):
    """Eager under the "being compiled" flag, except inside ``optimizer.step()`` (as the trace runs)."""
    real_step = w.optimizer.step

    def step(*args, **kwargs):
        with compiling_flag(False):
            return real_step(*args, **kwargs)

    def run():
        w.optimizer.step = step
        try:
            with compiling_flag(True):
                return w.train_step(w.model, w.optimizer, *w.batch)
        finally:
            del w.optimizer.step

    return run


def bench(name: str, rounds: int, warmup: int) -> dict:
    batch_size = HF_BATCH.get(name, 32)
    w_eager, w_new, w_cap, w_flag = (getattr(hf_models, name)(batch_size=batch_size) for _ in range(4))
    for w in (w_eager, w_new, w_cap, w_flag):
        w.train_step(w.model, w.optimizer, *w.batch)  # optimizer state exists, as in fidelity.py
    new = acopt.trace(w_new.train_step, w_new.model, w_new.optimizer, *w_new.batch)
    cap = trace_capturable(w_cap.train_step, w_cap.model, w_cap.optimizer, *w_cap.batch)
    assert not new.provenance["capturable_form"] and cap.provenance["capturable_form"]
    steps = {
        "eager": lambda: w_eager.train_step(w_eager.model, w_eager.optimizer, *w_eager.batch),
        "eager_form": lambda: new(*w_new.batch),
        "capturable": lambda: cap(*w_cap.batch),
        "eager_flag": eager_with_flag(w_flag),
    }
    ops = {k: sum(dispatched(f)[1].values()) for k, f in steps.items()}
    wall: dict[str, list[float]] = collections.defaultdict(list)
    cpu: dict[str, list[float]] = collections.defaultdict(list)
    for r in range(warmup + rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for k in order:
            t0, c0 = time.perf_counter(), time.thread_time()
            steps[k]()
            t1, c1 = time.perf_counter(), time.thread_time()
            if r >= warmup:
                wall[k].append(t1 - t0)
                cpu[k].append(c1 - c0)
    row = dict(model=name, batch=batch_size, nodes_eager_form=_nodes(new), nodes_capturable=_nodes(cap))
    for k in steps:
        row[f"{k}_wall_ms"] = statistics.median(wall[k]) * 1e3
        row[f"{k}_cpu_ms"] = statistics.median(cpu[k]) * 1e3
        row[f"{k}_ops"] = ops[k]
    return row


def _nodes(step) -> int:
    return sum(1 for n in step.graph.nodes if n.op == "call_function")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["llama", "mixtral", "gpt2", "bert"])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads 1, {datetime.date.today()}, rounds {args.rounds}\n")
    print("| model | batch | eager ms (wall / cpu) | traced, eager form ms | ratio wall / cpu | traced, capturable ms "
          "| ratio wall / cpu | eager + flag ms | ratio wall / cpu "
          "| aten ops eager / eager form / capturable / eager + flag | graph nodes eager form / capturable |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = bench(name, args.rounds, args.warmup)
        e_w, e_c = r["eager_wall_ms"], r["eager_cpu_ms"]
        cells = []
        for k in ("eager_form", "capturable", "eager_flag"):
            w, c = r[f"{k}_wall_ms"], r[f"{k}_cpu_ms"]
            cells.append(f"{w:.1f} / {c:.1f} | {w / e_w:.3f} / {c / e_c:.3f}")
        print(f"| {name} | {r['batch']} | {e_w:.1f} / {e_c:.1f} | {' | '.join(cells)} "
              f"| {r['eager_ops']} / {r['eager_form_ops']} / {r['capturable_ops']} / {r['eager_flag_ops']} "
              f"| {r['nodes_eager_form']} / {r['nodes_capturable']} |", flush=True)


if __name__ == "__main__":
    main()
