"""Weight interchange with HF transformers' `RobertaForMaskedLM`, without importing transformers.

    save_hf(model, "out/hf")            # config.json + model.safetensors, loadable by
                                        # transformers.RobertaForMaskedLM.from_pretrained("out/hf")
    model = load_hf("roberta-large/")   # from such a directory, or a published checkpoint
                                        # (model.safetensors, a sharded index, or pytorch_model.bin)

The pure functions `state_dict_to_hf` / `hf_to_state_dict` map between our parameter names and HF's
(split / fused QKV projection, vocabulary padding removed / added) and are reused by the export step.
HF ties `lm_head.decoder.weight` to the word embeddings and `lm_head.decoder.bias` to `lm_head.bias`;
like HF's own `save_pretrained`, we write neither tied copy, and on reading we accept them when they
equal what they are tied to.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from core.model import RobertaConfig, RobertaForMaskedLM

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"

BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 2
"""`<s>` and `</s>` (docs/DESIGN.md); `<pad>` is the config's `pad_token_id`."""

IGNORED_HF_KEYS = ("roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids")
"""Buffers some published checkpoints carry; derived, so ignored."""
IGNORED_HF_PREFIXES = ("roberta.pooler.",)
"""The pooler of published checkpoints: not part of the MLM model."""
TIED_HF_KEYS = {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                "lm_head.decoder.bias": "lm_head.bias"}
"""Tied copies (HF name -> the key it is tied to): accepted on reading when equal, never written."""

# Our config field -> HF config.json key.
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "ffn_size": "intermediate_size",
    "max_positions": "max_position_embeddings",
    "pad_token_id": "pad_token_id",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
    "type_vocab_size": "type_vocab_size",
    "init_std": "initializer_range",
}


class HFCheckpointError(ValueError):
    """A directory or state dict that is not a usable RoBERTa MLM checkpoint; the message says why."""


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------
def _name_map(cfg: RobertaConfig) -> dict[str, str]:
    """Our parameter name -> HF name, for every parameter except the fused QKV projections."""
    names = {
        "embeddings.word.weight": "roberta.embeddings.word_embeddings.weight",
        "embeddings.position.weight": "roberta.embeddings.position_embeddings.weight",
        "embeddings.token_type.weight": "roberta.embeddings.token_type_embeddings.weight",
        "embeddings.norm.weight": "roberta.embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "roberta.embeddings.LayerNorm.bias",
        "lm_head.dense.weight": "lm_head.dense.weight",
        "lm_head.dense.bias": "lm_head.dense.bias",
        "lm_head.norm.weight": "lm_head.layer_norm.weight",
        "lm_head.norm.bias": "lm_head.layer_norm.bias",
        "lm_head.bias": "lm_head.bias",
    }
    for i in range(cfg.num_layers):
        ours, hf = f"encoder.layers.{i}.", f"roberta.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            names[f"{ours}attention.out.{kind}"] = f"{hf}attention.output.dense.{kind}"
            names[f"{ours}attention_norm.{kind}"] = f"{hf}attention.output.LayerNorm.{kind}"
            names[f"{ours}ffn.up.{kind}"] = f"{hf}intermediate.dense.{kind}"
            names[f"{ours}ffn.down.{kind}"] = f"{hf}output.dense.{kind}"
            names[f"{ours}ffn_norm.{kind}"] = f"{hf}output.LayerNorm.{kind}"
    return names


def _qkv_names(cfg: RobertaConfig) -> dict[str, list[str]]:
    """Our fused `qkv` parameter -> the HF query, key, value names it concatenates (in that order)."""
    names = {}
    for i in range(cfg.num_layers):
        hf = f"roberta.encoder.layer.{i}.attention.self."
        for kind in ("weight", "bias"):
            parts = [f"{hf}{p}.{kind}" for p in ("query", "key", "value")]
            names[f"encoder.layers.{i}.attention.qkv.{kind}"] = parts
    return names


_VOCAB_ROWS = ("embeddings.word.weight", "lm_head.bias")
"""Our tensors whose first dimension is the (padded) vocabulary."""


def hf_shapes(cfg: RobertaConfig) -> dict[str, tuple[int, ...]]:
    """The HF state dict (as `state_dict_to_hf` writes it) as name -> shape, from the config alone."""
    d, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    shapes = {
        "roberta.embeddings.word_embeddings.weight": (v, d),
        "roberta.embeddings.position_embeddings.weight": (cfg.max_positions, d),
        "roberta.embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, d),
        "roberta.embeddings.LayerNorm.weight": (d,),
        "roberta.embeddings.LayerNorm.bias": (d,),
        "lm_head.dense.weight": (d, d),
        "lm_head.dense.bias": (d,),
        "lm_head.layer_norm.weight": (d,),
        "lm_head.layer_norm.bias": (d,),
        "lm_head.bias": (v,),
    }
    for i in range(cfg.num_layers):
        hf = f"roberta.encoder.layer.{i}."
        for p in ("query", "key", "value"):
            shapes[f"{hf}attention.self.{p}.weight"] = (d, d)
            shapes[f"{hf}attention.self.{p}.bias"] = (d,)
        shapes[f"{hf}attention.output.dense.weight"] = (d, d)
        shapes[f"{hf}intermediate.dense.weight"] = (f, d)
        shapes[f"{hf}intermediate.dense.bias"] = (f,)
        shapes[f"{hf}output.dense.weight"] = (d, f)
        for name in ("attention.output.dense.bias", "attention.output.LayerNorm.weight",
                     "attention.output.LayerNorm.bias", "output.dense.bias", "output.LayerNorm.weight",
                     "output.LayerNorm.bias"):
            shapes[f"{hf}{name}"] = (d,)
    return shapes


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------
def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: RobertaConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF `RobertaForMaskedLM` names, vocabulary cut to `cfg.vocab_size` rows, QKV
    split, tied copies left out. Every returned tensor is contiguous and owns its storage (safetensors
    refuses shared storage)."""
    expected = set(_name_map(cfg)) | set(_qkv_names(cfg))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise HFCheckpointError(f"not a state dict of RobertaForMaskedLM({cfg}): "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = {}
    for ours, hf in _name_map(cfg).items():
        tensor = sd[ours]
        if ours in _VOCAB_ROWS:
            tensor = tensor[: cfg.vocab_size]  # [Vp, ...] -> [V, ...]
        out[hf] = tensor.detach().clone().contiguous()
    for ours, hf_names in _qkv_names(cfg).items():
        for hf, part in zip(hf_names, sd[ours].chunk(3, dim=0)):  # [3D, ...] -> 3 x [D, ...]
            out[hf] = part.detach().clone().contiguous()
    return out


def hf_to_state_dict(sd: dict[str, torch.Tensor], cfg: RobertaConfig) -> dict[str, torch.Tensor]:
    """HF `RobertaForMaskedLM` state dict -> ours (QKV fused, vocabulary zero-padded to
    `cfg.padded_vocab_size`). Pooler and position-id buffers are ignored; tied decoder copies are
    accepted when equal to what they are tied to; a missing, unexpected or wrongly shaped key raises
    `HFCheckpointError` naming it."""
    shapes = hf_shapes(cfg)
    for copy, source in TIED_HF_KEYS.items():
        if copy in sd and source in sd and not torch.equal(sd[copy], sd[source]):
            raise HFCheckpointError(f"{copy} differs from {source}: untied decoders are not supported")
    ignored = set(TIED_HF_KEYS) | set(IGNORED_HF_KEYS)
    present = {k for k in sd if k not in ignored and not k.startswith(IGNORED_HF_PREFIXES)}
    missing, unexpected = sorted(set(shapes) - present), sorted(present - set(shapes))
    if missing:
        raise HFCheckpointError(f"checkpoint lacks {len(missing)} needed key(s), e.g. {missing[:5]}")
    if unexpected:
        raise HFCheckpointError(f"checkpoint has {len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    for name, shape in shapes.items():
        if tuple(sd[name].shape) != shape:
            raise HFCheckpointError(f"{name}: shape {tuple(sd[name].shape)}, the config needs {shape}")

    out = {}
    for ours, hf in _name_map(cfg).items():
        tensor = sd[hf]
        if ours in _VOCAB_ROWS and cfg.padded_vocab_size != cfg.vocab_size:
            pad = tensor.new_zeros((cfg.padded_vocab_size - cfg.vocab_size, *tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])  # [V, ...] -> [Vp, ...]
        out[ours] = tensor
    for ours, hf_names in _qkv_names(cfg).items():
        out[ours] = torch.cat([sd[hf] for hf in hf_names])  # 3 x [D, ...] -> [3D, ...]
    return out


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def config_to_hf(cfg: RobertaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` of HF's `RobertaForMaskedLM` for our config."""
    hf = {hf_key: getattr(cfg, ours) for ours, hf_key in _CONFIG_KEYS.items()}
    hf.update(
        architectures=["RobertaForMaskedLM"],
        model_type="roberta",
        hidden_act="gelu",
        position_embedding_type="absolute",
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        tie_word_embeddings=True,
        is_decoder=False,
        dtype=str(dtype).removeprefix("torch."),
    )
    return hf


def config_from_hf(hf: dict, pad_vocab_multiple: int = 64, source: str = CONFIG_NAME) -> RobertaConfig:
    """Our config from an HF RoBERTa `config.json` dict; refuses what our model cannot represent."""
    if hf.get("model_type") != "roberta":
        raise HFCheckpointError(f"{source}: model_type {hf.get('model_type')!r}, expected 'roberta'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise HFCheckpointError(f"{source}: hidden_act {hf['hidden_act']!r}; only exact 'gelu' is supported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise HFCheckpointError(f"{source}: position_embedding_type {hf['position_embedding_type']!r}; "
                                f"only 'absolute' is supported")
    if hf.get("is_decoder", False):
        raise HFCheckpointError(f"{source}: is_decoder is true; RobertaForMaskedLM is bidirectional")
    missing = [k for k in _CONFIG_KEYS.values() if k not in hf]
    if missing:
        raise HFCheckpointError(f"{source}: missing key(s) {missing}")
    values = {ours: hf[hf_key] for ours, hf_key in _CONFIG_KEYS.items()}
    try:
        return RobertaConfig(**values, pad_vocab_multiple=pad_vocab_multiple)
    except ValueError as e:
        raise HFCheckpointError(f"{source}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------------
def save_hf(model: RobertaForMaskedLM, directory: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` that `transformers.RobertaForMaskedLM.from_pretrained`
    loads with no missing and no unexpected keys. Tensors are saved in their current dtype."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in state_dict_to_hf(model.state_dict(), model.config).items()}
    dtype = model.embeddings.word.weight.dtype
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n")
    return directory


def read_hf_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an HF checkpoint directory: `model.safetensors`, a sharded safetensors index, or
    `pytorch_model.bin` (read with `weights_only=True`), in that order of preference. A truncated or
    corrupt file is an HFCheckpointError naming it."""
    from safetensors.torch import load_file

    def read(path: Path) -> dict[str, torch.Tensor]:
        try:
            if path.suffix == ".bin":
                return torch.load(path, map_location="cpu", weights_only=True)
            return load_file(str(path))
        except Exception as e:  # safetensors' SafetensorError, torch's unpickling/zip errors, OSError
            raise HFCheckpointError(f"{path}: unreadable ({type(e).__name__}: {e}); truncated or corrupt? "
                                    "Export it again") from None

    directory = Path(directory)
    if (directory / SAFETENSORS_NAME).is_file():
        return read(directory / SAFETENSORS_NAME)
    if (directory / SAFETENSORS_INDEX_NAME).is_file():
        try:
            shards = sorted(set(json.loads((directory / SAFETENSORS_INDEX_NAME).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFCheckpointError(f"{directory / SAFETENSORS_INDEX_NAME}: unreadable ({type(e).__name__}: {e})") \
                from None
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(read(directory / shard))
        return tensors
    if (directory / PYTORCH_NAME).is_file():
        return read(directory / PYTORCH_NAME)
    raise HFCheckpointError(f"{directory}: no {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {PYTORCH_NAME}")


def load_hf(directory: str | os.PathLike, pad_vocab_multiple: int = 64) -> RobertaForMaskedLM:
    """Our model (fp32, train mode) from an HF RoBERTa MLM directory (ours or a published one)."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise HFCheckpointError(f"{config_path}: not found")
    cfg = config_from_hf(json.loads(config_path.read_text()), pad_vocab_multiple, source=str(config_path))
    weights = read_hf_weights(directory)
    try:
        state = hf_to_state_dict(weights, cfg)
    except HFCheckpointError as e:
        raise HFCheckpointError(f"{directory}: {e}") from None
    with torch.device("meta"):
        model = RobertaForMaskedLM(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model
