"""Evaluate a checkpoint: `python -m pretrain.evaluate checkpoint=<dir> [+data.*=... +system.*=...]`,
or a checkpoint or HF directory on any text: `... checkpoint=<dir> text=<file> [seq_len=... mask_seed=...]`.

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

Text mode (`text=<file>`: the model card's "fill mask" evaluation on raw text, no corpus needed):
`checkpoint` may also be an HF directory (`python -m serving.export`). The documents of the file(s)
(.txt / .jsonl, optionally .gz, read by data_prep.io as the corpus builder reads them, `join_lines` too)
are tokenized with the model's tokenizer (an HF dir's own files, or the run's `data.tokenizer`; or
`tokenizer=`) exactly as build_corpus does, packed FULL-SENTENCES as training packs them
(`<s> block </s>`, `</s>` between documents) into sequences of `seq_len` (default: the run's
`data.seq_len` for a checkpoint, the model's maximum for an HF dir), and masked once with the
training recipe's masks (pretrain.masking: 15% of the tokens, or of the words with `whole_word`,
80/10/10), seeded by `mask_seed`: sequence i is keyed (mask_seed, 0, i), so the same settings give the
same masks and the same numbers on every run. Prints and writes (default `<model>/eval_text.json`):

    {"model", "text", "documents", "sequences", "tokens", "masked_tokens", "loss", "ppl",
     "top1_accuracy", "top5_accuracy", "whole_word", "join_lines", "mask_seed", "seq_len"}

`tokens` counts the documents' tokens (no `<s>`/`</s>`), `masked_tokens` the predicted ones; `loss` is
nats per masked token, `ppl` = exp(loss), topK accuracy the share of masked tokens whose target is among
the K highest logits.

`evaluate(forward, batches, device, max_batches, top_k)` is the one validation loop: it sums over this
rank's batches and all-reduces over the ranks, so the trainer can run it on a DeepSpeed engine too.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from omegaconf import MISSING, OmegaConf
from tokenizers import Tokenizer

from core import checkpoint
from core.checkpoint import (
    CheckpointError,
    checkpoint_tokenizer_dir,
    is_hf_dir,
    load_checkpoint_model,
    load_model_and_tokenizer,
    model_config,
    read_run_config,
    resolve_checkpoint,
)
from core.cli import command
from core.model import IGNORE_INDEX, MaskedLMOutput, RobertaForMaskedLM
from core.tokenizer import document_encoder, load_tokenizer, special_ids
from data_prep.corpus import Corpus
from data_prep.io import InputError, ReadStats, expand_inputs, iter_documents
from data_prep.shards import CorpusError
from pretrain import distributed
from pretrain.config import DEVICES, PACKINGS, PRECISIONS, ConfigError, PretrainConfig, load_run_config
from pretrain.data import (
    MaskingCollator,
    ValidLoader,
    block_index,
    separator_positions,
    to_torch,
    word_starts,
)
from pretrain.masking import Masker, MaskingConfig, word_start_table

EVAL_JSON = "eval.json"
TEXT_EVAL_JSON = "eval_text.json"
"""Where the text mode writes its summary by default, in the checkpoint or HF directory."""
TOP_K = 5
"""The text mode's second accuracy: the target among the TOP_K highest logits."""
"""Run-config groups a command line may override (the model and its training are fixed by the checkpoint)."""

Forward = Callable[[dict[str, torch.Tensor]], MaskedLMOutput]
"""A batch {"input_ids", "attention_mask", "labels"} -> the output with the *summed* loss."""


@torch.no_grad()
def evaluate(forward: Forward, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
             max_batches: int = 0, top_k: int = 0) -> dict[str, float]:
    """Loss, perplexity, accuracy and token count over the masked tokens of `batches` (the first
    `max_batches` when > 0), summed over all ranks; with `top_k` > 0 also `top<k>_accuracy` (the target
    among the k highest logits). `forward` must return the loss summed over the batch's masked tokens
    (`reduction="sum"`); putting the model in eval mode is the caller's job."""
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, count, correct, correct in top k
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
        if top_k:
            best = out.logits.topk(min(top_k, out.logits.shape[-1]), dim=-1).indices  # [N, k]
            totals[3] += (best == targets[:, None]).any(-1).sum().double()
    distributed.all_reduce(totals)
    loss = float(totals[0] / totals[1].clamp(min=1))
    metrics = {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
               "accuracy": float(totals[2] / totals[1].clamp(min=1)), "tokens": int(totals[1])}
    if top_k:
        metrics[f"top{top_k}_accuracy"] = float(totals[3] / totals[1].clamp(min=1))
    return metrics


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
    if is_hf_dir(path):
        raise CheckpointError(f"checkpoint={path} is an HF directory: it names no corpus to evaluate on; "
                              f"give text=<file> to evaluate it on a text")
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


# ---------------------------------------------------------------------------------------------------
# Text mode: any .txt / .jsonl, packed and masked as training does


def load_text_model(path: str | Path, tokenizer: str | Path | None = None, verify: bool = True
                    ) -> tuple[RobertaForMaskedLM, Tokenizer, int, Path]:
    """(model, tokenizer, default seq_len, resolved path) of an HF directory (its maximum length) or a
    checkpoint (anything `resolve_checkpoint` accepts; its run's `data.seq_len`)."""
    if is_hf_dir(path):
        model, tok = load_model_and_tokenizer(path, tokenizer)
        return model, tok, model.config.max_seq_len, Path(path)
    ckpt = resolve_checkpoint(path, verify)  # read here (not by load_model_and_tokenizer): its seq_len too
    cfg = read_run_config(ckpt)
    model = load_checkpoint_model(ckpt, model_config(cfg))
    tok = load_tokenizer(checkpoint_tokenizer_dir(cfg, tokenizer))
    return model, tok, int(cfg.data.seq_len), ckpt


def pack_documents(token_docs: Sequence[Sequence[int]], seq_len: int, specials: dict[str, int]) -> np.ndarray:
    """FULL-SENTENCES packing, as pretrain.data packs a corpus: the documents form one stream with `</s>`
    between them, cut into blocks of `seq_len - 2` (`block_index`); each sample is `<s> block </s>`,
    padded. Returns int64 `[num_blocks, seq_len]`."""
    lengths = np.array([len(d) for d in token_docs], dtype=np.int64)
    separators = separator_positions(lengths)
    stream = np.full(int(lengths.sum()) + len(separators), specials["eos"], dtype=np.int64)
    is_token = np.ones(len(stream), dtype=bool)
    is_token[separators] = False
    stream[is_token] = np.fromiter(itertools.chain.from_iterable(token_docs), dtype=np.int64,
                                   count=int(lengths.sum()))
    blocks = block_index(lengths, seq_len - 2, "full_sentences")
    samples = np.full((len(blocks), seq_len), specials["pad"], dtype=np.int64)
    samples[:, 0] = specials["bos"]
    for row, (start, length) in enumerate(blocks.tolist()):
        samples[row, 1 : 1 + length] = stream[start : start + length]
        samples[row, 1 + length] = specials["eos"]
    return samples


def masked_text_batches(samples: np.ndarray, tokenizer: Tokenizer, batch_size: int, mask_seed: int,
                        whole_word: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The packed samples in batches of `batch_size`, masked as training masks (`MaskingConfig`'s
    recipe, whole words with `whole_word`): sample i with the random stream of (mask_seed, 0, i)."""
    masking = MaskingConfig(whole_word=whole_word)
    specials = special_ids(tokenizer)
    word_start = word_start_table(tokenizer) if whole_word else None
    collate = MaskingCollator(Masker(masking, tokenizer.get_vocab_size(), specials, word_start), mask_seed,
                              specials["pad"])
    for start in range(0, len(samples), batch_size):
        rows = range(start, min(start + batch_size, len(samples)))
        yield to_torch(collate([(samples[i], 0, i) for i in rows]))


def read_text(text: str, max_documents: int = 0, join_lines: bool = False) -> list[str]:
    """The documents of `text` (a file or glob, as `data_prep.io.expand_inputs` takes it), the first
    `max_documents` when > 0; InputError naming `text` when there are none."""
    paths = expand_inputs(text)
    stats = ReadStats()
    docs = list(itertools.islice(iter_documents(paths, stats, join_lines=join_lines), max_documents or None))
    if not docs:
        raise InputError(f"text={text}: holds no documents ({len(paths)} files, {stats.skipped_empty} empty "
                         f"documents skipped)")
    return docs


def evaluate_text(model_path: str | Path, text: str, seq_len: int | None = None, mask_seed: int = 0,
                  whole_word: bool = False, max_documents: int = 0, join_lines: bool = False,
                  tokenizer: str | Path | None = None, batch_size: int = 16, device: str = "cpu",
                  verify: bool = True) -> dict:
    """Evaluate a checkpoint or HF directory on the documents of `text`; returns the summary (see the
    module docstring). ConfigError naming the key for a `seq_len` beyond the model's positions."""
    model, tok, default_len, resolved = load_text_model(model_path, tokenizer, verify)
    seq_len = default_len if seq_len is None else seq_len
    if not 3 <= seq_len <= model.config.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} must be within [3, {model.config.max_seq_len}] (the model's "
                          f"positions)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda, but torch sees no CUDA device (device=cpu or auto)")
    docs = read_text(text, max_documents, join_lines)
    encodings = document_encoder(tok).encode_batch_fast(docs, add_special_tokens=False)
    token_docs = [e.ids for e in encodings]
    samples = pack_documents(token_docs, seq_len, special_ids(tok))
    torch_device = distributed.select_device(distributed.detect({}), device)
    model = model.to(torch_device)

    def forward(batch: dict[str, torch.Tensor]) -> MaskedLMOutput:
        return model(batch["input_ids"], batch["attention_mask"], batch["labels"], reduction="sum")

    metrics = evaluate(forward, masked_text_batches(samples, tok, batch_size, mask_seed, whole_word),
                       torch_device, top_k=TOP_K)
    return {"model": str(resolved), "text": text, "documents": len(docs), "sequences": len(samples),
            "tokens": sum(map(len, token_docs)), "masked_tokens": metrics["tokens"], "loss": metrics["loss"],
            "ppl": metrics["ppl"], "top1_accuracy": metrics["accuracy"],
            "top5_accuracy": metrics[f"top{TOP_K}_accuracy"], "whole_word": whole_word,
            "join_lines": join_lines, "mask_seed": mask_seed, "seq_len": seq_len}


TEXT_KEYS = ("seq_len", "mask_seed", "whole_word", "max_documents", "join_lines", "tokenizer", "batch_size",
             "device")
"""The settings of the text mode (refused without text=)."""


@dataclass
class EvaluateArgs:
    """The settings of `python -m pretrain.evaluate` (conf/commands/evaluate.yaml)."""

    checkpoint: str = MISSING
    """A step_* dir, a run dir, its checkpoints/ dir or its latest file; with text=, an HF directory too."""
    output: Optional[str] = None
    """Where to write the JSON summary; null: <checkpoint>/eval.json (text=: <model>/eval_text.json)."""
    verify: bool = True
    """Check every checkpoint file's sha256 against its checkpoint.json first (false: sizes only, warned)."""
    data: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the run's `data.*` settings (`+data.valid_max_batches=0`); not with text=."""
    system: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the run's `system.*` settings (`+system.device=cuda`); not with text=."""
    text: Optional[str] = None
    """Evaluate on this text instead of the run's valid split: a .txt / .jsonl file (optionally .gz) or a
    glob, read as build_corpus reads its input (the settings marked text= apply to it)."""
    seq_len: Optional[int] = None
    """text=: tokens per packed sequence, <s> and </s> included; null: the run's data.seq_len (a
    checkpoint) or the model's maximum (an HF dir)."""
    mask_seed: int = 0
    """text=: seed of the fixed masks (15% of the tokens, 80/10/10, as in training): same seed, same
    numbers."""
    whole_word: bool = False
    """text=: mask whole words (a Ġ-token and its continuations), as data.masking.whole_word does."""
    max_documents: int = 0
    """text=: evaluate on the first max_documents documents (0: all)."""
    join_lines: bool = False
    """text=: join each .txt document's wrapped lines into one, as build_corpus join_lines=true does."""
    tokenizer: Optional[str] = None
    """text=: tokenizer directory; null: the HF dir's own, or the run's data.tokenizer."""
    batch_size: int = 16
    """text=: sequences per forward (no effect on the masks)."""
    device: str = "cpu"
    """text=: cpu, cuda or auto."""

    def __post_init__(self) -> None:
        text_keys = [f for f in dataclasses.fields(self) if f.name in TEXT_KEYS]
        if self.text is None:
            given = [f.name for f in text_keys if getattr(self, f.name) != f.default]
            if given:
                raise ValueError(f"{', '.join(given)}: settings of the text mode; give text=<file> too "
                                 f"(the valid split takes +data.* / +system.* overrides)")
            return
        for group in ("data", "system"):
            if getattr(self, group):
                raise ValueError(f"+{group}.*: overrides of the run's config, for its valid split; with "
                                 f"text= use seq_len=, batch_size=, device=")
        try:
            expand_inputs(self.text)
        except InputError as e:
            raise ValueError(f"text: {e}") from None
        if self.seq_len is not None and self.seq_len < 3:
            raise ValueError(f"seq_len={self.seq_len} must be >= 3 (<s>, a token, </s>)")
        for key in ("mask_seed", "max_documents"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} must be one of {list(DEVICES)}")

    def overrides(self) -> list[str]:
        """The run-config overrides as `key=value` words."""
        return [f"{group}.{key}={json.dumps(value)}"  # JSON values are YAML values
                for group in ("data", "system") for key, value in getattr(self, group).items()]


@command("evaluate", EvaluateArgs, refused=(CheckpointError, ConfigError, CorpusError))
def main(args: EvaluateArgs) -> int:
    if args.text is not None:
        summary = evaluate_text(args.checkpoint, args.text, args.seq_len, args.mask_seed, args.whole_word,
                                args.max_documents, args.join_lines, args.tokenizer, args.batch_size,
                                args.device, args.verify)
        output = Path(args.output) if args.output else Path(summary["model"]) / TEXT_EVAL_JSON
    else:
        summary = evaluate_checkpoint(args.checkpoint, args.overrides(), args.verify)
        output = Path(args.output) if args.output else Path(summary["checkpoint"]) / EVAL_JSON
    output.write_text(json.dumps(summary, indent=1) + "\n")
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    main()
