"""Open what training left behind: a checkpoint's run config, its consolidated model, its tokenizer.

Shared by `pretrain.evaluate`, `pretrain.export` and `pretrain.fill_mask`, which all start from

    ckpt = resolve_checkpoint("outputs/debug")           # a run dir, its checkpoints/ dir, the `latest`
                                                         # pointer file, or a step_* directory
    run = load_run_config(ckpt, ["data.valid_max_batches=4"])   # config.yaml, typed, with overrides
    model = load_checkpoint_model(ckpt, run)              # fp32, eval mode, on the CPU
    model, tokenizer = load_model_and_tokenizer(path)     # an HF export dir or a checkpoint

The weights come from `pretrain.engine.load_model_state`, which consolidates a checkpoint of either
backend and any ZeRO stage into one fp32 state dict. The tokenizer of a checkpoint is the run's
`data.tokenizer` (a relative path is taken from the current directory, as the trainer took it) unless
another is given; it must have the model's vocabulary size and, when the run's corpus manifest is
readable, the hash the corpus was built with.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf
from tokenizers import Tokenizer

from data_prep.corpus import load_manifest
from data_prep.shards import CorpusError
from data_prep.tokenizer import TokenizerError, load_tokenizer, tokenizer_hash
from pretrain import checkpoint
from pretrain.config import ConfigError, PretrainConfig
from pretrain.engine import load_model_state
from pretrain.hf import CONFIG_NAME, load_hf
from pretrain.model import RobertaForMaskedLM

RUN_CONFIG = "config.yaml"
"""The resolved run config the trainer writes into every checkpoint (pretrain.train.CONFIG_FILE)."""


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint (or whose tokenizer does not fit); the message says why."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The complete `step_*` directory that `path` names: the directory itself, the `latest` pointer
    file, a `checkpoints/` directory (its `latest`), or a run directory (its `checkpoints/latest`)."""
    path = Path(path)
    if path.is_file() and path.name == checkpoint.LATEST:
        path = path.parent / path.read_text().strip()
    elif path.is_dir() and (path / checkpoint.LATEST).is_file():
        path = path / (path / checkpoint.LATEST).read_text().strip()
    elif path.is_dir() and (path / "checkpoints" / checkpoint.LATEST).is_file():
        root = path / "checkpoints"
        path = root / (root / checkpoint.LATEST).read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    why = checkpoint.problem(path, check_hashes=False)
    if why is not None:
        raise CheckpointError(f"{path}: not a complete checkpoint: {why}")
    if not (path / RUN_CONFIG).is_file():
        raise CheckpointError(f"{path}: no {RUN_CONFIG} (the run config the trainer saves beside the "
                              f"weights)")
    return path


def load_run_config(ckpt: Path, overrides: Sequence[str] = ()) -> PretrainConfig:
    """The run config saved in checkpoint `ckpt`, with `key=value` overrides (e.g. `data.corpus=...`),
    checked against the schema: an unknown key or a bad value raises `ConfigError` naming it."""

    def first_line(e: Exception) -> str:  # omegaconf appends full_key / reference_type lines
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    try:
        merged = OmegaConf.merge(OmegaConf.structured(PretrainConfig), OmegaConf.load(ckpt / RUN_CONFIG))
    except Exception as e:  # omegaconf's ValidationError / ConfigKeyError, a YAML error
        raise ConfigError(f"{ckpt / RUN_CONFIG}: {first_line(e)}") from None
    for override in overrides:
        if "=" not in override or override.startswith("="):
            raise ConfigError(f"{override!r}: an override is key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except Exception as e:
            raise ConfigError(f"override {override!r}: {first_line(e)}") from None
    try:
        run = OmegaConf.to_object(merged)
    except ValueError as e:  # RobertaConfig / MaskingConfig __post_init__
        raise ConfigError(f"{ckpt / RUN_CONFIG} with overrides {list(overrides)}: {e}") from None
    except Exception as e:  # MissingMandatoryValue
        raise ConfigError(f"{ckpt / RUN_CONFIG}: {first_line(e)}") from None
    assert isinstance(run, PretrainConfig)
    return run


def load_checkpoint_model(ckpt: Path, run: PretrainConfig) -> RobertaForMaskedLM:
    """The model of checkpoint `ckpt` (any backend, any ZeRO stage), fp32 on the CPU, in eval mode."""
    try:
        # DeepSpeed's consolidation (and its logger, created on first import) print to stdout: keep
        # stdout for the commands' JSON answers.
        with contextlib.redirect_stdout(sys.stderr):
            state = load_model_state(ckpt)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    model = RobertaForMaskedLM(run.model)
    model.load_state_dict(state, strict=True)
    return model.eval()


def checkpoint_tokenizer_dir(run: PretrainConfig, tokenizer: str | os.PathLike | None = None) -> Path:
    """The tokenizer directory of a run: `tokenizer` when given, else the run's `data.tokenizer`.

    Checks that it loads, has `model.vocab_size` ids and, when the run's corpus manifest can be read,
    the `tokenizer_hash` the corpus was built with."""
    chosen = tokenizer if tokenizer is not None else run.data.tokenizer
    if chosen is None:
        raise CheckpointError("the run recorded no data.tokenizer: give the tokenizer directory "
                              "(tokenizer=<dir>)")
    directory = Path(chosen)
    tok = load_tokenizer(directory)
    if tok.get_vocab_size() != run.model.vocab_size:
        raise CheckpointError(f"{directory}: {tok.get_vocab_size()} ids, but the model has "
                              f"model.vocab_size={run.model.vocab_size}: not the run's tokenizer")
    try:
        manifest = load_manifest(run.data.corpus)
    except CorpusError:
        return directory  # the corpus is not here (e.g. another machine): the vocabulary check stands
    if manifest["tokenizer_hash"] != tokenizer_hash(directory):
        raise CheckpointError(f"{directory}: tokenizer_hash differs from the one the run's corpus was built "
                              f"with ({run.data.corpus}/manifest.json): not the run's tokenizer")
    return directory


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is an HF model directory (a `config.json`), as `pretrain.export` writes."""
    return (Path(path) / CONFIG_NAME).is_file()


def load_model_and_tokenizer(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None
                             ) -> tuple[RobertaForMaskedLM, Tokenizer]:
    """Model (fp32, eval mode, CPU) and tokenizer from an HF directory (its own tokenizer files unless
    `tokenizer` is given) or from a checkpoint (anything `resolve_checkpoint` accepts)."""
    if is_hf_dir(path):
        model = load_hf(path).eval()
        tok = load_tokenizer(tokenizer if tokenizer is not None else path)
        if tok.get_vocab_size() != model.config.vocab_size:
            raise TokenizerError(f"{tokenizer or path}: {tok.get_vocab_size()} ids, but the model in {path} "
                                 f"has vocab_size={model.config.vocab_size}")
        return model, tok
    ckpt = resolve_checkpoint(path)
    run = load_run_config(ckpt)
    return load_checkpoint_model(ckpt, run), load_tokenizer(checkpoint_tokenizer_dir(run, tokenizer))
