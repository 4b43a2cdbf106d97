"""Workloads from Hugging Face transformers configs (no download): a model type and overrides.

``build("llama", batch_size=2, seq_len=64, config={"hidden_size": 256}, device="meta")``
makes ``AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", hidden_size=256))``
(or ``AutoModelForSequenceClassification`` for encoder-only types such as bert),
optionally cast to ``dtype``, with an optimizer and the step people run through
``Trainer``: ``model(input_ids=..., labels=...).loss``, backward, optimizer step.

Presets name a few well-known shapes: :data:`PRESETS`. Every config key given
must exist in the model type's config (transformers itself would silently keep
a misspelt key as an unused attribute). Attention is SDPA. Other settings are
transformers' defaults, ``use_cache=True`` included, as ``Trainer`` runs them:
with it, transformers skips the causal mask (flash attention, native GQA);
``use_cache=false`` makes it keep a mask under tracing, and repeat K and V per head.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from acopt.models import Workload, _batch_maker, _check_batch_size

__all__ = ["PRESETS", "build", "resolve"]

#: name -> (model type, config overrides). Shapes as the published configs give them.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-8b": (
        "llama",
        {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 128256,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        },
    ),
    "gpt2": ("gpt2", {}),  # GPT2Config() is GPT-2 small (124M)
    "bert-base": ("bert", {}),  # BertConfig() is bert-base-uncased (110M)
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adamw", "sgd")


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("HF configs need the transformers package: pip install 'acopt[models]'") from e


def resolve(name: str, overrides: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(model type, config overrides) of a preset or a plain model type; ``overrides`` win."""
    model_type, base = PRESETS.get(name, (name, {}))
    return model_type, {**base, **(overrides or {})}


def make_config(name: str, overrides: dict[str, Any] | None = None):
    """The transformers config of a preset or model type with ``overrides``; unknown keys are refused."""
    tf = _transformers()
    model_type, kw = resolve(name, overrides)
    try:
        default = tf.AutoConfig.for_model(model_type)
    except (ValueError, KeyError):
        raise ValueError(
            f"unknown HF model type {model_type!r}; presets: {', '.join(PRESETS)}, "
            "or a transformers model type such as llama, mistral, qwen2, gpt2, bert"
        ) from None
    known = set(default.to_dict())
    unknown = sorted(k for k in kw if k not in known and not hasattr(default, k))
    if unknown:
        raise ValueError(
            f"{model_type} config has no key {', '.join(map(repr, unknown))}; "
            f"its keys include: {', '.join(sorted(k for k in known if not k.startswith('_'))[:40])}"
        )
    config = tf.AutoConfig.for_model(model_type, **kw)
    config._attn_implementation = "sdpa"
    return config


def _is_causal_lm(config) -> bool:
    """A decoder (llama, gpt2...): has a causal-LM head and no masked-LM one (bert has both)."""
    from transformers.models.auto import modeling_auto as auto

    t = config.model_type
    return t in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and t not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES


def hf_loss_step(model, optimizer, input_ids, labels):
    """One Trainer-like step: the model's own loss from ``labels``, backward, optimizer step."""
    optimizer.zero_grad()
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def build(
    name: str,
    *,
    batch_size: int,
    seq_len: int,
    config: dict[str, Any] | None = None,
    dtype: str | None = None,
    optimizer: str = "adamw",
    foreach: bool | None = None,
    device: str | torch.device = "meta",
    seed: int = 0,
) -> Workload:
    """A causal LM (or, for encoder-only types, a 2-label sequence classifier) from a config.

    ``dtype``: cast parameters and buffers (``"bf16"``: pure bf16 training,
    optimizer state in bf16 too); ``None`` keeps fp32. ``foreach``: the
    optimizer's implementation (``None``: PyTorch's own default for the device;
    on CUDA that is foreach, which holds a parameter-sized temporary in AdamW).
    """
    _check_batch_size(batch_size)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    tf = _transformers()
    cfg = make_config(name, config)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"{name}: seq_len {seq_len} is longer than its max_position_embeddings {limit}")
    causal = _is_causal_lm(cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        auto = tf.AutoModelForCausalLM if causal else tf.AutoModelForSequenceClassification
        model = auto.from_config(cfg)
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    model.train()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=foreach)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, foreach=foreach)
    vocab = cfg.vocab_size
    num_labels = getattr(cfg, "num_labels", 2)

    def make(g):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        labels = ids.clone() if causal else torch.randint(0, num_labels, (batch_size,), generator=g)
        return ids, labels

    def make_meta(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta tensors of the batch's shapes: no values, no memory (a fake profile of a huge batch)."""
        ids = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
        return ids, (torch.empty_like(ids) if causal else torch.empty(batch_size, dtype=torch.long, device="meta"))

    make_batch = make_meta if torch.device(device).type == "meta" else _batch_maker(make, device)
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return Workload(
        name=f"hf:{name}",
        model=model,
        optimizer=opt,
        batch=make_batch(seed),
        make_batch=make_batch,
        train_step=hf_loss_step,
        blocks=list(blocks[0]) if blocks else [],
    )
