"""Train (or import) the byte-level BPE tokenizer and write a tokenizer directory.

    python -m data_prep.build_tokenizer input=data/jargon.txt.gz output_dir=out/tok vocab_size=8192
    python -m data_prep.build_tokenizer vocab=encoder.json merges=vocab.bpe output_dir=out/gpt2

Training streams the documents (see data_prep.io) into the trainer; `max_bytes` trains on the first
max_bytes of documents, a deterministic sample. Ids and file layout: see data_prep.tokenizer.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from core.cli import parse_args, run, setting
from core.tokenizer import TokenizerError, tokenizer_hash
from data_prep.io import InputError, Progress, ReadStats, expand_inputs, iter_documents
from data_prep.tokenizer import import_gpt2, save_tokenizer, train_tokenizer


@dataclass
class BuildTokenizerArgs:
    output_dir: str = setting(help="directory to write tokenizer.json, vocab.json, merges.txt, HF files")
    input: str = setting("", "training text: files or globs, comma-separated (.txt/.jsonl[.gz])")
    vocab_size: int = setting(50265, "ids in all, <mask> = vocab_size-1")
    min_frequency: int = setting(2, "a pair is merged only if seen this often")
    max_bytes: int = setting(0, "train on the first max_bytes of documents (0: all)")
    vocab: str = setting("", "import: a GPT-2/RoBERTa vocab.json (with merges=)")
    merges: str = setting("", "import: the matching merges.txt / vocab.bpe")
    progress: bool = setting(True, "show a progress bar while reading")

    def __post_init__(self) -> None:
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
                iter_documents(paths, stats, max_bytes=args.max_bytes, progress=bar),
                args.vocab_size, args.min_frequency,
            )
        finally:
            bar.close()
        summary = {"input_files": len(paths), **stats.as_dict()}
    out = save_tokenizer(tok, args.output_dir)
    summary.update(
        vocab_size=tok.get_vocab_size(), output_dir=str(out), tokenizer_hash=tokenizer_hash(out),
        seconds=round(time.perf_counter() - start, 2),
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(BuildTokenizerArgs, argv)
    summary = build_tokenizer(args)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    run(main, (InputError, TokenizerError, OSError))
