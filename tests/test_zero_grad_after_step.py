"""``loss.backward(); optimizer.step(); optimizer.zero_grad()``: the loop most
people write, with zero_grad() last, so no parameter holds a gradient when the
step returns. Which parameters get optimizer state must come from the
gradients present when ``step()`` runs, not from those left at the end: the
tracer once took the latter, dropped every parameter's state and traced the
optimizer's first-step form (SGD's momentum buffer set to the gradient, never
accumulated: silently different from eager from the second step; AdamW's step
count baked: a crash). Each case is compared with eager PyTorch bitwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import acopt
from tests.tiny import batch, net

O = torch.optim

OPTIMIZERS = {
    "sgd-momentum": lambda p: O.SGD(p, lr=0.1, momentum=0.9),
    "sgd-nesterov-dampening": lambda p: O.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda p: O.Adam(p, lr=0.01),
    "adamw-betas": lambda p: O.AdamW(p, lr=0.01, betas=(0.9, 0.99)),
    "rmsprop-momentum": lambda p: O.RMSprop(p, lr=0.01, momentum=0.5),
    "adagrad": lambda p: O.Adagrad(p, lr=0.1),
    # reads its step count with .item() as eager does (not "compiling"): lr_decay's Python float, bitwise
    "adagrad-lr-decay": lambda p: O.Adagrad(p, lr=0.1, lr_decay=0.01, weight_decay=0.01),
    "nadam": lambda p: O.NAdam(p, lr=0.01),
    "radam": lambda p: O.RAdam(p, lr=0.01),
}


def zero_grad_last(model, optimizer, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def _compare(make_opt, *, compiled: bool, steps: int = 4) -> None:
    m_eager, m_acopt = net(), net()
    o_eager, o_acopt = make_opt(m_eager.parameters()), make_opt(m_acopt.parameters())
    if compiled:
        step = acopt.compile(zero_grad_last, m_acopt, o_acopt, *batch(), budget="floor")
    else:
        step = acopt.trace(zero_grad_last, m_acopt, o_acopt, *batch())
    # an optimizer traced in its capturable form (RAdam: acopt.optimizer_form) is equal at rounding
    traced = step.traced if compiled else step
    same = torch.testing.assert_close if traced.provenance["capturable_form"] else _bitwise
    for i in range(steps):
        want = zero_grad_last(m_eager, o_eager, *batch(i))
        got = step(*batch(i))
        same(got, want)
        for p, q in zip(m_eager.parameters(), m_acopt.parameters(), strict=True):
            same(q, p)
            assert q.grad is None
            assert o_eager.state[p].keys() == o_acopt.state[q].keys()
            for key, value in o_eager.state[p].items():
                same(torch.as_tensor(o_acopt.state[q][key]), torch.as_tensor(value))


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_traced_step_equals_eager(name):
    _compare(OPTIMIZERS[name], compiled=False)


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw-betas"])
def test_compiled_step_equals_eager(name):
    _compare(OPTIMIZERS[name], compiled=True)


def test_retrace_after_a_guard_failure_keeps_the_momentum():
    """A retrace (here: a module setting changed) starts from the state the first variant left."""
    m_eager, m_acopt = net(act=torch.nn.LeakyReLU), net(act=torch.nn.LeakyReLU)
    o_eager = O.SGD(m_eager.parameters(), lr=0.1, momentum=0.9)
    o_acopt = O.SGD(m_acopt.parameters(), lr=0.1, momentum=0.9)
    step = acopt.compile(zero_grad_last, m_acopt, o_acopt, *batch(), budget="floor")
    for i in range(4):
        if i == 2:
            m_eager[1].negative_slope = m_acopt[1].negative_slope = 0.3
        want = zero_grad_last(m_eager, o_eager, *batch(i))
        with pytest.warns(UserWarning, match="negative_slope") if i == 2 else _nothing():
            got = step(*batch(i))
        assert torch.equal(got, want)
        assert all(torch.equal(p, q) for p, q in zip(m_eager.parameters(), m_acopt.parameters(), strict=True))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _zero_grad_first(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def _dropout_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 4))


SWEEP = {
    "sgd-nesterov-wd": lambda m: O.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd-maximize": lambda m: O.SGD(m.parameters(), lr=0.1, momentum=0.5, maximize=True),
    "adam-amsgrad-foreach": lambda m: O.Adam(m.parameters(), lr=0.01, amsgrad=True, foreach=True),
    "adamw-foreach": lambda m: O.AdamW(m.parameters(), lr=0.01, foreach=True),
    "adamw-fused": lambda m: O.AdamW(m.parameters(), lr=0.01, fused=True),
    "adam-param-groups": lambda m: O.Adam(
        [{"params": m[0].parameters(), "lr": 0.02}, {"params": m[3].parameters(), "weight_decay": 0.1}], lr=0.01
    ),
    "rmsprop-centered": lambda m: O.RMSprop(m.parameters(), lr=0.01, centered=True, momentum=0.9),
    "adagrad-lr-decay": lambda m: O.Adagrad(m.parameters(), lr=0.1, lr_decay=0.01, weight_decay=0.01),
    "adadelta": lambda m: O.Adadelta(m.parameters(), lr=1.0),
    "adamax": lambda m: O.Adamax(m.parameters(), lr=0.01),
    "nadam-decoupled": lambda m: O.NAdam(m.parameters(), lr=0.01, decoupled_weight_decay=True, weight_decay=0.01),
    "radam-decoupled": lambda m: O.RAdam(m.parameters(), lr=0.01, decoupled_weight_decay=True, weight_decay=0.01),
    "asgd": lambda m: O.ASGD(m.parameters(), lr=0.01),
    "rprop": lambda m: O.Rprop(m.parameters(), lr=0.01),
}


@pytest.mark.slow
@pytest.mark.parametrize("order", ["zero-grad-last", "zero-grad-first"])
@pytest.mark.parametrize("name", SWEEP)
def test_optimizer_sweep_with_scheduler_and_dropout_equals_eager(name, order):
    """Compiled at the floor, 5 steps, StepLR outside the step, dropout masks from eager's generator."""
    step_fn = zero_grad_last if order == "zero-grad-last" else _zero_grad_first
    m_eager, m_acopt = _dropout_net(), _dropout_net()
    o_eager, o_acopt = SWEEP[name](m_eager), SWEEP[name](m_acopt)
    s_eager, s_acopt = O.lr_scheduler.StepLR(o_eager, 2, 0.5), O.lr_scheduler.StepLR(o_acopt, 2, 0.5)
    step = acopt.compile(step_fn, m_acopt, o_acopt, *batch(), budget="floor")
    same = torch.testing.assert_close if step.traced.provenance["capturable_form"] else _bitwise
    for i in range(5):
        torch.manual_seed(100 + i)
        want = step_fn(m_eager, o_eager, *batch(i))
        s_eager.step()
        torch.manual_seed(100 + i)
        got = step(*batch(i))
        s_acopt.step()
        same(got, want)
        for p, q in zip(m_eager.parameters(), m_acopt.parameters(), strict=True):
            same(q, p)
