"""RoBERTa for masked language modelling, the whole model in one file (Liu et al. 2019).

Read top to bottom like the paper: config, embeddings, self-attention, feed-forward, one post-LN
layer, the encoder, the LM head, and `RobertaForMaskedLM` that ties them together.

    cfg = RobertaConfig.from_preset("large")       # or RobertaConfig(vocab_size=..., ...)
    model = RobertaForMaskedLM(cfg)
    out = model(input_ids, attention_mask=None, labels=labels)  # labels: -100 = not predicted
    out.loss, out.num_predictions, out.logits

Shapes: B batch, S sequence, D hidden, H heads, Dh = D / H per head, F feed-forward, V vocabulary,
Vp the vocabulary padded to a multiple of `pad_vocab_multiple` (internal only), N predicted tokens.

Speed options, each tested to give the same results: bf16 autocast from outside, per-layer activation
checkpointing (`model.activation_checkpointing = True`), `torch.compile` of a layer without graph
breaks, and the padded vocabulary. Parallelism and compile are applied from outside; this file does
no I/O except `RobertaConfig.from_preset`, which reads the YAML presets in `conf/model/`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

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
# LM head
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


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
@dataclass
class MaskedLMOutput:
    """What `RobertaForMaskedLM.forward` returns."""

    logits: torch.Tensor
    """Without labels [B, S, V]; with labels [N, V] for the N predicted positions only (row-major order)."""
    loss: torch.Tensor | None = None
    """With labels: cross-entropy over the predicted positions, mean or sum (see `reduction`); else None."""
    num_predictions: torch.Tensor | None = None
    """With labels: N, the number of labels != -100 (a long scalar tensor); else None."""


class RobertaForMaskedLM(nn.Module):
    """RoBERTa encoder + MLM head. The head runs only on the predicted positions when labels are given."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.lm_head = LMHead(cfg)
        self.reset_parameters()

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)."""
        return self.encoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        self.encoder.activation_checkpointing = bool(enabled)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RoBERTa's init: normal(0, init_std) weights, zero biases, zero padding row, LayerNorm 1 / 0.
        The rows of the padded vocabulary beyond `vocab_size` are zero (they are never used)."""
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
        self.lm_head.bias.zero_()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters as the unpadded model has them (the tied table counted once).
        `exclude_embeddings` leaves out the word, position and token-type tables."""
        cfg = self.config
        total = sum(p.numel() for p in self.parameters())
        total -= (cfg.padded_vocab_size - cfg.vocab_size) * (cfg.hidden_size + 1)  # table rows + bias
        if exclude_embeddings:
            total -= (cfg.vocab_size + cfg.max_positions + cfg.type_vocab_size) * cfg.hidden_size
        return total

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> MaskedLMOutput:
        """input_ids [B, S]; attention_mask [B, S] (1 = token, 0 = padding) or None for no padding;
        labels [B, S] with -100 where nothing is predicted; reduction "mean" or "sum" of the loss."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's maximum "
                             f"{self.config.max_seq_len} (max_positions={self.config.max_positions})")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        mask = self._attention_mask(attention_mask, input_ids.shape)
        hidden = self.encoder(self.embeddings(input_ids), mask)  # [B, S, D]
        if labels is None:
            return MaskedLMOutput(logits=self.lm_head(hidden, self.embeddings.word.weight))  # [B, S, V]

        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        flat_labels = labels.reshape(-1)  # [B * S]
        # The one data-dependent shape of the model (a graph break under torch.compile, outside the layers).
        index = flat_labels.ne(IGNORE_INDEX).nonzero().squeeze(1)  # [N]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # [B * S, D] -> [N, D]
        targets = flat_labels.index_select(0, index)  # [N]
        logits = self.lm_head(hidden, self.embeddings.word.weight)  # [N, V]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        count = torch.tensor(index.shape[0], device=index.device)
        if reduction == "mean":
            loss = loss / count.clamp(min=1)
        return MaskedLMOutput(logits=logits, loss=loss, num_predictions=count)

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
        """[B, S] 0/1 -> [B, 1, 1, S] bool for SDPA, or None when there is no padding (so fused / flash
        kernels run). The all-ones check is skipped under torch.compile (the mask is kept: same result)."""
        if attention_mask is None:
            return None
        if attention_mask.shape != shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(shape)}")
        if not torch.compiler.is_compiling() and bool(attention_mask.all()):
            return None
        return attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
