"""What users see: logging, the report as a dict, module names of activations, the floor
beside the peak, output files that do not overwrite each other, text that rich keeps whole."""

from __future__ import annotations

import json
import logging
import sys

import pandas as pd
import pytest

import acopt
from acopt import models
from acopt.cli import main
from acopt.plan_outputs import recompute_by_module
from acopt.planning import no_recompute_peak


@pytest.fixture(scope="module")
def transformer_fake(tmp_path_factory):
    """The built-in transformer (one layer, batch 4) built on the meta device, traced and profiled
    on fake tensors by ``acopt profile --fake`` (AdamW's state on meta tensors included): seconds."""
    out = tmp_path_factory.mktemp("profile")
    argv = ["profile", "transformer", "--batch-size", "4", "--model-arg", "n_layers=1", "--fake", "--out", str(out)]
    assert main(argv) == 0
    w = models.build("transformer", batch_size=4, seed=0, n_layers=1)
    return w, None, acopt.Profile.from_json(out / "transformer_bs4_n_layers1_fake.profile.json")


def test_activations_are_named_after_their_module(transformer_fake):
    w, _, prof = transformer_fake
    modules = {name for name, _ in w.model.named_modules() if name}
    named = [a for a in prof.activations if a.module]
    assert len(named) > len(prof.activations) // 2
    assert all(a.module in modules for a in named)
    # dropout masks are made inside the attention's dropout module, the innermost one running
    assert any(a.module.endswith("attn.attn_drop") for a in named)
    again = acopt.Profile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert [a.module for a in again.activations] == [a.module for a in prof.activations]


def test_profiles_written_before_module_names_still_load(tmp_path, transformer_fake):
    _, _, prof = transformer_fake
    data = prof.to_dict()
    for a in data["activations"]:
        del a["module"]
    old = acopt.Profile.from_dict(data)
    assert all(a.module == "" for a in old.activations)
    assert acopt.plan(old, budget="floor+50%").fits


def test_recompute_by_module_adds_up_to_the_plan(transformer_fake):
    _, _, prof = transformer_fake
    plan = acopt.plan(prof, budget="floor+20%")
    frame = recompute_by_module(prof, plan)
    assert frame["recomputed"].sum() == len(plan.recompute)
    assert frame["block_time_s"].sum() == pytest.approx(acopt.simulate(prof, plan).recompute_time_s)
    assert list(frame["size_bytes"]) == sorted(frame["size_bytes"], reverse=True)


def test_report_as_dict_and_logging(caplog):
    w = models.build("mlp", batch_size=512, seed=0)
    with caplog.at_level(logging.DEBUG, logger="acopt"):
        step = acopt.compile(w.train_step, w.model, w.optimizer, *w.batch, budget=0.95)  # 95% of the peak
    report = step.report()
    assert report.budget_bytes == int(report.peak_before_bytes * 0.95)  # a fraction, never 0 bytes
    assert report.floor_bytes == acopt.floor(step.profile) <= report.peak_after_bytes <= report.budget_bytes
    assert "floor" in str(report)
    d = report.as_dict()
    json.dumps(d)  # plain values, for tensorboard / wandb
    assert d["floor_bytes"] == report.floor_bytes and d["overhead"] == report.overhead
    assert d["batch_shapes"] == [list(s) for s in report.batch_shapes]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("acopt")]
    assert any("compiled for batch shapes" in m for m in messages)
    assert any(m.startswith("greedy: heuristic") and "floor" in m for m in messages)  # acopt.planning's line

    caplog.clear()
    w.model.eval()  # a guard fails: traced and planned again, said at INFO every time, warned once
    with caplog.at_level(logging.DEBUG, logger="acopt"), pytest.warns(UserWarning, match="planning the step again"):
        step(*w.batch)
    messages = [r.getMessage() for r in caplog.records if r.name == "acopt.compiler"]
    assert any("a kept variant does not serve this call" in m for m in messages)  # the guard miss (DEBUG)
    assert any("tracing and planning the step again" in m and "eval()" in m for m in messages)


def test_exact_planner_progress_is_logged(caplog):
    pytest.importorskip("ortools")
    from tests.strategies import chain_profile

    prof = chain_profile(8)
    with caplog.at_level(logging.DEBUG, logger="acopt"):
        acopt.plan(prof, budget="floor+50%", solver="cpsat", time_limit_s=600)
    lines = [r.getMessage() for r in caplog.records if r.name == "acopt.solvers.exact"]
    assert any(line.startswith("build 0:") for line in lines) and any(line.startswith("solve 1:") for line in lines)


def test_cli_shows_the_floor_and_keeps_brackets(tmp_path, capsys, transformer_fake):
    _, _, prof = transformer_fake
    path = tmp_path / "transformer_bs4_fake.profile.json"
    prof.to_json(path)
    out = tmp_path / "out[models]"  # rich markup would swallow "[models]"
    assert main(["plan", str(path), "--budget", "floor+30%", "--out", str(out)]) == 0
    assert main(["plan", str(path), "--budget", "floor+30%", "--solver", "mu-two", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "out[models]" in text
    floor = acopt.floor(prof)
    assert text.count(f"floor {acopt.units.format_bytes(floor)}") >= 2  # in each plans table's title
    assert "recomputed, by module" in text and "attn" in text
    # one decisions file per model and solver, the design's ac_decisions_bs{N} first
    files = sorted(p.name for p in out.glob("ac_decisions_bs4_*.csv"))
    assert files == ["ac_decisions_bs4_transformer_fake_greedy.csv", "ac_decisions_bs4_transformer_fake_mu-two.csv"]
    frame = pd.read_csv(out / files[0])
    assert "module" in frame.columns and frame["module"].notna().any()


def test_cli_solvers_lists_options_and_plan_help_the_time_limit(capsys):
    assert main(["solvers"]) == 0
    text = capsys.readouterr().out
    assert "options: max_simulations=40" in text and "time_limit_s=60.0" in text
    assert main(["plan", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--time-limit SECONDS" in text and "max_simulations" in text and "rel_gap" in text


def test_budget_fraction_in_the_cli_is_of_the_peak(tmp_path, capsys, transformer_fake):
    pytest.importorskip("pulp")
    _, _, prof = transformer_fake
    path = tmp_path / "p.profile.json"
    prof.to_json(path)
    assert main(["plan", str(path), "--budget", "0.99", "--time-limit", "30", "--solver", "ilp", "--out", str(tmp_path)]) == 0
    plan = acopt.Plan.from_json(tmp_path / "p.ilp.plan.json")
    assert plan.budget_bytes == int(no_recompute_peak(prof) * 0.99)  # the floor is 97% of the peak here


def test_without_matplotlib_the_cli_writes_csvs_and_says_how_to_get_plots(tmp_path, capsys, monkeypatch, transformer_fake):
    from acopt import cli

    _, _, prof = transformer_fake
    path = tmp_path / "t.profile.json"
    prof.to_json(path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setattr(cli._plot, "said", False, raising=False)
    assert main(["plan", str(path), "--budget", "floor+50%", "--out", str(tmp_path / "o")]) == 0
    assert "pip install 'acopt[plots]'" in capsys.readouterr().err
    assert list((tmp_path / "o").glob("ac_decisions_*.csv")) and not list((tmp_path / "o").glob("*.png"))

