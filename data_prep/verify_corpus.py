"""Check every file of a corpus against its manifest: the full, uncached check.

    python -m data_prep.verify_corpus path=out/corpus

For every shard of every split: the `.idx` header and size, document and token counts, the recorded
file sizes, the sha256 of both files (never the `.verified.json` cache), and that every token id is
below the vocab size. Exits 0 with a summary, or 2 with `error: <file>: <problem>`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import MISSING

from core.cli import command
from data_prep.corpus import Corpus, check_shard_hashes, load_manifest
from data_prep.shards import CorpusError, read_idx

_CHUNK = 1 << 24  # tokens scanned at a time for the id range check


@dataclass
class VerifyCorpusArgs:
    """The settings of `python -m data_prep.verify_corpus` (conf/commands/verify_corpus.yaml)."""

    path: str = MISSING
    """Corpus directory (with manifest.json)."""


def verify_corpus(path: str | Path) -> dict:
    """Raise CorpusError naming the first bad file; return {split: {documents, tokens, shards}}."""
    root = Path(path)
    manifest = load_manifest(root)
    vocab_size = manifest["vocab_size"]
    summary = {}
    for split, info in manifest["splits"].items():
        entries = info["shards"]
        for entry in entries:
            for kind in ("bin", "idx"):
                fpath = root / entry[kind]
                if not fpath.is_file():
                    raise CorpusError(f"{fpath}: missing")
                if fpath.stat().st_size != entry[f"{kind}_bytes"]:
                    raise CorpusError(
                        f"{fpath}: {fpath.stat().st_size} bytes, the manifest says {entry[f'{kind}_bytes']}"
                    )
        corpus = Corpus.open(root, split, verify_hashes=False)  # headers, sizes, counts
        check_shard_hashes(root, entries, use_cache=False)
        for s, entry in enumerate(entries):  # one shard mapped at a time
            read_idx(root / entry["idx"], corpus.dtype.itemsize)  # offsets in order
            tokens = corpus.shard(s)[0]
            for start in range(0, len(tokens), _CHUNK):
                top = int(np.max(tokens[start : start + _CHUNK]))
                if top >= vocab_size:
                    raise CorpusError(f"{root / entry['bin']}: token id {top} >= vocab_size {vocab_size}")
        if len(corpus) != info["documents"] or corpus.num_tokens != info["tokens"]:
            raise CorpusError(
                f"{root / 'manifest.json'}: split {split!r} totals ({info['documents']} documents, "
                f"{info['tokens']} tokens) do not match its shards ({len(corpus)}, {corpus.num_tokens})"
            )
        summary[split] = {"documents": len(corpus), "tokens": corpus.num_tokens, "shards": len(entries)}
    return summary


@command("verify_corpus", VerifyCorpusArgs, refused=(CorpusError, OSError))
def main(args: VerifyCorpusArgs) -> int:
    summary = verify_corpus(args.path)
    parts = [f"{s}: {v['documents']} documents, {v['tokens']} tokens, {v['shards']} shards"
             for s, v in summary.items()]
    print(f"ok {args.path} ({'; '.join(parts)})")
    return 0


if __name__ == "__main__":
    main()
