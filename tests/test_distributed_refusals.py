"""Distributed constructs a traced step would silently get wrong are refused
(issue "Faithful in real training loops", item 7); in-place collectives are
traced as functional ones; functional collectives are never removed as dead
code. One gloo process on 127.0.0.1 (world size 1); several ranks:
tests/test_distributed.py."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import acopt
from tests import tiny


@pytest.fixture(scope="module")
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=__import__("datetime").timedelta(seconds=30))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _net():
    return tiny.net(act=nn.ReLU)


def _batch():
    return tiny.batch(0)


def _state(model, optimizer):
    return {k: v.clone() for k, v in model.state_dict().items()}, len(optimizer.state)


_step = tiny.train_step


def test_ddp_comm_hook_is_refused_leaving_state_untouched(group):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = nn.parallel.DistributedDataParallel(_net())
    model.register_comm_hook(None, default_hooks.allreduce_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = _state(model, opt)
    with pytest.raises(acopt.UnsupportedStep, match="communication hook"):
        acopt.trace(_step, model, opt, *_batch())
    after = _state(model, opt)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1] == after[1] == 0


def test_ddp_submodule_is_refused(group):
    model = _net()
    model[2] = nn.parallel.DistributedDataParallel(model[2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(acopt.UnsupportedStep, match="submodule '2'.*DistributedDataParallel"):
        acopt.trace(_step, model, opt, *_batch())


def test_inplace_collective_is_remapped_to_a_functional_one(group):
    def step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)  # traced as funcol.all_reduce + wait, copied back into p.grad
        optimizer.step()
        return loss.detach()

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    traced = acopt.trace(step, model, opt, *_batch())
    ops = [str(n.target) for n in traced.graph.nodes]
    assert sum("_c10d_functional.all_reduce" in t for t in ops) == 4 and not any(t.startswith("c10d.") for t in ops)
    ref = _net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for i in range(2):
        assert torch.equal(traced(*tiny.batch(i)), step(ref, ref_opt, *tiny.batch(i)))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_async_inplace_collective_is_refused(group):
    def step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        works = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()]
        for w in works:
            w.wait()
        optimizer.step()
        return loss.detach()

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(acopt.UnsupportedStep, match="async_op=True"):
        acopt.trace(step, model, opt, *_batch())
    assert len(opt.state) == 0  # the momentum state made for tracing was taken back


def test_functional_collective_is_never_dead_code(group):
    import torch.distributed._functional_collectives as funcol

    def step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        funcol.all_reduce(loss.detach(), "sum", group)  # result unused: still a collective every rank joins
        optimizer.step()
        return loss.detach()

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    traced = acopt.trace(step, model, opt, *_batch())
    targets = [str(n.target) for n in traced.graph.nodes]
    assert any("all_reduce" in t for t in targets), targets
    prof = acopt.profile(traced, *_batch(), warmup=0, iterations=1)
    collectives = [n for n in prof.nodes if "c10d" in n.op]
    assert collectives and not any(n.recomputable for n in collectives)  # rule 8: never replayed
    ref = _net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    assert torch.equal(traced(*_batch()), _step(ref, ref_opt, *_batch()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


@pytest.mark.parametrize("fake", [False, True])
def test_wait_is_an_alias_and_holds_the_collectives_inputs(group, fake):
    """Rule 8: the wait allocates nothing (fake and measured profiles alike); an
    all-gather's input lives until its wait, an all-reduce's (copied at issue) does not."""
    import torch.distributed._functional_collectives as funcol

    def step(model, optimizer, x, y):
        optimizer.zero_grad()
        h = model(x)
        gathered = funcol.all_gather_single(h * 2, 0, group)  # the backend reads h * 2 until the wait
        reduced = funcol.all_reduce(h * 3, "sum", group)
        loss = F.cross_entropy(gathered + reduced, y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    traced = acopt.trace(step, model, opt, *_batch())
    waits = [n for n in traced.graph.nodes if getattr(n.target, "__name__", "") == "wait_tensor"]
    assert len(waits) == 4  # funcol collectives are differentiable: two more in the backward
    prof = acopt.profile(traced, *_batch(), warmup=0, iterations=1, fake=fake)
    for w in waits:
        record = prof.node_by_name[w.name]
        issue = prof.node_by_name[w.args[0].name]
        assert record.allocates == () and record.storages == issue.storages  # an alias of the issue's output
    forward = [w for w in waits if w.meta["acopt_region"] == acopt.Region.FORWARD]
    gather_wait, reduce_wait = sorted(forward, key=lambda w: "all_reduce" in w.args[0].name)
    assert [a.target for a in gather_wait.args[1:]] == [torch.ops.aten.mul.Tensor]  # h * 2, alive until here
    assert reduce_wait.args[1:] == ()  # all_reduce copies its input at issue
    ref = _net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    assert torch.equal(traced(*_batch()), step(ref, ref_opt, *_batch()))


def test_sharded_model_in_ddp_is_refused_and_alone_trains_as_eager(group):
    model, ref = _net(), _net()
    acopt.shard(model)  # one rank: every shard is the whole unit
    assert [n for n, _ in model.named_parameters()] == ["0._acopt_shard", "2._acopt_shard"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ddp = nn.parallel.DistributedDataParallel(model)
    with pytest.raises(acopt.UnsupportedStep, match="reduced twice"):
        acopt.trace(_step, ddp, opt, *_batch())
    assert len(opt.state) == 0
    traced = acopt.trace(_step, model, opt, *_batch())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for i in range(2):
        assert torch.equal(traced(*tiny.batch(i)), _step(ref, ref_opt, *tiny.batch(i)))
    full = acopt.sharding.full_state_dict(model)
    assert all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
