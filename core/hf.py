"""Weight interchange with HF transformers' RoBERTa models, without importing transformers.

    save_hf(model, "out/hf")            # config.json + model.safetensors, loadable by
                                        # transformers.RobertaForMaskedLM.from_pretrained("out/hf")
    model = load_hf("roberta-large/")   # from such a directory, or a published checkpoint
                                        # (model.safetensors, a sharded index, or pytorch_model.bin)

The task models of `core.model` (sequence / token classification, extractive QA) have HF's head names:

    save_hf_task(clf, "out/clf", id2label={0: "neg", 1: "pos"})   # transformers' AutoModelFor... loads it
    clf, missing = load_hf_task("roberta-large/", "sequence_classification", num_labels=2)  # MLM or task dir
    clf, missing = task_model_from_state("token_classification", cfg, mlm_state, num_labels=9)
    cfg, task = read_hf_config("out/clf")                          # task.id2label, task.problem_type, ...
    state, ignored = read_hf_encoder_and_head("roberta-large/", cfg)  # our names; lm_head / pooler ignored

The pure functions `state_dict_to_hf` / `hf_to_state_dict` map between our parameter names and HF's
(split / fused QKV projection, vocabulary padding removed / added) and are reused by the export step.
HF ties `lm_head.decoder.weight` to the word embeddings and `lm_head.decoder.bias` to `lm_head.bias`;
like HF's own `save_pretrained`, we write neither tied copy, and on reading we accept them when they
equal what they are tied to.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from core.model import (
    PROBLEM_TYPES,
    TASK_MODELS,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    TaskModel,
    new_task_model,
)

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
LM_HEAD_HF_PREFIX = "lm_head."
"""The MLM head's HF keys: not part of a task model (ignored when a task model reads an MLM checkpoint)."""

MLM_ARCHITECTURE = "RobertaForMaskedLM"
ARCHITECTURES = {
    "sequence_classification": "RobertaForSequenceClassification",
    "token_classification": "RobertaForTokenClassification",
    "extractive_qa": "RobertaForQuestionAnswering",
}
"""Task kind (`core.model` classes' `kind`) -> HF `architectures` entry (and transformers class)."""
HEAD_KEYS = {
    "sequence_classification": ("classifier.dense.weight", "classifier.dense.bias",
                                "classifier.out_proj.weight", "classifier.out_proj.bias"),
    "token_classification": ("classifier.weight", "classifier.bias"),
    "extractive_qa": ("qa_outputs.weight", "qa_outputs.bias"),
}
"""Task kind -> its head's parameter names, ours and HF's alike (HF has no `roberta.` prefix on heads)."""

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
    """A directory or state dict that is not a usable RoBERTa checkpoint; the message says why."""


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------
_LM_HEAD_NAMES = {
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.norm.weight": "lm_head.layer_norm.weight",
    "lm_head.norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
}
"""Our LM-head parameter name -> HF name."""


def _name_map(cfg: RobertaConfig) -> dict[str, str]:
    """Our parameter name -> HF name, for every parameter of `RobertaForMaskedLM` except the fused QKV
    projections."""
    return {**_encoder_name_map(cfg), **_LM_HEAD_NAMES}


def _encoder_name_map(cfg: RobertaConfig) -> dict[str, str]:
    """Our parameter name -> HF name, for the embeddings and encoder except the fused QKV projections."""
    names = {
        "embeddings.word.weight": "roberta.embeddings.word_embeddings.weight",
        "embeddings.position.weight": "roberta.embeddings.position_embeddings.weight",
        "embeddings.token_type.weight": "roberta.embeddings.token_type_embeddings.weight",
        "embeddings.norm.weight": "roberta.embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "roberta.embeddings.LayerNorm.bias",
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
    d, v = cfg.hidden_size, cfg.vocab_size
    return {
        **_encoder_hf_shapes(cfg),
        "lm_head.dense.weight": (d, d),
        "lm_head.dense.bias": (d,),
        "lm_head.layer_norm.weight": (d,),
        "lm_head.layer_norm.bias": (d,),
        "lm_head.bias": (v,),
    }


def head_shapes(kind: str, cfg: RobertaConfig, num_labels: int) -> dict[str, tuple[int, ...]]:
    """The head of a task model of `kind` as name -> shape (our names = HF's); QA has 2 outputs."""
    d = cfg.hidden_size
    if kind == "sequence_classification":
        return {"classifier.dense.weight": (d, d), "classifier.dense.bias": (d,),
                "classifier.out_proj.weight": (num_labels, d), "classifier.out_proj.bias": (num_labels,)}
    if kind == "token_classification":
        return {"classifier.weight": (num_labels, d), "classifier.bias": (num_labels,)}
    if kind == "extractive_qa":
        return {"qa_outputs.weight": (2, d), "qa_outputs.bias": (2,)}
    raise ValueError(f"unknown task kind {kind!r}; known: {sorted(HEAD_KEYS)}")


def _encoder_hf_shapes(cfg: RobertaConfig) -> dict[str, tuple[int, ...]]:
    """The HF names and shapes of the embeddings and encoder (`roberta.*`), from the config alone."""
    d, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    shapes = {
        "roberta.embeddings.word_embeddings.weight": (v, d),
        "roberta.embeddings.position_embeddings.weight": (cfg.max_positions, d),
        "roberta.embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, d),
        "roberta.embeddings.LayerNorm.weight": (d,),
        "roberta.embeddings.LayerNorm.bias": (d,),
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
    return _to_hf(sd, cfg, _name_map(cfg))


def _to_hf(sd: dict[str, torch.Tensor], cfg: RobertaConfig,
           names: dict[str, str]) -> dict[str, torch.Tensor]:
    """`names` (ours -> HF) and the QKV projections of `sd` under HF names: vocabulary rows cut to
    `cfg.vocab_size`, QKV split; every tensor a contiguous copy that owns its storage."""
    out = {}
    for ours, hf in names.items():
        tensor = sd[ours]
        if ours in _VOCAB_ROWS:
            tensor = tensor[: cfg.vocab_size]  # [Vp, ...] -> [V, ...]
        out[hf] = tensor.detach().clone().contiguous()
    for ours, hf_names in _qkv_names(cfg).items():
        for hf, part in zip(hf_names, sd[ours].chunk(3, dim=0)):  # [3D, ...] -> 3 x [D, ...]
            out[hf] = part.detach().clone().contiguous()
    return out


def _from_hf(sd: dict[str, torch.Tensor], cfg: RobertaConfig,
             names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The inverse of `_to_hf` (keys and shapes already checked): vocabulary rows zero-padded to
    `cfg.padded_vocab_size`, QKV fused."""
    out = {}
    for ours, hf in names.items():
        tensor = sd[hf]
        if ours in _VOCAB_ROWS and cfg.padded_vocab_size != cfg.vocab_size:
            pad = tensor.new_zeros((cfg.padded_vocab_size - cfg.vocab_size, *tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])  # [V, ...] -> [Vp, ...]
        out[ours] = tensor
    for ours, hf_names in _qkv_names(cfg).items():
        out[ours] = torch.cat([sd[hf] for hf in hf_names])  # 3 x [D, ...] -> [3D, ...]
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
    return _from_hf(sd, cfg, _name_map(cfg))


def task_state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: RobertaConfig,
                          kind: str) -> dict[str, torch.Tensor]:
    """The state dict of a task model of `kind` -> HF names: the encoder under `roberta.` (vocabulary
    cut to `cfg.vocab_size` rows, QKV split) and the head under its own names; no `lm_head`. Every
    tensor is contiguous and owns its storage."""
    if kind not in HEAD_KEYS:
        raise ValueError(f"unknown task kind {kind!r}; known: {sorted(HEAD_KEYS)}")
    expected = set(_encoder_name_map(cfg)) | set(_qkv_names(cfg)) | set(HEAD_KEYS[kind])
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise HFCheckpointError(f"not a state dict of a {kind} model of {cfg}: "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = _to_hf(sd, cfg, _encoder_name_map(cfg))
    out.update({name: sd[name].detach().clone().contiguous() for name in HEAD_KEYS[kind]})
    return out


def hf_to_encoder_and_head(sd: dict[str, torch.Tensor],
                           cfg: RobertaConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Any HF RoBERTa state dict (MLM, a task model's, or a bare `RobertaModel`'s without the
    `roberta.` prefix) -> (our-named encoder weights plus the head weights present, the HF keys
    ignored). Ignored: `lm_head.*`, `roberta.pooler.*` and the position / token-type id buffers. A
    missing encoder key, a wrong shape, an incomplete head, two heads or any other key raises
    `HFCheckpointError` naming it. Head weights keep their names (ours = HF's); which head it is
    shows in the keys (`HEAD_KEYS`), its label count in their first dimension."""
    if sd and not any(k.startswith("roberta.") for k in sd):
        sd = {f"roberta.{k}": v for k, v in sd.items()}  # a bare RobertaModel: embeddings.*, encoder.*
    ignored = sorted(k for k in sd if k in IGNORED_HF_KEYS or k.startswith(IGNORED_HF_PREFIXES)
                     or k.startswith(LM_HEAD_HF_PREFIX))
    shapes = _encoder_hf_shapes(cfg)
    head_names = {name for names in HEAD_KEYS.values() for name in names}
    present = set(sd) - set(ignored)
    missing, unexpected = sorted(set(shapes) - present), sorted(present - set(shapes) - head_names)
    if missing:
        raise HFCheckpointError(f"checkpoint lacks {len(missing)} needed encoder key(s), e.g. {missing[:5]}")
    if unexpected:
        raise HFCheckpointError(f"checkpoint has {len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    kinds = [kind for kind, names in HEAD_KEYS.items() if present & set(names)]
    if len(kinds) > 1:
        raise HFCheckpointError(f"checkpoint has the heads of {kinds}: {sorted(present & head_names)}")
    if kinds:
        kind = kinds[0]
        lacking = [name for name in HEAD_KEYS[kind] if name not in present]
        if lacking:
            raise HFCheckpointError(f"checkpoint has an incomplete {kind} head: lacks {lacking}")
        num_labels = sd[HEAD_KEYS[kind][-1]].shape[0]  # the last head key is the output bias [num_labels]
        shapes = {**shapes, **head_shapes(kind, cfg, num_labels)}
    for name in sorted(present):
        if tuple(sd[name].shape) != shapes[name]:
            raise HFCheckpointError(f"{name}: shape {tuple(sd[name].shape)}, the config needs {shapes[name]}")
    out = _from_hf(sd, cfg, _encoder_name_map(cfg))
    if kinds:
        out.update({name: sd[name] for name in HEAD_KEYS[kinds[0]]})
    return out, ignored


def task_model_from_state(kind: str, cfg: RobertaConfig, state: Mapping[str, torch.Tensor],
                          num_labels: int | None = None, problem_type: str | None = None,
                          classifier_dropout: float | None = None) -> tuple[TaskModel, list[str]]:
    """A task model of `kind` (fp32, train mode; the arguments as `core.model.new_task_model`'s) with
    the weights of `state`, one of our state dicts: a `RobertaForMaskedLM`'s (a training checkpoint's
    consolidated weights), a task model's, or what `hf_to_encoder_and_head` returns.

    The encoder must be all there with the config's shapes: a missing key or a wrong shape raises
    `HFCheckpointError` naming it, as does any key that is neither encoder, `lm_head.*` nor a head.
    The head of `state` is kept when it fits (same kind and label count); one that does not (another
    kind, another `num_labels`) is dropped like `lm_head.*`, and the head initialised afresh. Returns
    the model and the head keys that were initialised afresh (all of the head's, or none)."""
    try:
        model = new_task_model(kind, cfg, num_labels, problem_type, classifier_dropout)
    except ValueError as e:
        raise HFCheckpointError(str(e)) from None
    expected = model.state_dict()
    head = list(HEAD_KEYS[kind])
    all_heads = {name for names in HEAD_KEYS.values() for name in names}
    missing_encoder = [k for k in expected if k not in head and k not in state]
    if missing_encoder:
        raise HFCheckpointError(f"state lacks {len(missing_encoder)} encoder key(s) of "
                                f"{type(model).__name__}, e.g. {missing_encoder[:5]}")
    unexpected = sorted(k for k in state if k not in expected and k not in all_heads
                        and not k.startswith(LM_HEAD_HF_PREFIX))
    if unexpected:
        raise HFCheckpointError(f"state has {len(unexpected)} key(s) that {type(model).__name__} lacks, "
                                f"e.g. {unexpected[:5]}")
    for name, tensor in expected.items():
        if name not in head and tuple(state[name].shape) != tuple(tensor.shape):
            raise HFCheckpointError(f"{name}: shape {tuple(state[name].shape)}, {type(model).__name__} "
                                    f"of {cfg} needs {tuple(tensor.shape)}")
    present = [k for k in head if k in state]
    if present and len(present) != len(head):
        raise HFCheckpointError(f"state has an incomplete {kind} head: {present}, lacks "
                                f"{[k for k in head if k not in state]}")
    fits = bool(present) and all(tuple(state[k].shape) == tuple(expected[k].shape) for k in head)
    model.load_state_dict({k: v for k, v in state.items() if k in expected and (fits or k not in head)},
                          strict=False)
    return model, [] if fits else head


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


@dataclass
class HFTaskConfig:
    """The task fields of an HF RoBERTa `config.json`, with HF's defaults where absent."""

    architectures: list[str]
    """As written (e.g. ["RobertaForMaskedLM"]); [] when absent."""
    kind: str | None
    """The task kind of the first architecture that is one of ours (`ARCHITECTURES`), else None (an MLM
    or a bare encoder directory: the caller says which task)."""
    num_labels: int
    """`len(id2label)`, or `num_labels` when there is no `id2label`, else HF's default 2."""
    id2label: dict[int, str]
    """Label index -> name (int keys; `config.json` writes them as strings); HF's `LABEL_<i>` by default."""
    label2id: dict[str, int]
    """Name -> index; the inverse of `id2label` when absent (HF 5 writes null)."""
    problem_type: str | None
    """Sequence classification's loss (`core.model.PROBLEM_TYPES`), or None (inferred from the labels)."""
    classifier_dropout: float | None
    """Dropout of the classification heads; None: the hidden dropout."""


def _check_id2label(id2label: Mapping, num_labels: int, source: str) -> dict[int, str]:
    """{index: name} with int keys exactly 0 .. num_labels - 1 and distinct string names."""
    try:
        labels = {int(k): v for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise HFCheckpointError(f"{source}: id2label keys must be label indices, got {sorted(id2label)}") \
            from None
    if sorted(labels) != list(range(num_labels)):
        raise HFCheckpointError(f"{source}: id2label must have the keys 0..{num_labels - 1}, "
                                f"got {sorted(labels)}")
    if not all(isinstance(v, str) for v in labels.values()) or len(set(labels.values())) != len(labels):
        raise HFCheckpointError(f"{source}: id2label names must be distinct strings, got {labels}")
    return dict(sorted(labels.items()))


def task_config_from_hf(hf: dict, source: str = CONFIG_NAME) -> HFTaskConfig:
    """The task fields of an HF RoBERTa `config.json` dict; refuses inconsistent ones naming the key."""
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise HFCheckpointError(f"{source}: architectures must be a list of names, got {architectures!r}")
    by_name = {name: kind for kind, name in ARCHITECTURES.items()}
    kind = next((by_name[a] for a in architectures if a in by_name), None)
    raw = hf.get("id2label")
    count = hf.get("num_labels")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count <= 0):
        raise HFCheckpointError(f"{source}: num_labels must be a positive integer, got {count!r}")
    if raw:
        if not isinstance(raw, Mapping):
            raise HFCheckpointError(f"{source}: id2label must be a mapping, got {raw!r}")
        if count is not None and count != len(raw):
            raise HFCheckpointError(f"{source}: num_labels {count} != the {len(raw)} labels of id2label")
        num_labels = len(raw)
    else:
        num_labels = 2 if count is None else count
        raw = {i: f"LABEL_{i}" for i in range(num_labels)}
    id2label = _check_id2label(raw, num_labels, source)
    label2id = hf.get("label2id") or {name: i for i, name in id2label.items()}
    if not isinstance(label2id, Mapping) or not all(isinstance(v, int) for v in label2id.values()):
        raise HFCheckpointError(f"{source}: label2id must map names to indices, got {label2id!r}")
    problem_type = hf.get("problem_type")
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise HFCheckpointError(f"{source}: problem_type {problem_type!r}, expected None or one of "
                                f"{PROBLEM_TYPES}")
    if kind == RobertaForQuestionAnswering.kind and num_labels != 2:
        raise HFCheckpointError(f"{source}: {ARCHITECTURES[kind]} needs num_labels 2, got {num_labels}")
    dropout = hf.get("classifier_dropout")
    if dropout is not None and (not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0):
        raise HFCheckpointError(f"{source}: classifier_dropout must be null or in [0, 1), got {dropout!r}")
    return HFTaskConfig(architectures=list(architectures), kind=kind, num_labels=num_labels,
                        id2label=id2label, label2id=dict(label2id), problem_type=problem_type,
                        classifier_dropout=dropout)


def task_config_to_hf(model: TaskModel, id2label: Mapping[int, str] | None = None,
                      dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` of the HF class of a task model: everything `config_to_hf` writes, with
    `architectures` the task's, `num_labels`, `id2label` (string keys "0", "1", ...; HF's `LABEL_<i>`
    if None), `label2id`, and `problem_type` and `classifier_dropout` where the head has them."""
    if not isinstance(model, tuple(TASK_MODELS.values())):
        raise TypeError(f"expected a task model of core.model ({sorted(TASK_MODELS)}), got "
                        f"{type(model).__name__}; save_hf writes RobertaForMaskedLM")
    num_labels = model.num_labels
    labels = {i: f"LABEL_{i}" for i in range(num_labels)} if id2label is None else id2label
    try:
        labels = _check_id2label(labels, num_labels, source="id2label")
    except HFCheckpointError as e:
        raise ValueError(f"{e} (the model has num_labels={num_labels})") from None
    hf = config_to_hf(model.config, dtype)
    hf.update(
        architectures=[ARCHITECTURES[model.kind]],
        num_labels=num_labels,
        id2label={str(i): name for i, name in labels.items()},
        label2id={name: i for i, name in labels.items()},
    )
    if isinstance(model, RobertaForSequenceClassification):
        hf["problem_type"] = model.problem_type
    if not isinstance(model, RobertaForQuestionAnswering):
        hf["classifier_dropout"] = model.classifier_dropout
    return hf


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
    hf, source = _read_config_json(directory)
    cfg = config_from_hf(hf, pad_vocab_multiple, source=source)
    weights = read_hf_weights(directory)
    try:
        state = hf_to_state_dict(weights, cfg)
    except HFCheckpointError as e:
        raise HFCheckpointError(f"{directory}: {e}") from None
    with torch.device("meta"):
        model = RobertaForMaskedLM(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model


def save_hf_task(model: TaskModel, directory: str | os.PathLike,
                 id2label: Mapping[int, str] | None = None) -> Path:
    """Write `config.json` (`task_config_to_hf`) + `model.safetensors` (`task_state_dict_to_hf`) that
    transformers' `AutoModelFor{SequenceClassification,TokenClassification,QuestionAnswering}` loads with
    no missing and no unexpected keys, the label names in its `config.id2label`. Tensors are saved in
    their current dtype."""
    from safetensors.torch import save_file

    config = task_config_to_hf(model, id2label, model.embeddings.word.weight.dtype)
    tensors = task_state_dict_to_hf(model.state_dict(), model.config, model.kind)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_hf_config(directory: str | os.PathLike,
                   pad_vocab_multiple: int = 64) -> tuple[RobertaConfig, HFTaskConfig]:
    """Our model config and the task fields (kind, labels, problem type) of an HF RoBERTa directory's
    `config.json`."""
    hf, source = _read_config_json(Path(directory))
    return config_from_hf(hf, pad_vocab_multiple, source=source), task_config_from_hf(hf, source=source)


def read_hf_encoder_and_head(directory: str | os.PathLike,
                             cfg: RobertaConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """From any HF RoBERTa directory (MLM or task, ours, transformers' or a published one): our-named
    encoder weights plus the head weights present, and the HF keys ignored (`lm_head.*`, the pooler,
    id buffers). See `hf_to_encoder_and_head`; `cfg` from `read_hf_config`."""
    weights = read_hf_weights(directory)
    try:
        return hf_to_encoder_and_head(weights, cfg)
    except HFCheckpointError as e:
        raise HFCheckpointError(f"{directory}: {e}") from None


def load_hf_task(directory: str | os.PathLike, kind: str | None = None, num_labels: int | None = None,
                 problem_type: str | None = None,
                 pad_vocab_multiple: int = 64) -> tuple[TaskModel, list[str]]:
    """Our task model (fp32, train mode) from any HF RoBERTa directory, and the head keys it lacked
    (freshly initialised). `kind`, `num_labels`, `problem_type` (and the classifier dropout) default to
    the config's: the task of its `architectures`, `len(id2label)`, its `problem_type`; an MLM directory
    needs `kind`. A head in the directory that does not fit (another kind or label count) is dropped
    and a new one initialised (see `task_model_from_state`)."""
    cfg, task = read_hf_config(directory, pad_vocab_multiple)
    kind = kind or task.kind
    if kind is None:
        raise HFCheckpointError(f"{directory}: architectures {task.architectures} name no task head; "
                                f"pass kind (one of {sorted(ARCHITECTURES)})")
    if kind not in HEAD_KEYS:
        raise HFCheckpointError(f"unknown task kind {kind!r}; known: {sorted(HEAD_KEYS)}")
    qa = kind == RobertaForQuestionAnswering.kind
    if num_labels is None and not qa:
        num_labels = task.num_labels
    if problem_type is None and kind == RobertaForSequenceClassification.kind:
        problem_type = task.problem_type
    state, _ = read_hf_encoder_and_head(directory, cfg)
    try:
        return task_model_from_state(kind, cfg, state, num_labels, problem_type,
                                     None if qa else task.classifier_dropout)
    except HFCheckpointError as e:
        raise HFCheckpointError(f"{directory}: {e}") from None


def _read_config_json(directory: Path) -> tuple[dict, str]:
    """The parsed `config.json` of `directory` and its path (for messages)."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise HFCheckpointError(f"{config_path}: not found")
    try:
        hf = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise HFCheckpointError(f"{config_path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(hf, dict):
        raise HFCheckpointError(f"{config_path}: expected a JSON object")
    return hf, str(config_path)
