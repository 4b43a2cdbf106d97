"""A model zoo that looks like the world, for end-to-end tests (tests/test_zoo.py).

Every entry is a builder taking no arguments and returning a :class:`Case`:
``(model, make_optimizer, batch, train_step)``. ``make_optimizer(model)``
makes a fresh optimizer for a (deep-copied) model; ``batch`` is a tuple of
tensors; ``train_step(model, optimizer, *batch)`` is plain eager code:
zero_grad, forward, loss, backward, step, ``return loss.detach()``.

Hugging Face models are built from tiny configs with random weights (no hub
access), in train mode, with each architecture's default settings otherwise
(dropout, attention implementation, ``use_cache``): hidden 32, 2 layers,
4 heads, vocab 128, sequence 12, batch 2 or 3. Their step is
``model(**kwargs).loss`` (:func:`hf_step` maps the positional batch to the
keyword arguments). Decoders, state-space models (Mamba, RWKV, Jamba),
mixtures of experts, encoders, encoder-decoders, vision backbones,
segmentation and image-text contrastive models; the entries whose docstring
says "refused" are ones acopt must refuse (the test checks the refusal
leaves model and optimizer as they were). The last entries are plain torch models written here:
an LSTM language model, a GRU classifier, a small UNet, an EmbeddingBag
model and an MLP that uses ``torch.utils.checkpoint`` itself.

Builds are deterministic: ``torch.manual_seed(0)`` before the model is made,
batches from their own ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

VOCAB = 128
SEQ = 12
BATCH = 2


class Case(NamedTuple):
    model: nn.Module
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    batch: tuple[torch.Tensor, ...]
    train_step: Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------
# optimizers and steps


def adamw(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, foreach=False)


def sgd(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def hf_step(*keys: str) -> Callable[..., torch.Tensor]:
    """A train step for a transformers model: ``model(**dict(zip(keys, batch))).loss``."""

    def train_step(model, optimizer, *batch):
        optimizer.zero_grad()
        loss = model(**dict(zip(keys, batch, strict=True))).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    train_step.__name__ = train_step.__qualname__ = f"hf_step({', '.join(keys)})"
    return train_step


def classify_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def lm_step(model, optimizer, idx, targets):
    optimizer.zero_grad()
    logits = model(idx)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    optimizer.step()
    return loss.detach()


def bag_step(model, optimizer, flat, offsets, targets):
    optimizer.zero_grad()
    loss = F.binary_cross_entropy_with_logits(model(flat, offsets), targets)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------------
# batches


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, low: int = 3) -> torch.Tensor:
    # ids 0-2 are left out: pad / bos / eos in the configs below
    return torch.randint(low, vocab, (batch, seq), generator=_gen())


def _padded_mask(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    """Real batches pad: the last row ends with 3 padding positions."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -3:] = 0
    return mask


def _lm_batch(pad_id: int = 0):
    ids = _tokens()
    mask = _padded_mask()
    ids = ids.masked_fill(mask == 0, pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _cls_batch(num_labels: int = 3, pad_id: int = 0):
    ids = _tokens()
    mask = _padded_mask()
    ids = ids.masked_fill(mask == 0, pad_id)
    labels = torch.randint(0, num_labels, (BATCH,), generator=_gen(2))
    return ids, mask, labels


def _seq2seq_batch(pad_id: int = 0):
    ids, mask, _ = _lm_batch(pad_id)
    labels = torch.randint(3, VOCAB, (BATCH, SEQ - 4), generator=_gen(3))
    labels[0, -2:] = -100  # padded targets
    return ids, mask, labels


def _image_batch(size: int = 32, num_labels: int = 3, batch: int = BATCH):
    return (
        torch.randn(batch, 3, size, size, generator=_gen()),
        torch.randint(0, num_labels, (batch,), generator=_gen(2)),
    )


# ---------------------------------------------------------------------------
# transformers


def _tf():
    import transformers

    return transformers


def _hf(model_cls: str, config_cls: str, **config) -> nn.Module:
    tf = _tf()
    cfg = getattr(tf, config_cls)(**config)
    torch.manual_seed(0)
    return getattr(tf, model_cls)(cfg).train()


_DEC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def _decoder(model_cls: str, config_cls: str, **config) -> Case:
    model = _hf(model_cls, config_cls, **config)
    return Case(model, adamw, _lm_batch(), hf_step("input_ids", "attention_mask", "labels"))


def gpt2() -> Case:
    return _decoder("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                    n_head=4, bos_token_id=1, eos_token_id=2)  # fmt: skip


def llama() -> Case:
    return _decoder("LlamaForCausalLM", "LlamaConfig", **_DEC, num_key_value_heads=2)


def mistral() -> Case:
    return _decoder("MistralForCausalLM", "MistralConfig", **_DEC, num_key_value_heads=2, sliding_window=8)


def qwen2() -> Case:
    return _decoder("Qwen2ForCausalLM", "Qwen2Config", **_DEC, num_key_value_heads=2)


def qwen3() -> Case:
    return _decoder("Qwen3ForCausalLM", "Qwen3Config", **_DEC, num_key_value_heads=2, head_dim=8)


def phi() -> Case:
    return _decoder("PhiForCausalLM", "PhiConfig", **_DEC)


def phi3() -> Case:
    return _decoder("Phi3ForCausalLM", "Phi3Config", **_DEC)


def gemma() -> Case:
    return _decoder("GemmaForCausalLM", "GemmaConfig", **_DEC, num_key_value_heads=1, head_dim=8)


def gemma2() -> Case:
    return _decoder("Gemma2ForCausalLM", "Gemma2Config", **_DEC, num_key_value_heads=2, head_dim=8, sliding_window=8)


def falcon() -> Case:
    return _decoder("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def gpt_neox() -> Case:
    return _decoder("GPTNeoXForCausalLM", "GPTNeoXConfig", **_DEC)


def gpt_neo() -> Case:
    return _decoder("GPTNeoForCausalLM", "GPTNeoConfig", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                    num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8,
                    max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip


def gptj() -> Case:
    return _decoder("GPTJForCausalLM", "GPTJConfig", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                    n_head=4, rotary_dim=4, bos_token_id=1, eos_token_id=2)  # fmt: skip


def gpt_bigcode() -> Case:
    return _decoder("GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=VOCAB, n_positions=64, n_embd=32,
                    n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)  # fmt: skip


def opt() -> Case:
    return _decoder("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                    ffn_dim=64, num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def bloom() -> Case:
    return _decoder("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def mpt() -> Case:
    return _decoder("MptForCausalLM", "MptConfig", vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2,
                    expansion_ratio=2, max_seq_len=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def stablelm() -> Case:
    return _decoder("StableLmForCausalLM", "StableLmConfig", **_DEC, num_key_value_heads=2)


def starcoder2() -> Case:
    return _decoder("Starcoder2ForCausalLM", "Starcoder2Config", **_DEC, num_key_value_heads=2)


def olmo() -> Case:
    return _decoder("OlmoForCausalLM", "OlmoConfig", **_DEC)


def olmo2() -> Case:
    return _decoder("Olmo2ForCausalLM", "Olmo2Config", **_DEC)


def cohere() -> Case:
    return _decoder("CohereForCausalLM", "CohereConfig", **_DEC)


def granite() -> Case:
    return _decoder("GraniteForCausalLM", "GraniteConfig", **_DEC, residual_multiplier=0.5, embedding_multiplier=2.0,
                    logits_scaling=4.0)  # fmt: skip


def persimmon() -> Case:
    return _decoder("PersimmonForCausalLM", "PersimmonConfig", **_DEC)


def codegen() -> Case:
    return _decoder("CodeGenForCausalLM", "CodeGenConfig", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                    n_head=4, rotary_dim=4, bos_token_id=1, eos_token_id=2)  # fmt: skip


def xglm() -> Case:
    return _decoder("XGLMForCausalLM", "XGLMConfig", vocab_size=VOCAB, d_model=32, num_layers=2, attention_heads=4,
                    ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


# state-space and recurrent decoders


def mamba() -> Case:
    """The PyTorch reference scan (no mamba_ssm kernels). Under acopt's trace
    ``is_torchdynamo_compiling()`` is true and transformers takes its associative
    scan instead of the sequential loop: equal to eager at rounding, not bitwise."""
    return _decoder("MambaForCausalLM", "MambaConfig", vocab_size=VOCAB, hidden_size=32, state_size=8,
                    num_hidden_layers=2, expand=2, conv_kernel=4, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)  # fmt: skip


def rwkv() -> Case:
    return _decoder("RwkvForCausalLM", "RwkvConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                    attention_hidden_size=32, intermediate_size=64, context_length=64, bos_token_id=1,
                    eos_token_id=2)  # fmt: skip


def jamba() -> Case:
    """Mamba and attention layers, a mixture of experts every other layer (the scan as in :func:`mamba`)."""
    return _decoder("JambaForCausalLM", "JambaConfig", **_DEC, num_key_value_heads=2, num_experts=2,
                    num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                    attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                    mamba_dt_rank=4)  # fmt: skip


def recurrent_gemma() -> Case:
    """Keeps its recurrent states as plain module attributes set in forward: refused."""
    return _decoder("RecurrentGemmaForCausalLM", "RecurrentGemmaConfig", vocab_size=VOCAB, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                    lru_width=32, attention_window_size=8, block_types=["recurrent", "attention"], head_dim=8,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def mixtral() -> Case:
    return _decoder("MixtralForCausalLM", "MixtralConfig", **_DEC, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2)  # fmt: skip


def qwen2_moe() -> Case:
    return _decoder("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_DEC, num_key_value_heads=2, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)  # fmt: skip


def granitemoe() -> Case:
    return _decoder("GraniteMoeForCausalLM", "GraniteMoeConfig", **_DEC, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2)  # fmt: skip


def olmoe() -> Case:
    return _decoder("OlmoeForCausalLM", "OlmoeConfig", **_DEC, num_key_value_heads=2, num_experts=4,
                    num_experts_per_tok=2)  # fmt: skip


def dbrx() -> Case:
    """Its experts loop skips experts no token chose (a data-dependent branch): refused."""
    return _decoder("DbrxForCausalLM", "DbrxConfig", vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2,
                    max_seq_len=64, attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                    ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2), pad_token_id=0,
                    bos_token_id=1, eos_token_id=2)  # fmt: skip


# encoders: single-label sequence classification

_ENC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=3)  # fmt: skip


def _encoder(model_cls: str, config_cls: str, pad_id: int = 0, **config) -> Case:
    model = _hf(model_cls, config_cls, **config)
    return Case(model, adamw, _cls_batch(pad_id=pad_id), hf_step("input_ids", "attention_mask", "labels"))


def bert() -> Case:
    return _encoder("BertForSequenceClassification", "BertConfig", **_ENC)


def roberta() -> Case:
    # RoBERTa's pad id is 1 and its positions start after it
    return _encoder("RobertaForSequenceClassification", "RobertaConfig", pad_id=1, **_ENC)


def distilbert() -> Case:
    return _encoder("DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=VOCAB, dim=32,
                    n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=3)  # fmt: skip


def electra() -> Case:
    return _encoder("ElectraForSequenceClassification", "ElectraConfig", **_ENC, embedding_size=16)


def albert() -> Case:
    return _encoder("AlbertForSequenceClassification", "AlbertConfig", **_ENC, embedding_size=16)


def deberta_v2() -> Case:
    # as DeBERTa-v3 ships: relative attention with position buckets, shared keys
    return _encoder("DebertaV2ForSequenceClassification", "DebertaV2Config", **_ENC, relative_attention=True,
                    pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=-1,
                    norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
                    # the default problem_type (None) picks labelled rows with nonzero(): data-dependent
                    problem_type="single_label_classification")  # fmt: skip


def mpnet() -> Case:
    return _encoder("MPNetForSequenceClassification", "MPNetConfig", pad_id=1, **_ENC)


def megatron_bert() -> Case:
    return _encoder("MegatronBertForSequenceClassification", "MegatronBertConfig", **_ENC)


def xlnet() -> Case:
    return _encoder("XLNetForSequenceClassification", "XLNetConfig", vocab_size=VOCAB, d_model=32, n_layer=2,
                    n_head=4, d_inner=64, num_labels=3)  # fmt: skip


def funnel() -> Case:
    """Caches its attention structure in plain module attributes during forward: refused."""
    return _encoder("FunnelForSequenceClassification", "FunnelConfig", vocab_size=VOCAB, d_model=32, n_head=4,
                    d_head=8, d_inner=64, block_sizes=[1, 1], num_decoder_layers=1, num_labels=3)  # fmt: skip


def layoutlm() -> Case:
    """Text with a bounding box per token (x0, y0, x1, y1 in 0..1000)."""
    model = _hf("LayoutLMForSequenceClassification", "LayoutLMConfig", **_ENC)
    ids, mask, labels = _cls_batch()
    corner = torch.randint(0, 500, (BATCH, SEQ, 2), generator=_gen(4))
    bbox = torch.cat([corner, corner + 10], dim=-1)
    return Case(model, adamw, (ids, bbox, mask, labels), hf_step("input_ids", "bbox", "attention_mask", "labels"))


def canine() -> Case:
    """Character-level: hashed code point embeddings, downsampling convolution, upsampling."""
    model = _hf("CanineForSequenceClassification", "CanineConfig", hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=64, num_hash_functions=2, num_hash_buckets=64,
                downsampling_rate=2, upsampling_kernel_size=3, local_transformer_stride=4, num_labels=3)  # fmt: skip
    return Case(model, adamw, _cls_batch(), hf_step("input_ids", "attention_mask", "labels"))


# encoder-decoders, with labels

_S2S = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # fmt: skip


def _seq2seq(model_cls: str, config_cls: str, **config) -> Case:
    model = _hf(model_cls, config_cls, **config)
    return Case(model, adamw, _seq2seq_batch(), hf_step("input_ids", "attention_mask", "labels"))


def t5() -> Case:
    return _seq2seq("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                    num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)  # fmt: skip


def bart() -> Case:
    return _seq2seq("BartForConditionalGeneration", "BartConfig", **_S2S)


def marian() -> Case:
    return _seq2seq("MarianMTModel", "MarianConfig", **_S2S)


def pegasus() -> Case:
    return _seq2seq("PegasusForConditionalGeneration", "PegasusConfig", **_S2S)


def mbart() -> Case:
    return _seq2seq("MBartForConditionalGeneration", "MBartConfig", **_S2S)


def blenderbot() -> Case:
    return _seq2seq("BlenderbotForConditionalGeneration", "BlenderbotConfig", **_S2S)


def longt5() -> Case:
    return _seq2seq("LongT5ForConditionalGeneration", "LongT5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                    num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                    local_radius=4, encoder_attention_type="transient-global", global_block_size=4)  # fmt: skip


def led() -> Case:
    """Longformer attention pads the sequence to its window in Python from a tensor's value: refused."""
    return _seq2seq("LEDForConditionalGeneration", "LEDConfig", vocab_size=VOCAB, d_model=32, encoder_layers=2,
                    decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                    decoder_ffn_dim=64, max_encoder_position_embeddings=64, max_decoder_position_embeddings=64,
                    attention_window=[4, 4], pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    decoder_start_token_id=1)  # fmt: skip


def switch_transformers() -> Case:
    """Sparse T5 (top-1 routing, expert capacity). Its router casts its classifier with
    ``.to(dtype)`` at every call (a no-op that the trace must skip); its expert loop
    branches on which experts got tokens: refused."""
    return _seq2seq("SwitchTransformersForConditionalGeneration", "SwitchTransformersConfig", vocab_size=VOCAB,
                    d_model=32, d_kv=8, d_ff=64, expert_capacity=8, num_layers=2, num_sparse_encoder_layers=1,
                    num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=4, num_experts=4, pad_token_id=0,
                    eos_token_id=2, decoder_start_token_id=0)  # fmt: skip


def nllb_moe() -> Case:
    """Its experts loop skips unused experts (a data-dependent branch): refused."""
    return _seq2seq("NllbMoeForConditionalGeneration", "NllbMoeConfig", **_S2S, num_experts=4, expert_capacity=8,
                    encoder_sparse_step=2, decoder_sparse_step=2)  # fmt: skip


# vision: image classification with labels


def _vision(model_cls: str, config_cls: str, optimizer=adamw, **config) -> Case:
    model = _hf(model_cls, config_cls, num_labels=3, **config)
    return Case(model, optimizer, _image_batch(), hf_step("pixel_values", "labels"))


def vit() -> Case:
    return _vision("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=32,
                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)  # fmt: skip


def convnext() -> Case:
    return _vision("ConvNextForImageClassification", "ConvNextConfig", num_stages=2, hidden_sizes=[16, 32],
                   depths=[1, 1], image_size=32)  # fmt: skip


def resnet() -> Case:
    return _vision("ResNetForImageClassification", "ResNetConfig", optimizer=sgd, embedding_size=16,
                   hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")  # fmt: skip


def swin() -> Case:
    return _vision("SwinForImageClassification", "SwinConfig", image_size=32, patch_size=4, embed_dim=16,
                   depths=[1, 1], num_heads=[2, 4], window_size=4)  # fmt: skip


def beit() -> Case:
    return _vision("BeitForImageClassification", "BeitConfig", image_size=32, patch_size=8, hidden_size=32,
                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   use_relative_position_bias=True)  # fmt: skip


def deit() -> Case:
    return _vision("DeiTForImageClassification", "DeiTConfig", image_size=32, patch_size=8, hidden_size=32,
                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)  # fmt: skip


def dinov2() -> Case:
    return _vision("Dinov2ForImageClassification", "Dinov2Config", image_size=32, patch_size=8, hidden_size=32,
                   num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2)  # fmt: skip


def levit() -> Case:
    return _vision("LevitForImageClassification", "LevitConfig", optimizer=sgd, image_size=32, patch_size=16,
                   hidden_sizes=[32, 48], num_attention_heads=[2, 3], depths=[1, 1], key_dim=[8, 8],
                   down_ops=[["Subsample", 8, 2, 4, 2, 2]])  # fmt: skip


def poolformer() -> Case:
    return _vision("PoolFormerForImageClassification", "PoolFormerConfig", num_encoder_blocks=2, depths=[1, 1],
                   hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1])  # fmt: skip


def regnet() -> Case:
    return _vision("RegNetForImageClassification", "RegNetConfig", optimizer=sgd, embedding_size=16,
                   hidden_sizes=[16, 32], depths=[1, 1], groups_width=8)  # fmt: skip


def efficientnet() -> Case:
    return _vision("EfficientNetForImageClassification", "EfficientNetConfig", optimizer=sgd, image_size=32,
                   width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)  # fmt: skip


def segformer() -> Case:
    """Semantic segmentation: per-pixel labels, logits upsampled to the image in the loss."""
    model = _hf("SegformerForSemanticSegmentation", "SegformerConfig", num_encoder_blocks=2, depths=[1, 1],
                sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                num_attention_heads=[1, 2], decoder_hidden_size=32, num_labels=3)  # fmt: skip
    pixels = torch.randn(BATCH, 3, 32, 32, generator=_gen())
    labels = torch.randint(0, 3, (BATCH, 32, 32), generator=_gen(2))
    return Case(model, adamw, (pixels, labels), hf_step("pixel_values", "labels"))


# image-text contrastive: the step passes return_loss=True


def _contrastive_step(*keys: str) -> Callable[..., torch.Tensor]:
    def train_step(model, optimizer, *batch):
        optimizer.zero_grad()
        loss = model(**dict(zip(keys, batch, strict=True)), return_loss=True).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return train_step


_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=0)  # fmt: skip
_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4)  # fmt: skip


def clip() -> Case:
    model = _hf("CLIPModel", "CLIPConfig", text_config=dict(_TEXT, bos_token_id=1, eos_token_id=2),
                vision_config=_VISION, projection_dim=16)  # fmt: skip
    ids, mask, _ = _lm_batch()
    pixels = torch.randn(BATCH, 3, 32, 32, generator=_gen(5))
    return Case(model, adamw, (ids, mask, pixels), _contrastive_step("input_ids", "attention_mask", "pixel_values"))


def siglip() -> Case:
    model = _hf("SiglipModel", "SiglipConfig", text_config=_TEXT, vision_config=_VISION)
    ids, _, _ = _lm_batch()
    pixels = torch.randn(BATCH, 3, 32, 32, generator=_gen(5))
    return Case(model, adamw, (ids, pixels), _contrastive_step("input_ids", "pixel_values"))


# audio


def _wav2vec2(model_cls: str, **config) -> nn.Module:
    """Raw audio in; the feature encoder leaves 79 frames of 800 samples. SpecAugment
    time masking is on by default (``mask_time_prob=0.05``), drawn with numpy."""
    return _hf(model_cls, "Wav2Vec2Config", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, pad_token_id=0, **config)  # fmt: skip


def wav2vec2() -> Case:
    """Audio classification, single label. Without LayerDrop: its default (0.1)
    skips layers on ``torch.rand([]) < p`` in Python, which acopt refuses."""
    model = _wav2vec2("Wav2Vec2ForSequenceClassification", num_labels=3, classifier_proj_size=16, layerdrop=0.0)
    audio = torch.randn(BATCH, 800, generator=_gen())
    labels = torch.randint(0, 3, (BATCH,), generator=_gen(2))
    return Case(model, adamw, (audio, labels), hf_step("input_values", "labels"))


def wav2vec2_ctc() -> Case:
    """CTC, as speech recognition fine-tunes it, all defaults (LayerDrop 0.1; the
    loss checks ``labels.max()`` in Python): acopt must refuse it."""
    model = _wav2vec2("Wav2Vec2ForCTC", vocab_size=32, ctc_loss_reduction="mean")
    audio = torch.randn(BATCH, 800, generator=_gen())
    labels = torch.randint(1, 32, (BATCH, 10), generator=_gen(2))
    labels[1, -3:] = -100
    return Case(model, adamw, (audio, labels), hf_step("input_values", "labels"))


def whisper() -> Case:
    model = _hf("WhisperForConditionalGeneration", "WhisperConfig", vocab_size=VOCAB, num_mel_bins=8, d_model=32,
                encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16, max_target_positions=32,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                suppress_tokens=None, begin_suppress_tokens=None)  # fmt: skip
    features = torch.randn(BATCH, 8, 32, generator=_gen())  # 2 * max_source_positions frames
    labels = torch.randint(3, VOCAB, (BATCH, 10), generator=_gen(2))
    labels[0, -2:] = -100
    return Case(model, adamw, (features, labels), hf_step("input_features", "labels"))


# ---------------------------------------------------------------------------
# plain torch models


class LSTMLM(nn.Module):
    def __init__(self, vocab=VOCAB, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.drop = nn.Dropout(0.1)
        self.lstm = nn.LSTM(d, d, num_layers=2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        out, _ = self.lstm(self.drop(self.emb(idx)))
        return self.head(self.drop(out))


def lstm_lm() -> Case:
    torch.manual_seed(0)
    model = LSTMLM().train()
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=_gen())
    return Case(model, sgd, (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()), lm_step)


class GRUClassifier(nn.Module):
    def __init__(self, vocab=VOCAB, d=32, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.gru = nn.GRU(d, d, num_layers=2, batch_first=True, bidirectional=True, dropout=0.1)
        self.head = nn.Linear(4 * d, classes)

    def forward(self, idx):
        _, h = self.gru(self.emb(idx))  # h: (layers * 2, batch, d)
        return self.head(torch.cat([h[-2], h[-1], h[0], h[1]], dim=-1))


def gru_classifier() -> Case:
    torch.manual_seed(0)
    model = GRUClassifier().train()
    ids, _, labels = _cls_batch()
    return Case(model, adamw, (ids, labels), classify_step)


class _DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )  # fmt: skip


class UNet(nn.Module):
    """Two levels down, a bottleneck, two up: one ConvTranspose2d, one bilinear upsample."""

    def __init__(self, cin=3, classes=4, c=8):
        super().__init__()
        self.inc = _DoubleConv(cin, c)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), _DoubleConv(c, 2 * c))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), _DoubleConv(2 * c, 4 * c))
        self.up1 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.conv1 = _DoubleConv(4 * c, 2 * c)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv2 = _DoubleConv(2 * c + c, c)
        self.drop = nn.Dropout2d(0.1)
        self.out = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.conv1(torch.cat([x2, self.up1(x3)], dim=1))
        y = self.conv2(torch.cat([x1, self.up2(y)], dim=1))
        return self.out(self.drop(y))


def unet() -> Case:
    torch.manual_seed(0)
    model = UNet().train()
    x = torch.randn(BATCH, 3, 16, 16, generator=_gen())
    y = torch.randint(0, 4, (BATCH, 16, 16), generator=_gen(2))  # per-pixel classes
    return Case(model, sgd, (x, y), classify_step)


class BagModel(nn.Module):
    """Bags of sparse ids (variable length, with offsets) -> MLP -> multi-label logits."""

    def __init__(self, vocab=VOCAB, d=32, labels=5):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, d, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, labels))

    def forward(self, flat, offsets):
        return self.mlp(self.bag(flat, offsets))


def embedding_bag() -> Case:
    torch.manual_seed(0)
    model = BagModel().train()
    lengths = [5, 2, 7, 4]
    flat = torch.randint(0, VOCAB, (sum(lengths),), generator=_gen())
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    targets = (torch.rand(len(lengths), 5, generator=_gen(2)) > 0.5).float()
    return Case(model, adamw, (flat, offsets, targets), bag_step)


class CheckpointedMLP(nn.Module):
    """The user checkpoints the blocks themselves (non-reentrant, the recommended form)."""

    def __init__(self, d=32, depth=3, classes=3):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * d, d)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.head(self.norm(x))


def user_checkpoint() -> Case:
    torch.manual_seed(0)
    model = CheckpointedMLP().train()
    x = torch.randn(4, 32, generator=_gen())
    y = torch.randint(0, 3, (4,), generator=_gen(2))
    return Case(model, adamw, (x, y), classify_step)


# ---------------------------------------------------------------------------
# registry

ZOO: dict[str, Callable[[], Case]] = {
    # decoder LMs (default cache settings), causal LM loss from labels
    "gpt2": gpt2,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "phi": phi,
    "phi3": phi3,
    "gemma": gemma,
    "gemma2": gemma2,
    "falcon": falcon,
    "gpt_neox": gpt_neox,
    "gpt_neo": gpt_neo,
    "gptj": gptj,
    "gpt_bigcode": gpt_bigcode,
    "opt": opt,
    "bloom": bloom,
    "mpt": mpt,
    "stablelm": stablelm,
    "starcoder2": starcoder2,
    "olmo": olmo,
    "olmo2": olmo2,
    "cohere": cohere,
    "granite": granite,
    "persimmon": persimmon,
    "codegen": codegen,
    "xglm": xglm,
    # state-space and recurrent decoders
    "mamba": mamba,
    "rwkv": rwkv,
    "jamba": jamba,
    "recurrent_gemma": recurrent_gemma,
    # mixture of experts
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "granitemoe": granitemoe,
    "olmoe": olmoe,
    "dbrx": dbrx,
    # encoders, single-label sequence classification
    "bert": bert,
    "roberta": roberta,
    "distilbert": distilbert,
    "electra": electra,
    "albert": albert,
    "deberta_v2": deberta_v2,
    "mpnet": mpnet,
    "megatron_bert": megatron_bert,
    "xlnet": xlnet,
    "funnel": funnel,
    "layoutlm": layoutlm,
    "canine": canine,
    # encoder-decoders with labels
    "t5": t5,
    "bart": bart,
    "marian": marian,
    "pegasus": pegasus,
    "mbart": mbart,
    "blenderbot": blenderbot,
    "longt5": longt5,
    "led": led,
    "switch_transformers": switch_transformers,
    "nllb_moe": nllb_moe,
    # vision
    "vit": vit,
    "convnext": convnext,
    "resnet": resnet,
    "swin": swin,
    "beit": beit,
    "deit": deit,
    "dinov2": dinov2,
    "levit": levit,
    "poolformer": poolformer,
    "regnet": regnet,
    "efficientnet": efficientnet,
    "segformer": segformer,
    # image-text contrastive
    "clip": clip,
    "siglip": siglip,
    # audio
    "wav2vec2": wav2vec2,
    "wav2vec2_ctc": wav2vec2_ctc,
    "whisper": whisper,
    # plain torch
    "lstm_lm": lstm_lm,
    "gru_classifier": gru_classifier,
    "unet": unet,
    "embedding_bag": embedding_bag,
    "user_checkpoint": user_checkpoint,
}

# Cheap, representative entries for the default (fast) suite.
FAST = ["qwen2", "distilbert", "vit", "unet", "embedding_bag"]


