"""The traced step keeps eager's kernels (issue 16, CPU part).

Attention with a boolean mask and no dropout traces to the fused CPU flash
kernel eager dispatches to; with dropout both eager and the trace take SDPA's
math path (``_safe_softmax``), the same kernels; foreach and fused AdamW trace
to their multi-tensor kernels; a plan recomputing the fused attention output
replays it bitwise, in the memory the simulator predicts. The timing and peak
comparison is a benchmark (benchmarks/fidelity.py), not a test.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import acopt
from acopt.schedule import MemoryModel

FLASH = "aten._scaled_dot_product_flash_attention_for_cpu.default"
# the attention kernels whose choice the trace must share with eager
ATTENTION_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_efficient_attention",
    "_safe_softmax",
    "_softmax_backward_data",
)
LAYERS, D, HEADS, T = 2, 32, 4, 16


class Attention(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.qkv, self.out, self.dropout = nn.Linear(D, 3 * D), nn.Linear(D, D), dropout

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return x + self.out(y.transpose(1, 2).reshape(b, t, d))


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Attention(dropout) for _ in range(LAYERS))
        self.head = nn.Linear(D, 4)

    def forward(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x.mean(1))


def step(model, optimizer, x, mask, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x, mask), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def batch(i: int = 0):
    g = torch.Generator().manual_seed(i)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.randn(4, T, D, generator=g), mask, torch.randint(0, 4, (4,), generator=g)


def ops(traced) -> collections.Counter:
    return collections.Counter(str(n.target) for n in traced.graph.nodes if n.op == "call_function")


def eager_kernels(dropout: float) -> set[str]:
    """The attention kernels one eager step dispatches, by the profiler's op names."""
    m = Net(dropout)
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(m, o, *batch())
    return {e.name.removeprefix("aten::") for e in prof.events()} & set(ATTENTION_KERNELS)


def traced_kernels(traced) -> set[str]:
    return {t.removeprefix("aten.").split(".")[0] for t in ops(traced)} & set(ATTENTION_KERNELS)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["mask", "mask-dropout"])
def test_attention_traces_to_eager_kernels_and_trains_bitwise(dropout):
    m1, m2 = Net(dropout), Net(dropout)
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.1), torch.optim.SGD(m2.parameters(), lr=0.1)
    traced = acopt.trace(step, m1, o1, *batch())
    counts = ops(traced)
    if dropout == 0.0:
        assert counts[FLASH] == LAYERS
        assert counts["aten._safe_softmax.default"] == 0
        assert counts["aten.bmm.default"] == 0
    assert traced_kernels(traced) == eager_kernels(dropout)
    for i in range(3):
        torch.manual_seed(100 + i)
        a = traced(*batch(i))
        torch.manual_seed(100 + i)
        b = step(m2, o2, *batch(i))
        assert torch.equal(a, b)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_foreach_adamw_traces_to_eager_foreach_ops():
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=0.01, foreach=True)
    step(m, opt, *batch())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(m, opt, *batch())
    eager = collections.Counter(e.name.removeprefix("aten::") for e in prof.events() if e.name.startswith("aten::_foreach_"))
    traced = acopt.trace(step, m, opt, *batch())
    counts = ops(traced)
    n_params = len(list(m.parameters()))
    # eager's (non-capturable) form: the bias corrections are host floats of each step count
    assert traced.provenance["capturable_form"] == []
    assert counts["aten._foreach_addcdiv_.ScalarList"] == 1
    assert counts["aten._local_scalar_dense.default"] == n_params
    assert collections.Counter(
        t.removeprefix("aten.").split(".")[0] for t in counts.elements() if t.startswith("aten._foreach_")
    ) == eager
    # no per-parameter tensor ops: neither the Adam update nor capturable bias corrections
    for single in ("aten.addcdiv_.default", "aten.lerp_.Scalar", "aten.addcmul_.default", "aten.sqrt.default",
                   "aten.pow.Scalar", "aten.pow.Tensor_Tensor", "aten.reciprocal.default", "aten.neg.default"):
        assert counts[single] == 0, single
    assert counts["aten.mul_.Tensor"] + counts["aten.mul_.Scalar"] < n_params


def test_fused_adamw_traces_to_one_fused_kernel():
    m = Net()
    traced = acopt.trace(step, m, torch.optim.AdamW(m.parameters(), lr=0.01, fused=True), *batch())
    counts = ops(traced)
    assert counts["aten._fused_adamw_.default"] == 1
    assert not any(k.startswith("aten._foreach_addcdiv") for k in counts)


def test_recomputing_the_fused_attention_replays_it_bitwise_in_the_simulated_memory():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    traced = acopt.trace(step, model, opt, *batch())
    prof = acopt.profile(traced, *batch())
    flash_nodes = {n.name for n in traced.graph.nodes if str(n.target) == FLASH}
    candidates = MemoryModel(prof).candidates
    made_by_flash = [
        a.name for a in prof.activations if a.name in candidates and a.node in flash_nodes
    ]
    assert made_by_flash, "a fused attention output should be a recompute candidate"
    plan = frozenset(made_by_flash[:1])
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    rewritten = acopt.rewrite(traced, plan, profile=prof)
    measured = acopt.profile(rewritten, *batch(), warmup=0, iterations=1)
    assert measured.peak_bytes == acopt.simulate(prof, plan).peak_bytes
    # replay: the rewritten step trains as the traced one does, bitwise
    model.load_state_dict(snapshot)
    ours = [rewritten(*batch(i)) for i in range(3)]
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(snapshot)
    ref = Net()
    ref.load_state_dict(snapshot)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    theirs = [step(ref, ref_opt, *batch(i)) for i in range(3)]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    for k, v in ref.state_dict().items():
        assert torch.equal(after[k], v), k
