"""acopt under torch.distributed: 2 gloo ranks on 127.0.0.1 (tests/ranks.py),
each test bounded in time. Every rank compares acopt's step with eager
PyTorch (DDP) bitwise; gloo sums two ranks' values in one order, so the
all-reduced gradients are bitwise equal too."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import acopt
from tests import ranks

DDP = nn.parallel.DistributedDataParallel


def _deep_net(width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 4),
    )  # fmt: skip


def _batch(rank: int, i: int = 0, rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + i)
    return torch.randn(rows, 8, generator=g), torch.randint(0, 4, (rows,), generator=g)


def _step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _hand_reduced_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for p in model.parameters():  # traced as a functional all-reduce written back into .grad
        p.grad.div_(dist.get_world_size())
        dist.all_reduce(p.grad)
    optimizer.step()
    return loss.detach()


def _smoothed_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _clipped_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach()


def _storage_peak(prof) -> int:
    return max(t - n.temp_bytes for t, n in zip(prof.timeline, prof.nodes))


def _storage_peak_sim(prof, sim) -> int:
    nodes = prof.node_by_name
    return max(t - nodes[node].temp_bytes for t, (node, _) in zip(sim.timeline, sim.step_nodes))


def _same_training(step, model, ref_step, ref_model, rank: int, steps: int = 3) -> None:
    for i in range(steps):
        batch = _batch(rank, i)
        assert torch.equal(step(*batch), ref_step(*batch)), f"rank {rank} step {i}: loss differs from eager DDP"
        for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
            assert torch.equal(a, b), f"rank {rank} step {i}: {name} differs from eager DDP"


def _budget_between(traced, batch) -> int:
    prof = acopt.profile(traced, *batch, warmup=0, iterations=1)
    floor = acopt.floor(prof)
    assert floor < prof.peak_bytes
    return (floor + prof.peak_bytes) // 2


def _ddp_body(rank: int, world: int, hand_reduced: bool) -> None:
    model = _deep_net()
    ref_model = copy.deepcopy(model)
    wrapped = model if hand_reduced else DDP(model)
    ref = DDP(ref_model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    train_step = _hand_reduced_step if hand_reduced else _step
    batch = _batch(rank)
    budget = _budget_between(acopt.trace(train_step, wrapped, opt, *batch), batch)
    step = acopt.compile(train_step, wrapped, opt, *batch, budget=budget)
    assert step.plan.recompute, "the plan should recompute something"
    collectives = [n for n in step.traced.graph.nodes if "all_reduce" in str(n.target)]
    assert collectives and all(n.meta["acopt_region"] != acopt.Region.FORWARD for n in collectives)
    # memory truth on this rank: the rewritten step's measured storage peak is the simulated one
    measured = acopt.profile(step.traced, *batch, warmup=0, iterations=1)
    assert _storage_peak(measured) == _storage_peak_sim(step.profile, acopt.simulate(step.profile, step.plan))
    _same_training(step, model, lambda *b: _step(ref, ref_opt, *b), ref_model, rank)
    if not hand_reduced:  # no_sync() is guarded: eager would skip the all-reduce, the graph would not
        before = [p.detach().clone() for p in model.parameters()]
        with (
            wrapped.no_sync(),
            pytest.warns(UserWarning, match="require_backward_grad_sync"),
            pytest.raises(acopt.UnsupportedStep, match="no_sync"),
        ):
            step(*batch)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        # each rank would pick its compiled plan by its own measurements: refused on every rank, untouched
        with pytest.raises(acopt.UnsupportedStep, match="backend='inductor' under torch.distributed"):
            acopt.compile(train_step, wrapped, opt, *batch, budget=budget, backend="inductor")
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ddp_step_equals_eager_ddp_with_a_plan():
    ranks.run(_ddp_body, False, timeout_s=150)


@pytest.mark.slow
def test_hand_reduced_step_equals_eager_ddp_with_a_plan():
    ranks.run(_ddp_body, True, timeout_s=150)


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _deep_net()
        self.spare = nn.Linear(4, 4)  # never called: DDP raises for it

    def forward(self, x):
        return self.net(x)


def _buffers_body(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    ref_model = copy.deepcopy(model)
    # small buckets: several all-reduces, each issued when its gradients are ready
    ddp, ref = DDP(model, bucket_cap_mb=0.005), DDP(ref_model, bucket_cap_mb=0.005)
    if rank == 1:  # buffers that differ across ranks: DDP broadcasts rank 0's before every forward
        with torch.no_grad():
            model[1].running_mean.add_(1.0)
            ref_model[1].running_mean.add_(1.0)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    batch = _batch(rank)
    budget = _budget_between(acopt.trace(_step, ddp, opt, *batch), batch)
    step = acopt.compile(_step, ddp, opt, *batch, budget=budget)
    assert step.plan.recompute
    nodes = list(step.traced.graph.nodes)
    issues = [i for i, n in enumerate(nodes) if "all_reduce_" in str(n.target)]
    waits = [i for i, n in enumerate(nodes) if getattr(n.target, "__name__", "") == "wait_tensor" and i > issues[0]]
    last_mm = max(i for i, n in enumerate(nodes) if n.target is torch.ops.aten.mm.default)
    assert len(issues) >= 2 and issues[0] < last_mm < min(waits)  # the rest of the backward overlaps bucket 1
    for i in range(3):
        b = _batch(rank, i)
        assert torch.equal(step(*b), _step(ref, ref_opt, *b))
        for (name, a), c in zip(model.state_dict().items(), ref_model.state_dict().values()):
            assert torch.equal(a, c), f"rank {rank} step {i}: {name} differs from eager DDP"


@pytest.mark.slow
def test_ddp_broadcast_buffers_equal_eager_ddp():
    ranks.run(_buffers_body, timeout_s=150)


def _mismatch_body(rank: int, world: int) -> None:
    from acopt import rank_plan

    # 1. an injected asymmetric plan: rank 1 runs another plan than the one broadcast
    model = DDP(_deep_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = _batch(rank)
    budget = _budget_between(acopt.trace(_step, model, opt, *batch), batch)
    real = rank_plan.plan_on_rank0
    if rank == 1:
        rank_plan.plan_on_rank0 = lambda *a, **k: dataclasses.replace(real(*a, **k), recompute=frozenset())
    try:
        with pytest.raises(acopt.RankMismatch, match="different plans"):
            acopt.compile(_step, model, opt, *batch, budget=budget)
    finally:
        rank_plan.plan_on_rank0 = real
    # 2. ranks that trace different steps are refused before anything runs
    other = DDP(_deep_net())
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(acopt.RankMismatch, match="different training steps"):
        acopt.compile(_step if rank == 0 else _smoothed_step, other, other_opt, *batch, budget="100%")
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    # 3. a refused DDP step (an unused parameter) leaves model and optimizer untouched
    ddp = DDP(_WithUnused())
    adam = torch.optim.Adam(ddp.parameters())
    before = [p.detach().clone() for p in ddp.parameters()]
    with pytest.raises(acopt.UnsupportedStep, match="get no gradient"):
        acopt.compile(_step, ddp, adam, *batch, budget="100%")
    assert len(adam.state) == 0 and all(torch.equal(a, b) for a, b in zip(before, ddp.parameters()))


def test_asymmetric_plans_and_steps_are_clear_errors():
    ranks.run(_mismatch_body, timeout_s=150)


def _full_equal(model, ref_model) -> bool:
    full = acopt.sharding.full_state_dict(model)
    return full.keys() == ref_model.state_dict().keys() and all(
        torch.equal(full[k], v) for k, v in ref_model.state_dict().items()
    )


def _sharded_body(rank: int, world: int) -> None:
    model = _deep_net(width=256)  # weights as large as a batch of 64's activations
    ref_model = copy.deepcopy(model)
    ref = DDP(ref_model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    acopt.shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert full_bytes / world <= shard_bytes <= full_bytes / world + 4 * world * 4  # 1/world, plus padding
    batch = _batch(rank, rows=64)
    # the eager sharded step (same gathers, run eagerly) is DDP's step
    assert torch.equal(_step(model, opt, *batch), _step(ref, ref_opt, *batch)) and _full_equal(model, ref_model)
    state_bytes = sum(s["momentum_buffer"].numel() * 4 for s in opt.state.values())
    assert state_bytes == shard_bytes  # optimizer state is sharded too

    before = [p.detach().clone() for p in model.parameters()], [s["momentum_buffer"].clone() for s in opt.state.values()]
    with pytest.raises(acopt.UnsupportedStep, match="clips gradients by norm"):
        acopt.trace(_clipped_step, model, opt, *batch)  # the norm would be this rank's shards' only
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(before[1], opt.state.values()))

    traced = acopt.trace(_step, model, opt, *batch)
    prof = acopt.profile(traced, *batch, warmup=0, iterations=1)
    gathers = frozenset(a.name for a in prof.activations if a.recomputable and a.name.startswith("all_gather"))
    others = frozenset(a.name for a in prof.activations if a.recomputable) - gathers
    assert len(gathers) == 3  # every unit but the first is read again in the backward
    plans = {"none": frozenset(), "keep": others, "re-gather": gathers, "re-gather and recompute": gathers | others}
    peaks = {}
    for label, recompute in plans.items():
        step = acopt.rewrite(traced, recompute, profile=prof)
        sim = acopt.simulate(prof, recompute)
        measured = acopt.profile(step, *batch, warmup=0, iterations=1)
        assert _storage_peak(measured) == _storage_peak_sim(prof, sim), label
        peaks[label] = sim.peak_bytes
        replayed = [
            n for n in step.graph.nodes if "all_gather" in str(n.target) and n.meta["acopt_region"] != acopt.Region.FORWARD
        ]
        if label in ("none", "re-gather"):  # the re-gathers run in the backward
            assert len(replayed) == (len(gathers) if recompute else 0), label
        for i in range(1, 3):
            b = _batch(rank, 10 * len(peaks) + i, rows=64)
            assert torch.equal(step(*b), _step(ref, ref_opt, *b)), f"rank {rank} {label} step {i}: loss"
            assert _full_equal(model, ref_model), f"rank {rank} {label} step {i}: parameters differ from eager DDP"
    assert peaks["re-gather"] <= peaks["none"] and peaks["re-gather and recompute"] <= peaks["keep"]
    # the planner re-gathers weights when the budget asks for it
    step = acopt.compile(_step, model, opt, *batch, budget=acopt.floor(prof))
    assert gathers & step.plan.recompute, sorted(step.plan.recompute)
    b = _batch(rank, 99, rows=64)
    assert torch.equal(step(*b), _step(ref, ref_opt, *b)) and _full_equal(model, ref_model)


@pytest.mark.slow
def test_sharded_step_equals_eager_ddp_with_keep_and_regather_plans():
    ranks.run(_sharded_body, timeout_s=200)


def _transformer_blocks_body(rank: int, world: int) -> None:
    from acopt import models

    w = models.transformer(batch_size=4, seed=0)  # dropout on: acopt draws what eager draws
    model = w.model
    ref_model = copy.deepcopy(model)
    ref = DDP(ref_model)
    acopt.shard(model, units=(models.PreLNBlock,))
    assert [n for n, _ in model.named_parameters()] == [
        "tok._acopt_shard", "pos._acopt_shard", "layers.0._acopt_shard", "layers.1._acopt_shard",
        "ln_f._acopt_shard", "head._acopt_shard",
    ]  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    batch = w.make_batch(rank + 1)
    try:
        acopt.compile(w.train_step, model, opt, *batch, budget=1)
    except acopt.InfeasibleBudget as e:  # raised on every rank: rank 0's planner error is broadcast
        floor = e.floor_bytes
    step = acopt.compile(w.train_step, model, opt, *batch, budget=floor)
    assert step.plan.recompute and step.report().peak_after_bytes <= floor
    measured = acopt.profile(step.traced, *batch, warmup=0, iterations=1)
    assert _storage_peak(measured) == _storage_peak_sim(step.profile, acopt.simulate(step.profile, step.plan))
    for i in range(2):
        b = w.make_batch(10 * rank + i)
        torch.manual_seed(i)
        loss = step(*b)
        torch.manual_seed(i)
        assert torch.equal(loss, w.train_step(ref, ref_opt, *b)) and _full_equal(model, ref_model)


@pytest.mark.slow
def test_sharded_transformer_blocks_equal_eager_ddp_at_the_floor():
    ranks.run(_transformer_blocks_body, timeout_s=300)
