"""acopt where people already train, with tiny models: a transformers model with a
kwargs batch and a ModelOutput, DDP around a wrapped module (2 gloo ranks),
transformers' Trainer, Lightning, and accelerate's / Lightning's optimizer
wrappers in the whole-step mode. Each is compared with the same code on the
unwrapped model in eager PyTorch. accelerate and lightning are optional
(``pip install acopt[integrations]``): their tests are skipped without them."""

from __future__ import annotations

import copy
import datetime
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acopt
from tests import tiny


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.train()
    return model


def _same_grads(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_transformers_model_with_kwargs_batch_and_model_output():
    model = _tiny_gpt2()
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    wrapped = acopt.wrap(model, budget="80%", **batch)
    assert wrapped.plan.recompute
    first = wrapped.report()
    for step in range(2):
        for net in (wrapped, eager):
            torch.manual_seed(step)  # the same dropout masks
            out = net(**batch)
            assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"
            assert out.logits.shape == (4, 16, 64)
            out.loss.backward()  # the logits' gradient is None: unused
            net.seen = (out.loss.detach(), out.logits.detach())
        assert torch.equal(wrapped.seen[0], eager.seen[0]) and torch.equal(wrapped.seen[1], eager.seen[1])
        _same_grads(model, eager)
    # the second call ran a plan without the logits' (zero) grad_output: 4 x 16 x 64 floats less
    assert wrapped.report().peak_before_bytes <= first.peak_before_bytes - 4 * 16 * 64 * 4


@pytest.mark.slow
def test_bert_classifier_with_padding_mask():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).train()
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}
    wrapped = acopt.wrap(model, budget="90%", **batch)
    assert wrapped.plan.recompute
    for step in range(2):
        for net in (wrapped, eager):
            torch.manual_seed(step)
            net(**batch).loss.backward()
        _same_grads(model, eager)


# ---- DDP ------------------------------------------------------------------------------------
def _ddp_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        from tests.test_module_mode import Net, batch

        plain = Net()  # batch norm (DDP broadcasts its buffers) and dropout
        mine = copy.deepcopy(plain)
        xs = [batch(2 * i + rank) for i in range(2)]  # each rank its own data
        wrapped = acopt.wrap(mine, xs[0][0], budget="85%")
        assert wrapped.plan.recompute
        grads = []
        for model in (DDP(wrapped), DDP(plain)):
            torch.manual_seed(rank)
            with model.no_sync():  # the first micro-batch accumulates locally
                F.cross_entropy(model(xs[0][0]), xs[0][1]).backward()
            local = [p.grad.clone() for p in model.parameters()]
            F.cross_entropy(model(xs[1][0]), xs[1][1]).backward()  # the second all-reduces
            grads.append((local, [p.grad.clone() for p in model.parameters()]))
        (lw, gw), (lp, gp) = grads
        results[rank] = (
            all(torch.equal(a, b) for a, b in zip(lw, lp)),
            all(torch.equal(a, b) for a, b in zip(gw, gp)),
            any(not torch.equal(a, b) for a, b in zip(lw, gw)),  # the all-reduce changed something
        )
    finally:
        dist.destroy_process_group()


def test_ddp_around_a_wrapped_module_gives_ddps_gradients():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.start_processes(_ddp_worker, args=(port, results), nprocs=2, join=True, start_method="fork")
    assert dict(results) == {0: (True, True, True), 1: (True, True, True)}


# ---- transformers Trainer ------------------------------------------------------------------
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 64, (n, 16), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train_with_trainer(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=7, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(24))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_transformers_trainer_trains_the_wrapped_model_as_the_plain_one(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (acopt[integrations])")
    plain = _tiny_gpt2()
    mine = copy.deepcopy(plain)
    ids = _Tokens(4).ids[:4]
    # the Trainer's call: its batch, plus the token count it passes for the loss's mean
    wrapped = acopt.wrap(mine, input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(120.0), budget="80%")
    assert wrapped.plan.recompute
    losses_plain = _train_with_trainer(plain, tmp_path / "plain")
    losses_wrapped = _train_with_trainer(wrapped, tmp_path / "wrapped")
    assert len(losses_plain) == 3 and losses_wrapped == losses_plain
    for p, q in zip(plain.parameters(), mine.parameters()):
        assert torch.equal(p, q)
    assert len(wrapped._variants) == 1  # every training call ran the planned variant


# ---- Lightning ---------------------------------------------------------------------------------
def test_lightning_trainer_trains_the_wrapped_module_as_the_plain_one():
    L = pytest.importorskip("lightning", reason="optional: pip install acopt[integrations]")

    class Task(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    data = [tiny.batch(i, rows=32) for i in range(3)]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])), batch_size=32
    )

    def fit(net):
        trainer = L.Trainer(
            max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=1,
            gradient_clip_val=0.5,
        )  # fmt: skip
        trainer.fit(Task(net), train_dataloaders=loader)

    plain = tiny.net(width=64, act=nn.GELU)
    mine = copy.deepcopy(plain)
    wrapped = acopt.wrap(mine, data[0][0], budget="1GiB")
    fit(plain)
    fit(wrapped)
    for p, q in zip(plain.parameters(), mine.parameters()):
        assert torch.equal(p, q)
    assert sum(map(len, wrapped._variants.values())) == 1  # every training call ran the planned variant


# ---- wrapped optimizers in the whole-step mode ------------------------------------------------
def test_accelerated_optimizer_is_unwrapped_in_the_whole_step_mode():
    accelerate = pytest.importorskip("accelerate", reason="optional: pip install acopt[integrations]")
    accelerator = accelerate.Accelerator(cpu=True)
    plain = tiny.net()
    mine = copy.deepcopy(plain)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(mine, torch.optim.SGD(mine.parameters(), lr=0.1, momentum=0.9))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    step = acopt.compile(tiny.train_step, model, opt, *tiny.batch(0), budget="1GiB")
    assert step.optimizer is opt  # the argument as passed; the real optimizer inside is traced
    for i in range(3):
        x, y = tiny.batch(i)
        assert torch.equal(step(x, y), tiny.train_step(plain, opt_plain, x, y))
    for p, q in zip(plain.parameters(), mine.parameters()):
        assert torch.equal(p, q)
    accelerator.gradient_state._set_sync_gradients(False)  # accumulate(): eager would not step
    with pytest.raises(acopt.GuardFailure, match="sync_gradients"):
        step(*tiny.batch(0))
    accelerator.gradient_state._set_sync_gradients(True)


def test_lightning_optimizer_is_unwrapped():
    pytest.importorskip("lightning", reason="optional: pip install acopt[integrations]")
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from acopt.tracer import OptimizerSet, unwrap_optimizer

    inner = torch.optim.SGD(tiny.net().parameters(), lr=0.1)
    wrapper = LightningOptimizer(inner)
    assert unwrap_optimizer(wrapper) is inner
    found = OptimizerSet.of({"main": wrapper})
    assert found.live() == [inner] and found.rebuild() == {"main": wrapper}
