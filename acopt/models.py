"""Built-in workloads for the CLI, the tests and the benchmarks.

``build(name_or_spec, batch_size=..., device=..., seed=...)`` returns a
:class:`Workload`: a model in train mode, its optimizer, an example batch, a
way to make more batches of the same shape, the eager ``train_step`` and the
model's repeated blocks (for ``torch.utils.checkpoint`` baselines).

Built-ins (random weights built from configs, never downloaded; every loss is
plain ``F.cross_entropy``)::

    mlp          3 x (Linear + ReLU), width 64, 32 features -> 10 classes, SGD momentum
    cnn          3 x (Conv2d + BatchNorm2d + ReLU) on 3x32x32, linear head, SGD momentum
    transformer  pre-LN encoder classifier, d 64, 2 layers, 4 heads, seq 32, vocab 1000,
                 dropout 0.1, explicit softmax attention, AdamW
    gpt2         GPT-2 small written by hand (12 layers, d 768, 12 heads, vocab 50257,
                 tied embeddings, dropout 0.1), seq_len 1024, LM loss, AdamW
    resnet152    transformers ResNetForImageClassification (bottleneck, [3, 8, 36, 3]),
                 image_size 224, 1000 classes, SGD momentum
    bert-base    transformers BertForSequenceClassification (BertConfig() defaults),
                 seq_len 512, 2 labels, AdamW

``name_or_spec`` may also be ``"package.module:factory"``: the factory is called
as ``factory(batch_size=..., device=..., seed=..., **kw)`` and must return a
:class:`Workload`.

Builds are deterministic: ``torch.manual_seed(seed)`` is set before the model
is made (so it also seeds the global RNG that dropout then draws from), and
batches come from their own ``torch.Generator``. Models are made on the CPU
and then moved to ``device``, so two builds with the same seed are bitwise
equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MODELS", "Workload", "build", "names"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """One training workload: everything ``acopt.trace`` and the baselines need."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: tuple[torch.Tensor, ...]
    make_batch: Callable[[int], tuple[torch.Tensor, ...]]
    train_step: Callable[..., torch.Tensor]
    blocks: list[nn.Module]

    def step(self) -> torch.Tensor:
        """One eager ``train_step`` on the example batch."""
        return self.train_step(self.model, self.optimizer, *self.batch)

    def with_loop(self, *, micro_batches: int = 1, amp: str | None = None) -> Workload:
        """The same workload trained with gradient accumulation and/or autocast
        (:func:`loop_step`); the batch size stays the whole step's."""
        if micro_batches == 1 and amp is None:
            return self
        loss_fn = _LOSSES.get(self.train_step)
        if loss_fn is None:
            raise ValueError(f"{self.name}: its train_step has no known loss function for --micro-batches/--amp")
        rows = self.batch[0].shape[0]
        if micro_batches < 1 or rows % micro_batches:
            raise ValueError(f"batch size {rows} does not split into {micro_batches} equal micro-batches")
        return dataclasses.replace(self, train_step=loop_step(loss_fn, micro_batches=micro_batches, amp=amp))


# ---------------------------------------------------------------------------
# train steps (plain eager functions, module level so they are importable)


def classify_loss(model, x, y):
    """``model(x)`` gives logits; cross-entropy against class labels ``y``."""
    return F.cross_entropy(model(x), y)


def hf_classify_loss(model, x, y):
    """A transformers model: ``model(x).logits``; cross-entropy against ``y``."""
    return F.cross_entropy(model(x).logits, y)


def lm_loss(model, idx, targets):
    """Language modelling: ``targets`` are ``idx`` shifted by one token."""
    logits = model(idx)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def classify_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = classify_loss(model, x, y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def hf_classify_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = hf_classify_loss(model, x, y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def lm_step(model, optimizer, idx, targets):
    optimizer.zero_grad()
    loss = lm_loss(model, idx, targets)
    loss.backward()
    optimizer.step()
    return loss.detach()


_LOSSES = {classify_step: classify_loss, hf_classify_step: hf_classify_loss, lm_step: lm_loss}
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def loop_step(loss_fn: Callable[..., torch.Tensor], *, micro_batches: int = 1, amp: str | None = None):
    """A train step as people write it around ``loss_fn(model, *batch)``:
    gradient accumulation over ``micro_batches`` slices of the batch (one
    ``backward()`` each, one optimizer step), the forward and loss under
    ``torch.autocast`` when ``amp`` is ``"bf16"`` or ``"fp16"`` (no gradient
    scaling)."""
    if amp is not None and amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(_AMP_DTYPES)}, got {amp!r}")

    def train_step(model, optimizer, *batch):
        optimizer.zero_grad()
        total = torch.zeros(())
        device = batch[0].device.type
        for chunk in zip(*(b.chunk(micro_batches) for b in batch)):
            ctx = torch.autocast(device, dtype=_AMP_DTYPES[amp]) if amp else contextlib.nullcontext()
            with ctx:
                loss = loss_fn(model, *chunk) / micro_batches
            loss.backward()
            total = total + loss.detach().float().cpu()
        optimizer.step()
        return total

    return train_step


# ---------------------------------------------------------------------------
# helpers


def _batch_maker(make: Callable[[torch.Generator], tuple[torch.Tensor, ...]], device) -> Callable[[int], tuple]:
    def make_batch(seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(t.to(device) for t in make(g))

    return make_batch


def _workload(name, model, optimizer, make, device, seed, train_step, blocks) -> Workload:
    make_batch = _batch_maker(make, device)
    return Workload(
        name=name,
        model=model,
        optimizer=optimizer,
        batch=make_batch(seed),
        make_batch=make_batch,
        train_step=train_step,
        blocks=list(blocks),
    )


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this model needs the transformers package: pip install 'acopt[models]'"
        ) from e


# ---------------------------------------------------------------------------
# mlp


def mlp(*, batch_size: int, device="cpu", seed: int = 0, in_features=32, width=64, num_classes=10) -> Workload:
    _check_batch_size(batch_size)
    torch.manual_seed(seed)
    blocks = [
        nn.Sequential(nn.Linear(in_features, width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
    ]
    model = nn.Sequential(*blocks, nn.Linear(width, num_classes)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def make(g):
        return torch.randn(batch_size, in_features, generator=g), torch.randint(0, num_classes, (batch_size,), generator=g)

    return _workload("mlp", model, opt, make, device, seed, classify_step, blocks)


# ---------------------------------------------------------------------------
# cnn


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )


class SmallCNN(nn.Module):
    def __init__(self, channels=(16, 32, 64), num_classes=10):
        super().__init__()
        cins = (3, *channels[:-1])
        self.blocks = nn.ModuleList(
            ConvBlock(cin, cout, stride=1 if i == 0 else 2) for i, (cin, cout) in enumerate(zip(cins, channels))
        )
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def cnn(*, batch_size: int, device="cpu", seed: int = 0, image_size=32, num_classes=10) -> Workload:
    _check_batch_size(batch_size)
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=num_classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def make(g):
        return (
            torch.randn(batch_size, 3, image_size, image_size, generator=g),
            torch.randint(0, num_classes, (batch_size,), generator=g),
        )

    return _workload("cnn", model, opt, make, device, seed, classify_step, model.blocks)


# ---------------------------------------------------------------------------
# transformer blocks (shared by "transformer" and "gpt2")


class SelfAttention(nn.Module):
    """Multi-head self-attention with an explicit softmax (or SDPA without dropout)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, *, causal: bool, attn: str = "eager"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        if attn not in ("eager", "sdpa"):
            raise ValueError(f"attn must be 'eager' or 'sdpa', got {attn!r}")
        self.n_heads = n_heads
        self.causal = causal
        self.attn = attn
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        if self.attn == "sdpa":
            # no dropout inside SDPA: its random mask would hide in one fused op
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h))
            if self.causal:
                mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~mask, float("-inf"))
            y = self.attn_drop(scores.softmax(dim=-1)) @ v
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.resid_drop(self.proj(y))


class MLPBlock(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float, *, approximate: str = "none"):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)
        self.approximate = approximate

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class PreLNBlock(nn.Module):
    """x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, d_model, n_heads, dropout, *, causal, attn="eager", mlp_ratio=4, approximate="none"):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout, causal=causal, attn=attn)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLPBlock(d_model, mlp_ratio * d_model, dropout, approximate=approximate)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerClassifier(nn.Module):
    def __init__(self, *, vocab_size, seq_len, d_model, n_layers, n_heads, dropout, num_classes, attn="eager"):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            PreLNBlock(d_model, n_heads, dropout, causal=False, attn=attn) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln_f(x).mean(dim=1))


def transformer(
    *,
    batch_size: int,
    device="cpu",
    seed: int = 0,
    seq_len=32,
    vocab_size=1000,
    d_model=64,
    n_layers=2,
    n_heads=4,
    dropout=0.1,
    num_classes=10,
    attn="eager",
) -> Workload:
    _check_batch_size(batch_size)
    torch.manual_seed(seed)
    model = TransformerClassifier(
        vocab_size=vocab_size,
        seq_len=seq_len,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        dropout=dropout,
        num_classes=num_classes,
        attn=attn,
    ).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def make(g):
        return (
            torch.randint(0, vocab_size, (batch_size, seq_len), generator=g),
            torch.randint(0, num_classes, (batch_size,), generator=g),
        )

    return _workload("transformer", model, opt, make, device, seed, classify_step, model.layers)


# ---------------------------------------------------------------------------
# gpt2 (GPT-2 small, by hand: same shapes and parameter count as GPT2LMHeadModel)


class GPT2(nn.Module):
    def __init__(self, *, vocab_size=50257, n_positions=1024, d_model=768, n_layers=12, n_heads=12, dropout=0.1, attn="eager"):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(n_positions, d_model)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(
            PreLNBlock(d_model, n_heads, dropout, causal=True, attn=attn, approximate="tanh") for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt2(
    *,
    batch_size: int,
    device="cpu",
    seed: int = 0,
    seq_len=1024,
    vocab_size=50257,
    d_model=768,
    n_layers=12,
    n_heads=12,
    dropout=0.1,
    attn="eager",
) -> Workload:
    _check_batch_size(batch_size)
    torch.manual_seed(seed)
    model = GPT2(
        vocab_size=vocab_size,
        n_positions=max(seq_len, 1024),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        dropout=dropout,
        attn=attn,
    ).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def make(g):
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return _workload("gpt2", model, opt, make, device, seed, lm_step, model.h)


# ---------------------------------------------------------------------------
# transformers models


def resnet152(*, batch_size: int, device="cpu", seed: int = 0, image_size=224, num_labels=1000) -> Workload:
    _check_batch_size(batch_size)
    tf = _transformers()
    config = tf.ResNetConfig(
        layer_type="bottleneck",
        depths=[3, 8, 36, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        embedding_size=64,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    model = tf.ResNetForImageClassification(config).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    blocks = [layer for stage in model.resnet.encoder.stages for layer in stage.layers]

    def make(g):
        return (
            torch.randn(batch_size, 3, image_size, image_size, generator=g),
            torch.randint(0, num_labels, (batch_size,), generator=g),
        )

    return _workload("resnet152", model, opt, make, device, seed, hf_classify_step, blocks)


def bert_base(*, batch_size: int, device="cpu", seed: int = 0, seq_len=512, num_labels=2, attn="sdpa") -> Workload:
    _check_batch_size(batch_size)
    tf = _transformers()
    config = tf.BertConfig(num_labels=num_labels)
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"bert-base takes seq_len <= {config.max_position_embeddings}, got {seq_len}")
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = tf.BertForSequenceClassification(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5)

    def make(g):
        return (
            torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g),
            torch.randint(0, num_labels, (batch_size,), generator=g),
        )

    return _workload("bert-base", model, opt, make, device, seed, hf_classify_step, model.bert.encoder.layer)


# ---------------------------------------------------------------------------
# registry

MODELS: dict[str, Callable[..., Workload]] = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer": transformer,
    "gpt2": gpt2,
    "resnet152": resnet152,
    "bert-base": bert_base,
}


def names() -> list[str]:
    return list(MODELS)


def _load_factory(spec: str) -> Callable[..., Workload]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model spec {spec!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model spec {spec!r}: cannot import {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"model spec {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"model spec {spec!r}: {attr!r} is not callable")
    return obj


def build(name_or_spec: str, *, batch_size: int, device="cpu", seed: int = 0, **kw) -> Workload:
    """Build a built-in workload by name, or call a ``"package.module:factory"``.

    Extra keyword arguments go to the factory (e.g. ``seq_len=128`` for gpt2 and
    bert-base, ``image_size=64`` for resnet152).
    """
    if ":" in name_or_spec:
        factory = _load_factory(name_or_spec)
    else:
        factory = MODELS.get(name_or_spec)
        if factory is None:
            raise ValueError(
                f"unknown model {name_or_spec!r}; built-ins: {', '.join(MODELS)} "
                "(or give 'package.module:factory')"
            )
    workload = factory(batch_size=batch_size, device=device, seed=seed, **kw)
    if not isinstance(workload, Workload):
        raise TypeError(f"{name_or_spec!r} returned {type(workload).__name__}, not an acopt.models.Workload")
    return workload
