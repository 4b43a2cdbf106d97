"""acopt.rewrite: any valid plan leaves the training numbers bitwise unchanged,
recomputes what the plan says, and runs in the memory the simulator predicts."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import acopt
from acopt import models
from acopt.profiler import allocator_peak_bytes
from acopt.rewriter import recompute_blocks
from acopt.schedule import InvalidPlan, MemoryModel


@functools.lru_cache(maxsize=None)
def _setup(name: str):
    w = models.build(name, batch_size=4, seed=0)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch, warmup=1, iterations=1)
    snapshot = (copy.deepcopy(w.model.state_dict()), copy.deepcopy(w.optimizer.state_dict()))
    return w, traced, prof, snapshot


def _run(step, w, snapshot, steps: int = 3):
    """Run ``steps`` steps from ``snapshot``; return losses, state and grads after."""
    w.model.load_state_dict(snapshot[0])
    w.optimizer.load_state_dict(copy.deepcopy(snapshot[1]))  # it keeps the tensors it is given
    losses = []
    for i in range(steps):
        torch.manual_seed(1000 + i)
        losses.append(step(*w.make_batch(i)))
    state = copy.deepcopy(w.model.state_dict())
    opt_state = copy.deepcopy(w.optimizer.state_dict()["state"])
    grads = [None if p.grad is None else p.grad.clone() for p in w.model.parameters()]
    return losses, state, opt_state, grads


def _assert_bitwise(a, b):
    la, sa, oa, ga = a
    lb, sb, ob, gb = b
    assert all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for p in oa:
        for k in oa[p]:
            assert torch.equal(torch.as_tensor(oa[p][k]), torch.as_tensor(ob[p][k])), (p, k)
    for x, y in zip(ga, gb, strict=True):
        assert (x is None and y is None) or torch.equal(x, y)


MODELS = ["mlp", "cnn", "transformer"]


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_plan_keeps_training_bitwise(name, data):
    w, traced, prof, snapshot = _setup(name)
    candidates = MemoryModel(prof).candidates
    recompute = data.draw(st.sets(st.sampled_from(candidates)), label="recompute")
    rewritten = acopt.rewrite(traced, recompute, profile=prof)
    _assert_bitwise(_run(traced, w, snapshot), _run(rewritten, w, snapshot))
    measured = acopt.profile(rewritten, *w.batch, warmup=0, iterations=1)
    sim = acopt.simulate(prof, recompute)
    # Storages are exact; workspace is the profiled one, so compare without it.
    assert _storage_peak(measured) == _storage_peak_sim(prof, sim)


def _storage_peak(prof) -> int:
    return max(t - n.temp_bytes for t, n in zip(prof.timeline, prof.nodes))


def _storage_peak_sim(prof, sim) -> int:
    return max(_storage_timeline_sim(prof, sim))


def _storage_timeline_sim(prof, sim) -> list[int]:
    """The simulated timeline without workspace: node temporaries, and the
    generator state a random node's replay holds while it runs (rule 7)."""
    nodes = prof.node_by_name
    return [
        t - nodes[node].temp_bytes - (prof.rng_state_bytes if block and nodes[node].random else 0)
        for t, (node, block) in zip(sim.timeline, sim.step_nodes)
    ]


def test_generator_states_are_counted_step_by_step():
    """Rule 7: the rewritten step keeps each replayed random node's generator
    state from its forward run to its last replay. The measured storage
    timeline (the saving nodes left out: each is followed by its random node)
    equals the simulated one at every step, and the states are in it."""
    w, traced, prof, _ = _setup("transformer")
    assert prof.rng_state_bytes == torch.get_rng_state().nbytes
    recompute = frozenset(MemoryModel(prof).candidates)
    sim = acopt.simulate(prof, recompute)
    random_replays = [n for n, b in sim.step_nodes if b and prof.node_by_name[n].random]
    assert random_replays, "the transformer's plan should replay dropout"
    rewritten = acopt.rewrite(traced, recompute, profile=prof)
    measured = acopt.profile(rewritten, *w.batch, warmup=0, iterations=1)
    kept = [(t - n.temp_bytes) for t, n in zip(measured.timeline, measured.nodes) if not n.name.startswith("rng_state__")]
    assert kept == _storage_timeline_sim(prof, sim)
    without = acopt.simulate(dataclasses.replace(prof, rng_state_bytes=0), recompute)
    gap = [a - b for a, b in zip(sim.timeline, without.timeline)]
    assert max(gap) >= prof.rng_state_bytes * 2  # a replay step: saved + current state
    assert min(gap) == 0


@pytest.mark.parametrize("name", MODELS)
def test_all_candidates_keeps_training_bitwise_and_matches_the_simulator(name):
    w, traced, prof, snapshot = _setup(name)
    recompute = frozenset(MemoryModel(prof).candidates)
    rewritten = acopt.rewrite(traced, recompute, profile=prof)
    _assert_bitwise(_run(traced, w, snapshot), _run(rewritten, w, snapshot))
    # Memory truth: the rewritten step's measured peak is the simulated one.
    measured = acopt.profile(rewritten, *w.batch, warmup=0, iterations=1)
    sim = acopt.simulate(prof, recompute)
    assert measured.peak_bytes == sim.peak_bytes
    assert sim.peak_bytes < prof.peak_bytes or name == "mlp"


def test_blocks_are_labelled_and_readable():
    w, traced, prof, _ = _setup("cnn")
    recompute = frozenset(MemoryModel(prof).candidates[:3])
    rewritten = acopt.rewrite(traced, recompute, profile=prof)
    blocks = recompute_blocks(rewritten)
    assert set(blocks) == recompute
    text = rewritten.print_readable()
    for names in blocks.values():
        assert all(n in text for n in names)
    assert all(n.startswith("rc_") for names in blocks.values() for n in names)


def test_batch_norm_replay_does_not_touch_running_stats():
    w, traced, prof, snapshot = _setup("cnn")
    mm = MemoryModel(prof)
    # activations whose blocks replay a batch norm
    with_bn = [a for a in mm.candidates if any(
        prof.node_by_name[v].replay for v in mm.block(a, frozenset({a})).nodes)]  # fmt: skip
    assert with_bn
    rewritten = acopt.rewrite(traced, with_bn, profile=prof)
    _assert_bitwise(_run(traced, w, snapshot, steps=2), _run(rewritten, w, snapshot, steps=2))


class _RandomMask(nn.Module):
    """A random op whose result backward needs, with no mask kept by default."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x):
        h = self.a(x)
        noise = torch.rand_like(h)  # functional random op: replayed, not kept
        return self.b(torch.tanh(h * noise))


def _random_setup():
    torch.manual_seed(0)
    model = _RandomMask()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    traced = acopt.trace(models.classify_step, model, opt, x, y)
    return model, opt, x, y, traced


def test_random_ops_replay_the_same_numbers():
    model, opt, x, y, traced = _random_setup()
    prof = acopt.profile(traced, x, y, warmup=0, iterations=1)
    mm = MemoryModel(prof)
    replaying_random = [
        a for a in mm.candidates
        if any(prof.node_by_name[v].random for v in mm.block(a, frozenset({a})).nodes)
    ]  # fmt: skip
    assert replaying_random, "expected an activation whose block replays rand_like"
    rewritten = acopt.rewrite(traced, replaying_random, profile=prof)
    snapshot = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    results = []
    for step in (traced, rewritten):
        model.load_state_dict(snapshot[0])
        opt.load_state_dict(copy.deepcopy(snapshot[1]))
        torch.manual_seed(7)
        losses = [step(x, y) for _ in range(3)]
        after = torch.rand(3)  # the generator is left where the plain step leaves it
        results.append((losses, copy.deepcopy(model.state_dict()), after))
    (l1, s1, r1), (l2, s2, r2) = results
    assert all(torch.equal(a, b) for a, b in zip(l1, l2))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(r1, r2)


def test_recomputed_flops_match_the_plan():
    w, traced, prof, snapshot = _setup("mlp")
    mm = MemoryModel(prof)
    recompute = frozenset(mm.candidates)
    rewritten = acopt.rewrite(traced, recompute, profile=prof)

    def flops(step):
        w.model.load_state_dict(snapshot[0])
        w.optimizer.load_state_dict(copy.deepcopy(snapshot[1]))  # it keeps the tensors it is given
        with FlopCounterMode(display=False) as fc:
            step(*w.batch)
        return fc.get_total_flops()

    replayed = [v for b in mm.schedule(recompute).blocks for v in b.nodes]
    nodes = {n.name: n for n in traced.graph.nodes}
    expected = sum(_node_flops(nodes[v]) for v in replayed)
    assert expected > 0
    assert flops(rewritten) - flops(traced) == expected


def _node_flops(node) -> int:
    """FLOPs of one node, from the shapes recorded at tracing (meta tensors)."""

    if not isinstance(node.target, torch._ops.OpOverload):
        return 0  # getitem

    def meta(a):
        return torch.utils._pytree.tree_map_only(
            torch.Tensor,
            lambda v: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta"),
            a.meta["val"],
        )

    args = torch.fx.node.map_arg(node.args, meta)
    kwargs = torch.fx.node.map_arg(node.kwargs, meta)
    with FlopCounterMode(display=False) as fc:
        node.target(*args, **kwargs)
    return fc.get_total_flops()


@pytest.mark.parametrize("name", ["cnn", "transformer"])
@pytest.mark.parametrize("solver", ["greedy", "ilp", "cpsat"])  # the dev extra installs the solvers
def test_planner_plans_keep_training_bitwise_and_fit(name, solver):
    """Greedy and exact plans at two budgets: bitwise training, the measured
    storage peak is the simulated one, and the allocator's peak is within 2%."""
    w, traced, prof, snapshot = _setup(name)
    base = _run(traced, w, snapshot)
    floor = acopt.floor(prof)
    for frac in (0.25, 0.75):
        budget = floor + int(frac * (prof.peak_bytes - floor))
        options = {} if solver == "greedy" else {"time_limit_s": 30}
        plan = acopt.plan(prof, budget=budget, solver=solver, **options)
        assert plan.recompute, (solver, frac)
        rewritten = acopt.rewrite(traced, plan, profile=prof)
        _assert_bitwise(base, _run(rewritten, w, snapshot))
        sim = acopt.simulate(prof, plan)
        assert sim.peak_bytes <= budget
        measured = acopt.profile(rewritten, *w.batch, warmup=0, iterations=1)
        assert _storage_peak(measured) == _storage_peak_sim(prof, sim)
        allocator = allocator_peak_bytes(rewritten, *w.batch)
        assert abs(allocator - sim.peak_bytes) <= 0.02 * sim.peak_bytes, (allocator, sim.peak_bytes)


def test_plan_for_another_graph_is_refused():
    _, traced, prof, _ = _setup("mlp")
    with pytest.raises(InvalidPlan, match="not recomputable"):
        acopt.rewrite(traced, {"no_such_activation"}, profile=prof)
    _, other_traced, other_prof, _ = _setup("cnn")
    with pytest.raises(InvalidPlan, match="not made from this traced step"):
        acopt.rewrite(traced, set(), profile=other_prof)


BIG = {"resnet152": dict(image_size=64), "bert-base": dict(seq_len=64)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BIG))
def test_big_models_bitwise_and_memory_truth_cpu(name):
    w = models.build(name, batch_size=2, seed=0, **BIG[name])
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch, warmup=1, iterations=1)
    snapshot = (copy.deepcopy(w.model.state_dict()), copy.deepcopy(w.optimizer.state_dict()))
    base = _run(traced, w, snapshot, steps=2)
    floor = acopt.floor(prof)
    for budget in (floor + (prof.peak_bytes - floor) // 2, floor):
        plan = acopt.plan(prof, budget=budget, solver="greedy")
        rewritten = acopt.rewrite(traced, plan, profile=prof)
        _assert_bitwise(base, _run(rewritten, w, snapshot, steps=2))
        measured = acopt.profile(rewritten, *w.batch, warmup=0, iterations=1)
        sim = acopt.simulate(prof, plan)
        assert _storage_peak(measured) == _storage_peak_sim(prof, sim)
        assert sim.peak_bytes <= budget


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["transformer", "cnn"])
def test_cuda_bitwise_and_memory(name):
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    w = models.build(name, batch_size=8, seed=0, device="cuda")
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    prof = acopt.profile(traced, *w.batch, warmup=1, iterations=2)
    snapshot = (copy.deepcopy(w.model.state_dict()), copy.deepcopy(w.optimizer.state_dict()))
    recompute = frozenset(MemoryModel(prof).candidates)
    rewritten = acopt.rewrite(traced, recompute, profile=prof)
    _assert_bitwise(_run(traced, w, snapshot), _run(rewritten, w, snapshot))
    measured = acopt.profile(rewritten, *w.batch, warmup=0, iterations=1)
    assert _storage_peak(measured) == _storage_peak_sim(prof, acopt.simulate(prof, recompute))
