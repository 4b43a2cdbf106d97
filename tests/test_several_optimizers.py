"""Several optimizers in one step (issue "The training loops people write", item 4)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import acopt
from tests.tiny import batch as _batch
from tests.tiny import net as _net


def _optimizers(model):
    """SGD with momentum for the matrices, SGD without for the biases (dict, as users write it)."""
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return {"matrices": torch.optim.SGD(matrices, lr=0.1, momentum=0.9), "vectors": torch.optim.SGD(vectors, lr=0.05)}


def two_step(model, optimizers, x, y):
    for o in optimizers.values():
        o.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for o in optimizers.values():
        o.step()
    return loss.detach()


def test_two_optimizers_equal_eager_bitwise_with_schedulers():
    m1, m2 = _net(), _net()
    o1, o2 = _optimizers(m1), _optimizers(m2)
    s1 = torch.optim.lr_scheduler.StepLR(o1["vectors"], 2, 0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2["vectors"], 2, 0.5)
    step = acopt.compile(two_step, m1, o1, *_batch(), budget="100%")
    for i in range(6):
        assert torch.equal(step(*_batch(i)), two_step(m2, o2, *_batch(i)))
        s1.step()
        s2.step()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert step.traced.provenance["optimizer"] == "SGD, SGD"


def test_an_optimizer_not_passed_is_refused():
    m = _net()
    opts = _optimizers(m)

    def step(model, optimizer, x, y):
        return two_step(model, opts, x, y)

    with pytest.raises(acopt.UnsupportedStep, match="not in the optimizer argument"):
        acopt.trace(step, m, opts["matrices"], *_batch())


def test_a_parameter_in_two_optimizers_is_refused():
    m = _net()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.SGD(m.parameters(), lr=0.1)]
    with pytest.raises(acopt.UnsupportedStep, match="updated twice"):
        acopt.trace(two_step, m, dict(enumerate(opts)), *_batch())


def test_a_dropped_optimizer_is_a_guard_failure():
    m = _net()
    opts = _optimizers(m)
    traced = acopt.trace(two_step, m, opts, *_batch())
    traced(*_batch())
    del opts["vectors"]
    gc.collect()
    with pytest.raises(acopt.GuardFailure, match="no longer exists"):
        traced(*_batch())
