"""backend="inductor": the planned step run by compiled kernels (acopt.inductor).

Checked against EAGER PyTorch (the user's train_step, run eagerly) over several
steps with dropout, at inductor's tolerance; the plan must survive
compilation (the forward graph returns no recomputed activation, the recompute
blocks are compiled in the backward graph), and the measured peak must be
within the budget.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import acopt
from acopt import rng
from acopt.inductor import compile_inductor, measure_graph_peak, segments_of
from acopt.records import Region
from acopt.rewriter import BLOCK_KEY
from acopt.tracer import REGION_KEY, is_random

RTOL, ATOL = 1e-4, 1e-5
#: Parameters after AdamW steps: its first steps divide by sqrt(v) ~ |grad|, so a
#: rounding difference in a tiny gradient moves a weight by up to ~lr; 1e-4 is 1% of lr.
PARAM_ATOL = 1e-4


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Dropout(0.3), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))


def train_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def batch(i: int = 0, rows: int = 512):
    g = torch.Generator().manual_seed(i)
    return torch.randn(rows, 8, generator=g), torch.randint(0, 4, (rows,), generator=g)


def _pair():
    m1, m2 = net(), net()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    return (m1, o1), (m2, o2)


def _assert_close(m1, m2):
    for (name, a), b in zip(m1.named_parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=PARAM_ATOL, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(b.grad, a.grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}.grad: {m}")


def _planned(budget="90%", pair=None):
    """(model, optimizer), profile, plan, rewritten step; ``budget=None``: every
    recomputable activation (the dropout's mask included)."""
    m2, o2 = pair or _pair()[1]
    x, y = batch()
    traced = acopt.trace(train_step, m2, o2, x, y)
    prof = acopt.profile(traced, x, y, warmup=0, iterations=1)
    if budget is None:
        plan = frozenset(a.name for a in prof.activations if a.recomputable)
        return (m2, o2), prof, plan, acopt.rewrite(traced, plan, profile=prof)
    plan = acopt.plan(prof, budget=budget)
    return (m2, o2), prof, plan, acopt.rewrite(traced, plan, profile=prof)  # the step holds o2 weakly


def test_segments_keep_the_plan_and_replay_the_forward_mask():
    """The cut never mixes forward and backward in one compiled graph, the forward's
    compiled graphs return no value the plan recomputes, and the random op, rng.save
    and rng.replay run inside the compiled graphs as acopt's custom operators (the
    eager generator's draws), chained by their tokens in graph order: no graph cut.
    Run (every activation recomputed: the dropout is replayed in the backward), the
    compiled step equals eager PyTorch."""
    (m1, o1), (m2, o2) = _pair()
    _, _, plan, rewritten = _planned(None, pair=(m2, o2))
    assert sum(n.target is rng.replay for n in rewritten.graph.nodes) >= 1, "the plan must replay the dropout"
    segments = segments_of(rewritten.graph_module)
    random_seen = 0
    lowered = {torch.ops.acopt.draw.default, torch.ops.acopt.save.default, torch.ops.acopt.replay.default}
    for seg in segments:
        regions = {n.meta[REGION_KEY] == Region.FORWARD for n in seg.nodes}
        if seg.compiled:
            assert len(regions) == 1, "a compiled graph mixes forward and backward nodes"
            if regions == {True}:
                assert not set(seg.outputs) & set(plan), "the forward graph returns a recomputed activation"
            nodes = list(seg.graph_module.graph.nodes)
            calls = [n for n in nodes if n.target in lowered]
            optimizer = {n.meta[REGION_KEY] for n in seg.nodes} == {Region.OPTIMIZER}  # its own graph, no draws
            assert (optimizer or calls) and not any(
                is_random(n) or n.target in (rng.save, rng.replay) for n in nodes if n not in calls
            )
            for before, call in zip([None, *calls], calls):  # each takes the previous one's token
                after = call.args[0]
                assert (
                    (after is None)
                    if before is None
                    else (after.target is operator.getitem and after.args[0] is before)
                )
        random_seen += sum(is_random(n) for n in seg.nodes)
    blocks = [n for s in segments if s.compiled for n in s.nodes if BLOCK_KEY in n.meta]
    assert blocks, "the recompute blocks are not in a compiled graph"
    assert random_seen == 1  # the dropout, in the forward
    compiled = [s for s in segments if s.compiled]
    assert len(compiled) == 3, "forward, backward and optimizer: one compiled graph each"
    assert all(n.meta[REGION_KEY] == Region.OPTIMIZER for n in compiled[2].nodes)
    assert any(n.target is rng.replay for n in compiled[1].nodes) and any(is_random(n) for n in compiled[0].nodes)
    step = compile_inductor(rewritten)
    for i in range(2):
        xb, yb = batch(i)
        torch.manual_seed(10 + i)
        l1 = train_step(m1, o1, xb, yb)
        torch.manual_seed(10 + i)
        l2 = step(xb, yb)
        torch.testing.assert_close(l2, l1, rtol=RTOL, atol=ATOL)
        _assert_close(m1, m2)


def test_a_recompute_block_ends_its_compiled_graph_with_cut_blocks():
    """cut_blocks: no compiled graph holds nodes of two recompute blocks, or a
    block and a node after it: inside one graph inductor fused kernels across
    blocks and kept a block's intermediates alive past its end
    (docs/memory-model.md, "Compiled steps")."""
    _, _, _plan, rewritten = _planned(None)
    segments = segments_of(rewritten.graph_module, cut_blocks=True)
    with_block = 0
    for seg in segments:
        if not seg.compiled:
            continue
        keys = [n.meta.get(BLOCK_KEY) for n in seg.nodes]
        first = next((i for i, k in enumerate(keys) if k is not None), len(keys))
        assert len(set(keys[first:])) <= 1, f"a compiled graph runs past the block of {keys[first]!r}"
        with_block += first < len(keys)
    assert with_block >= 2, "the plan must have several compiled blocks"


def test_fit_compiled_compiles_again_with_cut_blocks_over_the_eager_model(monkeypatch):
    """A plan measuring above its simulated peak is compiled again with the
    blocks cut, and the lower measurement kept (compiling and measuring faked)."""
    from types import SimpleNamespace

    from acopt import inductor

    m, o = _pair()[1]
    x, y = batch()
    traced = acopt.trace(train_step, m, o, x, y)
    prof = acopt.profile(traced, x, y, warmup=0, iterations=1)
    calls = []

    def fake_compile(step, *, compile_segment=None, cut_blocks=False):
        calls.append(cut_blocks)
        return SimpleNamespace(cut=cut_blocks)

    monkeypatch.setattr(inductor, "compile_inductor", fake_compile)
    monkeypatch.setattr(inductor, "measure_graph_peak", lambda step, *b: 1 if step.cut else 10**12)
    fitted = inductor.fit_compiled(traced, prof, (x, y), budget="90%", solver="greedy", options={})
    assert fitted.plan.recompute and calls[:2] == [False, True]
    assert fitted.step.cut and fitted.measured_peak_bytes == 1


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


#: What a compiled step may hold above the eager model: an input a compiled graph
#: never reads is freed only when the graph returns (nll_loss_backward reads the
#: log-softmax only for its shape: 8 x 4 floats here). docs/memory-model.md.
UNREAD_INPUT_SLACK = 4096


@pytest.mark.slow
def test_recompute_heavy_compiled_step_stays_under_the_eager_model():
    """Every activation recomputed (batch-norm statistics and convolutions replayed
    in separate blocks): with cut_blocks the compiled step's measured peak is at
    most the eager model's, up to the unread-input slack (313 924 B against
    434 308 B simulated). With the blocks compiled in the backward graph around
    them it measured 549 284 B."""
    model = _conv_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    traced = acopt.trace(train_step, model, opt, x, y)
    prof = acopt.profile(traced, x, y, warmup=0, iterations=1)
    plan = frozenset(a.name for a in prof.activations if a.recomputable)
    step = compile_inductor(acopt.rewrite(traced, plan, profile=prof), cut_blocks=True)
    simulated = acopt.simulate(prof, plan).peak_bytes
    assert measure_graph_peak(step, x, y) <= simulated + UNREAD_INPUT_SLACK


def test_inductor_step_equals_eager_pytorch_with_dropout():
    """acopt.compile(backend="inductor") trains as eager PyTorch does (dropout
    included: masks are eager's own), keeps lr live, fits its budget when measured
    (80%: below the eager floor, which fusion lets the compiled step reach, and
    below the compiled no-recompute peak), and compiling leaves the model and
    optimizer untouched."""
    (m1, o1), (m2, o2) = _pair()
    x, y = batch()
    step = acopt.compile(train_step, m2, o2, x, y, budget="80%", backend="inductor", warmup=0, iterations=1)
    report = step.report()
    assert acopt.floor(step.profile) > report.budget_bytes, "the budget is meant to be below the eager floor"
    assert report.backend == "inductor" and report.recomputed >= 1
    assert report.measured_peak_bytes is not None and report.measured_peak_bytes <= report.budget_bytes
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b), "compiling (and measuring) changed the model"
    for i in range(3):
        xb, yb = batch(i)
        torch.manual_seed(100 + i)
        l1 = train_step(m1, o1, xb, yb)
        torch.manual_seed(100 + i)
        l2 = step(xb, yb)
        torch.testing.assert_close(l2, l1, rtol=RTOL, atol=ATOL)
        _assert_close(m1, m2)
        assert torch.equal(torch.get_rng_state(), _eager_rng_after(100 + i)), "the generator is not where eager left it"
    for o in (o1, o2):
        o.param_groups[0]["lr"] = 0.3  # a live hyperparameter: no recompilation, no stale constant
    torch.manual_seed(7)
    train_step(m1, o1, x, y)
    torch.manual_seed(7)
    step(x, y)
    _assert_close(m1, m2)
    assert isinstance(step.traced.runner.summary()["compiled_segments"], int)


def _eager_rng_after(seed: int) -> torch.Tensor:
    """The generator after one eager step's draws (one dropout of a 512 x 64 input)."""
    keep = torch.get_rng_state()
    torch.manual_seed(seed)
    torch.nn.functional.dropout(torch.ones(512, 64), 0.3, training=True)
    out = torch.get_rng_state()
    torch.set_rng_state(keep)
    return out


def test_measured_peak_of_the_eager_rewrite_is_the_simulated_one():
    """The measuring helper itself: on the eager rewritten step it gives the simulator's peak exactly."""
    _live, prof, plan, rewritten = _planned()
    x, y = batch()
    assert measure_graph_peak(rewritten, x, y) == acopt.simulate(prof, plan).peak_bytes


def test_bad_backend_is_refused():
    (_, _), (m2, o2) = _pair()
    with pytest.raises(ValueError, match="backend"):
        acopt.compile(train_step, m2, o2, *batch(), budget="90%", backend="tvm")


@pytest.mark.slow
@pytest.mark.parametrize("name,batch_size,budget", [("cnn", 32, "90%"), ("transformer", 32, "50%")])
def test_builtin_models_match_eager_and_fit(name, batch_size, budget):
    from acopt import models

    w1 = models.build(name, batch_size=batch_size, device="cpu", seed=0)
    w2 = models.build(name, batch_size=batch_size, device="cpu", seed=0)
    step = acopt.compile(w2.train_step, w2.model, w2.optimizer, *w2.batch, budget=budget, backend="inductor")
    report = step.report()
    assert report.recomputed >= 1 and report.measured_peak_bytes <= report.budget_bytes
    for i in range(3):
        b = w1.make_batch(i)
        torch.manual_seed(i)
        l1 = w1.train_step(w1.model, w1.optimizer, *b)
        torch.manual_seed(i)
        l2 = step(*w2.make_batch(i))
        torch.testing.assert_close(l2, l1, rtol=RTOL, atol=ATOL)
    for a, b in zip(w1.model.parameters(), w2.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=PARAM_ATOL)


@pytest.mark.slow
def test_compiled_steps_are_compiled_per_variant():
    """A guard failure (eval mode) traces, plans and compiles again; each variant
    trains as eager PyTorch does."""
    (m1, o1), (m2, o2) = _pair()
    x, y = batch()
    step = acopt.compile(train_step, m2, o2, x, y, budget="90%", backend="inductor", warmup=0, iterations=1)
    for mode in ("train", "eval", "train"):
        for m in (m1, m2):
            m.train(mode == "train")
        torch.manual_seed(3)
        l1 = train_step(m1, o1, x, y)
        torch.manual_seed(3)
        if mode == "eval":
            with pytest.warns(UserWarning, match="tracing and planning the step again"):
                l2 = step(x, y)
        else:
            l2 = step(x, y)
        torch.testing.assert_close(l2, l1, rtol=RTOL, atol=ATOL)
        _assert_close(m1, m2)
    assert len(step._compiled) == 1 and len(next(iter(step._compiled.values()))) == 2
    assert compile_inductor is not None


@pytest.mark.slow
def test_cli_run_backend_inductor(capsys):
    """`acopt run --backend inductor` checks against eager PyTorch and the budget, and prints both peaks."""
    from acopt.cli import main

    assert main(["run", "mlp", "--batch-size", "2048", "--budget", "80%", "--backend", "inductor",
                 "--steps", "2", "--timing-steps", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "simulated" in out and "measured" in out and "yes" in out


def test_a_saved_plan_is_refused_with_the_inductor_backend(tmp_path, capsys):
    """The inductor backend chooses its plan by measuring the compiled step: a
    saved plan is refused before anything is traced, in the API and the CLI."""
    from acopt.cli import main

    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="plan= is for the eager backend"):
        acopt.compile(train_step, model, opt, torch.randn(4, 8), torch.randint(0, 4, (4,)),
                      backend="inductor", plan=tmp_path / "any.plan.json")  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state
    saved = tmp_path / "mlp.plan.json"
    saved.write_text("{}")
    assert main(["run", "mlp", "--batch-size", "8", "--backend", "inductor", "--plan", str(saved)]) == 2
    assert "--backend inductor chooses its plan" in capsys.readouterr().err


class _TwoDropouts(nn.Module):
    """Two dropouts (one on a transposed, non-contiguous view: its mask depends on the
    layout) and a draw whose result is unused: the generator must still advance."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c = nn.Linear(8, 48), nn.Linear(48, 48), nn.Linear(48, 4)

    def forward(self, x):
        h = F.dropout(torch.tanh(self.a(x)), 0.5, training=True)
        g = F.dropout(torch.sigmoid(self.b(h)).t(), 0.25, training=True).t()
        torch.rand_like(g)  # drawn, unused
        return self.c(g), h == 0, g == 0


def _two_dropouts_step(model, optimizer, x, y):
    optimizer.zero_grad()
    out, mask1, mask2 = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    optimizer.step()
    return loss.detach(), mask1, mask2


@pytest.mark.parametrize(
    "patches",
    [
        pytest.param({}, id="acopt-settings"),
        pytest.param(
            {"reorder_for_locality": True, "reorder_for_peak_memory": True},
            id="inductor-reorderings",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_compiled_draws_keep_eager_generator_order(monkeypatch, patches):
    """Two dropouts, an unused draw and the replays of the first dropout (every
    activation recomputed), all inside compiled graphs: the masks equal eager
    PyTorch's bitwise, the loss and parameters at rounding, the CPU generator is
    where eager leaves it after each step, and the draws run in the graph's order
    (forward: the two dropouts and the unused draw; backward: the replays), also
    with inductor's reordering passes on (the token chain orders them)."""
    import functools

    from acopt import inductor_rng
    from acopt.inductor import _inductor_segment

    def pair():
        m = _TwoDropouts()
        return m, torch.optim.SGD(m.parameters(), lr=0.1)

    (m1, o1), (m2, o2) = pair(), pair()
    x, y = batch(rows=64)
    traced = acopt.trace(_two_dropouts_step, m2, o2, x, y)
    prof = acopt.profile(traced, x, y, warmup=0, iterations=1)
    rewritten = acopt.rewrite(traced, frozenset(a.name for a in prof.activations if a.recomputable), profile=prof)
    graph = rewritten.graph_module.graph
    replays = [n for n in graph.nodes if n.target is rng.replay]
    assert len(replays) >= 2, "the plan must replay the first dropout (for several blocks)"
    step = compile_inductor(rewritten, compile_segment=functools.partial(_inductor_segment, config_patches=patches))
    assert sum(s.compiled for s in step.runner.segments) == 3  # forward, backward, optimizer
    assert all(s.compiled or not is_random(n) for s in step.runner.segments for n in s.nodes)
    expected = [("draw" if is_random(n) else "replay", n.meta["val"].shape) for n in graph.nodes
                if is_random(n) or n.target is rng.replay]  # fmt: skip
    calls = []
    real_call = inductor_rng._call

    def logged(op, spec, tensors, *, check):
        out = real_call(op, spec, tensors, check=check)
        if check:  # the real call, not the fake one while compiling
            calls.append(("replay" if _in_replay[0] else "draw", out[0].shape))
        return out

    _in_replay = [False]
    real_replay = rng.replay

    def replay(*a, **k):
        _in_replay[0] = True
        try:
            return real_replay(*a, **k)
        finally:
            _in_replay[0] = False

    monkeypatch.setattr(inductor_rng, "_call", logged)
    monkeypatch.setattr(inductor_rng.rng, "replay", replay)
    for i in range(2):
        xb, yb = batch(i, rows=64)
        torch.manual_seed(20 + i)
        l1, a1, b1 = _two_dropouts_step(m1, o1, xb, yb)
        after_eager = torch.get_rng_state()
        torch.manual_seed(20 + i)
        calls.clear()
        l2, a2, b2 = step(xb, yb)
        assert calls == expected, "the draws ran out of the graph's order"
        assert torch.equal(a2, a1) and torch.equal(b2, b1), "a mask differs from eager PyTorch's"
        assert torch.equal(torch.get_rng_state(), after_eager), "the generator is not where eager left it"
        torch.testing.assert_close(l2, l1, rtol=RTOL, atol=ATOL)
        _assert_close(m1, m2)


def test_lowered_draws_run_eager_ops_with_their_arguments():
    """acopt.inductor_rng on a hand-made graph, run without inductor: the custom
    operators draw what the eager ops draw (keyword dtype, an in-place op on a fresh
    tensor, a multi-output op), leave the generator where they do, refuse a tensor
    whose strides differ from the traced ones, and an in-place op on a tensor read
    elsewhere is not lowered."""
    from acopt import inductor_rng

    aten = torch.ops.aten
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(6, 5)
    a = graph.call_function(aten.rand_like.default, (x,), {"dtype": torch.float64})
    e = graph.call_function(aten.empty_like.default, (x,))
    e.meta["val"] = torch.empty(6, 5)
    b = graph.call_function(aten.bernoulli_.float, (e, 0.3))
    c = graph.call_function(aten.native_dropout.default, (x, 0.5, True))
    graph.output((a, b, graph.call_function(operator.getitem, (c, 0)), graph.call_function(operator.getitem, (c, 1))))
    gm = fx.GraphModule(nn.Module(), graph)
    assert all(inductor_rng.lowerable(n) for n in (a, b, c))
    eager = fx.GraphModule(nn.Module(), copy.deepcopy(graph))
    assert inductor_rng.lower(gm) == 3
    assert inductor_rng.lower(gm) == 0  # its own operators are left alone
    assert not any(
        n.target in (aten.rand_like.default, aten.bernoulli_.float, aten.empty_like.default) for n in gm.graph.nodes
    )
    xt = torch.randn(6, 5)
    torch.manual_seed(5)
    want = eager(xt)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    got = gm(xt)
    assert all(torch.equal(g, w) and g.dtype == w.dtype for g, w in zip(got, want, strict=True))
    assert torch.equal(torch.get_rng_state(), after)
    with pytest.raises(RuntimeError, match="not eager's"):
        gm(torch.randn(5, 6).t())

    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(4)
    e = graph.call_function(aten.empty_like.default, (x,))
    e.meta["val"] = torch.empty(4)
    b = graph.call_function(aten.uniform_.default, (e,))
    graph.output((b, e))  # the written tensor is read elsewhere too
    assert not inductor_rng.lowerable(b)


# ---- the optimizer step compiled, hyperparameters live (acopt.inductor_scalars) -------------
def _scheduled_pair(make):
    """Two identical (model, optimizer, scheduler): lr halves after every step."""
    out = []
    for _ in range(2):
        m = net()
        o = make(m.parameters())
        out.append((m, o, torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)))
    return out


def _check_compiled_optimizer(make, steps=3):
    """The compiled step (no plan: the optimizer is what is checked) equals eager
    PyTorch over ``steps`` steps while a scheduler changes lr between them (a baked
    lr would drift), parameters and optimizer state included; the optimizer runs
    as one compiled graph with no eager node, its hyperparameters float64 inputs."""
    from acopt.inductor_scalars import BOUNDARY_KEY

    (m1, o1, s1), (m2, o2, s2) = _scheduled_pair(make)
    x, y = batch()
    step = compile_inductor(acopt.trace(train_step, m2, o2, x, y))
    optimizer = [s for s in step.runner.segments if any(n.meta[REGION_KEY] == Region.OPTIMIZER for n in s.nodes)]
    assert len(optimizer) == 1 and optimizer[0].compiled, "the optimizer step is not one compiled graph"
    assert optimizer[0].graph_module.meta[BOUNDARY_KEY][0], "no hyperparameter is an input of the compiled optimizer"
    assert step.runner.summary()["eager_nodes"] == 0
    lrs = []
    for i in range(steps):
        xb, yb = batch(i)
        torch.manual_seed(i)
        l1 = train_step(m1, o1, xb, yb)
        torch.manual_seed(i)
        l2 = step(xb, yb)
        torch.testing.assert_close(l2, l1, rtol=RTOL, atol=ATOL)
        _assert_close(m1, m2)
        for a, b in zip(o1.state.values(), o2.state.values(), strict=True):
            for key, value in a.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(b[key], value, rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")
        lrs.append(o2.param_groups[0]["lr"])
        s1.step()
        s2.step()
    assert len(set(lrs)) == steps


def test_compiled_adamw_keeps_lr_live_and_equals_eager():
    _check_compiled_optimizer(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
        lambda p: torch.optim.RAdam(p, lr=1e-2),  # traced in its capturable form
        lambda p: torch.optim.NAdam(p, lr=1e-2, foreach=True),  # _foreach_* ops, unrolled
        lambda p: torch.optim.Rprop(p, lr=1e-2),  # capturable form, comparisons with a hyperparameter
    ],
    ids=["sgd-nesterov", "adam-amsgrad", "radam", "nadam-foreach", "rprop"],
)
def test_compiled_optimizers_keep_lr_live_and_equal_eager(make):
    _check_compiled_optimizer(make)


def test_scalar_uses_compile_with_live_values_or_run_eagerly():
    """On a hand-made graph: Python arithmetic on hyperparameters and aten ops that read
    them (in a Tensor or a Scalar argument) compile with the hyperparameters as inputs;
    a use the pass does not convert (float ``//``, ``clamp``'s Scalar bound) runs
    eagerly with every scalar computed from it; the compiled graph holds no
    hyperparameter's value, and the numbers follow the live values."""
    from acopt.inductor import _inductor_segment, _Runner

    aten = torch.ops.aten
    g = fx.Graph()
    p = g.placeholder("p")
    lr, beta = g.placeholder("hyper__lr"), g.placeholder("hyper__beta")
    s = g.call_function(operator.sub, (1, beta))
    q = g.call_function(operator.floordiv, (lr, 0.001))  # Python's float // is not torch's
    t = g.call_function(operator.mul, (q, 0.5))
    m = g.call_function(aten.mul.Tensor, (p, s))
    a = g.call_function(aten.add.Tensor, (m, p), {"alpha": lr})
    c = g.call_function(aten.clamp.default, (a, None, t))
    e = g.call_function(aten.lerp.Scalar, (m, p, s))
    g.output((a, c, e))
    for n in (p, m, a, c, e):
        n.meta["val"] = torch.empty(16)
    gm = fx.GraphModule(torch.nn.Module(), g)
    runner = _Runner(gm, compile_segment=_inductor_segment)
    eager = {n.name for seg in runner.segments if not seg.compiled for n in seg.nodes}
    assert eager == {q.name, t.name, c.name}
    compiled = [seg for seg in runner.segments if seg.compiled]
    assert {n.name for seg in compiled for n in seg.nodes} == {s.name, m.name, a.name, e.name}
    x = torch.randn(16)
    for lr_value, beta_value in [(0.01, 0.9), (0.0372, 0.99), (0.5, 0.3)]:
        got = runner(x, lr_value, beta_value)
        want = gm(x, lr_value, beta_value)
        for g1, w1 in zip(got, want, strict=True):
            torch.testing.assert_close(g1, w1, rtol=1e-6, atol=1e-7)
    for seg in compiled:
        text = seg.graph_module.code
        assert "0.9" not in text and "0.01" not in text, "a hyperparameter's value is in the compiled graph"


def test_the_log_softmax_is_not_held_for_a_read_of_its_shape(monkeypatch):
    """nll_loss_backward reads the log-softmax's shape only: compiled, that read kept
    the logits-sized tensor alive to the end of the first backward graph."""
    from acopt import inductor

    (m2, o2), _, _, rewritten = _planned(budget="100%")
    gm = inductor.without_shape_only_reads(rewritten.graph_module)
    (nll,) = [n for n in gm.graph.nodes if n.target == torch.ops.aten.nll_loss_backward.default]
    assert nll.args[1].target == torch.ops.aten.expand.default  # of a zero scalar: no storage
    assert nll.args[1].meta[REGION_KEY] == nll.meta[REGION_KEY] == Region.BACKWARD
    assert rewritten.graph_module.graph is not gm.graph  # the step's own graph is unchanged
    x, y = batch()
    peaks = {}
    for passes in (True, False):
        if not passes:
            monkeypatch.setattr(inductor, "without_shape_only_reads", lambda g: g)
        peaks[passes] = measure_graph_peak(compile_inductor(rewritten), x, y)
    logits = x.shape[0] * 4 * 4  # rows x classes floats
    assert peaks[True] <= peaks[False] - logits
    (m1, o1), _ = _pair()
    step = compile_inductor(rewritten)
    for i in range(2):
        torch.manual_seed(i)  # the same dropout masks: both draw from eager's generator
        want = train_step(m1, o1, *batch(i))
        torch.manual_seed(i)
        torch.testing.assert_close(step(*batch(i)), want, rtol=RTOL, atol=ATOL)
    _assert_close(m1, m2)
