"""Every torch.optim optimizer whose step needs no closure, by one mechanism
(issue "The training loops people write", item 3): state is created by the
optimizer's own first step on a copy (acopt.tracer._init_optimizer_state),
every tensor of it is a graph input, every float of every group is live."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acopt
from tests.tiny import batch as _batch
from tests.tiny import net as _net
from tests.tiny import train_step

O = torch.optim


# name -> (class, kwargs, bitwise): bitwise where the traced form is eager's own;
# RAdam and ASGD, whose eager form branches on the step count, are traced in their
# capturable form (acopt/optimizer_form.py), equal to eager's at float rounding.
CASES = {
    "RMSprop": (O.RMSprop, dict(lr=0.01), True),
    "RMSprop-centered-momentum": (O.RMSprop, dict(lr=0.01, centered=True, momentum=0.9), True),
    "Adagrad": (O.Adagrad, dict(lr=0.1), True),
    "Adadelta": (O.Adadelta, dict(lr=1.0, weight_decay=0.01), True),
    "Rprop": (O.Rprop, dict(lr=0.01), True),
    "Adamax": (O.Adamax, dict(lr=0.01), True),
    "NAdam": (O.NAdam, dict(lr=0.01), True),
    "NAdam-decoupled": (O.NAdam, dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.1), True),
    "RAdam": (O.RAdam, dict(lr=0.01), False),
    "ASGD": (O.ASGD, dict(lr=0.01), False),
    "Adam-amsgrad": (O.Adam, dict(lr=0.01, amsgrad=True), True),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_optimizer_equals_eager(name, foreach):
    cls, kw, bitwise = CASES[name]
    m1, m2 = _net(), _net()
    o1, o2 = cls(m1.parameters(), foreach=foreach, **kw), cls(m2.parameters(), foreach=foreach, **kw)
    sched1 = O.lr_scheduler.ExponentialLR(o1, 0.9)
    sched2 = O.lr_scheduler.ExponentialLR(o2, 0.9)
    step = acopt.trace(train_step, m1, o1, *_batch())
    for i in range(5):
        a, b = step(*_batch(i)), train_step(m2, o2, *_batch(i))
        sched1.step()
        sched2.step()
        assert torch.equal(a, b) if bitwise else torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        if bitwise:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert o1.state[p].keys() == o2.state[q].keys()


@pytest.mark.skipif(not hasattr(O, "Muon"), reason="torch.optim.Muon is not in this torch")
def test_muon_for_matrices_and_adamw_for_the_rest():
    def both(model, optimizers, x, y):
        for o in optimizers:
            o.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for o in optimizers:
            o.step()
        return loss.detach()

    def make(m):
        mats = [p for p in m.parameters() if p.ndim == 2]
        rest = [p for p in m.parameters() if p.ndim != 2]
        return [O.Muon(mats, lr=0.02), O.AdamW(rest, lr=1e-3)]

    m1, m2 = _net(), _net()
    o1, o2 = make(m1), make(m2)
    step = acopt.trace(both, m1, o1, *_batch())
    for i in range(4):
        torch.testing.assert_close(step(*_batch(i)), both(m2, o2, *_batch(i)))
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lbfgs_is_refused_and_state_untouched():
    m = _net()
    o = O.LBFGS(m.parameters())
    with pytest.raises(acopt.UnsupportedStep, match="closure"):
        acopt.trace(train_step, m, o, *_batch())
    assert not o.state


def test_a_third_party_optimizer_with_number_state_is_refused():
    class Counting(O.Optimizer):
        """Follows the torch.optim contract but counts steps in a Python int."""

        def __init__(self, params, lr=0.1):
            super().__init__(params, dict(lr=lr))

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state[p]
                    state["n"] = state.get("n", 0) + 1
                    p.add_(p.grad, alpha=-group["lr"] / state["n"])

    m = _net()
    o = Counting(m.parameters())
    with pytest.raises(acopt.UnsupportedStep, match="Python number"):
        acopt.trace(train_step, m, o, *_batch())
    assert not o.state


def test_a_third_party_tensor_state_optimizer_works():
    class SignSGD(O.Optimizer):
        def __init__(self, params, lr=0.1, beta=0.9):
            super().__init__(params, dict(lr=lr, beta=beta))

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state[p]
                    if not state:
                        state["m"] = torch.zeros_like(p)
                    state["m"].mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                    p.add_(state["m"].sign(), alpha=-group["lr"])

    m1, m2 = _net(), _net()
    o1, o2 = SignSGD(m1.parameters()), SignSGD(m2.parameters())
    step = acopt.trace(train_step, m1, o1, *_batch())
    for i in range(3):
        assert torch.equal(step(*_batch(i)), train_step(m2, o2, *_batch(i)))
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize(
    "cls, kw",
    [
        (O.SGD, dict(lr=0.1, momentum=0.9)),
        (O.Adam, dict(lr=1e-2)),
        (O.AdamW, dict(lr=1e-2, weight_decay=0.1)),
        (O.Adagrad, dict(lr=1e-2)),
    ],
    ids=["SGD", "Adam", "AdamW", "Adagrad"],
)
def test_fused_optimizers_equal_eager_bitwise(cls, kw):
    """fused=True traces to torch's fused kernel (one op for all parameters), fed the live hyperparameters."""
    m1, m2 = _net(), _net()
    o1, o2 = cls(m1.parameters(), fused=True, **kw), cls(m2.parameters(), fused=True, **kw)
    s1, s2 = O.lr_scheduler.ExponentialLR(o1, 0.8), O.lr_scheduler.ExponentialLR(o2, 0.8)
    step = acopt.trace(train_step, m1, o1, *_batch())
    assert any("_fused_" in str(n.target) for n in step.graph.nodes)
    for i in range(4):
        assert torch.equal(step(*_batch(i)), train_step(m2, o2, *_batch(i)))
        s1.step()
        s2.step()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_state_only_for_parameters_that_get_a_gradient():
    """Frozen parameters and parameters of an unused branch get no optimizer state, as in eager."""

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.used = torch.nn.Linear(8, 4)
            self.unused = torch.nn.Linear(8, 4)
            self.frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)

        def forward(self, x):
            return self.used(x) * self.frozen

    m1, m2 = Branchy(), Branchy()
    o1, o2 = O.Adam(m1.parameters(), lr=1e-2), O.Adam(m2.parameters(), lr=1e-2)
    step = acopt.trace(train_step, m1, o1, *_batch())
    for i in range(2):
        torch.testing.assert_close(step(*_batch(i)), train_step(m2, o2, *_batch(i)))
    named1 = {id(p): n for n, p in m1.named_parameters()}
    named2 = {id(p): n for n, p in m2.named_parameters()}
    assert sorted(named1[id(p)] for p in o1.state) == sorted(named2[id(p)] for p in o2.state) == ["used.bias", "used.weight"]


def _memory_truth(train, model, optimizer, batch):
    """Plan at the floor, rewrite: bitwise equal to the traced step, measured peak == simulated."""
    import copy

    traced = acopt.trace(train, model, optimizer, *batch)
    prof = acopt.profile(traced, *batch, warmup=0, iterations=1)
    plan = acopt.plan(prof, budget=acopt.floor(prof))
    step = acopt.rewrite(traced, plan, profile=prof)
    assert acopt.profile(step, *batch, warmup=0, iterations=1).peak_bytes == acopt.simulate(prof, plan).peak_bytes
    snapshot = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    a = traced(*batch)
    after = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(snapshot[0])
    optimizer.load_state_dict(snapshot[1])
    assert torch.equal(step(*batch), a)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after))
    return plan


@pytest.mark.parametrize(
    "make",
    [
        lambda p: O.RMSprop(p, lr=0.01, centered=True, momentum=0.9, foreach=True),
        lambda p: O.AdamW(p, lr=0.01, fused=True),
        lambda p: O.NAdam(p, lr=0.01),
        lambda p: O.Rprop(p, lr=0.01, foreach=False),
    ],
    ids=["RMSprop-foreach", "AdamW-fused", "NAdam", "Rprop"],
)
def test_optimizer_steps_plan_and_keep_the_memory_truth(make):
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    assert _memory_truth(train_step, model, make(model.parameters()), _batch(0, rows=256)).recompute


class _SqrtOneMinusBeta(torch.optim.Optimizer):
    """A hand-written optimizer doing host arithmetic on a hyperparameter."""

    def __init__(self, params, lr=1e-2, beta2=0.999):
        super().__init__(params, dict(lr=lr, beta2=beta2))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            scale = math.sqrt(1 - group["beta2"])  # acopt cannot keep this live
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"] * scale)


def test_host_math_on_a_beta_is_a_clear_refusal_not_a_domain_error():
    """Tracing sentinels keep a beta below 1 (1 - beta2 > 0 as in eager), so the step
    reaches the literal comparison that refuses it, instead of math.sqrt failing."""
    model = nn.Linear(4, 2)
    opt = _SqrtOneMinusBeta(model.parameters())

    def step(model, optimizer, x):
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    with pytest.raises(acopt.UnsupportedStep, match="cannot keep live"):
        acopt.trace(step, model, opt, torch.randn(3, 4))
