"""Plain Python values a step reads from globals, closures and config objects are
guarded (acopt/python_values.py): a change after tracing retraces (compile,
wrap) or fails a guard (trace), never runs the old value silently."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acopt
from acopt import python_values

ALPHA = 1.0
CFG = types.SimpleNamespace(smooth=0.0, aux=False)
TABLE = {"scale": 1.0}
USE_RESIDUAL = True
COUNTER = 0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


def _scaled_loss(logits, y):  # a helper the step calls: its globals are walked too
    return F.cross_entropy(logits, y, label_smoothing=CFG.smooth) * TABLE["scale"]


def global_step(model, opt, x, y):
    loss = _scaled_loss(model(x), y) * ALPHA
    if CFG.aux:
        loss = loss + model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def _run_both(step_fn, changes, make_model=_model):
    """Eager and acopt.compile side by side; ``changes[i]()`` runs before step i."""
    m_eager, m_acopt = make_model(), make_model()
    o_eager = torch.optim.SGD(m_eager.parameters(), lr=0.1, momentum=0.9)
    o_acopt = torch.optim.SGD(m_acopt.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch()
    step = acopt.compile(step_fn, m_acopt, o_acopt, x, y, budget="100%")
    for change in changes:
        change()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "tracing and planning the step again: <what changed>"
            got = step(x, y)
        want = step_fn(m_eager, o_eager, x, y)
        assert torch.equal(got, want)
        for p, q in zip(m_eager.parameters(), m_acopt.parameters(), strict=True):
            assert torch.equal(p, q)


def _same():
    pass


@pytest.fixture
def restore_globals():
    saved = (ALPHA, CFG.smooth, CFG.aux, TABLE["scale"], USE_RESIDUAL, COUNTER)
    yield
    g = globals()
    g["ALPHA"], CFG.smooth, CFG.aux, TABLE["scale"], g["USE_RESIDUAL"], g["COUNTER"] = saved


def _set_global(name, value):
    def change():
        globals()[name] = value

    return change


def _set_attr(obj, name, value):
    return lambda: setattr(obj, name, value)


def test_globals_config_attributes_and_dict_items_are_read_at_every_call(restore_globals):
    _run_both(
        global_step,
        [
            _same,
            _set_global("ALPHA", 3.0),
            _same,
            _set_attr(CFG, "smooth", 0.2),
            lambda: TABLE.__setitem__("scale", 0.5),
            _set_attr(CFG, "aux", True),  # a branch the old graph does not have
        ],
    )


def test_closure_variables_are_read_at_every_call():
    def make_step():
        weight = 1.0

        def step_fn(model, opt, x, y):
            loss = F.cross_entropy(model(x), y) * weight
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        def set_weight(v):
            nonlocal weight
            weight = v

        return step_fn, set_weight

    step_fn, set_weight = make_step()
    _run_both(step_fn, [_same, lambda: set_weight(5.0), _same])


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        if USE_RESIDUAL:  # a module global read by the user's model code
            h = h + x
        return self.head(h)


def _residual_model():
    torch.manual_seed(0)
    return _Residual()


def plain_step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def test_a_global_the_model_reads_is_guarded(restore_globals):
    _run_both(plain_step, [_same, _set_global("USE_RESIDUAL", False), _same], make_model=_residual_model)


def test_wrap_retraces_when_a_global_the_model_reads_changes(restore_globals):
    x, y = _batch()
    eager, wrapped_model = _residual_model(), _residual_model()
    wrapped = acopt.wrap(wrapped_model, x, budget="100%")
    for change in (_same, _set_global("USE_RESIDUAL", False)):
        change()
        want = F.cross_entropy(eager(x), y)
        got = F.cross_entropy(wrapped(x), y)
        assert torch.equal(got, want)
        want.backward()
        got.backward()
        for p, q in zip(eager.parameters(), wrapped_model.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
            p.grad = q.grad = None


def test_traced_step_fails_a_guard_and_touches_nothing(restore_globals):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    traced = acopt.trace(global_step, model, opt, x, y)
    traced(x, y)
    before = [p.detach().clone() for p in model.parameters()]
    globals()["ALPHA"] = 2.0
    with pytest.raises(acopt.GuardFailure, match="global ALPHA .* is 2.0, 1.0 when traced"):
        traced(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def counting_step(model, opt, x, y):
    global COUNTER
    COUNTER += 1
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def test_a_step_that_writes_a_global_it_reads_is_refused_and_the_value_restored(restore_globals):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(acopt.UnsupportedStep, match="assigns global COUNTER"):
        acopt.compile(counting_step, model, opt, x, y, budget="100%")
    assert COUNTER == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not opt.state


def test_library_code_is_not_walked():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    assert python_values.record(None, model) == []
    reads = python_values.record(global_step, model)
    assert {r.where.split(" (")[0] for r in reads} == {
        "global ALPHA",
        "global CFG.smooth",
        "global CFG.aux",
        "global TABLE['scale']",
    }


WIDTH = 8


class _Built(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, 4)  # read when the model is built, not in a step

    def forward(self, x):
        return self.lin(x) * ALPHA


def test_values_read_only_when_the_model_is_built_are_not_guarded():
    assert [r.where for r in python_values.record(None, _Built())] == ["global ALPHA (read by _Built.forward)"]


CLASS_WEIGHTS = torch.tensor([1.0, 2.0, 1.0, 0.5])


def weighted_step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y, weight=CLASS_WEIGHTS)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


@pytest.fixture
def restore_weights():
    saved = CLASS_WEIGHTS
    yield
    globals()["CLASS_WEIGHTS"] = saved


def test_a_global_tensor_rebound_after_tracing_is_traced_again(restore_weights):
    _run_both(
        weighted_step,
        [
            _same,
            lambda: CLASS_WEIGHTS.mul_(2.0),  # in place: the graph reads the same tensor
            _set_global("CLASS_WEIGHTS", torch.tensor([0.1, 1.0, 3.0, 1.0])),  # rebound: a new tensor
            _same,
        ],
    )


EMA = torch.zeros(())


def ema_step(model, opt, x, y):
    global EMA
    loss = F.cross_entropy(model(x), y)
    EMA = 0.9 * EMA + 0.1 * loss.detach()  # a running value kept in a global: runs no Python when traced
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def test_a_step_rebinding_a_global_tensor_is_refused_and_the_tensor_restored():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = EMA
    with pytest.raises(acopt.UnsupportedStep, match="assigns global EMA"):
        acopt.trace(ema_step, model, opt, *_batch())
    assert EMA is before and not isinstance(EMA, torch._subclasses.FakeTensor)


class _Step:
    """A training step as a callable object, its settings on ``self``."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __call__(self, model, opt, x, y):
        loss = F.cross_entropy(model(x), y) * self.alpha
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    def method(self, model, opt, x, y):
        return self(model, opt, x, y)


def test_settings_of_a_callable_step_object_are_guarded():
    step_object = _Step(1.0)
    _run_both(step_object, [_same, _set_attr(step_object, "alpha", 4.0), _same])


def test_settings_of_a_bound_method_step_are_guarded():
    step_object = _Step(1.0)
    _run_both(step_object.method, [_same, _set_attr(step_object, "alpha", 0.25)])


def test_a_step_assigning_an_outer_variable_is_refused_before_tracing():
    last = {"loss": None}
    steps = 0

    def logging_step(model, opt, x, y):
        nonlocal steps
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += 1
        return loss

    def local_closure_step(model, opt, x, y):
        total = 0.0

        def add(v):
            nonlocal total  # the step's own variable: fine
            total = total + v

        loss = F.cross_entropy(model(x), y)
        add(1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss * total

    assert python_values.assigned_outside(logging_step) == ["nonlocal steps"]
    assert python_values.assigned_outside(local_closure_step) == []
    assert python_values.assigned_outside(counting_step) == ["global COUNTER"]
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(acopt.UnsupportedStep, match="assigns nonlocal steps"):
        acopt.trace(logging_step, model, opt, *_batch())
    assert steps == 0 and last["loss"] is None
    acopt.trace(local_closure_step, model, opt, *_batch())
