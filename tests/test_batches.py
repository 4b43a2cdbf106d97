"""Batches and results as users pass them: dicts and nests of tensors, aux outputs
(issue "The training loops people write", item 5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import acopt


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, inputs, scale=1.0):
        return self.body(inputs["x"]) * scale


def dict_step(model, optimizer, batch):
    optimizer.zero_grad()
    logits = model(batch["inputs"], scale=batch["scale"])
    loss = F.cross_entropy(logits, batch["labels"])
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "logits": logits.detach(), "accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}


def _batch(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": {"x": torch.randn(6, 8, generator=g)}, "labels": torch.randint(0, 4, (6,), generator=g), "scale": scale}


def test_dict_batch_and_dict_result_equal_eager_bitwise():
    m1, m2 = Net(), Net()
    o1 = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    step = acopt.compile(dict_step, m1, o1, _batch(), budget="100%")
    for i in range(3):
        torch.manual_seed(i)
        a = step(_batch(i))
        torch.manual_seed(i)
        b = dict_step(m2, o2, _batch(i))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_batch_constants_are_guarded():
    m = Net()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    traced = acopt.trace(dict_step, m, o, _batch())
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(acopt.GuardFailure, match="constant of the batch"):
        traced(_batch(scale=3.0))
    with pytest.raises(acopt.GuardFailure, match="structure"):
        traced({"inputs": {"x": torch.randn(6, 8)}, "labels": torch.randint(0, 4, (6,))})
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_compile_retraces_for_a_new_constant():
    m1, m2 = Net(), Net()
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.1), torch.optim.SGD(m2.parameters(), lr=0.1)
    step = acopt.compile(dict_step, m1, o1, _batch(), budget="100%")
    for i, scale in enumerate([2.0, 3.0, 2.0]):
        torch.manual_seed(i)
        a = step(_batch(i, scale))
        torch.manual_seed(i)
        b = dict_step(m2, o2, _batch(i, scale))
        assert torch.equal(a["loss"], b["loss"])


def test_non_tensor_leaf_is_refused():
    m = Net()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(acopt.UnsupportedStep, match=r"batch\[0\]\['extra'\] is a object"):
        acopt.trace(dict_step, m, o, {**_batch(), "extra": object()})


def test_a_batch_tensor_that_requires_grad_is_refused():
    m = Net()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    b = _batch()
    b["inputs"]["x"].requires_grad_()
    with pytest.raises(acopt.UnsupportedStep, match=r"batch\[0\]\['inputs'\]\['x'\] requires grad"):
        acopt.trace(dict_step, m, o, b)
