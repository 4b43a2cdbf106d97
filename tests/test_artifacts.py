"""Artifacts are checked, not trusted: profiles and plans are type-checked on
load, and acopt.rewrite refuses a profile or plan of another step (graph
fingerprint, profile id) or a profile whose node records disagree with the graph."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn

import acopt
from acopt.fingerprint import ArtifactMismatch, graph_fingerprint
from acopt.planning import Plan
from acopt.records import Profile
from acopt.schedule import InvalidPlan


def _train_step(model, optimizer, x):
    optimizer.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


def _build():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


@pytest.fixture(scope="module")
def world():
    """One model; its step traced and profiled at batch sizes 256 and 512; a plan for each."""
    model, optimizer = _build()
    out = {"model": model, "optimizer": optimizer}
    for bs in (256, 512):
        x = torch.randn(bs, 8)
        traced = acopt.trace(_train_step, model, optimizer, x)
        prof = acopt.profile(traced, x, warmup=0, iterations=1, fake=bs == 512)
        plan = acopt.plan(prof, budget=acopt.floor(prof))
        assert plan.recompute
        out[bs] = (x, traced, prof, plan)
    return out


def _corrupt_profile(prof: Profile, edit) -> dict:
    data = json.loads(json.dumps(prof.to_dict()))
    edit(data)
    return data


# ---- 3. type-checked loading ---------------------------------------------------------
def _set(path, value):
    def edit(data):
        *parents, last = path
        for p in parents:
            data = data[p]
        data[last] = value

    return edit


def _delete(path):
    def edit(data):
        *parents, last = path
        for p in parents:
            data = data[p]
        del data[last]

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set(["nodes", 3, "time_s"], "abc"), r"nodes\[3\]\.time_s: expected a number, got str 'abc'"),
        (_set(["nodes", 3, "random"], 1), r"nodes\[3\]\.random: expected a boolean, got int 1"),
        (_set(["nodes", 2, "temp_bytes"], True), r"nodes\[2\]\.temp_bytes: expected an integer, got bool True"),
        (_set(["nodes", 2, "temp_bytes"], 1.5), r"nodes\[2\]\.temp_bytes: expected an integer, got float 1.5"),
        (_set(["nodes", 30, "inputs"], "mm"), r"nodes\[30\]\.inputs: expected a list, got str 'mm'"),
        (_set(["nodes", 30, "inputs", 0], 7), r"nodes\[30\]\.inputs\[0\]: expected a string, got int 7"),
        (_set(["nodes", 0, "region"], "sideways"), r"nodes\[0\]\.region: expected one of 'forward', 'backward'"),
        (_set(["storages", 1, "role"], "wizard"), r"storages\[1\]\.role: expected one of 'parameter'"),
        (_set(["storages", 1, "bytes"], None), r"storages\[1\]\.bytes: expected an integer, got null"),
        (_set(["activations", 0, "sources"], {"a": 1}), r"activations\[0\]\.sources: expected a list, got dict"),
        (_set(["meta", "batch_size"], "8"), r"meta\.batch_size: expected an integer, got str '8'"),
        (_set(["meta", "graph_fingerprint"], 12), r"meta\.graph_fingerprint: expected a string"),
        (_set(["nodes", 1, "colour"], "red"), r"nodes\[1\]: unknown field 'colour' for NodeRecord"),
        (_set(["timeline"], [1, "2"]), r"timeline\[1\]: expected an integer, got str '2'"),
        (_set(["nodes"], {}), r"nodes: expected a list, got dict"),
        (_delete(["nodes", 5, "name"]), r"nodes\[5\]\.name: missing"),
        (_delete(["peak_bytes"]), r"peak_bytes: missing"),
    ],
)
def test_profile_fields_are_type_checked_naming_the_field(world, edit, message):
    prof = world[256][2]
    with pytest.raises(ValueError, match=r"^corrupt acopt profile: " + message):
        Profile.from_dict(_corrupt_profile(prof, edit))


def test_profile_json_round_trip_is_exact_and_old_files_load(world, tmp_path):
    prof = world[256][2]
    assert len(prof.meta.graph_fingerprint) == 16
    prof.to_json(tmp_path / "p.json")
    back = Profile.from_json(tmp_path / "p.json")
    assert back == prof
    back.to_json(tmp_path / "q.json")
    assert (tmp_path / "q.json").read_text() == (tmp_path / "p.json").read_text()
    # a file from before graph fingerprints (and rng_state_bytes) still loads
    old = _corrupt_profile(prof, _delete(["meta", "graph_fingerprint"]))
    del old["rng_state_bytes"]
    loaded = Profile.from_dict(old)
    assert loaded.meta.graph_fingerprint == "" and loaded.rng_state_bytes == 0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("recompute", "relu", r"recompute: expected a list, got str 'relu'"),
        ("recompute", ["relu", 3], r"recompute\[1\]: expected a string, got int 3"),
        ("status", "splendid", r"status: expected one of 'optimal', 'feasible'"),
        ("budget_bytes", True, r"budget_bytes: expected an integer, got bool True"),
        ("recompute_time_s", "abc", r"recompute_time_s: expected a number, got str 'abc'"),
        ("bound", [], r"bound: expected a number, got list"),
        ("stats", {"variables": "3"}, r"stats\.variables: expected an integer, got str '3'"),
        ("stats", {"notes": "hi"}, r"stats\.notes: expected a list, got str 'hi'"),
        ("stats", [1], r"stats: expected an object \(SolverStats\), got list"),
        ("options", {"x": [1, 2]}, r"options\['x'\]: expected .*got list \[1, 2\]"),
        ("profile_id", None, r"profile_id: expected a string, got null"),
        ("colour", "red", r"unknown field 'colour' for Plan"),
    ],
)
def test_plan_fields_are_type_checked_naming_the_field(world, field, value, message):
    plan = world[256][3]
    data = json.loads(json.dumps(plan.to_dict()))
    data[field] = value
    with pytest.raises(ValueError, match=r"^corrupt acopt plan: " + message):
        Plan.from_dict(data)


def test_plan_json_round_trip_is_exact_and_old_files_load(world, tmp_path):
    plan = world[256][3]
    assert plan.graph_fingerprint == world[256][2].meta.graph_fingerprint
    plan.to_json(tmp_path / "plan.json")
    back = Plan.from_json(tmp_path / "plan.json")
    assert back == plan and isinstance(back.recompute, frozenset)
    back.to_json(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == (tmp_path / "plan.json").read_text()
    data = plan.to_dict()
    del data["graph_fingerprint"], data["options"]
    assert Plan.from_dict(data) == dataclasses.replace(plan, graph_fingerprint="", options=())


# ---- 1. the graph fingerprint -----------------------------------------------------------
def test_graph_fingerprint_is_the_graphs(world):
    x256, traced256, prof256, _ = world[256]
    _, traced512, prof512, _ = world[512]
    again = acopt.trace(_train_step, world["model"], world["optimizer"], x256)
    assert graph_fingerprint(again) == graph_fingerprint(traced256) == prof256.meta.graph_fingerprint
    assert graph_fingerprint(traced512) == prof512.meta.graph_fingerprint  # fake profile: same digest
    assert graph_fingerprint(traced512) != graph_fingerprint(traced256)
    assert [n.name for n in traced512.graph.nodes] == [n.name for n in traced256.graph.nodes]


def test_profile_from_another_batch_size_is_refused(world):
    _, traced512, _, _ = world[512]
    _, _, prof256, _ = world[256]
    with pytest.raises(ArtifactMismatch, match=r"not made from this traced step.*batch size 256.*batch size 512"):
        acopt.rewrite(traced512, set(), profile=prof256)
    assert issubclass(ArtifactMismatch, InvalidPlan)


def _flip(prof: Profile, tmp_path, edit) -> Profile:
    """Save ``prof``, edit the JSON file by hand, load it back."""
    path = tmp_path / "edited.json"
    prof.to_json(path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return Profile.from_json(path)


def _index(prof: Profile, pred) -> int:
    return next(i for i, n in enumerate(prof.nodes) if pred(n))


@pytest.mark.parametrize("keep_fingerprint", [True, False])
@pytest.mark.parametrize(
    "field, pick",
    [
        ("random", lambda n: n.random),  # the dropout: flipped to not random
        ("random", lambda n: n.op == "aten.relu.default"),  # relu: flipped to random
        ("recomputable", lambda n: n.op == "aten.tanh.default"),
        ("mutates", lambda n: bool(n.mutates)),  # an optimizer update, its write removed
    ],
)
def test_hand_edited_node_facts_are_refused(world, tmp_path, keep_fingerprint, field, pick):
    x, traced, prof, plan = world[256]
    i = _index(prof, pick)
    name = prof.nodes[i].name

    def edit(data):
        node = data["nodes"][i]
        node[field] = [] if field == "mutates" else not node[field]
        if not keep_fingerprint:  # a hand-built or old profile: the per-node check still runs
            data["meta"]["graph_fingerprint"] = ""

    edited = _flip(prof, tmp_path, edit)
    with pytest.raises(ArtifactMismatch, match=rf"node '{name}' says {field}=.*traced graph says {field}="):
        acopt.rewrite(traced, set(), profile=edited)


def test_plan_from_another_batch_size_is_refused(world):
    _, traced512, prof512, _ = world[512]
    _, _, prof256, plan256 = world[256]
    for profile in (prof512, None):
        with pytest.raises(ArtifactMismatch, match=r"plan was made for another traced step.*batch size 256"):
            acopt.rewrite(traced512, plan256, profile=profile)
    # an older plan file without a graph fingerprint: its profile id still gives it away
    old = dataclasses.replace(plan256, graph_fingerprint="")
    with pytest.raises(ArtifactMismatch, match=r"plan was made for another profile.*batch size 256"):
        acopt.rewrite(traced512, old, profile=prof512)
    with pytest.raises(ArtifactMismatch, match=r"another profile"):
        acopt.rewrite(traced512, old)
    # the same names as a plain set skip the plan checks (and fit both graphs)
    acopt.rewrite(traced512, set(plan256.recompute), profile=prof512)


def test_plan_names_must_be_activations_of_the_profile(world):
    _, traced, prof, plan = world[256]
    with pytest.raises(InvalidPlan, match=r"not activations of this profile.*'no_such'"):
        acopt.rewrite(traced, {"no_such"}, profile=prof)
    forged = dataclasses.replace(plan, recompute=plan.recompute | {"no_such"})
    with pytest.raises(InvalidPlan, match=r"not activations of this profile"):
        acopt.rewrite(traced, forged, profile=prof)


def _run(step, w, snapshot, steps: int = 2):
    model, optimizer, x = w
    model.load_state_dict(snapshot[0])
    optimizer.load_state_dict(copy.deepcopy(snapshot[1]))
    losses = []
    for i in range(steps):
        torch.manual_seed(100 + i)
        losses.append(step(x + i))
    return losses, copy.deepcopy(model.state_dict()), [p.grad.clone() for p in model.parameters()]


def test_matching_artifacts_rewrite_bitwise(world, tmp_path):
    x, traced, prof, plan = world[256]
    prof.to_json(tmp_path / "p.json")
    plan.to_json(tmp_path / "plan.json")
    prof_back, plan_back = Profile.from_json(tmp_path / "p.json"), Plan.from_json(tmp_path / "plan.json")
    model, optimizer = world["model"], world["optimizer"]
    w = (model, optimizer, x)
    snapshot = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    base = _run(traced, w, snapshot)
    for step in (acopt.rewrite(traced, plan_back, profile=prof_back), acopt.rewrite(traced, plan)):
        assert step.provenance["recompute"] == sorted(plan.recompute)
        got = _run(step, w, snapshot)
        assert all(torch.equal(a, b) for a, b in zip(base[0], got[0], strict=True))
        assert all(torch.equal(base[1][k], got[1][k]) for k in base[1])
        assert all(torch.equal(a, b) for a, b in zip(base[2], got[2], strict=True))
    model.load_state_dict(snapshot[0])
    optimizer.load_state_dict(copy.deepcopy(snapshot[1]))
