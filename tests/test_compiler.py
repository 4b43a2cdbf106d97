"""acopt.compile in a training loop, and the CLI end to end."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch

import acopt
from acopt import models
from acopt.cli import main


def _state(w):
    return copy.deepcopy(w.model.state_dict())


def test_compile_trains_like_eager_within_budget():
    w1 = models.build("transformer", batch_size=8, seed=0)
    w2 = models.build("transformer", batch_size=8, seed=0)
    step = acopt.compile(w1.train_step, w1.model, w1.optimizer, *w1.batch, budget="70%")
    ref = acopt.trace(w2.train_step, w2.model, w2.optimizer, *w2.batch)  # same math, no recompute
    for i in range(3):
        batch = w1.make_batch(i)
        torch.manual_seed(i)
        a = step(*batch)
        torch.manual_seed(i)
        b = ref(*batch)
        assert torch.equal(a, b)
    s1, s2 = _state(w1), _state(w2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    report = step.report()
    assert report.peak_after_bytes <= report.budget_bytes < report.peak_before_bytes
    assert report.recomputed == len(step.plan.recompute) > 0
    assert "predicted overhead" in str(report)


def test_new_batch_shape_replans():
    w = models.build("mlp", batch_size=512, seed=0)
    step = acopt.compile(w.train_step, w.model, w.optimizer, *w.batch, budget="90%")
    first = step.report()
    x, y = w.batch
    step(x[:256], y[:256])  # a smaller last batch
    second = step.report()
    assert second.batch_shapes[0][0] == 256 and first.batch_shapes[0][0] == 512
    assert second.peak_before_bytes < first.peak_before_bytes
    step(x, y)  # back to the first shape: its plan is reused
    assert step.report() is first


def test_budget_below_floor_is_an_error():
    w = models.build("mlp", batch_size=8, seed=0)
    before = _state(w)
    with pytest.raises(acopt.InfeasibleBudget) as err:
        acopt.compile(w.train_step, w.model, w.optimizer, *w.batch, budget=1024)
    assert err.value.floor_bytes > 1024
    assert "floor" in str(err.value)
    after = _state(w)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_profile_plan_sweep(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["profile", "mlp", "--batch-size", "512", "--fake", "--out", str(out)]) == 0
    profile_json = out / "mlp_bs512_fake.profile.json"
    prof = acopt.Profile.from_json(profile_json)
    assert prof.meta.estimated_times and prof.meta.batch_size == 512
    for suffix in ("_node_stats.csv", "_activation_stats.csv", "_timeline.png"):
        assert (out / f"mlp_bs512_fake{suffix}").stat().st_size > 0

    assert main(["plan", str(profile_json), "--budget", "90%", "--out", str(out)]) == 0
    decisions = pd.read_csv(out / "ac_decisions_bs512_mlp_fake_greedy.csv")
    assert set(decisions.decision) == {"CHECKPOINT", "RECOMPUTE"}
    plan = acopt.Plan.from_json(out / "mlp_bs512_fake.greedy.plan.json")
    assert set(decisions[decisions.decision == "RECOMPUTE"].activation_name) == set(plan.recompute)
    assert acopt.simulate(prof, plan).peak_bytes <= plan.budget_bytes

    assert main(["sweep", str(profile_json), "--points", "4", "--out", str(out)]) == 0
    sweep = pd.read_csv(out / "mlp_bs512_fake.greedy_sweep.csv")
    assert len(sweep) == 4


def test_cli_plan_below_floor_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["profile", "mlp", "--batch-size", "4", "--fake", "--model-arg", "width=16", "--out", str(out)]) == 0
    code = main(["plan", str(out / "mlp_bs4_width16_fake.profile.json"), "--budget", "1KiB", "--out", str(out)])
    assert code == 2
    assert "floor" in capsys.readouterr().err  # user errors go to stderr (tests/test_cli.py)


def test_cli_run_main_job(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "mlp", "--batch-size", "512", "--budget", "90%", "--timing-steps", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "bitwise equal over 3 steps" in text and "yes" in text
    plan = json.loads((out / "mlp_bs512.greedy.plan.json").read_text())
    assert plan["solver"] == "greedy"
    assert (out / "mlp_bs512.rewritten.py").read_text().count("rc_") > 0


def test_cli_run_with_micro_batches_and_bf16(tmp_path, capsys):
    """The main job on k micro-batches under bf16 autocast: plan, bitwise check, measured == simulated."""
    out = tmp_path / "run"
    args = ["run", "transformer", "--batch-size", "16", "--micro-batches", "2", "--amp", "bf16", "--budget", "70%"]
    code = main([*args, "--timing-steps", "1", "--steps", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "2 micro-batches, autocast bf16" in text
    assert (out / "transformer_bs16_mb2_bf16.greedy.plan.json").exists()


def test_cli_micro_batches_must_divide_the_batch(capsys):
    assert main(["run", "mlp", "--batch-size", "10", "--micro-batches", "3"]) == 2
    assert "equal micro-batches" in capsys.readouterr().err
