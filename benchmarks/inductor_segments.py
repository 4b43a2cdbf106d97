"""Where a compiled step's memory differs from the eager model: per segment of
acopt's inductor runner, the simulator's largest live bytes over the segment's
nodes against the allocator's peak while the segment runs, and the allocations
alive at the step's measured peak (docs/memory-model.md, "Compiled steps").

    python benchmarks/inductor_segments.py transformer 32 40% --plan /tmp/t40.plan.json
    python benchmarks/inductor_segments.py cnn 32 floor --cut-blocks

``--plan FILE`` replays a saved plan (the greedy's plan depends on the profiled
times) or saves the new one there. CPU only (profiler allocation events).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

import acopt
from acopt import models
from acopt.inductor import compile_inductor
from acopt.measure import live_bytes


def _run_marked(runner, inputs):
    """``runner(*inputs)`` with a profiler range per segment."""
    env = dict(zip(runner._placeholders, inputs, strict=True))
    for i, seg in enumerate(runner.segments):
        with record_function(f"acopt_segment_{i}"):
            runner.run_segment(seg, env)
    env.clear()


def _events(prof):
    stack, ranges, allocs, mark = list(prof.profiler.kineto_results.experimental_event_tree()), {}, [], None
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            p, names = e.parent, []
            while p is not None and not p.name.startswith("acopt_segment_"):
                names.append(p.name)
                p = p.parent
            seg = int(p.name.rsplit("_", 1)[1]) if p is not None else -1
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.ptr, seg, "/".join(names[:3])))
        elif e.name == "acopt_measured":
            mark = (e.start_time_ns, e.end_time_ns)
        elif e.name.startswith("acopt_segment_"):
            ranges.setdefault(int(e.name.rsplit("_", 1)[1]), []).append((e.start_time_ns, e.end_time_ns))
        stack.extend(e.children)
    allocs = sorted(a for a in allocs if mark[0] <= a[0] <= mark[1])
    ranges = {i: next(r for r in rs if mark[0] <= r[0] <= mark[1]) for i, rs in ranges.items()}
    return allocs, ranges


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("batch_size", type=int)
    ap.add_argument("budget", help='a budget, or "floor"')
    ap.add_argument("--plan", help="replay this plan file if it exists, else save the plan there")
    ap.add_argument("--cut-blocks", action="store_true", help="compile with cut_blocks=True")
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = models.build(args.model, batch_size=args.batch_size, device="cpu", seed=0)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch)
    if args.plan and os.path.exists(args.plan):
        plan = acopt.Plan.from_json(args.plan)
    else:
        plan = acopt.plan(prof, budget=acopt.floor(prof) if args.budget == "floor" else args.budget)
        if args.plan:
            plan.to_json(args.plan)
    sim = acopt.simulate(prof, plan)
    step = compile_inductor(acopt.rewrite(traced, plan, profile=prof), cut_blocks=args.cut_blocks)
    inputs = step.flat_inputs(*w.batch)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    with torch.no_grad():
        saved = [t.detach().clone() for t in tensors]
    rng = torch.get_rng_state()

    def once():
        with torch.no_grad():
            _run_marked(step.runner, list(inputs))

    once()  # compiles
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        once()
        base = live_bytes(tensors, "cpu")
        with record_function("acopt_measured"):
            once()
    with torch.no_grad():
        for t, s in zip(tensors, saved, strict=True):
            t.copy_(s)
    torch.set_rng_state(rng)
    allocs, ranges = _events(p)

    step_of = {(node if block is None else f"rc_{node}__for__{block}"): t for t, (node, block) in enumerate(sim.step_nodes)}
    current, j, peak, live, at_peak = base, 0, 0, {}, {}
    print(f"{len(plan.recompute)} recomputed; simulated peak {sim.peak_bytes} B at {sim.peak_node} (block {sim.peak_block})")
    print("segment  kind nodes  simulated max   measured max   excess  first node")
    for i, seg in enumerate(step.runner.segments):
        start, end = ranges[i]
        seg_peak = current
        while j < len(allocs) and allocs[j][0] <= end:
            a = allocs[j]
            current += a[1]
            if a[1] > 0:
                live[a[2]] = a
            else:
                live.pop(a[2], None)
            if current > peak:
                peak, at_peak = current, dict(live)
            if a[0] >= start:
                seg_peak = max(seg_peak, current)
            j += 1
        ts = [step_of[n.name] for n in seg.nodes if n.name in step_of]
        if seg.compiled and ts:
            simulated = max(sim.timeline[t] for t in ts)
            print(f"{i:7d}  {'graph':5s} {len(seg.nodes):5d} {simulated:14d} {seg_peak:14d} {seg_peak - simulated:8d}  {seg.nodes[0].name}")
    print(f"measured peak {peak} B ({peak - sim.peak_bytes:+d} B against the simulated); allocations alive then:")
    for a in sorted(at_peak.values()):
        print(f"  {a[1]:10d} B  segment {a[3]}  {a[4]}")


if __name__ == "__main__":
    main()
