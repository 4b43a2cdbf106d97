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
keyword arguments). The last entries are plain torch models written here:
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


def mixtral() -> Case:
    return _decoder("MixtralForCausalLM", "MixtralConfig", **_DEC, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2)  # fmt: skip


def qwen2_moe() -> Case:
    return _decoder("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_DEC, num_key_value_heads=2, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)  # fmt: skip


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
    # mixture of experts
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    # encoders, single-label sequence classification
    "bert": bert,
    "roberta": roberta,
    "distilbert": distilbert,
    "electra": electra,
    "albert": albert,
    "deberta_v2": deberta_v2,
    # encoder-decoders with labels
    "t5": t5,
    "bart": bart,
    "marian": marian,
    "pegasus": pegasus,
    # vision
    "vit": vit,
    "convnext": convnext,
    "resnet": resnet,
    "swin": swin,
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


