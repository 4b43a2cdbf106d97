"""acopt.trace: one graph for the whole step, equal to eager training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import acopt
from tests import tiny
from acopt.records import Region
from acopt.tracer import REGION_KEY, UnsupportedStep


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4)
    )


train_step = tiny.train_step


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


def _groups(model: nn.Module, lr: float):
    """Two parameter groups with different hyper-parameters."""
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr * 0.5, "weight_decay": 0.01}]


OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "sgd-nesterov-foreach": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, foreach=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, foreach=False)),
    "adam-foreach": (torch.optim.Adam, dict(lr=1e-2, foreach=True)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, foreach=False)),
    "adamw-foreach": (torch.optim.AdamW, dict(lr=1e-2, foreach=True)),
}


def _eager_step(model, optimizer, batch):
    """Eager reference: Adam/AdamW in their default form, which is what acopt
    traces (acopt/optimizer_form.py): the same math, so bitwise comparable."""
    return train_step(model, optimizer, *batch)


def _assert_same_state(m1, o1, m2, o2):
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert (p1.grad is None) == (p2.grad is None)
        if p1.grad is not None:
            assert torch.equal(p1.grad, p2.grad)
        s1, s2 = o1.state[p1], o2.state[p2]
        assert s1.keys() == s2.keys()
        for k in s1:
            assert torch.equal(torch.as_tensor(s1[k]), torch.as_tensor(s2[k])), k


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "two-groups"])
def test_traced_step_equals_eager_bitwise(name, groups):
    cls, kw = OPTIMIZERS[name]
    m1, m2 = _net(), _net()
    o1 = cls(_groups(m1, kw["lr"]) if groups else m1.parameters(), **kw)
    o2 = cls(_groups(m2, kw["lr"]) if groups else m2.parameters(), **kw)
    step = acopt.trace(train_step, m1, o1, *_batch())
    for i in range(3):
        batch = _batch(i)
        torch.manual_seed(100 + i)
        l1 = step(*batch)
        torch.manual_seed(100 + i)
        l2 = _eager_step(m2, o2, batch)
        assert torch.equal(l1, l2)
        _assert_same_state(m1, o1, m2, o2)


def test_regions_split_forward_backward_optimizer():
    m = _net()
    step = acopt.trace(train_step, m, torch.optim.SGD(m.parameters(), lr=0.1), *_batch())
    regions = [n.meta[REGION_KEY] for n in step.graph.nodes if n.op == "call_function"]
    # contiguous forward, then backward, then optimizer
    order = [r for i, r in enumerate(regions) if i == 0 or r != regions[i - 1]]
    assert order == [Region.FORWARD, Region.BACKWARD, Region.OPTIMIZER]
    targets = {str(n.target) for n in step.graph.nodes if n.meta[REGION_KEY] == Region.FORWARD}
    assert "aten.native_batch_norm.default" in targets
    assert not any("_record_function" in str(n.target) for n in step.graph.nodes)


def test_reads_live_state_after_load_state_dict():
    m1, m2 = _net(), _net()
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    step = acopt.trace(train_step, m1, o1, *_batch())
    snapshot = (copy.deepcopy(m1.state_dict()), copy.deepcopy(o1.state_dict()))
    torch.manual_seed(0)
    step(*_batch(1))
    m1.load_state_dict(snapshot[0])
    o1.load_state_dict(snapshot[1])
    torch.manual_seed(0)
    l1 = step(*_batch(1))
    torch.manual_seed(0)
    l2 = train_step(m2, o2, *_batch(1))
    assert torch.equal(l1, l2)
    _assert_same_state(m1, o1, m2, o2)


def test_tied_weights():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)

    def lm_step(model, optimizer, tokens):
        optimizer.zero_grad()
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        loss.backward()
        optimizer.step()
        return loss.detach()

    m2 = copy.deepcopy(model)
    o1 = torch.optim.SGD(model.parameters(), lr=0.1)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    tokens = torch.randint(0, 10, (3, 5))
    step = acopt.trace(lm_step, model, o1, tokens)
    placeholders = [n.name for n in step.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 3, placeholders  # one weight, one batch, the live lr
    for _ in range(2):
        assert torch.equal(step(tokens), lm_step(m2, o2, tokens))
    assert torch.equal(model[0].weight, m2[0].weight)
    assert model[1].weight is model[0].weight


def _untouched(model, optimizer, fn):
    before_m = copy.deepcopy(model.state_dict())
    before_o = copy.deepcopy(optimizer.state_dict())
    fn()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_m[k])
    assert optimizer.state_dict()["state"].keys() == before_o["state"].keys()


@pytest.mark.parametrize(
    "case, message",
    [
        ("second-optimizer", "not in the optimizer argument"),
        ("data-dependent", "data-dependent"),
        ("closure-optimizer", "closure"),
        ("no-zero-grad", "zero_grad"),
        ("backward-after-step", "backward\\(\\) after optimizer.step"),
        ("no-step", "never calls optimizer.step"),
        ("differentiable", "differentiable=True"),
    ],
)
def test_unsupported_constructs_raise_clear_errors(case, message):
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    step = train_step
    if case == "second-optimizer":

        def step(model, optimizer, x, y):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            other.step()
            return x.sum()

    elif case == "data-dependent":

        def step(model, optimizer, x, y):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if loss > 1:  # control flow on a tensor's value
                loss = loss * 2
            loss.backward()
            optimizer.step()
            return loss

    elif case == "closure-optimizer":
        optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1)
    elif case == "no-zero-grad":

        def step(model, optimizer, x, y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            return loss

    elif case == "backward-after-step":

        def step(model, optimizer, x, y):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

    elif case == "no-step":

        def step(model, optimizer, x, y):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

    elif case == "differentiable":
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1, differentiable=True)

    def attempt():
        with pytest.raises(UnsupportedStep, match=message):
            acopt.trace(step, model, optimizer, *_batch())

    _untouched(model, optimizer, attempt)


def test_batch_shape_change_is_an_error():
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    step = acopt.trace(train_step, m, opt, *_batch())
    with pytest.raises(acopt.GuardFailure, match="trace again"):
        step(torch.randn(3, 8), torch.randint(0, 4, (3,)))


@pytest.mark.parametrize("source", ["random", "numpy"])
def test_host_random_draws_are_refused_and_generators_restored(source):
    import random

    import numpy as np

    def step(model, optimizer, x, y):
        optimizer.zero_grad()
        flip = random.random() < 0.5 if source == "random" else np.random.rand() < 0.5
        loss = F.cross_entropy(model(x.flip(0) if flip else x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    random.seed(3)
    np.random.seed(3)
    before = (random.getstate(), np.random.get_state()[1].copy())
    m = _net()
    with pytest.raises(UnsupportedStep, match="draws from Python's"):
        acopt.trace(step, m, torch.optim.SGD(m.parameters(), lr=0.1), *_batch())
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
