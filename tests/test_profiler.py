"""acopt.profile: per-storage accounting, activation liveness, fake mode, exports."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import acopt
from acopt.exports import write_profile_csvs
from acopt.profiler import allocator_peak_bytes
from acopt.records import Region, Role

F32 = 4


def _mlp_step(model, optimizer, x):
    optimizer.zero_grad()
    loss = model(x).sum()
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.fixture
def tiny():
    """x[5,4] -> Linear(4,3) -> ReLU -> Linear(3,2) -> sum, no biases, plain SGD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    step = acopt.trace(_mlp_step, model, optimizer, x)
    return step, acopt.profile(step, x, warmup=1, iterations=2), model, optimizer, x


def test_hand_computed_activations_and_liveness(tiny):
    _, prof, *_ = tiny
    acts = {a.name: a for a in prof.activations}
    # Backward needs the ReLU output (for both grads) and the loss (ones_like);
    # nothing else made in the forward is read after it.
    assert set(acts) == {"relu", "sum_1"}
    relu = acts["relu"]
    assert relu.bytes == 5 * 3 * F32
    assert relu.recomputable and not acts["sum_1"].recomputable  # the loss is an output
    assert relu.sources == ("batch_0", "t")  # x and the transposed weight (a view of it)
    idx = prof.node_index
    assert relu.creation_rank == idx["relu"]
    assert relu.last_fw_use_rank == idx["mm_1"]
    assert relu.first_bw_use_rank == idx["mm_2"]  # grad of the second weight
    assert relu.last_bw_use_rank == idx["threshold_backward"]
    # its block replays mm, relu and the detach that backward reads it through
    block = ("mm", "relu", "detach")
    assert relu.recomp_time_s == pytest.approx(sum(prof.node_by_name[n].time_s for n in block))

    params = (3 * 4 + 2 * 3) * F32
    x = 5 * 4 * F32
    # Peak: during threshold_backward, with its input grad (5x3), the ReLU
    # output, the second weight's grad (2x3) and the loss alive.
    expected_peak = params + x + 5 * 3 * F32 + 5 * 3 * F32 + 2 * 3 * F32 + F32 + 5 * 3 * F32
    assert prof.peak_bytes == expected_peak
    assert prof.timeline[idx["threshold_backward"]] == expected_peak
    assert prof.timeline[idx["relu"]] == params + x + 2 * 5 * 3 * F32  # mm and relu both alive


def test_roles_and_regions(tiny):
    _, prof, *_ = tiny
    roles = {s.name: s.role for s in prof.storages}
    assert roles["param__0_weight"] == Role.PARAMETER
    assert roles["batch_0"] == Role.INPUT
    assert roles["relu"] == Role.ACTIVATION
    assert roles["mm_4"] == Role.GRADIENT  # grad of the first weight, read by the update
    regions = {n.name: n.region for n in prof.nodes}
    assert regions["relu"] == Region.FORWARD
    assert regions["threshold_backward"] == Region.BACKWARD
    assert regions["add_"] == Region.OPTIMIZER
    assert prof.node_by_name["add_"].mutates == ("param__0_weight",)
    assert not prof.node_by_name["add_"].recomputable


def test_profile_leaves_state_and_rng_untouched(tiny):
    step, _, model, optimizer, x = tiny
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    acopt.profile(step, x, warmup=0, iterations=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(8, 10),
    )  # fmt: skip
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _ce_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_storage_accounting_matches_the_allocator():
    model, optimizer = _cnn()
    batch = (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    step = acopt.trace(_ce_step, model, optimizer, *batch)
    prof = acopt.profile(step, *batch, warmup=1, iterations=1)
    allocator = allocator_peak_bytes(step, *batch)
    assert abs(allocator - prof.peak_bytes) <= 0.01 * prof.peak_bytes


def test_fake_profile_has_exact_memory_and_estimated_times():
    model, optimizer = _cnn()
    batch = (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    step = acopt.trace(_ce_step, model, optimizer, *batch)
    real = acopt.profile(step, *batch, warmup=1, iterations=1)
    fake = acopt.profile(step, *batch, fake=True)
    # Fake tensors run no kernel, so they see no workspace; storages are exact.
    assert fake.timeline == tuple(t - n.temp_bytes for t, n in zip(real.timeline, real.nodes))
    assert any(n.temp_bytes > 0 for n in real.nodes)  # convolutions use workspace on CPU
    assert [a.name for a in fake.activations] == [a.name for a in real.activations]
    assert fake.meta.estimated_times and "roofline" in fake.meta.time_estimator
    assert not real.meta.estimated_times
    conv = next(n for n in fake.nodes if "convolution" in n.op and n.region == Region.FORWARD)
    relu = next(n for n in fake.nodes if n.op == "aten.relu.default")
    assert conv.time_s > relu.time_s > 0  # FLOPs dominate the convolution


def test_batch_norm_and_dropout_flags():
    model, optimizer = _cnn()
    batch = (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    step = acopt.trace(_ce_step, model, optimizer, *batch)
    prof = acopt.profile(step, *batch, fake=True)
    bn = [n for n in prof.nodes if n.op == "aten.native_batch_norm.default"]
    assert len(bn) == 2
    for n in bn:  # writes its running stats, replayable without them
        assert len(n.mutates) == 2 and n.replay == "drop_running_stats" and n.recomputable
    random = [n for n in prof.nodes if n.random]
    assert random and all(n.region == Region.FORWARD for n in random)


def test_json_round_trip_and_csvs(tiny, tmp_path):
    _, prof, *_ = tiny
    prof.to_json(tmp_path / "p.json")
    assert acopt.Profile.from_json(tmp_path / "p.json") == prof
    nodes_csv, acts_csv = write_profile_csvs(prof, tmp_path, prefix="tiny")
    acts = pd.read_csv(acts_csv)
    assert list(acts.activation_name) == [a.name for a in prof.activations]
    for col in ("creation_rank", "last_fw_use_rank", "first_bw_use_rank", "last_bw_use_rank",
                "median_mem_size_bytes", "inactive_time_s", "recomp_time_s"):  # fmt: skip
        assert col in acts.columns
    nodes = pd.read_csv(nodes_csv)
    assert len(nodes) == len(prof.nodes) and nodes.live_bytes.max() == prof.peak_bytes


def test_corrupt_profile_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "acopt.Profile", "version": 1, "nodes": [{"name": 1}]}')
    with pytest.raises(ValueError, match="corrupt"):
        acopt.Profile.from_json(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        acopt.Profile.from_json(bad)
