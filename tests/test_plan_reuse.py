"""Plans are reusable: ``acopt.compile(..., plan=...)``, a plan cache directory keyed by
the step's graph fingerprint, budget and solver, and ``acopt run --plan FILE``.
A plan of another step is refused (ArtifactMismatch), never applied."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acopt
import acopt.plan_cache as pc
from acopt.cli import main


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 4))


def _batch(i=0, rows=256):
    g = torch.Generator().manual_seed(i)
    return torch.randn(rows, 8, generator=g), torch.randint(0, 4, (rows,), generator=g)


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _forbid_profiling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("profiled or solved again")

    monkeypatch.setattr(pc, "make_profile", refuse)
    monkeypatch.setattr(pc, "make_plan", refuse)


def test_second_compile_reads_the_cache_and_trains_the_same(tmp_path, monkeypatch):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = acopt.compile(_step, model, opt, *_batch(), budget="90%", cache_dir=tmp_path)
    assert first.plan.recompute
    assert len(list(tmp_path.glob("*.plan.json"))) == 1 and len(list(tmp_path.glob("*.profile.json"))) == 1

    _forbid_profiling(monkeypatch)
    again_model = copy.deepcopy(model)
    again_opt = torch.optim.SGD(again_model.parameters(), lr=0.1)
    again = acopt.compile(_step, again_model, again_opt, *_batch(), budget="90%", cache_dir=tmp_path)
    assert again.plan.recompute == first.plan.recompute
    assert again.report().peak_after_bytes == first.report().peak_after_bytes
    for i in range(2):
        assert torch.equal(first(*_batch(i)), again(*_batch(i)))
    # another budget or solver is another key: planned anew (here: refused by the fake profiler)
    with pytest.raises(AssertionError, match="again"):
        acopt.compile(_step, again_model, again_opt, *_batch(), budget="95%", cache_dir=tmp_path)


def test_plan_argument_skips_profiling_and_a_foreign_plan_is_refused(tmp_path, monkeypatch):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    planned = acopt.compile(_step, model, opt, *_batch(), budget="90%")
    path = tmp_path / "step.plan.json"
    planned.plan.to_json(path)
    _forbid_profiling(monkeypatch)
    for given in (path, planned.plan):
        reused = acopt.compile(_step, model, opt, *_batch(), plan=given)
        assert reused.plan.recompute == planned.plan.recompute
        # memory from a fake-tensor profile of the step: exact bytes
        assert reused.report().peak_after_bytes == planned.report().peak_after_bytes
    with pytest.raises(acopt.ArtifactMismatch, match="batch size 256, this step's is 64"):
        acopt.compile(_step, model, opt, *_batch(rows=64), plan=path)
    with pytest.raises(TypeError, match="budget"):
        acopt.compile(_step, model, opt, *_batch())
    # a later batch shape of a step compiled from a plan: planned for the budget, if there is one
    monkeypatch.undo()
    step = acopt.compile(_step, model, opt, *_batch(), plan=path, budget="90%")
    with pytest.warns(UserWarning, match="does not fit this variant"):
        step(*_batch(rows=64))
    strict = acopt.compile(_step, model, opt, *_batch(), plan=path)
    with pytest.raises(acopt.ArtifactMismatch):
        strict(*_batch(rows=64))


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ACOPT_CACHE_DIR", str(tmp_path / "cache"))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acopt.compile(_step, model, opt, *_batch(), budget="90%")
    assert list((tmp_path / "cache").glob("*.plan.json"))
    _forbid_profiling(monkeypatch)
    acopt.compile(_step, model, opt, *_batch(), budget="90%")


def test_cli_run_with_a_saved_plan(tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["run", "mlp", "--batch-size", "8", "--budget", "100%", "--steps", "1", "--timing-steps", "1",
                 "--iterations", "1", "--out", str(first)]) == 0  # fmt: skip
    plan = next(first.glob("*.plan.json"))
    capsys.readouterr()
    args = ["run", "mlp", "--plan", str(plan), "--steps", "1", "--timing-steps", "1", "--iterations", "1"]
    assert main([*args, "--batch-size", "8", "--out", str(tmp_path / "again")]) == 0
    assert "bitwise equal" in capsys.readouterr().out
    assert main([*args, "--batch-size", "4", "--out", str(tmp_path / "other")]) != 0
    assert "another traced graph" in capsys.readouterr().err
    assert main([*args[:2], "--plan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x")]) != 0
    assert "argument --plan: no such file" in capsys.readouterr().err
