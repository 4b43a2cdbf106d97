"""Fidelity: the traced step against eager (issue 16, the benchmark; not a test).

For each workload: the eager step and acopt's traced step (an empty plan: the
trace itself, before any recomputation) on the same model, optimizer and batch.

* time: ``acopt.measure.time_paired`` (traced and eager alternately, one
  call each per iteration), medians; goal traced <= eager * 1.03.
* peak: ``acopt.measure.measure_peak`` around ``eager()`` and around
  ``traced(*batch)``, the same way (CPU profiler allocation events + the
  storages alive before the step); goal traced <= eager.
* op counts in the traced graph: call nodes, fused SDPA (flash) vs math
  attention (``_safe_softmax``, ``bmm``), ``_foreach_*`` and ``_fused_*``
  ops, detach nodes, view nodes (view/reshape/permute/transpose/t/expand/...).
* attention kernels: what one eager step dispatched (torch.profiler op
  names) against what the trace holds; ``same`` when the sets are equal.

Prints a markdown table (and ``--json`` writes the rows)::

    python benchmarks/fidelity.py --threads 1
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import acopt  # noqa: E402
from acopt import models  # noqa: E402
from benchmarks import hf_models  # noqa: E402
from acopt.measure import measure_peak, median, state_tensors, time_paired  # noqa: E402

TIME_GOAL = 1.03
ATTENTION = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
    "_safe_softmax",
    "_softmax",
)
VIEWS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "alias", "unsqueeze",
         "squeeze", "slice", "select", "split", "split_with_sizes", "unbind", "as_strided", "_reshape_alias"}

# name -> (factory, kwargs): sizes where an eager step takes >= ~50 ms on one CPU thread
BUILTIN = {
    "mlp": (models.mlp, dict(batch_size=4096, width=512)),
    "cnn": (models.cnn, dict(batch_size=256)),
    "transformer": (models.transformer, dict(batch_size=32, seq_len=128, d_model=128)),
}
HF_BATCH = {"vit": 64, "convnext": 128, "mixtral": 16}
HF = ("gpt2", "llama", "opt", "bloom", "mixtral", "bert", "roberta", "distilbert", "electra", "vit", "convnext")


def workload(name: str, batch_size: int | None):
    if name in BUILTIN:
        fn, kw = BUILTIN[name]
        kw = dict(kw)
        if batch_size is not None:
            kw["batch_size"] = batch_size
        return fn(**kw)
    return getattr(hf_models, name)(batch_size=batch_size or HF_BATCH.get(name, 32))


def op_name(target) -> str:
    """'aten._safe_softmax.default' -> '_safe_softmax'."""
    s = str(target)
    return s.removeprefix("aten.").split(".")[0] if s.startswith("aten.") else s


def op_counts(traced) -> dict[str, int]:
    names = [op_name(n.target) for n in traced.graph.nodes if n.op == "call_function"]
    c = collections.Counter(names)
    return dict(
        nodes=len(names),
        flash=sum(v for k, v in c.items() if k.startswith("_scaled_dot_product_") and not k.endswith("_backward")),
        safe_softmax=c["_safe_softmax"],
        softmax=c["_softmax"],
        bmm=c["bmm"],
        foreach=sum(v for k, v in c.items() if k.startswith("_foreach_")),
        fused=sum(v for k, v in c.items() if k.startswith("_fused_")),
        detach=c["detach"],
        views=sum(v for k, v in c.items() if k in VIEWS),
        getitem=sum(v for k, v in c.items() if "getitem" in k),
    )


# the per-parameter scalar ops of Adam's capturable form (the bias corrections as tensors);
# acopt traces eager's own form where it can (acopt/optimizer_form.py), then there are none
CAPTURABLE = ("pow", "rsub", "reciprocal", "neg", "sqrt")


def dispatched(step) -> tuple[set[str], collections.Counter]:
    """One step under torch.profiler: every aten op name, and the top-level aten ops (not
    called from inside another aten op) counted by name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = collections.Counter(
        e.name.removeprefix("aten::") for e in events
        if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")
    )  # fmt: skip
    return {e.name.removeprefix("aten::") for e in events}, top


def attention_kernels_eager(all_names: set[str]) -> set[str]:
    names = all_names & set(ATTENTION)
    if "_safe_softmax" in names:  # eager's _safe_softmax calls _softmax inside it (a child event)
        names.discard("_softmax")
    return names


def attention_kernels_traced(traced) -> set[str]:
    return {op_name(n.target) for n in traced.graph.nodes if n.op == "call_function"} & set(ATTENTION)


def short(kernels: set[str]) -> str:
    if not kernels:
        return "-"
    abbrev = {"_scaled_dot_product_flash_attention_for_cpu": "flash_cpu", "_safe_softmax": "safe_softmax"}
    return "+".join(sorted(abbrev.get(k, k.lstrip("_")) for k in kernels))


def bench(name: str, *, batch_size: int | None, warmup: int, iterations: int) -> dict:
    w = workload(name, batch_size)

    def eager():
        return w.train_step(w.model, w.optimizer, *w.batch)

    eager()  # optimizer state exists before tracing and before any measurement
    eager_names, eager_top = dispatched(eager)
    eager_attn = attention_kernels_eager(eager_names)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)

    def step():
        return traced(*w.batch)

    step()
    _, traced_top = dispatched(step)

    t, e = time_paired(step, eager, device="cpu", warmup=warmup, iterations=iterations)
    alive = lambda: state_tensors(w.model, w.optimizer, w.batch)  # noqa: E731
    peak_e = measure_peak(eager, device="cpu", alive=alive)
    peak_t = measure_peak(step, device="cpu", alive=alive)
    row = dict(
        model=name, batch=w.batch[0].shape[0], optimizer=type(w.optimizer).__name__,
        capturable_form=bool(traced.provenance.get("capturable_form")),
        eager_ms=median(e) * 1e3, traced_ms=median(t) * 1e3,
        eager_peak=peak_e.peak_bytes, traced_peak=peak_t.peak_bytes,
        eager_attn=sorted(eager_attn), traced_attn=sorted(attention_kernels_traced(traced)),
        eager_ops=sum(eager_top.values()), traced_ops=sum(traced_top.values()),
        capturable_ops=sum(max(0, traced_top[k] - eager_top[k]) for k in CAPTURABLE),
        **op_counts(traced),
    )  # fmt: skip
    row["ratio"] = row["traced_ms"] / row["eager_ms"]
    row["time_met"] = row["ratio"] <= TIME_GOAL
    row["peak_met"] = row["traced_peak"] <= row["eager_peak"]
    row["same_kernels"] = row["eager_attn"] == row["traced_attn"]
    row["per_node_us"] = (row["traced_ms"] - row["eager_ms"]) * 1e3 / row["nodes"]
    return row


def mib(b: int) -> str:
    return f"{b / 2**20:.1f}"


def why(r: dict) -> str:
    out = []
    if not r["same_kernels"]:
        out.append("attention kernels differ")
    if not r["time_met"]:
        if r.get("capturable_form") and r["capturable_ops"]:
            out.append(f"{r['optimizer']} traced in its capturable form: +{r['capturable_ops']} per-parameter "
                       "pow/rsub/reciprocal/neg/sqrt ops (eager: Python-float bias corrections)")
        out.append(f"{r['traced_ops'] - r['eager_ops']:+d} aten ops dispatched, "
                   f"{r['per_node_us']:+.1f} us per graph node")
    if not r["peak_met"]:
        out.append(f"peak +{(r['traced_peak'] - r['eager_peak']) / 2**10:.0f} KiB")
    return "; ".join(out) or "-"


def table(rows: list[dict]) -> str:
    head = ("| model | batch | opt | eager ms | traced ms | ratio | time | eager peak MiB | traced peak MiB | peak "
            "| eager attn | traced attn | aten ops eager/traced | nodes | flash | safe_softmax/bmm | foreach | fused | detach | views | why |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['optimizer']}{' (capturable)' if r.get('capturable_form') else ''} | {r['eager_ms']:.1f} | {r['traced_ms']:.1f} "
            f"| {r['ratio']:.3f} | {'met' if r['time_met'] else 'missed'} | {mib(r['eager_peak'])} "
            f"| {mib(r['traced_peak'])} | {'met' if r['peak_met'] else 'missed'} "
            f"| {short(set(r['eager_attn']))} | {short(set(r['traced_attn']))} | {r['eager_ops']}/{r['traced_ops']} | {r['nodes']} | {r['flash']} "
            f"| {r['safe_softmax']}/{r['bmm']} | {r['foreach']} | {r['fused']} | {r['detach']} | {r['views']} | {why(r)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=[*BUILTIN, *HF])
    ap.add_argument("--batch-size", type=int, default=None, help="one batch size for every model (default: per model)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        r = bench(name, batch_size=args.batch_size, warmup=args.warmup, iterations=args.iterations)
        print(f"{name}: eager {r['eager_ms']:.1f} ms traced {r['traced_ms']:.1f} ms", file=sys.stderr, flush=True)
        rows.append(r)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {datetime.date.today()}, commit {commit}\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
