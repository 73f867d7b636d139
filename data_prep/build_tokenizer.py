"""Train (or import) the byte-level BPE tokenizer and write a tokenizer directory.

    python -m data_prep.build_tokenizer input=data/jargon.txt.gz output_dir=out/tok vocab_size=8192
    python -m data_prep.build_tokenizer vocab=encoder.json merges=vocab.bpe output_dir=out/gpt2

Training streams the documents (see data_prep.io) into the trainer; `max_bytes` trains on the first
max_bytes of documents, a deterministic sample; `join_lines=true` joins each .txt document's wrapped
lines into one (give the corpus build the same). Ids and file layout: see data_prep.tokenizer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from core.cli import as_list, command
from core.tokenizer import TokenizerError, tokenizer_hash
from data_prep.io import InputError, Progress, ReadStats, expand_inputs, iter_documents
from data_prep.tokenizer import import_gpt2, save_tokenizer, train_tokenizer


@dataclass
class BuildTokenizerArgs:
    """The settings of `python -m data_prep.build_tokenizer` (conf/commands/build_tokenizer.yaml)."""

    output_dir: str = MISSING
    """Directory to write tokenizer.json, vocab.json, merges.txt and the HF files into."""
    input: Any = None
    """Training text: a file or glob, or a list of them (`input=[a.txt,'b/*.jsonl.gz']`); .txt/.jsonl[.gz]."""
    vocab_size: int = 50265
    """Ids in all; `<mask>` = vocab_size-1."""
    min_frequency: int = 2
    """A pair is merged only if seen this often."""
    max_bytes: int = 0
    """Train on the first max_bytes of documents (0: all)."""
    join_lines: bool = False
    """Join the lines of each .txt document into one (a line break and the indentation around it become
    one space: for hard-wrapped text); .jsonl is read as it is. Build the corpus with the same value."""
    vocab: Optional[str] = None
    """Import instead of training: a GPT-2/RoBERTa vocab.json (with merges=)."""
    merges: Optional[str] = None
    """Import: the matching merges.txt / vocab.bpe."""
    progress: bool = True
    """Show a progress bar while reading."""

    def __post_init__(self) -> None:
        if self.input is not None:
            self.input = as_list("input", self.input)
        importing = bool(self.vocab or self.merges)
        if importing and not (self.vocab and self.merges):
            raise ValueError("vocab= and merges= go together")
        if importing == bool(self.input):
            raise ValueError("give either input= (train) or vocab= + merges= (import)")
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes={self.max_bytes}: must be >= 0")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency={self.min_frequency}: must be >= 1")


def build_tokenizer(args: BuildTokenizerArgs) -> dict:
    """Train or import, save to args.output_dir; return a summary (also printed by the CLI)."""
    start = time.perf_counter()
    if args.vocab:
        tok = import_gpt2(args.vocab, args.merges)
        summary: dict = {"imported": [args.vocab, args.merges]}
    else:
        paths = expand_inputs(args.input)
        stats = ReadStats()
        bar = Progress(paths, "reading", enabled=args.progress)
        try:
            tok = train_tokenizer(
                iter_documents(paths, stats, max_bytes=args.max_bytes, progress=bar,
                               join_lines=args.join_lines),
                args.vocab_size, args.min_frequency,
            )
        except TokenizerError:
            if stats.documents:
                raise
        finally:
            bar.close()
        if stats.documents == 0:  # whatever the trainer said: an empty stream trains nothing
            raise InputError(f"the input holds no documents ({len(paths)} files, {stats.skipped_empty} empty "
                             "documents skipped): nothing to train a tokenizer on")
        summary = {"input_files": len(paths), **stats.as_dict()}
    out = save_tokenizer(tok, args.output_dir)
    summary.update(
        vocab_size=tok.get_vocab_size(), output_dir=str(out), tokenizer_hash=tokenizer_hash(out),
        seconds=round(time.perf_counter() - start, 2),
    )
    return summary


@command("build_tokenizer", BuildTokenizerArgs, refused=(InputError, TokenizerError, OSError))
def main(args: BuildTokenizerArgs) -> int:
    summary = build_tokenizer(args)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    main()
