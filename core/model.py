"""RoBERTa (Liu et al. 2019) for masked language modelling and for fine-tuning, the whole model in one file.

Read top to bottom like the paper: config, embeddings, self-attention, feed-forward, one post-LN
layer, the encoder, `RobertaPreTrainedModel` (embeddings + encoder, shared by every model here), the LM
head and `RobertaForMaskedLM`, then the task heads with HF's names and maths:
`RobertaForSequenceClassification`, `RobertaForTokenClassification`, `RobertaForQuestionAnswering`.

    cfg = RobertaConfig.from_preset("large")       # or RobertaConfig(vocab_size=..., ...)
    model = RobertaForMaskedLM(cfg)
    out = model(input_ids, attention_mask=None, labels=labels)  # labels: -100 = not predicted
    out.loss, out.num_predictions, out.logits
    model(input_ids, None, labels, max_predictions=77)  # the trainer's: static shapes, no host sync

    clf = RobertaForSequenceClassification(cfg, num_labels=3)
    missing, unexpected = clf.load_state_dict(model.state_dict(), strict=False)  # the head / lm_head.*
    clf(input_ids, attention_mask, labels=labels).logits                          # [B, 3]

Shapes: B batch, S sequence, D hidden, H heads, Dh = D / H per head, F feed-forward, V vocabulary,
Vp the vocabulary padded to a multiple of `pad_vocab_multiple` (internal only), N predicted tokens.

Speed options, each tested to give the same results: bf16 autocast from outside, per-layer activation
checkpointing (`model.activation_checkpointing = True`), `torch.compile` of a layer without graph
breaks (of the whole model with `fullgraph=True` given `max_predictions`), and the padded vocabulary. Parallelism and compile are applied from outside; this file does
no I/O except `RobertaConfig.from_preset`, which reads the YAML presets in `conf/model/`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

IGNORE_INDEX = -100
"""Label value of positions that are not predicted (as in HF and `torch.nn.functional.cross_entropy`)."""

PRESET_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"
"""Where the presets live: `conf/model/<name>.yaml` at the repository root (the Hydra group `model`)."""


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclass
class RobertaConfig:
    """Sizes of a RoBERTa model. Defaults are RoBERTa-large; the presets are `conf/model/*.yaml`."""

    vocab_size: int = 50265
    """Tokens in the vocabulary (logits and exported weights have exactly this many rows)."""
    hidden_size: int = 1024
    """Width D of the residual stream."""
    num_layers: int = 24
    """Transformer layers."""
    num_heads: int = 16
    """Attention heads; must divide `hidden_size`."""
    ffn_size: int = 4096
    """Inner width F of the feed-forward block."""
    max_positions: int = 514
    """Rows of the position table. Positions start at `pad_token_id + 1`, so the longest sequence is
    `max_positions - pad_token_id - 1` (512 for RoBERTa)."""
    pad_token_id: int = 1
    """Id of `<pad>`: its embedding row is zero, and padding keeps position `pad_token_id`."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings and on each sub-block's output before the residual sum."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    type_vocab_size: int = 1
    """Token-type rows; RoBERTa has one (all tokens type 0)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of every weight matrix and embedding."""
    pad_vocab_multiple: int = 64
    """Pad the embedding rows internally to a multiple of this (faster matmuls); 1 = no padding."""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_positions",
                    "type_vocab_size", "pad_vocab_multiple")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"RobertaConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"RobertaConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"RobertaConfig.pad_token_id must be in [0, vocab_size={self.vocab_size}), "
                             f"got {self.pad_token_id!r}")
        if self.max_positions < self.pad_token_id + 2:
            raise ValueError(f"RobertaConfig.max_positions ({self.max_positions}) must exceed "
                             f"pad_token_id + 1 ({self.pad_token_id + 1}): positions start after the pad id")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"RobertaConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("layer_norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"RobertaConfig.{name} must be a positive number, got {value!r}")

    @property
    def head_size(self) -> int:
        """Width Dh of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the word-embedding table: `vocab_size` rounded up to `pad_vocab_multiple`."""
        return math.ceil(self.vocab_size / self.pad_vocab_multiple) * self.pad_vocab_multiple

    @property
    def max_seq_len(self) -> int:
        """Longest input sequence the position table allows."""
        return self.max_positions - self.pad_token_id - 1

    def to_dict(self) -> dict:
        """The fields as a plain dict (the keys of `conf/model/*.yaml`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> RobertaConfig:
        """Build from a mapping, refusing unknown keys with a message naming them and `source`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown RobertaConfig key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str) -> RobertaConfig:
        """Read the preset `conf/model/<name>.yaml` (`tiny`, `base`, `large`)."""
        from omegaconf import OmegaConf  # a dependency of hydra-core; only presets need it

        if not PRESET_DIR.is_dir():
            raise FileNotFoundError(f"preset directory {PRESET_DIR} not found: RobertaConfig.from_preset "
                                    f"needs the repository's conf/ beside the pretrain/ package")
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"no model preset {name!r}: {path} does not exist (presets: {names})")
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of RobertaConfig fields")
        return cls.from_dict(values, source=str(path))


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------
def position_ids_from_input_ids(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """RoBERTa's positions: real tokens count up from `pad_token_id + 1` (cumulative over non-pad
    tokens); padding keeps `pad_token_id`. [B, S] -> [B, S]."""
    not_pad = input_ids.ne(pad_token_id).int()
    return (torch.cumsum(not_pad, dim=1) * not_pad).long() + pad_token_id


class Embeddings(nn.Module):
    """Word + position + the token-type row, then LayerNorm and dropout."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.pad_token_id = cfg.pad_token_id
        self.word = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids -> [B, S, D]."""
        positions = position_ids_from_input_ids(input_ids, self.pad_token_id)
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]  # [D] row: all type 0
        return self.dropout(self.norm(x))


# --------------------------------------------------------------------------------------------------
# Self-attention and feed-forward
# --------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention: fused QKV projection, `scaled_dot_product_attention`, output projection."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_size = cfg.head_size
        self.attention_dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # rows: [query; key; value]
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, D], mask [B, 1, 1, S] bool (True = attend) or None -> [B, S, D]."""
        batch, seq, hidden = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_size)  # [B, S, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, Dh]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0
        )  # [B, H, S, Dh]
        y = y.transpose(1, 2).reshape(batch, seq, hidden)  # [B, S, H * Dh] = [B, S, D]
        return self.out(y)


class FeedForward(nn.Module):
    """Linear D -> F, exact (erf) GELU, linear F -> D."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]."""
        return self.down(F.gelu(self.up(x)))


class Layer(nn.Module):
    """One post-LN transformer layer: x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x)))."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, D], mask [B, 1, 1, S] bool or None -> [B, S, D]."""
        x = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class Encoder(nn.Module):
    """The stack of layers, each optionally under activation checkpointing."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, D], mask [B, 1, 1, S] bool or None -> [B, S, D]."""
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x


# --------------------------------------------------------------------------------------------------
# The shared encoder model
# --------------------------------------------------------------------------------------------------
class RobertaPreTrainedModel(nn.Module):
    """Embeddings + encoder, the part every model here shares, so all have the same encoder parameter
    names (`embeddings.*`, `encoder.*`): the state dict of one loads into another with `strict=False`,
    only the heads missing or unexpected. A subclass adds its head in `__init__`, then calls
    `self.reset_parameters()`; its forward starts with `hidden = self.encode(input_ids, attention_mask)`."""

    _vocab_rows: tuple[str, ...] = ("embeddings.word.weight",)
    """Parameters whose first dimension is the padded vocabulary (the rows beyond `vocab_size` unused)."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)."""
        return self.encoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        self.encoder.activation_checkpointing = bool(enabled)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RoBERTa's init (HF's `_init_weights`): normal(0, init_std) weights of every Linear and
        Embedding, zero biases, zero padding rows, LayerNorm 1 / 0. The rows of the padded vocabulary
        beyond `vocab_size` are zero (they are never used)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.embeddings.word.weight[self.config.vocab_size:].zero_()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters as the unpadded model has them (a tied table counted once).
        `exclude_embeddings` leaves out the word, position and token-type tables."""
        cfg = self.config
        params = dict(self.named_parameters())
        total = sum(p.numel() for p in params.values())
        for name in self._vocab_rows:  # [Vp, ...]: leave out the Vp - V padded rows
            total -= (cfg.padded_vocab_size - cfg.vocab_size) * params[name][0].numel()
        if exclude_embeddings:
            total -= (cfg.vocab_size + cfg.max_positions + cfg.type_vocab_size) * cfg.hidden_size
        return total

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S]; attention_mask [B, S] (1 = token, 0 = padding) or None for no padding
        -> the last layer's hidden states [B, S, D]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's maximum "
                             f"{self.config.max_seq_len} (max_positions={self.config.max_positions})")
        mask = self._attention_mask(attention_mask, input_ids.shape)
        return self.encoder(self.embeddings(input_ids), mask)  # [B, S, D]

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
        """[B, S] 0/1 -> [B, 1, 1, S] bool for SDPA, or None when there is no padding (so fused / flash
        kernels run). The all-ones check runs only on a CPU mask and outside torch.compile: on an
        accelerator it would be a host sync (a mask given there is used as it is, the same result), so a
        caller that knows there is no padding passes None (the trainer checks its host copy)."""
        if attention_mask is None:
            return None
        if attention_mask.shape != shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(shape)}")
        if (not torch.compiler.is_compiling() and attention_mask.device.type == "cpu"
                and bool(attention_mask.all())):
            return None
        return attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]


# --------------------------------------------------------------------------------------------------
# Masked language modelling
# --------------------------------------------------------------------------------------------------
class LMHead(nn.Module):
    """Dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, plus a bias."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.padded_vocab_size))

    def forward(self, x: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        """x [..., D], decoder_weight [Vp, D] (the word embeddings) -> [..., V] logits; the padded
        columns are computed (aligned matmul), then cut off."""
        x = self.norm(F.gelu(self.dense(x)))
        logits = F.linear(x, decoder_weight, self.bias)  # [..., Vp]
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., : self.vocab_size]  # [..., V]
        return logits


class MaskedLMOutput(NamedTuple):
    """What `RobertaForMaskedLM.forward` returns. A NamedTuple, so that code walking a module's outputs
    for their tensors finds them (DeepSpeed ZeRO-3's backward hooks see tuples, lists and dicts only; a
    dataclass hid the loss from them), and torch.compile / pytree treat it as a container."""

    logits: torch.Tensor
    """Without labels [B, S, V]; with labels [N, V] for the N predicted positions only (row-major
    order), or [B * K, V] with `max_predictions=K` (rows beyond a sample's predictions are padding)."""
    loss: torch.Tensor | None = None
    """With labels: cross-entropy over the predicted positions, mean or sum (see `reduction`); else None."""
    num_predictions: torch.Tensor | None = None
    """With labels: N, the number of labels != -100 (a long scalar tensor); else None."""
    targets: torch.Tensor | None = None
    """With labels: the label of each row of `logits` ([N], or [B * K] with -100 on padding rows)."""


class RobertaForMaskedLM(RobertaPreTrainedModel):
    """RoBERTa encoder + MLM head. The head runs only on the predicted positions when labels are given."""

    _vocab_rows = ("embeddings.word.weight", "lm_head.bias")

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__(cfg)
        self.lm_head = LMHead(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The shared init (`RobertaPreTrainedModel.reset_parameters`) and a zero LM-head bias."""
        super().reset_parameters()
        self.lm_head.bias.zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        max_predictions: int | None = None,
    ) -> MaskedLMOutput:
        """input_ids [B, S]; attention_mask [B, S] (1 = token, 0 = padding) or None for no padding;
        labels [B, S] with -100 where nothing is predicted; reduction "mean" or "sum" of the loss.

        `max_predictions` K: a static bound on the labels per sample (the trainer's, from the masking
        rate). The head then runs on K gathered positions per sample, the predicted ones first, and the
        rest carry label -100: every shape is fixed, no host sync, the whole model compiles with
        `fullgraph=True`. A sample with more than K labels loses the ones beyond K (the caller checks).
        None: the head runs on exactly the N predicted positions (a data-dependent shape: `nonzero`)."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        hidden = self.encode(input_ids, attention_mask)  # [B, S, D]
        if labels is None:
            return MaskedLMOutput(logits=self.lm_head(hidden, self.embeddings.word.weight))  # [B, S, V]

        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        predicted = labels.ne(IGNORE_INDEX)  # [B, S]
        if max_predictions is None:
            # The one data-dependent shape of the model (a graph break under torch.compile, a host sync).
            index = predicted.reshape(-1).nonzero().squeeze(1)  # [N]
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # [B * S, D] -> [N, D]
            targets = labels.reshape(-1).index_select(0, index)  # [N]
        else:
            if max_predictions <= 0:
                raise ValueError(f"max_predictions must be positive, got {max_predictions}")
            batch, seq = labels.shape
            k = min(max_predictions, seq)
            # A key unique per position: predicted ones above the rest, earlier above later, so the top k
            # are the sample's predicted positions in order, then unpredicted ones (label -100).
            order = torch.arange(seq - 1, -1, -1, device=labels.device)  # [S]: S-1 .. 0
            key = predicted.int() * seq + order  # [B, S]
            index = key.topk(k, dim=1).indices  # [B, K]
            hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, K, D]
            hidden = hidden.reshape(batch * k, -1)  # [B * K, D]
            targets = labels.gather(1, index).reshape(-1)  # [B * K], -100 on padding rows
        logits = self.lm_head(hidden, self.embeddings.word.weight)  # [N or B * K, V]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)
        count = predicted.sum()  # a device scalar: no host sync
        if reduction == "mean":
            loss = loss / count.clamp(min=1)
        return MaskedLMOutput(logits=logits, loss=loss, num_predictions=count, targets=targets)


# --------------------------------------------------------------------------------------------------
# Task heads (fine-tuning): HF's parameter names and maths
# --------------------------------------------------------------------------------------------------
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
"""The `problem_type`s of sequence classification, as in HF's config: MSE, cross entropy, BCE-with-logits."""


@dataclass
class TaskOutput:
    """What `RobertaForSequenceClassification` and `RobertaForTokenClassification` return."""

    logits: torch.Tensor
    """Sequence classification [B, num_labels]; token classification [B, S, num_labels]."""
    loss: torch.Tensor | None = None
    """With labels: the mean loss (a float32 scalar); else None."""


@dataclass
class QuestionAnsweringOutput:
    """What `RobertaForQuestionAnswering` returns."""

    start_logits: torch.Tensor
    """[B, S]: score of each token as the answer's first."""
    end_logits: torch.Tensor
    """[B, S]: score of each token as the answer's last."""
    loss: torch.Tensor | None = None
    """With start and end positions: (CE(start) + CE(end)) / 2 (a float32 scalar); else None."""


def _check_head_args(num_labels: int, classifier_dropout: float | None) -> None:
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels <= 0:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    if classifier_dropout is not None and (not isinstance(classifier_dropout, (int, float))
                                           or isinstance(classifier_dropout, bool)
                                           or not 0.0 <= classifier_dropout < 1.0):
        raise ValueError(f"classifier_dropout must be None or in [0, 1), got {classifier_dropout!r}")


class ClassificationHead(nn.Module):
    """HF's `RobertaClassificationHead`, on the `<s>` token: dropout -> dense (D -> D) -> tanh -> dropout
    -> out_proj (D -> num_labels)."""

    def __init__(self, cfg: RobertaConfig, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(cfg.hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, num_labels]."""
        x = self.dropout(hidden[:, 0])  # [B, D]: the <s> token
        x = self.dropout(torch.tanh(self.dense(x)))  # [B, D]
        return self.out_proj(x)  # [B, num_labels]


class RobertaForSequenceClassification(RobertaPreTrainedModel):
    """RoBERTa encoder + a classification head on `<s>` (HF's `RobertaForSequenceClassification`).

    `problem_type` picks the loss as HF does: "regression" (MSE; with num_labels == 1 on the squeezed
    logits), "single_label_classification" (cross entropy on long labels [B]),
    "multi_label_classification" (BCE-with-logits on float labels [B, num_labels]). None: regression if
    num_labels == 1 (fixed here), else inferred per call from the labels' dtype (long / int32 -> single
    label, anything else -> multi label); HF also stores its first inference in its config, we do not."""

    kind = "sequence_classification"

    def __init__(self, cfg: RobertaConfig, num_labels: int, problem_type: str | None = None,
                 classifier_dropout: float | None = None) -> None:
        _check_head_args(num_labels, classifier_dropout)
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be None or one of {PROBLEM_TYPES}, got {problem_type!r}")
        if problem_type == "single_label_classification" and num_labels < 2:
            raise ValueError("problem_type 'single_label_classification' needs num_labels >= 2 "
                             f"(cross entropy over one class is always 0), got {num_labels}")
        if problem_type is None and num_labels == 1:
            problem_type = "regression"  # what HF infers for one label, whatever the labels' dtype
        super().__init__(cfg)
        self.num_labels = num_labels
        self.problem_type = problem_type
        self.classifier_dropout = classifier_dropout
        dropout = cfg.hidden_dropout if classifier_dropout is None else classifier_dropout
        self.classifier = ClassificationHead(cfg, num_labels, dropout)
        self.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> TaskOutput:
        """input_ids [B, S]; attention_mask [B, S] (1 = token, 0 = padding) or None; labels [B] (long:
        single label; float: regression), [B, num_labels] (float 0/1: multi label) or None."""
        hidden = self.encode(input_ids, attention_mask)  # [B, S, D]
        logits = self.classifier(hidden)  # [B, num_labels]
        if labels is None:
            return TaskOutput(logits=logits)
        problem_type = self.problem_type
        if problem_type is None:
            single = labels.dtype in (torch.long, torch.int)
            problem_type = "single_label_classification" if single else "multi_label_classification"
        if problem_type == "regression":
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze().float(), labels.squeeze().float())  # [B] vs [B]
            else:
                loss = F.mse_loss(logits.float(), labels.float())  # [B, num_labels]
        elif problem_type == "single_label_classification":
            loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        else:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())  # [B, num_labels]
        return TaskOutput(logits=logits, loss=loss)


class RobertaForTokenClassification(RobertaPreTrainedModel):
    """RoBERTa encoder + dropout -> a linear classifier on every token (HF's
    `RobertaForTokenClassification`); loss: mean cross entropy over the labels != -100."""

    kind = "token_classification"

    def __init__(self, cfg: RobertaConfig, num_labels: int, classifier_dropout: float | None = None) -> None:
        _check_head_args(num_labels, classifier_dropout)
        super().__init__(cfg)
        self.num_labels = num_labels
        self.classifier_dropout = classifier_dropout
        self.dropout = nn.Dropout(cfg.hidden_dropout if classifier_dropout is None else classifier_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        self.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> TaskOutput:
        """input_ids [B, S]; attention_mask [B, S] or None; labels [B, S] long, -100 where not scored
        (padding, continuation sub-words), or None. With every label -100 the loss is NaN, as in HF."""
        hidden = self.encode(input_ids, attention_mask)  # [B, S, D]
        logits = self.classifier(self.dropout(hidden))  # [B, S, num_labels]
        if labels is None:
            return TaskOutput(logits=logits)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1),
                               ignore_index=IGNORE_INDEX)  # [B * S, num_labels] vs [B * S]
        return TaskOutput(logits=logits, loss=loss)


class RobertaForQuestionAnswering(RobertaPreTrainedModel):
    """RoBERTa encoder + `qa_outputs`, a linear D -> 2 on every token: start and end logits of the
    answer span (HF's `RobertaForQuestionAnswering`, extractive QA as in SQuAD)."""

    kind = "extractive_qa"
    num_labels = 2
    """The outputs of `qa_outputs` (HF's config has `num_labels` 2 for this head)."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__(cfg)
        self.qa_outputs = nn.Linear(cfg.hidden_size, 2)
        self.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
    ) -> QuestionAnsweringOutput:
        """input_ids [B, S]; attention_mask [B, S] or None; start_positions and end_positions [B] (or
        [B, 1]) token indices of the answer, both or neither. As in HF, positions are clamped to [0, S]
        and S is ignored: an answer outside the input (e.g. cut off) adds nothing to the loss."""
        if (start_positions is None) != (end_positions is None):
            raise ValueError("give both start_positions and end_positions, or neither")
        hidden = self.encode(input_ids, attention_mask)  # [B, S, D]
        logits = self.qa_outputs(hidden)  # [B, S, 2]
        start_logits, end_logits = logits.unbind(-1)  # [B, S] each
        if start_positions is None:
            return QuestionAnsweringOutput(start_logits=start_logits, end_logits=end_logits)
        if start_positions.dim() > 1:
            start_positions = start_positions.squeeze(-1)  # [B, 1] -> [B]
        if end_positions.dim() > 1:
            end_positions = end_positions.squeeze(-1)
        seq = start_logits.shape[1]
        start_positions, end_positions = start_positions.clamp(0, seq), end_positions.clamp(0, seq)
        start_loss = F.cross_entropy(start_logits.float(), start_positions, ignore_index=seq)
        end_loss = F.cross_entropy(end_logits.float(), end_positions, ignore_index=seq)
        return QuestionAnsweringOutput(start_logits=start_logits, end_logits=end_logits,
                                       loss=(start_loss + end_loss) / 2)


TaskModel = RobertaForSequenceClassification | RobertaForTokenClassification | RobertaForQuestionAnswering
"""Any of the task models."""

TASK_MODELS: dict[str, type[TaskModel]] = {
    RobertaForSequenceClassification.kind: RobertaForSequenceClassification,
    RobertaForTokenClassification.kind: RobertaForTokenClassification,
    RobertaForQuestionAnswering.kind: RobertaForQuestionAnswering,
}
"""Task kind (the class attribute `kind`) -> model class."""


def new_task_model(kind: str, cfg: RobertaConfig, num_labels: int | None = None,
                     problem_type: str | None = None, classifier_dropout: float | None = None) -> TaskModel:
    """A freshly initialised task model of `kind` ("sequence_classification", "token_classification",
    "extractive_qa"). Classification kinds need `num_labels`; `problem_type` is for sequence
    classification only; extractive QA takes no `num_labels` (or 2), `problem_type` or dropout."""
    if kind not in TASK_MODELS:
        raise ValueError(f"unknown task kind {kind!r}; known: {sorted(TASK_MODELS)}")
    if kind != RobertaForSequenceClassification.kind and problem_type is not None:
        raise ValueError(f"problem_type is for sequence_classification only, got {problem_type!r} for {kind}")
    if kind == RobertaForQuestionAnswering.kind:
        if num_labels not in (None, 2):
            raise ValueError(f"extractive_qa has 2 outputs (start, end), got num_labels={num_labels!r}")
        if classifier_dropout is not None:
            raise ValueError("extractive_qa has no classifier dropout (HF's qa_outputs has none)")
        return RobertaForQuestionAnswering(cfg)
    if num_labels is None:
        raise ValueError(f"{kind} needs num_labels")
    if kind == RobertaForTokenClassification.kind:
        return RobertaForTokenClassification(cfg, num_labels, classifier_dropout)
    return RobertaForSequenceClassification(cfg, num_labels, problem_type, classifier_dropout)
