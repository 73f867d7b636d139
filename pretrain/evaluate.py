"""Evaluate a checkpoint: `python -m pretrain.evaluate checkpoint=<dir> [+data.*=... +system.*=...]`.

MLM loss (nats per masked token), perplexity and accuracy (argmax == target over the masked tokens)
on the valid split of the run's corpus, with the deterministic masks of `pretrain.data.ValidLoader`
(seeded by the run's `trainer.seed`): the same batches and the same numbers as the trainer's
validation of a one-rank run. Settings come from the run config saved in the checkpoint; `+data.*` and
`+system.*` overrides change them (`+data.corpus=...`, `+data.valid_max_batches=0` for the whole split,
`+system.micro_batch_size=64`, `+system.device=cuda`, `+system.precision=bf16`). The `+` is Hydra's
"add a key": they are keys of the run's config, which this command's own config does not hold; they are
checked against the training schema when merged (an unknown one exits 2, named).

Prints a JSON summary and writes it to `<checkpoint>/eval.json` (or `output=<file>`):

    {"checkpoint", "step", "corpus", "split": "valid", "seq_len", "batch_size", "max_batches",
     "precision", "loss", "ppl", "accuracy", "tokens"}

`evaluate(forward, batches, device, max_batches)` is the one validation loop: it sums over this rank's
batches and all-reduces over the ranks, so the trainer can run it on a DeepSpeed engine too.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch
from omegaconf import MISSING, OmegaConf

from core import checkpoint
from core.checkpoint import (
    CheckpointError,
    checkpoint_tokenizer_dir,
    load_checkpoint_model,
    resolve_checkpoint,
)
from core.cli import command
from core.model import IGNORE_INDEX, MaskedLMOutput
from data_prep.corpus import Corpus
from data_prep.shards import CorpusError
from pretrain import distributed
from pretrain.config import DEVICES, PACKINGS, PRECISIONS, ConfigError, PretrainConfig, load_run_config
from pretrain.data import ValidLoader, word_starts

EVAL_JSON = "eval.json"
"""Run-config groups a command line may override (the model and its training are fixed by the checkpoint)."""

Forward = Callable[[dict[str, torch.Tensor]], MaskedLMOutput]
"""A batch {"input_ids", "attention_mask", "labels"} -> the output with the *summed* loss."""


@torch.no_grad()
def evaluate(forward: Forward, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
             max_batches: int = 0) -> dict[str, float]:
    """Loss, perplexity, accuracy and token count over the masked tokens of `batches` (the first
    `max_batches` when > 0), summed over all ranks. `forward` must return the loss summed over the
    batch's masked tokens (`reduction="sum"`); putting the model in eval mode is the caller's job."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, count, correct
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        out = forward(batch)
        labels = batch["labels"]
        targets = labels[labels.ne(IGNORE_INDEX)]  # [N], row-major like out.logits
        assert out.loss is not None and out.num_predictions is not None
        totals[0] += out.loss.double()
        totals[1] += out.num_predictions.double()
        totals[2] += (out.logits.argmax(-1) == targets).sum().double()
    distributed.all_reduce(totals)
    loss = float(totals[0] / totals[1].clamp(min=1))
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
            "accuracy": float(totals[2] / totals[1].clamp(min=1)), "tokens": int(totals[1])}


def check_settings(run_cfg: PretrainConfig) -> None:
    """The settings evaluation reads, checked after overrides (`ConfigError` naming the key)."""
    system, data = run_cfg.system, run_cfg.data
    checks = [
        ("system.device", system.device, system.device in DEVICES, f"one of {list(DEVICES)}"),
        ("system.precision", system.precision, system.precision in PRECISIONS, f"one of {list(PRECISIONS)}"),
        ("system.micro_batch_size", system.micro_batch_size, system.micro_batch_size > 0, "> 0"),
        ("data.valid_max_batches", data.valid_max_batches, data.valid_max_batches >= 0, ">= 0"),
        ("data.packing", data.packing, data.packing in PACKINGS, f"one of {list(PACKINGS)}"),
        ("data.seq_len", data.seq_len, 3 <= data.seq_len <= run_cfg.model.max_seq_len,
         f"within [3, {run_cfg.model.max_seq_len}] (the model's positions)"),
    ]
    for key, value, ok, wanted in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r} must be {wanted}")


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = (), verify: bool = True) -> dict:
    """Evaluate the checkpoint `path` (anything `core.checkpoint.resolve_checkpoint` accepts) on its
    run's valid split, in one process; returns the summary (see the module docstring)."""
    ckpt = resolve_checkpoint(path, verify)
    run_cfg = load_run_config(ckpt, overrides)
    check_settings(run_cfg)
    env = distributed.detect({})  # one process, whatever launched us
    device = distributed.select_device(env, run_cfg.system.device)
    model = load_checkpoint_model(ckpt, run_cfg.model).to(device)
    corpus = Corpus.open(run_cfg.data.corpus, "valid", expect_vocab_size=run_cfg.model.vocab_size)
    if corpus.num_tokens == 0:
        raise CorpusError(f"{run_cfg.data.corpus}: the valid split is empty (data.corpus)")
    batch_size = run_cfg.system.micro_batch_size
    data = run_cfg.data
    # Whole-word masking needs the run's tokenizer (checked against the corpus), as the trainer read it.
    tokenizer = checkpoint_tokenizer_dir(OmegaConf.structured(run_cfg)) if data.masking.whole_word else None
    loader = ValidLoader(corpus, seq_len=data.seq_len, batch_size=batch_size, masking=data.masking,
                         seed=run_cfg.trainer.seed, packing=data.packing,
                         word_start=word_starts(data.masking, tokenizer))
    bf16 = run_cfg.system.precision == "bf16"

    def forward(batch: dict[str, torch.Tensor]) -> MaskedLMOutput:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(batch["input_ids"], batch["attention_mask"], batch["labels"], reduction="sum")

    metrics = evaluate(forward, loader, device, run_cfg.data.valid_max_batches)
    return {"checkpoint": str(ckpt), "step": checkpoint.step_of(ckpt), "corpus": str(run_cfg.data.corpus),
            "split": "valid", "seq_len": run_cfg.data.seq_len, "batch_size": batch_size,
            "max_batches": run_cfg.data.valid_max_batches, "precision": run_cfg.system.precision, **metrics}


@dataclass
class EvaluateArgs:
    """The settings of `python -m pretrain.evaluate` (conf/commands/evaluate.yaml)."""

    checkpoint: str = MISSING
    """A step_* dir, a run dir, its checkpoints/ dir or its latest file."""
    output: Optional[str] = None
    """Where to write the JSON summary; null: <checkpoint>/eval.json."""
    verify: bool = True
    """Check every checkpoint file's sha256 against its checkpoint.json first (false: sizes only, warned)."""
    data: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the run's `data.*` settings (`+data.valid_max_batches=0`)."""
    system: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the run's `system.*` settings (`+system.device=cuda`)."""

    def overrides(self) -> list[str]:
        """The run-config overrides as `key=value` words."""
        return [f"{group}.{key}={json.dumps(value)}"  # JSON values are YAML values
                for group in ("data", "system") for key, value in getattr(self, group).items()]


@command("evaluate", EvaluateArgs, refused=(CheckpointError, ConfigError, CorpusError))
def main(args: EvaluateArgs) -> int:
    summary = evaluate_checkpoint(args.checkpoint, args.overrides(), args.verify)
    output = Path(args.output) if args.output else Path(summary["checkpoint"]) / EVAL_JSON
    output.write_text(json.dumps(summary, indent=1) + "\n")
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    main()
