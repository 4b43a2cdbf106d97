"""Optimizers are traced in eager's own form (acopt/optimizer_form.py): Adam's
step count is read on the host at every call (``aten._local_scalar_dense`` in
the graph), so the traced step is eager's default step bitwise, also after
``load_state_dict`` and with an LR scheduler; optimizers whose eager form
branches on that value (RAdam) or bakes a hyperparameter (Rprop) are traced
in their capturable form instead."""

from __future__ import annotations

import collections
import copy

import pytest
import torch

import acopt
from tests.tiny import batch, net, train_step

O = torch.optim


def _ops(step) -> collections.Counter:
    return collections.Counter(str(n.target) for n in step.graph.nodes if n.op == "call_function")


def _same(m1, m2) -> bool:
    return all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_adamw_is_eager_bitwise_over_20_steps_with_a_scheduler_and_load_state_dict(foreach):
    m1, m2 = net(), net()
    kw = dict(lr=0.01, weight_decay=0.1, foreach=foreach)
    o1, o2 = O.AdamW(m1.parameters(), **kw), O.AdamW(m2.parameters(), **kw)
    s1, s2 = O.lr_scheduler.StepLR(o1, 3, 0.5), O.lr_scheduler.StepLR(o2, 3, 0.5)
    step = acopt.trace(train_step, m1, o1, *batch())
    assert step.provenance["capturable_form"] == []
    counts = _ops(step)
    n_params = len(list(m1.parameters()))
    assert counts["aten._local_scalar_dense.default"] == n_params  # each step count read per call
    assert counts["aten.pow.Scalar"] == counts["aten.pow.Tensor_Tensor"] == counts["aten.reciprocal.default"] == 0
    for i in range(20):
        if i == 10:  # another run's optimizer state: other step counts, one per parameter
            other = net()
            o3 = O.AdamW(other.parameters(), **kw)
            s3 = O.lr_scheduler.StepLR(o3, 3, 0.5)  # (its groups have the scheduler's keys too)
            for j in range(4):
                train_step(other, o3, *batch(50 + j))
                s3.step()
            sd = o3.state_dict()
            sd["state"][0]["step"] = torch.tensor(7.0)  # parameters at different steps
            o1.load_state_dict(copy.deepcopy(sd))  # (load_state_dict keeps the tensors it is given)
            o2.load_state_dict(copy.deepcopy(sd))
        a, b = step(*batch(i)), train_step(m2, o2, *batch(i))
        s1.step()
        s2.step()
        assert torch.equal(a, b), i
        assert _same(m1, m2), i
    for p, q in zip(m1.parameters(), m2.parameters()):
        for k in o2.state[q]:
            assert torch.equal(o1.state[p][k], o2.state[q][k]), k


def test_a_step_count_changed_between_calls_is_read_not_baked():
    m1, m2 = net(), net()
    o1, o2 = O.Adam(m1.parameters(), lr=0.01), O.Adam(m2.parameters(), lr=0.01)
    step = acopt.trace(train_step, m1, o1, *batch())
    step(*batch(0)), train_step(m2, o2, *batch(0))
    for o in (o1, o2):
        for st in o.state.values():
            st["step"].fill_(1000.0)
    assert torch.equal(step(*batch(1)), train_step(m2, o2, *batch(1)))
    assert _same(m1, m2)
    assert all(float(st["step"]) == 1001.0 for st in o1.state.values())


@pytest.mark.parametrize(
    ("cls", "kw", "bitwise"),
    [(O.RAdam, dict(lr=0.01), False), (O.Rprop, dict(lr=0.01), True)],
    ids=["RAdam-branches-on-the-step", "Rprop-bakes-etaplus"],
)
def test_an_eager_form_that_cannot_be_traced_falls_back_to_capturable(cls, kw, bitwise):
    m1, m2 = net(), net()
    o1, o2 = cls(m1.parameters(), **kw), cls(m2.parameters(), **kw)
    step = acopt.trace(train_step, m1, o1, *batch())
    assert step.provenance["capturable_form"] == [cls.__name__]
    for i in range(8):  # RAdam's rectification switches on after 5 steps
        a, b = step(*batch(i)), train_step(m2, o2, *batch(i))
        assert torch.equal(a, b) if bitwise else torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    for p, q in zip(m1.parameters(), m2.parameters()):
        if bitwise:
            assert torch.equal(p, q)
        else:  # the capturable form: eager's at float rounding
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_eager_form_with_another_optimizer_in_capturable_form():
    def both(model, optimizers, x, y):
        for o in optimizers:
            o.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for o in optimizers:
            o.step()
        return loss.detach()

    def make(m):
        first, *rest = m.parameters()
        return [O.AdamW([first], lr=0.01), O.RAdam(rest, lr=0.01)]

    m1, m2 = net(), net()
    o1, o2 = make(m1), make(m2)
    step = acopt.trace(both, m1, o1, *batch())
    assert step.provenance["capturable_form"] == ["RAdam"]
    assert torch.equal(step(*batch(0)), both(m2, o2, *batch(0)))
    assert torch.equal(next(m1.parameters()), next(m2.parameters()))  # AdamW's: eager's form, bitwise
    for i in range(1, 4):
        torch.testing.assert_close(step(*batch(i)), both(m2, o2, *batch(i)), rtol=1e-5, atol=1e-6)
