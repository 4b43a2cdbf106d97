"""Tiny configs of real transformers architectures, for the profile corpus.

Each factory is an ``acopt.models`` workload factory (``acopt.models.build``
takes ``"benchmarks.hf_models:NAME"``): random weights from a small config
of the real model class (never downloaded), in train mode with the
architecture's defaults otherwise (dropout, attention implementation), an
AdamW optimizer (SGD with momentum for the convolutional one), and a step
that uses the model's own loss: ``model(**batch).loss``.

Sizes: hidden 64, 2 layers, 4 heads, vocabulary 1 000, sequences of 64
tokens, batch 8; images 32x32, batch 8. Small enough that the exact planners
prove the optimum in seconds, big enough that activations matter.

    decoders   gpt2, llama, opt, bloom        causal LM, labels = input ids
    encoders   bert, roberta, distilbert, electra   sequence classification, 3 labels
    vision     vit, convnext                   image classification, 3 labels
    MoE        mixtral                         causal LM, 4 experts, 2 per token
"""

from __future__ import annotations

import importlib

import torch

from acopt.models import Workload

VOCAB, SEQ, HIDDEN, LAYERS, HEADS = 1000, 64, 64, 2, 4
NUM_LABELS, IMAGE = 3, 32


def _step(*keys: str):
    """``model(**dict(zip(keys, batch))).loss``: zero_grad, forward, backward, step."""

    def train_step(model, optimizer, *batch):
        optimizer.zero_grad()
        loss = model(**dict(zip(keys, batch, strict=True))).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    train_step.__name__ = train_step.__qualname__ = f"hf_step({', '.join(keys)})"
    return train_step


def _workload(name, model_cls, config_cls, make, keys, *, batch_size, device, seed, sgd=False, **config) -> Workload:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    tf = importlib.import_module("transformers")
    cfg = getattr(tf, config_cls)(**config)
    torch.manual_seed(seed)
    model = getattr(tf, model_cls)(cfg).to(device).train()
    if sgd:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def make_batch(batch_seed: int):
        g = torch.Generator().manual_seed(batch_seed)
        return tuple(t.to(device) for t in make(g, batch_size))

    return Workload(
        name=name, model=model, optimizer=opt, batch=make_batch(seed), make_batch=make_batch,
        train_step=_step(*keys), blocks=[],
    )  # fmt: skip


def _tokens(g, batch_size):
    ids = torch.randint(3, VOCAB, (batch_size, SEQ), generator=g)
    return ids, torch.ones_like(ids)


def _lm(g, batch_size):
    ids, mask = _tokens(g, batch_size)
    return ids, mask, ids.clone()


def _cls(g, batch_size):
    ids, mask = _tokens(g, batch_size)
    return ids, mask, torch.randint(0, NUM_LABELS, (batch_size,), generator=g)


def _images(g, batch_size):
    return torch.randn(batch_size, 3, IMAGE, IMAGE, generator=g), torch.randint(0, NUM_LABELS, (batch_size,), generator=g)


LM_KEYS = ("input_ids", "attention_mask", "labels")
IMAGE_KEYS = ("pixel_values", "labels")
_DEC = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=SEQ, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
_ENC = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=4 * HIDDEN, max_position_embeddings=SEQ + 2, num_labels=NUM_LABELS, pad_token_id=0)  # fmt: skip


def gpt2(*, batch_size: int = 8, device="cpu", seed: int = 0) -> Workload:
    return _workload("hf-gpt2", "GPT2LMHeadModel", "GPT2Config", _lm, LM_KEYS, batch_size=batch_size, device=device,
                     seed=seed, vocab_size=VOCAB, n_positions=SEQ, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                     bos_token_id=1, eos_token_id=2)  # fmt: skip


def llama(*, batch_size: int = 8, device="cpu", seed: int = 0) -> Workload:
    return _workload("hf-llama", "LlamaForCausalLM", "LlamaConfig", _lm, LM_KEYS, batch_size=batch_size,
                     device=device, seed=seed, **_DEC, num_key_value_heads=2)  # fmt: skip


def opt(*, batch_size: int = 8, device="cpu", seed: int = 0) -> Workload:
    return _workload("hf-opt", "OPTForCausalLM", "OPTConfig", _lm, LM_KEYS, batch_size=batch_size, device=device,
                     seed=seed, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=4 * HIDDEN,
                     num_attention_heads=HEADS, max_position_embeddings=SEQ, word_embed_proj_dim=HIDDEN,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def bloom(*, batch_size: int = 8, device="cpu", seed: int = 0) -> Workload:
    return _workload("hf-bloom", "BloomForCausalLM", "BloomConfig", _lm, LM_KEYS, batch_size=batch_size,
                     device=device, seed=seed, vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def mixtral(*, batch_size: int = 8, device="cpu", seed: int = 0) -> Workload:
    return _workload("hf-mixtral", "MixtralForCausalLM", "MixtralConfig", _lm, LM_KEYS, batch_size=batch_size,
                     device=device, seed=seed, **_DEC, num_key_value_heads=2, num_local_experts=4,
                     num_experts_per_tok=2)  # fmt: skip


def bert(*, batch_size: int = 8, device="cpu", seed: int = 0) -> Workload:
    return _workload("hf-bert", "BertForSequenceClassification", "BertConfig", _cls, LM_KEYS, batch_size=batch_size,
                     device=device, seed=seed, **_ENC)  # fmt: skip


def roberta(*, batch_size: int = 8, device="cpu", seed: int = 0) -> Workload:
    return _workload("hf-roberta", "RobertaForSequenceClassification", "RobertaConfig", _cls, LM_KEYS,
                     batch_size=batch_size, device=device, seed=seed, **_ENC)  # fmt: skip


def distilbert(*, batch_size: int = 8, device="cpu", seed: int = 0) -> Workload:
    return _workload("hf-distilbert", "DistilBertForSequenceClassification", "DistilBertConfig", _cls, LM_KEYS,
                     batch_size=batch_size, device=device, seed=seed, vocab_size=VOCAB, dim=HIDDEN,
                     n_layers=LAYERS, n_heads=HEADS, hidden_dim=4 * HIDDEN, max_position_embeddings=SEQ,
                     num_labels=NUM_LABELS, pad_token_id=0)  # fmt: skip


def electra(*, batch_size: int = 8, device="cpu", seed: int = 0) -> Workload:
    return _workload("hf-electra", "ElectraForSequenceClassification", "ElectraConfig", _cls, LM_KEYS,
                     batch_size=batch_size, device=device, seed=seed, embedding_size=HIDDEN, **_ENC)  # fmt: skip


def vit(*, batch_size: int = 8, device="cpu", seed: int = 0) -> Workload:
    return _workload("hf-vit", "ViTForImageClassification", "ViTConfig", _images, IMAGE_KEYS, batch_size=batch_size,
                     device=device, seed=seed, image_size=IMAGE, patch_size=4, hidden_size=HIDDEN,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
                     num_labels=NUM_LABELS)  # fmt: skip


def convnext(*, batch_size: int = 8, device="cpu", seed: int = 0) -> Workload:
    return _workload("hf-convnext", "ConvNextForImageClassification", "ConvNextConfig", _images, IMAGE_KEYS,
                     batch_size=batch_size, device=device, seed=seed, sgd=True, num_stages=2, hidden_sizes=[32, 64],
                     depths=[2, 2], image_size=IMAGE, num_labels=NUM_LABELS)  # fmt: skip


ARCHITECTURES = ("gpt2", "llama", "opt", "bloom", "mixtral", "bert", "roberta", "distilbert", "electra", "vit", "convnext")
