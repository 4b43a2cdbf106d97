"""Gradient accumulation inside one step: k micro-batches, k backward() calls,
one optimizer step (issue "The training loops people write", item 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import acopt
from acopt import models
from acopt.records import Region


def accumulate_step(model, optimizer, x, y, k=4):
    optimizer.zero_grad()
    total = 0.0
    for xb, yb in zip(x.chunk(k), y.chunk(k)):
        loss = F.cross_entropy(model(xb), yb) / k
        loss.backward()
        total = total + loss.detach()
    optimizer.step()
    return total


def _mlp(seed=0):
    w = models.build("mlp", batch_size=64, seed=seed)
    return w


def test_regions_alternate_per_micro_batch():
    w = _mlp()
    traced = acopt.trace(accumulate_step, w.model, w.optimizer, *w.batch)
    regions = [traced.region(n) for n in traced.graph.nodes if n.op != "placeholder"]
    runs = [r for i, r in enumerate(regions) if i == 0 or regions[i - 1] != r]
    assert runs == [Region.FORWARD, Region.BACKWARD] * 4 + [Region.OPTIMIZER]


def test_accumulation_equals_eager_bitwise_with_a_plan():
    """SGD: bitwise equal to the same eager loop over three steps, with a plan
    that recomputes in every micro-batch; measured peak == simulated."""
    w, ref = _mlp(), _mlp()
    traced = acopt.trace(accumulate_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch, warmup=1, iterations=1)
    plan = acopt.plan(prof, budget=acopt.floor(prof))
    assert plan.recompute
    micro_batch, seen, backward_runs = {}, Region.FORWARD, 0
    for n in prof.nodes:  # micro-batch i's nodes come after i backward runs began
        if n.region == Region.BACKWARD and seen != Region.BACKWARD:
            backward_runs += 1
        seen = n.region
        micro_batch[n.name] = backward_runs
    picked_in = {micro_batch[prof.storage_by_name[r].node] for r in plan.recompute}
    assert len(picked_in) > 1, picked_in
    step = acopt.rewrite(traced, plan, profile=prof)
    for i in range(3):
        batch = w.make_batch(i)
        assert torch.equal(step(*batch), accumulate_step(ref.model, ref.optimizer, *batch))
    for a, b in zip(w.model.parameters(), ref.model.parameters(), strict=True):
        assert torch.equal(a, b)
    measured = acopt.profile(step, *w.batch, warmup=0, iterations=1)
    assert measured.peak_bytes == acopt.simulate(prof, plan).peak_bytes


def test_micro_batches_peak_below_one_big_batch():
    """k micro-batches of b keep one micro-batch's activations: a lower peak than k*b at once."""
    w = _mlp()
    whole = acopt.profile(acopt.trace(w.train_step, w.model, w.optimizer, *w.batch), *w.batch, warmup=0, iterations=1)
    w2 = _mlp()
    micro = acopt.profile(acopt.trace(accumulate_step, w2.model, w2.optimizer, *w2.batch), *w2.batch, warmup=0, iterations=1)
    assert micro.peak_bytes < whole.peak_bytes
