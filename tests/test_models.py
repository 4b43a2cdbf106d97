"""acopt.models: the built-in workloads, and the torch.utils.checkpoint baseline."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from acopt.models import MODELS, Workload, build, classify_step
from acopt.checkpoint_baselines import apply_torch_checkpoint

FAST = ["mlp", "cnn", "transformer"]
BATCH = 3


def tiny_factory(*, batch_size, device="cpu", seed=0, width=5):
    """A third-party factory, reached as "tests.test_models:tiny_factory"."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def make_batch(s):
        g = torch.Generator().manual_seed(s)
        return torch.randn(batch_size, 4, generator=g), torch.randint(0, 2, (batch_size,), generator=g)

    return Workload(
        name="tiny",
        model=model,
        optimizer=opt,
        batch=make_batch(seed),
        make_batch=make_batch,
        train_step=classify_step,
        blocks=[model[0]],
    )


def not_a_factory(*, batch_size, device="cpu", seed=0):
    return "nope"


def _params(w: Workload) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in w.model.state_dict().items()}


def _assert_equal_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", FAST)
def test_build(name):
    w = build(name, batch_size=BATCH)
    assert isinstance(w, Workload)
    assert w.name == name
    assert w.model.training
    assert all(isinstance(t, torch.Tensor) for t in w.batch)
    assert all(t.shape[0] == BATCH for t in w.batch)
    assert w.blocks and all(isinstance(b, nn.Module) for b in w.blocks)
    owned = {id(m) for m in w.model.modules()}
    assert all(id(b) in owned for b in w.blocks)
    opt_params = {id(p) for g in w.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in w.model.parameters()}


@pytest.mark.parametrize("name", FAST)
def test_same_seed_same_workload(name):
    a, b = build(name, batch_size=BATCH, seed=7), build(name, batch_size=BATCH, seed=7)
    _assert_equal_state(_params(a), _params(b))
    assert all(torch.equal(x, y) for x, y in zip(a.batch, b.batch))
    c = build(name, batch_size=BATCH, seed=8)
    assert any(not torch.equal(x, y) for x, y in zip(_params(a).values(), _params(c).values()))
    # and the same eager step (same dropout draws) gives the same loss, bitwise
    torch.manual_seed(1)
    la = a.step()
    torch.manual_seed(1)
    assert torch.equal(la, b.step())


@pytest.mark.parametrize("name", FAST)
def test_train_step_changes_parameters(name):
    w = build(name, batch_size=BATCH)
    before = {k: p.detach().clone() for k, p in w.model.named_parameters()}
    loss = w.train_step(w.model, w.optimizer, *w.batch)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    assert math.isfinite(loss.item())
    changed = [k for k, p in w.model.named_parameters() if not torch.equal(p, before[k])]
    assert changed, "no parameter changed"
    assert len(changed) == len(before), set(before) - set(changed)


@pytest.mark.parametrize("name", FAST)
def test_make_batch(name):
    w = build(name, batch_size=BATCH, seed=0)
    new = w.make_batch(1)
    assert len(new) == len(w.batch)
    for x, y in zip(new, w.batch):
        assert x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
    assert any(not torch.equal(x, y) for x, y in zip(new, w.batch))
    assert all(torch.equal(x, y) for x, y in zip(w.make_batch(0), w.batch))
    assert all(torch.equal(x, y) for x, y in zip(w.make_batch(1), new))


def test_kwargs_reach_the_factory():
    w = build("transformer", batch_size=2, seq_len=8, n_layers=3)
    assert w.batch[0].shape == (2, 8)
    assert len(w.blocks) == 3
    with pytest.raises(TypeError):
        build("mlp", batch_size=2, no_such_option=1)


def test_unknown_name():
    with pytest.raises(ValueError) as e:
        build("no-such-model", batch_size=1)
    for name in MODELS:
        assert name in str(e.value)


def test_bad_batch_size():
    with pytest.raises(ValueError):
        build("mlp", batch_size=0)


def test_factory_spec():
    w = build("tests.test_models:tiny_factory", batch_size=4, seed=3, width=7)
    assert w.name == "tiny"
    assert w.batch[0].shape == (4, 4)
    assert w.model[0].out_features == 7
    assert math.isfinite(w.step().item())
    with pytest.raises(ValueError):
        build("tests.test_models:no_such_factory", batch_size=1)
    with pytest.raises(ValueError):
        build("no_such_module_xyz:f", batch_size=1)
    with pytest.raises(TypeError):
        build("tests.test_models:not_a_factory", batch_size=1)


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_torch_checkpoint_baseline(name):
    plain = build(name, batch_size=BATCH)
    ckpt = build(name, batch_size=BATCH)
    restore = apply_torch_checkpoint(ckpt, every=1)
    assert all("forward" in vars(b) for b in ckpt.blocks)
    # dropout included: checkpoint replays the RNG state, so same numbers
    torch.manual_seed(123)
    a = plain.step()
    torch.manual_seed(123)
    b = ckpt.step()
    assert torch.equal(a, b)
    for (k, p), (_, q) in zip(plain.model.named_parameters(), ckpt.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=k)
    restore()
    assert not any("forward" in vars(blk) for blk in ckpt.blocks)
    restore2 = apply_torch_checkpoint(ckpt, every=2)
    assert ["forward" in vars(blk) for blk in ckpt.blocks] == [i % 2 == 0 for i in range(len(ckpt.blocks))]
    restore2()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,kw",
    [("resnet152", dict(image_size=224)), ("bert-base", dict(seq_len=128))],
)
def test_transformers_models(name, kw):
    pytest.importorskip("transformers")
    w = build(name, batch_size=1, **kw)
    _assert_equal_state(_params(w), _params(build(name, batch_size=1, **kw)))
    assert w.model.training
    assert all(t.shape[0] == 1 for t in w.batch)
    assert len(w.blocks) == {"resnet152": 3 + 8 + 36 + 3, "bert-base": 12}[name]
    before = {k: p.detach().clone() for k, p in w.model.named_parameters()}
    loss = w.step()
    assert loss.dim() == 0 and math.isfinite(loss.item())
    assert any(not torch.equal(p, before[k]) for k, p in w.model.named_parameters())
