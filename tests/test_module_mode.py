"""Module mode (acopt.wrap): the wrapped module trains as the unwrapped one in eager
PyTorch (bitwise on CPU, dropout and batch norm included) inside ordinary loops,
its measured peak is the simulated one, and it keeps exactly the plan's kept set."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acopt
from acopt.profiler import added_peak_bytes


class Net(nn.Module):
    """Linear -> BatchNorm -> tanh -> Dropout -> Linear -> GELU -> Dropout -> Linear, seeded."""

    def __init__(self, width: int = 96, p: float = 0.25):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(8, width)
        self.bn = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(p)
        self.l2 = nn.Linear(width, width)
        self.l3 = nn.Linear(width, 4)

    def forward(self, x):
        h = self.drop(torch.tanh(self.bn(self.l1(x))))
        h = self.drop(F.gelu(self.l2(h)))
        return self.l3(h)


def batch(i: int, rows: int = 128):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(rows, 8, generator=g), torch.randint(0, 4, (rows,), generator=g)


def same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    for (name, x), y in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def wrapped_net():
    model = Net()
    eager = copy.deepcopy(model)
    x, _ = batch(0)
    wrapped = acopt.wrap(model, x, budget="85%")
    return model, eager, wrapped


def test_a_plan_recomputes_and_keeps_exactly_its_kept_set(wrapped_net):
    _, _, wrapped = wrapped_net
    plan, prof = wrapped.plan, wrapped.profile
    assert plan.recompute, "the budget must make the planner recompute something"
    # the forward graph returns exactly the values the rewritten backward reads:
    # their storages are the rewritten step's activations (kept ones + generator states)
    x, _ = batch(0)
    tangents = (torch.ones(128, 4),)
    rewritten = acopt.profile(wrapped.traced, (x,), {}, tangents, warmup=0, iterations=1)
    storage_of = {n.name: n.storages for n in rewritten.nodes}
    inputs = {s for n in rewritten.nodes if n.op == "placeholder" for s in n.storages}  # views of weights
    saved = {s for name in wrapped.graphs.saved for s in storage_of[name]} - inputs
    output = next(n for n in wrapped.traced.graph.nodes if n.op == "output")
    returned = set(storage_of[output.args[0][0].name])  # the logits: returned, not saved
    assert saved == {a.name for a in rewritten.activations} - returned
    kept = {a.name for a in prof.activations} - plan.recompute
    assert kept - returned <= saved  # every kept activation is saved, none of the recomputed ones is
    assert not (plan.recompute & saved)


def test_measured_peak_is_the_simulated_one(wrapped_net):
    """The rewritten joint graph (forward + backward of the module), run with the
    profiler's storage accounting, peaks where the simulator says."""
    _, _, wrapped = wrapped_net
    x, _ = batch(0)
    measured = acopt.profile(wrapped.traced, (x,), {}, (torch.ones(128, 4),), warmup=0, iterations=1)
    sim = acopt.simulate(wrapped.profile, wrapped.plan)
    assert measured.peak_bytes == sim.peak_bytes
    assert sim.peak_bytes < wrapped.profile.peak_bytes
    rep = wrapped.report()
    assert rep.peak_after_bytes == sim.peak_bytes and rep.recomputed == len(wrapped.plan.recompute)
    assert "module" in str(rep) and rep.as_dict()["overhead"] >= 0


def test_the_real_forward_and_backward_peak_at_the_simulated_bytes(wrapped_net):
    """Not the joint graph: the wrapped module called and differentiated by autograd.
    With its inputs, parameters, buffers and grad_output already allocated, the
    allocator's peak is the simulated one to the byte; eager's is the no-recompute peak."""
    model, eager, wrapped = wrapped_net
    x, _ = batch(0)
    grad = torch.ones(128, 4)
    held = [*model.parameters(), *model.buffers(), x, grad]
    base = sum(t.untyped_storage().nbytes() for t in held)
    peaks = {}
    for name, net in (("wrapped", wrapped), ("eager", eager)):
        net.zero_grad(set_to_none=True)

        def run(net=net):
            net(x).backward(grad)

        peaks[name] = base + added_peak_bytes(run)
        net.zero_grad(set_to_none=True)
    sim = acopt.simulate(wrapped.profile, wrapped.plan)
    assert peaks["wrapped"] == sim.peak_bytes
    assert abs(peaks["eager"] - wrapped.profile.peak_bytes) <= 0.02 * wrapped.profile.peak_bytes
    assert peaks["wrapped"] < peaks["eager"]


def test_plain_loop_with_scheduler_accumulation_and_clipping_is_eager_bitwise(wrapped_net):
    model, eager, wrapped = wrapped_net
    model.load_state_dict(eager.state_dict())
    model.zero_grad(set_to_none=True)
    eager.zero_grad(set_to_none=True)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, eager)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in opts]
    for step in range(3):
        for net, opt, sched in ((wrapped, opts[0], scheds[0]), (eager, opts[1], scheds[1])):
            torch.manual_seed(step)  # the same dropout masks in both runs
            for micro in range(2):  # gradient accumulation over 2 calls
                x, y = batch(2 * step + micro)
                loss = F.cross_entropy(net(x), y) / 2
                loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            opt.step()
            sched.step()
            opt.zero_grad()
        same(model, eager)
    assert torch.equal(model.bn.running_var, eager.bn.running_var)
    assert int(model.bn.num_batches_tracked) == int(eager.bn.num_batches_tracked) > 0


def test_recomputed_dropout_masks_replay_eagers_draws(tmp_path):
    """The plan that recomputes every candidate (the floor's), dropout masks included:
    the replays draw from the saved generator states, so training stays eager's."""
    import dataclasses

    from acopt.planning import _most_recomputed

    model = Net()
    eager = copy.deepcopy(model)
    x, y = batch(0)
    probe = acopt.wrap(copy.deepcopy(model), x, budget="1GiB")
    everything = dataclasses.replace(probe.plan, recompute=_most_recomputed(probe.profile))
    wrapped = acopt.wrap(model, x, plan=everything)
    replays = [n for n in wrapped.traced.graph.nodes if "replay" in str(n.target)]
    assert replays, "the plan must replay a random op"
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    for step in range(2):
        for net, opt in ((wrapped, opts[0]), (eager, opts[1])):
            torch.manual_seed(step)
            x, y = batch(step)
            F.cross_entropy(net(x), y).backward()
            torch.manual_seed(99)  # what the loop draws after the forward is its own business
            opt.step()
            opt.zero_grad()
        same(model, eager)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_grad_scaler_and_autocast_are_eager_bitwise(dtype):
    model = Net()
    eager = copy.deepcopy(model)
    x, y = batch(0)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        wrapped = acopt.wrap(model, x, budget="85%")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, eager)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    for step in range(2):
        for net, opt, scaler in ((wrapped, opts[0], scalers[0]), (eager, opts[1], scalers[1])):
            torch.manual_seed(step)
            x, y = batch(step)
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                out = net(x)
            loss = F.cross_entropy(out.float(), y)
            scaler.scale(loss).backward()  # scaled grad_outputs
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        same(model, eager)
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert len(wrapped._variants) == 1  # every call ran the planned variant


class Heads(nn.Module):
    """Returns a dict: a used head, an unused head, an integer output and a detached one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.a = nn.Linear(64, 3)
        self.b = nn.Linear(64, 5)

    def forward(self, x, *, scale: float = 1.0):
        h = self.body(x)
        return {"a": self.a(h) * scale, "b": self.b(h), "argmax": h.argmax(-1), "h": h.detach()}


def test_dict_outputs_unused_output_inputs_requiring_grad_and_kwargs():
    model = Heads()
    eager = copy.deepcopy(model)
    x = torch.randn(256, 8)
    wrapped = acopt.wrap(model, x, budget="1GiB", scale=2.0)
    for net in (wrapped, eager):
        xi = x.clone().requires_grad_(True)
        out = net(xi, scale=2.0)
        assert set(out) == {"a", "b", "argmax", "h"}
        assert not out["argmax"].requires_grad and not out["h"].requires_grad
        out["a"].square().mean().backward()  # "b" unused: its grad_output is None
        net.xgrad = xi.grad
    same(model, eager)
    assert torch.equal(wrapped.xgrad, eager.xgrad)
    n = sum(map(len, wrapped._variants.values()))
    assert torch.equal(wrapped(x, scale=3.0)["a"], eager(x, scale=3.0)["a"])  # a constant: its own plan
    assert sum(map(len, wrapped._variants.values())) == n + 1


class Counting(nn.Module):
    """Reassigns one buffer and updates another in place in its forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.l = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("running", torch.zeros(8))

    def forward(self, x):
        self.calls = self.calls + 1
        h = self.l(x)
        self.running.mul_(0.9).add_(h.detach().mean(0), alpha=0.1)
        return torch.tanh(h)


def test_buffers_reassigned_or_updated_in_forward_are_written_back():
    model = Counting()
    eager = copy.deepcopy(model)
    x = torch.randn(16, 8)
    wrapped = acopt.wrap(model, x, budget="1GiB")
    for i in range(3):
        for net in (wrapped, eager):
            net(x * i).sum().backward()
        same(model, eager)
    assert float(model.calls) == 3.0


def test_outputs_without_gradient_are_left_out_of_the_next_plan():
    """An output no gradient reaches (here head "b") costs a zero grad_output of its
    size: after the first backward the module is planned without it. If it gets a
    gradient later, that backward refuses (never a silently missing term) and the
    next call plans with it again."""
    model = Heads()
    eager = copy.deepcopy(model)
    x = torch.randn(256, 8)
    wrapped = acopt.wrap(model, x, budget="1GiB")
    full = wrapped.report()

    def run(net, use_b=False):
        out = net(x)
        loss = out["a"].square().mean() + (out["b"].mean() if use_b else 0)
        loss.backward()

    for _ in range(2):
        run(wrapped)
        run(eager)
        same(model, eager)
    variants = wrapped._variants[next(iter(wrapped._variants))]
    assert len(variants) == 2
    reduced = wrapped.report()
    assert reduced.peak_before_bytes <= full.peak_before_bytes - 256 * 5 * 4  # no zero grad_output for "b"
    assert all(p.grad is None for p in model.b.parameters())
    with pytest.raises(RuntimeError, match=r"\['b'\] got a gradient"):
        run(wrapped, use_b=True)
    model.zero_grad(set_to_none=True)
    eager.zero_grad(set_to_none=True)
    run(wrapped, use_b=True)  # planned with "b" again: the full variant
    run(eager, use_b=True)
    same(model, eager)
    assert wrapped.report() is full


def test_guards_frozen_layer_eval_and_no_grad():
    model = Net(p=0.0)
    eager = copy.deepcopy(model)
    x, y = batch(0)
    wrapped = acopt.wrap(model, x, budget="1GiB")
    for net in (model, eager):
        net.l1.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="frozen"):
        F.cross_entropy(wrapped(x), y).backward()
    F.cross_entropy(eager(x), y).backward()
    same(model, eager)
    assert model.l1.weight.grad is None
    # no_grad and eval calls run the module itself, eagerly: same numbers, no new plan
    n_variants = sum(map(len, wrapped._variants.values()))
    wrapped.eval()
    eager.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), eager(x))
    assert not model.training and sum(map(len, wrapped._variants.values())) == n_variants
    wrapped.train()
    eager.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # back to a known variant: no warning, no retrace
        F.cross_entropy(wrapped(x), y).backward()
    # a new batch shape is planned once and kept
    x2, _ = batch(1, rows=64)
    wrapped(x2).sum().backward()
    assert sum(map(len, wrapped._variants.values())) == n_variants + 1


def test_state_dict_and_attributes_are_the_models():
    model = Net()
    wrapped = acopt.wrap(model, batch(0)[0], budget="90%")
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert wrapped.l1 is model.l1 and wrapped.bn is model.bn
    assert [p for p in wrapped.parameters()] == [p for p in model.parameters()]
    import inspect

    assert list(inspect.signature(wrapped.forward).parameters) == ["x"]
    with pytest.raises(acopt.UnsupportedStep, match="DataParallel"):  # a replica would share our plans
        wrapped._replicate_for_data_parallel()(batch(0)[0])


def test_a_deep_copy_trains_its_own_copy():
    model = Net()
    x, y = batch(0)
    wrapped = acopt.wrap(model, x, budget="85%")
    twin = copy.deepcopy(wrapped)
    assert twin.module is not model and not twin._variants
    eager = copy.deepcopy(model)
    for net in (twin, eager):
        torch.manual_seed(0)
        F.cross_entropy(net(x), y).backward()
    same(twin.module, eager)
    assert all(p.grad is None for p in model.parameters())  # the original untouched
    assert twin.report().recomputed == wrapped.report().recomputed


def test_budget_counts_what_the_loop_keeps():
    model = Net()
    x, _ = batch(0)
    opt = torch.optim.AdamW(model.parameters())
    plain = acopt.wrap(model, x, budget="1GiB")
    with_opt = acopt.wrap(model, x, budget="1GiB", optimizer=opt)
    params = sum(p.numel() * 4 for p in model.parameters())
    # AdamW: exp_avg, exp_avg_sq (and a step counter each), plus the gradients
    assert 3 * params <= with_opt.report().extra_bytes <= 3 * params + 64 * len(list(model.parameters()))
    assert not opt.state  # measured on copies: the live optimizer is untouched
    assert plain.report().extra_bytes == 0
    assert with_opt.report().budget_bytes == plain.report().budget_bytes - with_opt.report().extra_bytes
    with pytest.raises(ValueError, match="extra_bytes"):
        acopt.wrap(model, x, budget=1000, extra_bytes=2000)


def test_plan_reuse_and_cache_skip_profiling(tmp_path, monkeypatch):
    import acopt.plan_cache as pc

    model = Net()
    x, _ = batch(0)
    first = acopt.wrap(model, x, budget="85%", cache_dir=tmp_path)
    assert first.report().plan_source == "planned"
    plan_file = tmp_path / "plan.json"
    first.plan.to_json(plan_file)

    def no_profiling(*a, **k):
        raise AssertionError("profiled again")

    monkeypatch.setattr(pc, "make_profile", no_profiling)
    monkeypatch.setattr(pc, "make_plan", no_profiling)
    again = acopt.wrap(model, x, budget="85%", cache_dir=tmp_path)
    assert again.report().plan_source == "cache"
    assert again.plan.recompute == first.plan.recompute
    monkeypatch.setenv("ACOPT_CACHE_DIR", str(tmp_path))
    assert acopt.wrap(model, x, budget="85%").report().plan_source == "cache"
    monkeypatch.delenv("ACOPT_CACHE_DIR")
    given = acopt.wrap(model, x, budget="85%", plan=plan_file)
    assert given.report().plan_source == "plan argument" and given.plan.recompute == first.plan.recompute
    with pytest.raises(acopt.ArtifactMismatch, match="another traced graph"):
        acopt.wrap(model, batch(0, rows=64)[0], budget="85%", plan=plan_file)


def test_backward_twice_and_in_place_changes_are_errors():
    model = Net(p=0.0)
    x, y = batch(0)
    wrapped = acopt.wrap(model, x, budget="1GiB")
    loss = F.cross_entropy(wrapped(x), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
    loss = F.cross_entropy(wrapped(x), y)
    with torch.no_grad():
        model.l2.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_refused_forwards_leave_the_model_as_it_was():
    import random

    class Drawing(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 8)

        def forward(self, x):
            return self.l(x) * (2.0 if random.random() < 0.5 else 1.0)  # frozen into a graph

    state = random.getstate()
    with pytest.raises(acopt.UnsupportedStep, match="random"):
        acopt.wrap(Drawing(), torch.randn(4, 8), budget="1GiB")
    assert random.getstate() == state
    frozen = Net()
    frozen.requires_grad_(False)
    with pytest.raises(acopt.UnsupportedStep, match="requires grad"):
        acopt.wrap(frozen, batch(0)[0], budget="1GiB")
