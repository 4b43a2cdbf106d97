"""acopt fit: memory from a config alone (meta device, fake tensors), the exact
largest-batch search, the roofline of a named GPU, and clear errors."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import acopt
from acopt import hf_workloads, models
from acopt.cli import main
from acopt.fit import (
    GPUS,
    FitInputError,
    fused_attention,
    largest_fitting,
    roofline_of,
    will_it_fit,
)
from acopt.profiler import Roofline


# ---- the search ---------------------------------------------------------------------
@given(
    pieces=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**4)), min_size=1, max_size=4),
    limit=st.integers(0, 10**7),
    start=st.integers(1, 300),
    max_batch=st.sampled_from([1, 7, 300, 65536]),
)
def test_largest_fitting_is_the_boundary(pieces, limit, start, max_batch):
    """On peaks shaped as the profiler's are (a maximum of terms affine in the
    batch), the answer fits, the next batch was evaluated and does not."""
    def peak(b):
        return max(a + c * b for a, c in pieces)

    calls = []
    b = largest_fitting(lambda x: calls.append(x) or peak(x), limit, start=start, max_batch=max_batch)
    lo, hi = 0, max_batch + 1  # the truth, by plain bisection
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= limit else (lo, mid)
    assert b == lo
    assert b == 0 or b in calls
    assert b == max_batch or b + 1 in calls
    assert len(calls) == len(set(calls)) <= 2 * max_batch.bit_length() + 6  # no batch twice; about bisection at worst


def test_largest_fitting_affine_takes_four_evaluations():
    calls = []
    assert largest_fitting(lambda b: calls.append(b) or 1000 + 37 * b, 100_000, start=4) == 2675
    assert calls == [4, 5, 2675, 2676]


# ---- fit on a built-in, checked against acopt.profile -----------------------------------
def _fake(name: str, batch_size: int, **kw):
    """A fake profile of a model built with real weights on the CPU (not the meta device)."""
    w = models.build(name, batch_size=batch_size, **kw)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    return acopt.profile(traced, *w.batch, fake=True)


@pytest.fixture(scope="module")
def mlp_fit():
    base = _fake("mlp", 128)
    memory = int(base.peak_bytes * 4)  # the boundaries lie at several hundred rows
    report = will_it_fit("mlp", batch_size=128, device_memory=memory, reserve=1000, gpu="a100")
    return report, base


def test_fit_peak_is_the_fake_profile_peak(mlp_fit):
    report, base = mlp_fit
    assert report.peak_bytes == base.peak_bytes
    assert report.floor_bytes == acopt.floor(base)
    assert report.floor_bytes < report.peak_bytes
    assert report.step_time_s > 0 and "3.12e+14 FLOP/s" in report.roofline  # A100's dense bf16


def test_fit_largest_batches_are_the_boundary(mlp_fit):
    report, _ = mlp_fit
    usable = report.usable_bytes
    b = report.max_batch_no_plan
    assert b > 128
    assert _fake("mlp", b).peak_bytes <= usable < _fake("mlp", b + 1).peak_bytes
    c = report.max_batch_with_plan
    assert c > b
    assert acopt.floor(_fake("mlp", c)) <= usable < acopt.floor(_fake("mlp", c + 1))
    plan = report.plan_at_max_batch
    assert plan is not None and plan.batch_size == c
    assert plan.predicted_peak_bytes <= usable and plan.recomputed > 0 and plan.overhead > 0
    assert report.plan is None  # batch 128 fits without recomputation


def test_fit_plans_the_requested_batch_when_it_does_not_fit():
    base = _fake("mlp", 256)
    budget = (base.peak_bytes + acopt.floor(base)) // 2
    report = will_it_fit("mlp", batch_size=256, device_memory=budget, max_batch=258)
    assert report.peak_bytes == base.peak_bytes > budget
    assert report.plan is not None and report.plan.predicted_peak_bytes <= budget < report.peak_bytes
    assert report.plan.recomputed > 0 and report.plan.solver == "mu-two"
    assert report.max_batch_no_plan < 256 <= report.max_batch_with_plan


# ---- HF configs on the meta device -------------------------------------------------------
TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 256}  # fmt: skip


def test_hf_llama_on_meta_profiles_as_on_cpu():
    """The meta-built bf16 step has the CPU-built one's storages; SDPA is traced as a fused flash op."""
    profiles = {}
    for device in ("meta", "cpu"):
        w = hf_workloads.build("llama", batch_size=2, seq_len=16, config=TINY_LLAMA, dtype="bf16", foreach=True,
                               device=device)  # fmt: skip
        assert all(p.device.type == device and p.dtype == torch.bfloat16 for p in w.model.parameters())
        with fused_attention():
            traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
        profiles[device] = acopt.profile(traced, *w.batch, fake=True)
    meta, cpu = profiles["meta"], profiles["cpu"]
    assert meta.peak_bytes == cpu.peak_bytes and acopt.floor(meta) == acopt.floor(cpu)
    # the CPU trace has two empty (0-byte) constants per layer (transformers' KV cache) that the meta one lifts
    assert sorted(s.bytes for s in meta.storages if s.bytes) == sorted(s.bytes for s in cpu.storages if s.bytes)
    ops = {n.op for n in meta.nodes}
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in ops
    assert "aten._foreach_sqrt.default" in ops  # foreach AdamW's parameter-sized temporary
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_llama3_8b_preset_is_built_on_meta():
    """The preset's shape is Llama-3-8B's (8.03 B parameters), and no weight is allocated."""
    w = hf_workloads.build("llama3-8b", batch_size=1, seq_len=8, dtype="bf16")
    params = list(w.model.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == 8_030_261_248


def test_roofline_sets_estimated_times():
    w = models.build("mlp", batch_size=8)
    traced = acopt.trace(w.train_step, w.model, w.optimizer, *w.batch)
    slow, fast = (acopt.profile(traced, *w.batch, fake=True, roofline=r) for r in (Roofline(1e9, 1e9, 0.0), Roofline(2e9, 2e9, 0.0)))
    assert slow.timeline == fast.timeline
    assert all(abs(a.time_s - 2 * b.time_s) <= 1e-15 for a, b in zip(slow.nodes, fast.nodes))
    views = [n for n in slow.nodes if n.op in ("aten.t.default", "aten.view.default")]
    assert views and all(n.time_s == 0.0 for n in views)  # a view runs no kernel
    assert "1e+09 FLOP/s" in slow.meta.time_estimator
    assert roofline_of("h100").flops_per_s == GPUS["h100"].flops_per_s
    assert roofline_of(None, flops=1e12, bandwidth=1e11).bytes_per_s == 1e11
    with pytest.raises(ValueError, match="pass fake=True"):
        acopt.profile(traced, *w.batch, roofline=Roofline())


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "give either model"),
        ({"model": "mlp", "hf": "gpt2"}, "give either model"),
        ({"model": "nosuch"}, "unknown model 'nosuch'"),
        ({"hf": "nosuch", "seq_len": 8}, "unknown HF model type 'nosuch'"),
        ({"hf": "llama", "seq_len": 8, "config": {"hiden_size": 64}}, "no key 'hiden_size'"),
        ({"hf": "llama", "config": {"hidden_size": 64}}, "needs seq_len"),
        ({"hf": "gpt2", "seq_len": 4096}, "longer than its max_position_embeddings 1024"),
        ({"model": "mlp", "seq_len": 8}, "mlp takes no seq_len"),
        ({"model": "mlp", "config": {"x": 1}}, "config overrides are for HF"),
        ({"model": "mlp", "device_memory": "1GiB", "reserve": "2GiB"}, "leaves nothing"),
        ({"model": "mlp", "gpu": "h1000"}, "unknown GPU 'h1000'"),
        ({"model": "mlp", "gpu": None, "flops": 1e12}, "give both flops"),
        ({"model": "mlp", "batch_size": 0}, "batch_size must be a positive int"),
        ({"model": "mlp", "dtype": "int8"}, "dtype must be one of"),
        ({"model": "mlp", "solver": "nosuch"}, "nosuch"),
        ({"model": "mlp", "device_memory": "80 parsecs"}, "unknown size unit"),
        ({"model": "mlp", "model_args": {"nosuch": 1}}, "unexpected keyword argument 'nosuch'"),
        ({"model": "mlp", "solver_options": {"x": 1}}, "unknown option 'x' for planner 'mu-two'"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    with pytest.raises(FitInputError, match=match):
        will_it_fit(**kwargs)


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["fit", "--hf", "llama", "--seq-len", "8", "--config", "hiden_size=64"], "no key 'hiden_size'"),
        (["fit", "mlp", "--device-memory", "70%"], "not a percentage"),
        (["fit", "mlp", "--flops", "-3"], "must be a positive number"),
        (["fit"], "give either model"),
        (["fit", "mlp", "--gpu", "h1000"], "invalid choice"),
        (["fit", "mlp", "--batch-size", "8", "--max-batch", "4"], "below --batch-size 8"),
    ],
)
def test_cli_errors_are_one_line(argv, expected, capsys):
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(r"acopt( \w+)?: error: ", last) and expected in last, err


def test_cli_prints_the_report(tmp_path, capsys):
    out = tmp_path / "fit.json"
    code = main(["fit", "mlp", "--batch-size", "8", "--device-memory", "2MiB", "--max-batch", "9", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    for words in ("peak, no recompute", "floor", "largest batch, no plan", "ESTIMATE", "fits = whole-step peak"):
        assert words in text
    import json

    data = json.loads(out.read_text())
    assert data["batch_size"] == 8 and data["peak_bytes"] > 0 and data["max_batch_no_plan"] == 9  # the cap
