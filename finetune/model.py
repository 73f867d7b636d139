"""Where a task model comes from and where the best one goes.

    pre = load_pretrained("outputs/debug")          # a run dir, a checkpoint, or any HF RoBERTa directory
    model = build_task_model(pre, "sequence_classification", num_labels=2, dropout=0.1)
    save_best(model, pre, ["negative", "positive"], "outputs/finetune/x/best")   # an HF directory

A pretraining checkpoint gives its consolidated MLM weights (any backend, any ZeRO stage, sha256
verified: core.checkpoint) and its run's tokenizer; an HF directory (ours from serving.export, or a
published `roberta-base`/`roberta-large`, MLM or already fine-tuned) gives its weights and its own
tokenizer files. The encoder is loaded into the task model; the head is new (seeded by the caller)
unless the source already has a head of the same shape for the same kind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer
from torch import nn

from core import hf
from core.checkpoint import (
    checkpoint_tokenizer_dir,
    is_hf_dir,
    load_model_state,
    model_config,
    read_run_config,
    resolve_checkpoint,
)
from core.model import RobertaConfig
from core.tokenizer import TOKENIZER_FILES, TOKENIZER_JSON, TokenizerError, load_tokenizer

log = logging.getLogger("finetune.model")


@dataclass
class Pretrained:
    """A pretrained model's sizes, weights (our names; the encoder, and a head when the source has one),
    its tokenizer and where they came from."""

    config: RobertaConfig
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    tokenizer_dir: Path
    source: str


def load_pretrained(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                    verify: bool = True) -> Pretrained:
    """The model at `path`: an HF directory (config.json + weights) or a pretraining checkpoint (a run dir,
    its checkpoints/, `latest`, or a step_* dir)."""
    path = Path(path)
    if is_hf_dir(path):
        config = hf.config_from_hf(json.loads((path / hf.CONFIG_NAME).read_text()), source=str(path / hf.CONFIG_NAME))
        state, ignored = hf.read_hf_encoder_and_head(path, config)
        if ignored:
            log.info("%s: not used for fine-tuning: %s", path, ", ".join(sorted(ignored)[:6]) +
                     (" ..." if len(ignored) > 6 else ""))
        tok_dir = Path(tokenizer) if tokenizer is not None else path
        source = str(path)
    else:
        ckpt = resolve_checkpoint(path, verify)
        run_cfg = read_run_config(ckpt)
        config = model_config(run_cfg)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation prints to stdout
            state = load_model_state(ckpt)
        tok_dir = checkpoint_tokenizer_dir(run_cfg, tokenizer)
        source = str(ckpt)
    tok = load_tokenizer(tok_dir)
    if tok.get_vocab_size() != config.vocab_size:
        raise TokenizerError(f"{tok_dir}: {tok.get_vocab_size()} ids, but the model at {path} has "
                             f"vocab_size={config.vocab_size}")
    return Pretrained(config=config, state=state, tokenizer=tok, tokenizer_dir=tok_dir, source=source)


def build_task_model(pre: Pretrained, kind: str, num_labels: int, dropout: float | None = None,
                     from_scratch: bool = False) -> nn.Module:
    """The task model of `kind` with the pretrained encoder (and the source's head when it fits), in
    train mode; `dropout` replaces the hidden and attention dropout; `from_scratch` keeps the architecture
    and draws every weight anew (a baseline)."""
    config = pre.config
    if dropout is not None:
        config = dataclasses.replace(config, hidden_dropout=dropout, attention_dropout=dropout)
    problem_type = {"sequence_regression": "regression", "sequence_classification": "single_label_classification",
                    "multi_label_classification": "multi_label_classification"}.get(kind)
    model_kind = "sequence_classification" if problem_type is not None else kind
    n = 1 if kind == "sequence_regression" else num_labels
    if from_scratch:
        model = hf.new_task_model(model_kind, config, n, problem_type)
    else:
        model, missing = hf.task_model_from_state(model_kind, config, pre.state, n, problem_type)
        if missing:
            log.info("a new head: %s", ", ".join(missing))
    return model.train()


def save_best(model: nn.Module, pre: Pretrained, labels: Sequence[str] | None, directory: str | os.PathLike) -> Path:
    """`directory` as an HF directory of the task model, with real label names and the tokenizer files,
    written aside and moved into place."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    id2label = {i: name for i, name in enumerate(labels)} if labels else None
    hf.save_hf_task(model.cpu().float(), tmp, id2label)
    if not (pre.tokenizer_dir / TOKENIZER_JSON).is_file():
        raise TokenizerError(f"{pre.tokenizer_dir}: no {TOKENIZER_JSON}")
    for name in TOKENIZER_FILES:  # a published HF directory may lack some of ours: copy what is there
        if (pre.tokenizer_dir / name).is_file():
            shutil.copyfile(pre.tokenizer_dir / name, tmp / name)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory
