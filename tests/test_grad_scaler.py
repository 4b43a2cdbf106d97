"""fp16 autocast with torch.amp.GradScaler as graph ops, no host sync (issue "The
training loops people write", item 2): unscale, inf check, skipped step and
scale update equal eager, on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import acopt
from tests import tiny


def _net():
    return tiny.net(width=32)


def _batch(i=0):
    return tiny.batch(i, rows=16)


def _step_with(scaler):
    def train_step(model, optimizer, x, y):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return train_step


@pytest.mark.parametrize(
    "make, tol",
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 1e-6),
        # AdamW is traced in eager's default form (acopt/optimizer_form.py): bitwise
        (lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False), 0.0),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_grad_scaler_equals_eager_with_skipped_and_taken_steps(make, tol):
    m1, m2 = _net(), _net()
    o1, o2 = make(m1.parameters()), make(m2.parameters())
    # A scale this large overflows fp16 gradients at first: the first steps are
    # skipped and the scale backs off, then steps are taken and it grows again.
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=2)
    s2 = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=2)
    step = acopt.compile(_step_with(s1), m1, o1, *_batch(), budget="100%")
    start = [p.detach().clone() for p in m1.parameters()]
    scales = []
    for i in range(12):
        a, b = step(*_batch(i)), _step_with(s2)(m2, o2, *_batch(i))
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        assert s1.get_scale() == s2.get_scale()
        scales.append(s1.get_scale())
        for p, q in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p, q, rtol=tol, atol=tol / 10)
    assert any(b < a for a, b in zip(scales, scales[1:])), scales  # some steps were skipped
    assert any(b > a for a, b in zip(scales, scales[1:])), scales  # and some taken (growth)
    assert any(not torch.equal(p, q) for p, q in zip(start, m1.parameters()))


def test_update_outside_the_step_is_refused_and_the_scaler_left_clean():
    m = _net()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")

    def train_step(model, optimizer, x, y):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        return loss.detach()

    with pytest.raises(acopt.UnsupportedStep, match="scaler.update"):
        acopt.trace(train_step, m, o, *_batch())
    assert not scaler._per_optimizer_states
    assert type(scaler._scale) is torch.Tensor  # a real tensor, as its first eager call makes it
    train_step(m, o, *_batch())  # the scaler still works eagerly
    scaler.update()


def test_grad_scaler_step_plans_and_keeps_the_memory_truth():
    import copy

    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = tiny.batch(0, rows=256)
    traced = acopt.trace(_step_with(scaler), model, opt, *batch)
    prof = acopt.profile(traced, *batch, warmup=0, iterations=1)
    plan = acopt.plan(prof, budget=acopt.floor(prof))
    assert plan.recompute
    step = acopt.rewrite(traced, plan, profile=prof)
    assert acopt.profile(step, *batch, warmup=0, iterations=1).peak_bytes == acopt.simulate(prof, plan).peak_bytes
    snapshot = copy.deepcopy((model.state_dict(), opt.state_dict(), scaler.state_dict()))
    a = traced(*batch)
    after = [p.detach().clone() for p in model.parameters()] + [scaler.get_scale()]
    model.load_state_dict(snapshot[0])
    opt.load_state_dict(snapshot[1])
    scaler._scale.fill_(snapshot[2]["scale"])  # in place: the graph holds this tensor
    scaler._growth_tracker.fill_(snapshot[2]["_growth_tracker"])
    assert torch.equal(step(*batch), a)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after[:-1]))
    assert scaler.get_scale() == after[-1]
