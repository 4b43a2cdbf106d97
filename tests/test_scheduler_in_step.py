"""``scheduler.step()`` called inside ``train_step`` (issue "The training loops
people write", item 4): run on the host after the graph, as eager runs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler

import acopt
from tests.tiny import batch as _batch
from tests.tiny import net as _net


def _step_with(scheduler, before=False):
    def train_step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if before:
            scheduler.step()
        optimizer.step()
        if not before:
            scheduler.step()
        return loss.detach()

    return train_step


SCHEDULERS = {
    "warmup-then-cosine": lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, 0.1, total_iters=3), lr_scheduler.CosineAnnealingLR(o, 10)], milestones=[3]
    ),
    "onecycle": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=20),
    "step": lambda o: lr_scheduler.StepLR(o, 2, 0.5),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_inside_the_step_equals_eager_bitwise(name):
    m1, m2 = _net(), _net()
    o1 = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    s1, s2 = SCHEDULERS[name](o1), SCHEDULERS[name](o2)
    step = acopt.compile(_step_with(s1), m1, o1, *_batch(), budget="100%")
    for i in range(8):
        assert torch.equal(step(*_batch(i)), _step_with(s2)(m2, o2, *_batch(i)))
    assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"]
    assert s1.state_dict() == s2.state_dict()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_scheduler_before_the_optimizer_is_refused():
    m = _net()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    s = lr_scheduler.StepLR(o, 1, 0.5)
    with pytest.raises(acopt.UnsupportedStep, match="before optimizer.step"):
        acopt.trace(_step_with(s, before=True), m, o, *_batch())
    assert o.param_groups[0]["lr"] == 0.1 and s.last_epoch == 0


def test_plateau_on_a_tensor_metric_is_refused():
    m = _net()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    s = lr_scheduler.ReduceLROnPlateau(o)

    def train_step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        s.step(loss)
        return loss.detach()

    with pytest.raises(acopt.UnsupportedStep, match="with a tensor"):
        acopt.trace(train_step, m, o, *_batch())
