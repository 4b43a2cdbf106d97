"""The benchmark harness end to end on a tiny mlp (fast: seconds on a CPU)."""

from __future__ import annotations

import csv

import pytest
import torch

from acopt import bench as harness
from acopt.measure import live_bytes, max_abs_diff, measure_peak

pytestmark = pytest.mark.filterwarnings("ignore")


def _config(tmp_path, **kw):
    base = dict(
        models=(harness.ModelRun(name="mlp", batch_sizes=(256,)),),
        methods=("none", "acopt-greedy", "ckpt-every"),
        budgets=("act50%",),
        match=False,
        out=tmp_path,
        tag="test",
        verbose=False,
        **harness.FAST,
    )
    base.update(kw)
    return harness.Config(**base)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    files = harness.run(_config(out))
    with open(files["csv"]) as f:
        reader = csv.DictReader(f)
        return files, reader.fieldnames, list(reader)


def test_csv_has_the_documented_columns(results):
    files, fieldnames, rows = results
    assert fieldnames == harness.COLUMNS
    assert {r["method"] for r in rows} == {"none", "traced", "acopt-greedy", "ckpt-every"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["device"] == "cpu" and r["torch_version"] == torch.__version__
        assert r["model"] == "mlp" and r["batch_size"] == "256"
    assert [r["budget"] for r in rows if r["method"] == "acopt-greedy"] == ["act50%"]
    for key in ("mlp_peak", "mlp_time", "mlp_pareto"):
        assert files[key].stat().st_size > 0


def test_acopt_is_bitwise_equal_to_the_traced_step(results):
    _, _, rows = results
    (row,) = [r for r in rows if r["method"] == "acopt-greedy"]
    assert row["reference"] == "traced"
    assert row["bitwise_vs_reference"] == "True"
    assert int(row["recomputed"]) > 0  # the budget made it recompute something
    (ckpt,) = [r for r in rows if r["method"] == "ckpt-every"]
    assert ckpt["reference"] == "none" and float(ckpt["param_max_abs_diff_vs_none"]) < 1e-5


def test_peaks_are_positive_and_acopt_fits_below_none(results):
    _, _, rows = results
    peaks = {r["method"]: int(r["peak_bytes"]) for r in rows}
    assert all(p > 0 for p in peaks.values())
    assert peaks["acopt-greedy"] <= peaks["none"]
    (row,) = [r for r in rows if r["method"] == "acopt-greedy"]
    # the budget is the floor plus half the removable memory, and acopt meets it as measured
    assert int(row["floor_bytes"]) <= int(row["budget_bytes"]) <= int(row["no_recompute_sim_peak_bytes"])
    assert int(row["peak_bytes"]) <= int(row["budget_bytes"])
    assert float(row["step_time_s"]) > 0


def test_torch_budget_runs_or_says_why(tmp_path):
    """torch.compile with the partitioner's memory budget; aot_eager keeps it quick on a CPU."""
    files = harness.run(_config(tmp_path, methods=("none", "torch-budget"), torch_backend="aot_eager", plots=False))
    with open(files["csv"]) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    row = rows["torch-budget"]
    if row["status"] != "ok":
        pytest.skip(f"torch.compile (aot_eager) does not work here: {row['error']}")
    assert row["torch_budget_fraction"] == "0.5" and row["torch_backend"] == "aot_eager"
    assert int(row["peak_bytes"]) > 0
    assert float(row["param_max_abs_diff_vs_none"]) < 1e-4


def test_max_batch_search_brackets_the_cap(tmp_path):
    config = _config(tmp_path)
    run = harness.ModelRun(name="mlp", batch_sizes=(), max_batch_limit=64)
    cap = 150_000  # about 20 samples: the peak of a batch of 32 is 153 kB
    r = harness.max_batch(config, run, "none", cap)
    assert 1 <= r["max_batch_size"] < 32
    assert r["peak_at_max_bytes"] <= cap < r["peak_at_fail_bytes"]
    assert r["first_failing_batch_size"] == r["max_batch_size"] + 1


def test_memory_helpers():
    x = torch.zeros(1000)
    assert live_bytes([x, x[10:], x.view(10, 100)]) == 4000
    assert max_abs_diff([x], [x.clone()]) == (0.0, True)
    assert max_abs_diff([x], [x + 0.5]) == (0.5, False)

    def step():
        a = torch.ones(1 << 18)  # 1 MiB
        b = a * 2  # another MiB while a lives
        return b.sum()

    mem = measure_peak(step, device="cpu", alive=lambda: [x])
    assert mem.base_bytes == 4000
    assert 2 << 20 <= mem.added_peak_bytes < (2 << 20) + 4096


def test_measured_peak_is_the_simulated_one_with_generator_states(tmp_path):
    """The transformer's dropout is replayed from saved generator states (acopt.rng; on
    CPU 5056 B each). The simulator counts them (docs/memory-model.md, rule 7), so the
    harness's whole-step measurement equals the simulated peak to the byte and fits."""
    from acopt.measure import state_tensors

    config = _config(tmp_path)
    ctx = harness.make_context(config, harness.ModelRun(name="transformer", batch_sizes=(4,)), 4)
    w = ctx.workload
    assert ctx.profile.rng_state_bytes == torch.get_rng_state().nbytes > 0

    def measured(prepared):
        ctx.restore()
        prepared.step(*w.batch)
        alive = lambda: state_tensors(w.model, w.optimizer, w.batch)  # noqa: E731
        return measure_peak(lambda: prepared.step(*w.batch), device="cpu", alive=alive).peak_bytes

    # every candidate recomputed, the dropout outputs among them
    import acopt
    from acopt.schedule import MemoryModel

    everything = frozenset(MemoryModel(ctx.profile).candidates)
    step = acopt.rewrite(ctx.traced, everything, profile=ctx.profile)
    assert harness._rng_saves(step) > 0
    prepared = harness.Prepared(step, info={}, reference="traced")
    assert measured(prepared) == acopt.simulate(ctx.profile, everything).peak_bytes
    # a greedy plan through the harness: measured == simulated, within the budget
    prepared = harness.acopt_step(ctx, "greedy", ctx.budget_bytes("act60%"))
    info = prepared.info
    assert info["rng_state_bytes"] == info["rng_states"] * ctx.profile.rng_state_bytes
    assert measured(prepared) == info["sim_peak_bytes"] <= ctx.budget_bytes("act60%")
