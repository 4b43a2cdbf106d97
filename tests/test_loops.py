"""Training loops written the way users write them, against EAGER PyTorch.

Every case either matches the same eager loop (bitwise: Adam/AdamW are
traced in eager's own default form, acopt/optimizer_form.py) over several
steps, or raises a clear acopt error
(:class:`acopt.UnsupportedStep` / :class:`acopt.GuardFailure`) with the model
and optimizer untouched. Tiny models (Linear 8->16->4, batch 6) and one
intra-op thread keep the file fast.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim.lr_scheduler as lrs
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import acopt
from tests import tiny
from acopt import GuardFailure, UnsupportedStep

# The no-recompute peak: these models are so small that the floor is the peak.
BUDGET = "100%"
MODES = ["trace", "compile"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 4))


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))


_batch = tiny.batch
train_step = tiny.train_step


def _build(mode, fn, model, optimizer, *batch):
    if mode == "trace":
        return acopt.trace(fn, model, optimizer, *batch)
    return acopt.compile(fn, model, optimizer, *batch, budget=BUDGET)


def _eager(fn, model, optimizer, *batch):
    """The eager reference: the optimizer in its own default form, which acopt traces."""
    return fn(model, optimizer, *batch)


def _numbers(group):
    return {k: v for k, v in group.items() if k not in ("params", "capturable")}


def _assert_same(m1, o1, m2, o2, *, exact=True, rtol=None, atol=None):
    """Model state, .grad, optimizer state and hyperparameters of two copies."""

    def eq(a, b, what):
        if exact:
            assert torch.equal(a, b), what
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")

    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        eq(s1[k], s2[k], k)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters(), strict=True):
        assert p1.requires_grad == p2.requires_grad, name
        assert (p1.grad is None) == (p2.grad is None), f"{name}.grad"
        if p1.grad is not None:
            eq(p1.grad, p2.grad, f"{name}.grad")
        st1, st2 = o1.state.get(p1, {}), o2.state.get(p2, {})
        if st2:  # eager creates state lazily; acopt creates it at trace time
            assert st1.keys() == st2.keys(), name
            for k in st1:
                eq(torch.as_tensor(st1[k]), torch.as_tensor(st2[k]), f"{name}/{k}")
    assert [_numbers(g) for g in o1.param_groups] == [_numbers(g) for g in o2.param_groups]


def _snapshot(model, optimizer):
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    opt = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    return copy.deepcopy(model.state_dict()), grads, opt, torch.get_rng_state()


def _assert_untouched(before, model, optimizer):
    state, grads, opt, rng = before
    assert torch.equal(torch.get_rng_state(), rng), "the global generator advanced"
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None) == (g is None)
        if g is not None:
            assert torch.equal(p.grad, g)
    if optimizer is not None:
        o = optimizer.state_dict()
        assert o["param_groups"] == opt["param_groups"]
        assert o["state"].keys() == opt["state"].keys()
        for i in opt["state"]:
            assert o["state"][i].keys() == opt["state"][i].keys()
            for k, v in opt["state"][i].items():
                assert torch.equal(torch.as_tensor(o["state"][i][k]), torch.as_tensor(v)), (i, k)


def _in_lockstep(
    step, m1, o1, m2, o2, fn=train_step, *, steps, before=None, batch=_batch, ctx=None, losses=None, **same
):
    """Run ``steps`` steps through ``step`` and eagerly; ``before(i)`` changes both copies
    before step i (a scheduler, a freeze...). Appends the losses to ``losses``."""
    losses = [] if losses is None else losses
    for i in range(steps):
        if before is not None:
            before(i)
        b = batch(i)
        with ctx(i) if ctx else contextlib.nullcontext():
            torch.manual_seed(1000 + i)
            l1 = step(*b)
            rng1 = torch.get_rng_state()
        with ctx(i) if ctx else contextlib.nullcontext():
            torch.manual_seed(1000 + i)
            l2 = _eager(fn, m2, o2, *b)
            rng2 = torch.get_rng_state()
        if same.get("exact", True):
            assert torch.equal(l1, l2), f"loss at step {i}: {l1} vs {l2}"
        else:
            torch.testing.assert_close(l1, l2, rtol=same.get("rtol"), atol=same.get("atol"))
        assert torch.equal(rng1, rng2), f"generator state after step {i}"
        _assert_same(m1, o1, m2, o2, **same)
        losses.append(l2)
    return losses


# ---------------------------------------------------------------------------
# 1. every LR scheduler, and hand-written schedules, over 20 steps
# ---------------------------------------------------------------------------
def _sgd(m, **kw):
    return torch.optim.SGD(m.parameters(), **{"lr": 0.1, "momentum": 0.9, **kw})


def _adam(m, **kw):
    return torch.optim.Adam(m.parameters(), **{"lr": 1e-2, **kw})


def _adamw(m, **kw):
    return torch.optim.AdamW(m.parameters(), **{"lr": 1e-2, **kw})


def _set_every_step(key, value):
    def hand(opt, i, loss):
        for g in opt.param_groups:
            g[key] = value(i)

    return hand


def _sched_step(sched, i, loss):
    sched.step()


# name -> (optimizer factory, scheduler factory or hand-written schedule, how it steps)
SCHEDULES = {
    "StepLR": (_sgd, lambda o: lrs.StepLR(o, step_size=5, gamma=0.5), _sched_step),
    "MultiStepLR": (_sgd, lambda o: lrs.MultiStepLR(o, milestones=[3, 8, 15], gamma=0.3), _sched_step),
    "ExponentialLR-adamw-foreach": (
        lambda m: _adamw(m, foreach=True),
        lambda o: lrs.ExponentialLR(o, gamma=0.9),
        _sched_step,
    ),
    "LambdaLR-warmup": (_sgd, lambda o: lrs.LambdaLR(o, lambda e: min(1.0, (e + 1) / 5)), _sched_step),
    "CosineAnnealingLR-adam": (
        lambda m: _adam(m, foreach=False),
        lambda o: lrs.CosineAnnealingLR(o, T_max=20, eta_min=1e-4),
        _sched_step,
    ),
    "OneCycleLR-sgd-momentum": (_sgd, lambda o: lrs.OneCycleLR(o, max_lr=0.1, total_steps=25), _sched_step),
    "OneCycleLR-adam-betas": (_adam, lambda o: lrs.OneCycleLR(o, max_lr=1e-2, total_steps=25), _sched_step),
    "CyclicLR-sgd-cycle-momentum": (
        _sgd,
        lambda o: lrs.CyclicLR(
            o, base_lr=0.01, max_lr=0.1, step_size_up=4, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95
        ),
        _sched_step,
    ),
    "LinearLR": (_sgd, lambda o: lrs.LinearLR(o, start_factor=0.25, total_iters=8), _sched_step),
    "SequentialLR-warmup-cosine": (
        _sgd,
        lambda o: lrs.SequentialLR(
            o,
            [lrs.LinearLR(o, start_factor=0.1, total_iters=5), lrs.CosineAnnealingLR(o, T_max=15)],
            milestones=[5],
        ),
        _sched_step,
    ),
    "ReduceLROnPlateau": (
        _sgd,
        lambda o: lrs.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=0.05),
        lambda sched, i, loss: sched.step(loss),
    ),
    "weight-decay-schedule-sgd": (
        lambda m: _sgd(m, weight_decay=1e-3),
        None,
        _set_every_step("weight_decay", lambda i: 1e-3 * (1 + i)),
    ),
    "weight-decay-schedule-adamw": (
        lambda m: _adamw(m, weight_decay=0.01),
        None,
        _set_every_step("weight_decay", lambda i: 0.01 * math.cos(i / 10) + 0.02),
    ),
    "lr-every-step-sgd-nesterov": (
        lambda m: _sgd(m, nesterov=True),
        None,
        _set_every_step("lr", lambda i: 0.05 * 0.93**i + 0.001 * i),
    ),
    "lr-every-step-adamw-foreach": (
        lambda m: _adamw(m, foreach=True, weight_decay=0.01),
        None,
        _set_every_step("lr", lambda i: 1e-2 * 0.93**i + 1e-4 * i),
    ),
    "lr-every-step-adamw-for-loop": (
        lambda m: _adamw(m, foreach=False, weight_decay=0.01),
        None,
        _set_every_step("lr", lambda i: 1e-2 * 0.93**i + 1e-4 * i),
    ),
}


def _schedule_loop(name, mode, *, scheduler_after_build=False):
    make_opt, make_sched, advance = SCHEDULES[name]
    m1, m2 = _mlp(), _mlp()
    o1, o2 = make_opt(m1), make_opt(m2)
    if not scheduler_after_build:
        s1, s2 = (make_sched(o1), make_sched(o2)) if make_sched else (o1, o2)
    step = _build(mode, train_step, m1, o1, *_batch(0))
    if scheduler_after_build:
        s1, s2 = make_sched(o1), make_sched(o2)
    seen, losses = [], []

    def before(i):
        if i:
            advance(s1, i, losses[-1])
            advance(s2, i, losses[-1])
        seen.append(tuple(sorted((k, v) for k, v in o1.param_groups[0].items() if k != "params")))

    _in_lockstep(step, m1, o1, m2, o2, steps=20, before=before, losses=losses)
    assert len(set(seen)) > 1, f"{name}: the schedule never changed a hyperparameter"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_matches_eager(name, mode):
    _schedule_loop(name, mode)


# The traced step never calls optimizer.step(), so a scheduler made after tracing
# warns that it was stepped first (its schedule is unaffected).
@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler\.step\(\)`")
@pytest.mark.parametrize("mode", MODES)
def test_scheduler_created_after_tracing(mode):
    """OneCycleLR made after the step: it adds keys and rewrites lr and betas."""
    _schedule_loop("OneCycleLR-adam-betas", mode, scheduler_after_build=True)


def test_onecycle_adam_close_to_default_eager_adam():
    """Against eager default (non-capturable) Adam: equal to float rounding."""
    m1, m2 = _mlp(), _mlp()
    o1, o2 = _adam(m1), _adam(m2)
    s1 = lrs.OneCycleLR(o1, max_lr=1e-2, total_steps=25)
    s2 = lrs.OneCycleLR(o2, max_lr=1e-2, total_steps=25)
    step = acopt.trace(train_step, m1, o1, *_batch(0))
    for i in range(20):
        torch.manual_seed(i)
        l1 = step(*_batch(i))
        torch.manual_seed(i)
        l2 = train_step(m2, o2, *_batch(i))
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
        s1.step()
        s2.step()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _stepping_inside(sched_of):
    def step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        sched_of[optimizer].step()  # after optimizer.step(), as PyTorch asks
        return loss.detach()

    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["LambdaLR-warmup", "CyclicLR-sgd-cycle-momentum", "OneCycleLR-adam-betas"])
def test_scheduler_stepped_inside_train_step_matches_eager(name, mode):
    make_opt, make_sched, _ = SCHEDULES[name]
    m1, m2 = _mlp(), _mlp()
    o1, o2 = make_opt(m1), make_opt(m2)
    sched_of = {o1: make_sched(o1), o2: make_sched(o2)}
    fn = _stepping_inside(sched_of)
    step = _build(mode, fn, m1, o1, *_batch(0))
    assert sched_of[o1].last_epoch == 0, "tracing stepped the scheduler"
    _in_lockstep(step, m1, o1, m2, o2, fn, steps=8)
    assert sched_of[o1].state_dict() == sched_of[o2].state_dict()
    assert sched_of[o1].last_epoch == 8


# ---------------------------------------------------------------------------
# 2. changes after tracing: GuardFailure (TracedStep), retrace (compile)
# ---------------------------------------------------------------------------
def _guard_setup():
    """The head's bias is left out of the optimizer (frozen), for add_param_group."""
    m = _bn_net()
    m[4].bias.requires_grad_(False)
    o = torch.optim.SGD([p for n, p in m.named_parameters() if n != "4.bias"], lr=0.1, momentum=0.9)
    return m, o


# name -> (change(model, optimizer, batch) -> (batch, context), match)
def _guard_cases():
    nothing = contextlib.nullcontext

    def add_group(m, o, b):
        o.add_param_group({"params": [m[4].bias], "lr": 0.01})
        return b, nothing()

    def swap_index(m, o, b):
        m[0] = nn.Linear(8, 16)
        return b, nothing()

    def swap_activation(m, o, b):
        m[2] = nn.GELU()
        return b, nothing()

    def freeze(m, o, b):
        m[0].weight.requires_grad_(False)
        return b, nothing()

    def evaluate(m, o, b):
        m.eval()
        return b, nothing()

    def group(key, value):
        def change(m, o, b):
            o.param_groups[0][key] = value
            return b, nothing()

        return change

    def transposed(m, o, b):
        return (b[0].t().contiguous().t(), b[1]), nothing()

    def sliced(m, o, b):
        wide = torch.zeros(6, 16)
        wide[:, ::2] = b[0]
        return (wide[:, ::2], b[1]), nothing()

    def double(m, o, b):
        return (b[0].double(), b[1]), nothing()

    def no_grad(m, o, b):
        return b, torch.no_grad()

    def autocast(m, o, b):
        return b, torch.autocast("cpu", dtype=torch.bfloat16)

    return {
        "add_param_group": (add_group, "param groups"),
        "swapped-submodule": (swap_index, "submodule '0'"),
        "swapped-activation": (swap_activation, "submodule '2'"),
        "requires_grad_(False)": (freeze, "'0.weight' was frozen"),
        "eval()": (evaluate, r"eval\(\)"),
        "nesterov-flipped": (group("nesterov", True), "nesterov"),
        "maximize": (group("maximize", True), "maximize"),
        "weight_decay-0-to-0.01": (group("weight_decay", 0.01), "weight_decay"),
        "momentum-0.9-to-0": (group("momentum", 0.0), "momentum"),
        "strides-transposed": (transposed, "strides"),
        "strides-sliced": (sliced, "strides"),
        "dtype": (double, "dtype"),
        "no_grad": (no_grad, "no_grad"),
        "autocast": (autocast, "autocast"),
    }


GUARD_CASES = _guard_cases()


@pytest.mark.parametrize("case", list(GUARD_CASES))
def test_change_after_tracing_is_a_guard_failure(case):
    change, match = GUARD_CASES[case]
    m, o = _guard_setup()
    step = acopt.trace(train_step, m, o, *_batch(0))
    step(*_batch(0))
    batch, ctx = change(m, o, _batch(1))
    before = _snapshot(m, o)
    with ctx, pytest.raises(GuardFailure, match=match):
        step(*batch)
    _assert_untouched(before, m, o)


class _Headed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(x))


def test_swapped_head_attribute_is_a_guard_failure():
    m = _Headed()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    step = acopt.trace(train_step, m, o, *_batch(0))
    step(*_batch(0))
    m.head = nn.Linear(16, 4)
    before = _snapshot(m, o)
    with pytest.raises(GuardFailure, match="'head'"):
        step(*_batch(1))
    _assert_untouched(before, m, o)


@pytest.mark.parametrize("mode", MODES)
def test_dropped_optimizer_is_a_guard_failure(mode):
    m = _mlp()
    o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    step = _build(mode, train_step, m, o, *_batch(0))
    step(*_batch(0))
    del o
    gc.collect()
    before = _snapshot(m, None)
    with pytest.raises(GuardFailure, match="optimizer"):
        step(*_batch(1))
    _assert_untouched(before, m, None)


# name -> change(model, optimizer, step index) applied to both copies; the batch or
# a context for some steps
def _retrace_cases():
    def at(i0, fn, i1=None, undo=None):
        def before(m, o, i):
            if i == i0:
                fn(m, o)
            if i == i1:
                undo(m, o)

        return before

    def group(key, value):
        def fn(m, o):
            o.param_groups[0][key] = value

        return fn

    def unfreeze(m, o):
        m[4].bias.requires_grad_(True)
        o.add_param_group({"params": [m[4].bias], "lr": 0.01})

    def gelu(m, o):
        torch.manual_seed(5)
        m[2] = nn.GELU()

    return {
        "eval-then-train": dict(before=at(2, lambda m, o: m.eval(), 5, lambda m, o: m.train())),
        "freeze-layer": dict(before=at(3, lambda m, o: [p.requires_grad_(False) for p in m[0].parameters()])),
        "unfreeze-add_param_group": dict(before=at(3, unfreeze)),
        "swapped-activation": dict(before=at(3, gelu)),
        "nesterov-on": dict(before=at(3, group("nesterov", True))),
        "maximize-on-off": dict(before=at(2, group("maximize", True), 4, group("maximize", False))),
        "weight_decay-0-to-0.01": dict(before=at(3, group("weight_decay", 0.01))),
        "momentum-to-0": dict(before=at(3, group("momentum", 0.0))),
        "strided-batch": dict(batch=lambda i: (lambda x, y: (x.t().contiguous().t() if i >= 3 else x, y))(*_batch(i))),
        "autocast-some-steps": dict(
            ctx=lambda i: torch.autocast("cpu", dtype=torch.bfloat16) if 3 <= i < 6 else contextlib.nullcontext()
        ),
    }


RETRACE_CASES = _retrace_cases()


@pytest.mark.parametrize("case", list(RETRACE_CASES))
def test_compile_retraces_after_a_change_and_matches_eager(case):
    spec = RETRACE_CASES[case]
    (m1, o1), (m2, o2) = _guard_setup(), _guard_setup()
    step = acopt.compile(train_step, m1, o1, *_batch(0), budget=BUDGET)
    ran = []  # the traced step that ran each step
    change = spec.get("before")

    def before(i):
        ran.append(step.traced)
        if change is not None:
            change(m1, o1, i)
            change(m2, o2, i)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _in_lockstep(
            step, m1, o1, m2, o2, steps=8, before=before, batch=spec.get("batch", _batch), ctx=spec.get("ctx")
        )
    ran.append(step.traced)
    assert len({id(t) for t in ran}) > 1, "the change never made acopt.compile trace again"


def test_compile_refuses_a_swapped_head_the_optimizer_does_not_hold():
    """The optimizer still holds the old head: retracing refuses, nothing touched."""
    m = _Headed()
    o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    step = acopt.compile(train_step, m, o, *_batch(0), budget=BUDGET)
    step(*_batch(0))
    m.head = nn.Linear(16, 4)
    before = _snapshot(m, o)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedStep, match="not a parameter of the model"):
            step(*_batch(1))
    _assert_untouched(before, m, o)


@pytest.mark.parametrize("mode", MODES)
def test_parameter_outside_the_optimizer_keeps_eager_gradients(mode):
    """optimizer.zero_grad() clears only the optimizer's parameters: eager
    accumulates .grad of a trainable parameter the optimizer does not hold.
    acopt must do the same, or refuse at trace time."""
    m1, m2 = _mlp(), _mlp()
    o1 = torch.optim.SGD([p for n, p in m1.named_parameters() if n != "3.bias"], lr=0.1)
    o2 = torch.optim.SGD([p for n, p in m2.named_parameters() if n != "3.bias"], lr=0.1)
    try:
        step = _build(mode, train_step, m1, o1, *_batch(0))
    except UnsupportedStep as e:  # refusing is fine, if it names the parameter
        assert "3.bias" in str(e)
        return
    _in_lockstep(step, m1, o1, m2, o2, steps=3)


# ---------------------------------------------------------------------------
# 3. buffers: reassigned in forward, updated in place, batch norm
# ---------------------------------------------------------------------------
class _BufferNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.register_buffer("ema", torch.zeros(16))
        self.register_buffer("sq", torch.ones(16))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        self.ema = 0.9 * self.ema + 0.1 * h.detach().mean(0)  # reassigned
        self.sq.mul_(0.9).add_(0.1 * h.detach().pow(2).mean(0))  # in place
        self.calls += 1  # in place (a tensor buffer)
        return self.fc2((h - self.ema) / self.sq.sqrt())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("net", ["buffers", "batchnorm", "batchnorm-cumulative"])
def test_buffers_match_eager(net, mode):
    def make():
        if net == "buffers":
            return _BufferNet()
        torch.manual_seed(0)
        momentum = None if net == "batchnorm-cumulative" else 0.1
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=momentum), nn.ReLU(), nn.Linear(16, 4))

    m1, m2 = make(), make()
    o1, o2 = _sgd(m1), _sgd(m2)
    if net == "batchnorm-cumulative":
        # momentum=None: eager computes 1 / float(num_batches_tracked) in Python, a
        # value no static graph holds. Refused, nothing touched.
        train_step(m1, o1, *_batch(0))
        before = _snapshot(m1, o1)
        with pytest.raises(UnsupportedStep, match="data-dependent"):
            _build(mode, train_step, m1, o1, *_batch(1))
        _assert_untouched(before, m1, o1)
        return
    step = _build(mode, train_step, m1, o1, *_batch(0))
    _in_lockstep(step, m1, o1, m2, o2, steps=4)
    if net == "buffers":
        assert int(m1.calls) == 4 and m1.ema.abs().sum() > 0
    else:
        assert int(m1[1].num_batches_tracked) == 4


# ---------------------------------------------------------------------------
# 4. user torch.utils.checkpoint regions (with dropout inside)
# ---------------------------------------------------------------------------
class _Ckpt(nn.Module):
    def __init__(self, kind: str, preserve: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.preserve = kind, preserve
        self.inp = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.3))
        self.seq = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 16), nn.Tanh())
        self.first = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3))
        self.head = nn.Linear(16, 4)

    def _block_forward(self, h):  # transformers-style: a function of the hidden states
        return self.block(h)

    def forward(self, x):
        kind = self.kind
        if kind == "reentrant-no-grad-inputs":  # the region's inputs do not require grad
            h = checkpoint(self.first, x, use_reentrant=True) + self.inp(x)
            return self.head(h)
        h = self.inp(x)
        if kind == "non-reentrant":
            h = checkpoint(self.block, h, use_reentrant=False, preserve_rng_state=self.preserve)
        elif kind == "reentrant":
            h = checkpoint(self.block, h, use_reentrant=True, preserve_rng_state=self.preserve)
        elif kind == "hf-style":
            h = checkpoint(self._block_forward, h, use_reentrant=False)
        elif kind == "sequential":
            h = checkpoint_sequential(self.seq, 2, h, use_reentrant=False)
        elif kind == "sequential-reentrant":
            h = checkpoint_sequential(self.seq, 2, h, use_reentrant=True)
        return self.head(h)


CKPT_KINDS = [
    "non-reentrant",
    "reentrant",
    "hf-style",
    "sequential",
    "sequential-reentrant",
    "reentrant-no-grad-inputs",
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", CKPT_KINDS)
def test_user_checkpoint_matches_eager(kind, mode):
    m1, m2 = _Ckpt(kind), _Ckpt(kind)
    o1, o2 = _sgd(m1), _sgd(m2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reentrant: "None of the inputs have requires_grad=True"
        step = _build(mode, train_step, m1, o1, *_batch(0))
        _in_lockstep(step, m1, o1, m2, o2, steps=4)
    if kind == "reentrant-no-grad-inputs":  # as in eager: the region's parameters get no gradient
        assert m1.first[0].weight.grad is None


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpoint_without_preserved_rng_and_dropout_is_refused(reentrant):
    m = _Ckpt("reentrant" if reentrant else "non-reentrant", preserve=False)
    o = _sgd(m)
    train_step(m, o, *_batch(0))
    before = _snapshot(m, o)
    with pytest.raises(UnsupportedStep, match="preserve_rng_state"):
        acopt.trace(train_step, m, o, *_batch(1))
    _assert_untouched(before, m, o)


# ---------------------------------------------------------------------------
# 5. gradient clipping, bf16 autocast, loss scaling
# ---------------------------------------------------------------------------
def _clip_step(foreach):
    def step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1, foreach=foreach)
        optimizer.step()
        return loss.detach()

    return step


def amp_step(model, optimizer, x, y):
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def scaled_step(model, optimizer, x, y):
    scale = 1024.0
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    (loss * scale).backward()
    for p in model.parameters():
        p.grad.div_(scale)
    optimizer.step()
    return loss.detach()


STEPS = {
    "clip-foreach": _clip_step(True),
    "clip-for-loop": _clip_step(False),
    "amp-bf16": amp_step,
    "loss-scaling": scaled_step,
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("name", list(STEPS))
def test_step_variants_match_eager(name, opt, mode):
    fn = STEPS[name]
    make = _sgd if opt == "sgd" else (lambda m: _adamw(m, weight_decay=0.01))
    m1, m2 = _mlp(), _mlp()
    o1, o2 = make(m1), make(m2)
    step = _build(mode, fn, m1, o1, *_batch(0))
    _in_lockstep(step, m1, o1, m2, o2, fn, steps=4)


# ---------------------------------------------------------------------------
# 6. bad inputs: clear errors, state untouched
# ---------------------------------------------------------------------------
class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def _refusal_cases():
    def tensor_lr_sgd():
        m = _mlp()
        return m, torch.optim.SGD(m.parameters(), lr=torch.tensor(0.1), momentum=0.9), train_step, None

    def tensor_lr_adam():
        m = _mlp()
        return m, torch.optim.Adam(m.parameters(), lr=torch.tensor(1e-2)), train_step, None

    def scheduler_before_optimizer_step():
        m = _mlp()
        o = _sgd(m)
        sched = lrs.StepLR(o, step_size=1, gamma=0.5)

        def step(model, optimizer, x, y):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            sched.step()
            optimizer.step()
            return loss.detach()

        return m, o, step, lambda m: sched.state_dict()

    def plateau_on_the_loss_inside():
        m = _mlp()
        o = _sgd(m)
        sched = lrs.ReduceLROnPlateau(o, patience=0)

        def step(model, optimizer, x, y):
            loss = train_step(model, optimizer, x, y)
            sched.step(loss)
            return loss

        return m, o, step, lambda m: sched.state_dict()

    def counter():
        m = _Counting()
        return m, _sgd(m), train_step, lambda m: m.calls

    return {
        "tensor-lr-sgd": (tensor_lr_sgd, "tensor hyperparameter"),
        "tensor-lr-adam": (tensor_lr_adam, "tensor hyperparameter"),
        "scheduler.step-before-optimizer.step": (scheduler_before_optimizer_step, r"before optimizer\.step"),
        "ReduceLROnPlateau.step(loss)-inside": (plateau_on_the_loss_inside, "with a tensor"),
        "module-attribute-counter": (counter, "module attributes.*calls"),
    }


REFUSALS = _refusal_cases()


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_step_is_refused_and_nothing_touched(case):
    setup, match = REFUSALS[case]
    m, o, fn, extra = setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(m, o, *_batch(0))  # one eager step first: gradients and state exist
    before = _snapshot(m, o)
    extra_before = extra(m) if extra else None
    with pytest.raises(UnsupportedStep, match=match):
        acopt.trace(fn, m, o, *_batch(1))
    _assert_untouched(before, m, o)
    if extra:
        assert extra(m) == extra_before


# ---------------------------------------------------------------------------
# 7. recurrent models; a torch.compile'd model
# ---------------------------------------------------------------------------
class _Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = cell(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _seq_batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(6, 5, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_recurrent_matches_eager(cell, mode):
    m1, m2 = _Recurrent(cell), _Recurrent(cell)
    o1, o2 = _sgd(m1), _sgd(m2)
    step = _build(mode, train_step, m1, o1, *_seq_batch(0))
    # LSTM is bitwise; GRU's traced kernels round differently (float32 rounding)
    close = {} if cell is nn.LSTM else dict(exact=False, rtol=1e-5, atol=1e-6)
    _in_lockstep(step, m1, o1, m2, o2, steps=3, batch=_seq_batch, **close)


def test_torch_compiled_model_is_traced_through_the_original():
    m1, m2 = _mlp(), _mlp()
    compiled = torch.compile(m1)
    o1, o2 = _sgd(m1), _sgd(m2)
    step = acopt.trace(train_step, compiled, o1, *_batch(0))
    _in_lockstep(step, m1, o1, m2, o2, steps=3)


def test_a_module_setting_changed_after_tracing_is_guarded():
    """Dropout.p, a temperature, eps: plain attributes model code reads in forward
    are baked into the graph, so a change is a GuardFailure (compile: a retrace)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))

    def step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    traced = acopt.trace(step, model, opt, x, y)
    traced(x, y)
    model[1].p = 0.5
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(acopt.GuardFailure, match="attribute 'p' is 0.5, 0.1 when traced"):
        traced(x, y)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
