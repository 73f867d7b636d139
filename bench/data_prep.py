"""Benchmark of the corpus builder against the tokenizer's own limit (a benchmark, not a test).

    python -m bench.data_prep [runs=3] [small=2] [large=8] [workers=[1,2]] [tokenizer=<dir>] [out=<file.json>]

On the same text (the Jargon File's documents repeated `small` and `large` times, as plain .txt):
  raw       `encode_batch_fast` over the large input's documents already in memory, in the builder's
            batch size, with the tokenizers library's own threads: the limit (MB/s of UTF-8 text)
  build_wN  `python -m data_prep.build_corpus workers=N` end to end on the large input (reading,
            hashing, tokenizing, writing, sha256), timed by the build's own summary (interpreter
            start-up excluded; tokenizer loading, worker start and the manifest included), as MB/s
            and as a ratio to raw; `file_ratio` times the input file alone (its record's seconds:
            reading, tokenizing, writing, sha256), the steady state of a long build
  rss       the build's peak RSS (its largest process, from wait4 in a small wrapper) at both input
            sizes: it should stay flat as the input grows
Each figure is the median of `runs` runs. The default tokenizer is GPT-2's vocabulary imported from
tests/assets/gpt2 (50,262 ids, the production size; training one that large needs more text).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from bench.report import report
from core.cli import command
from core.tokenizer import document_encoder, load_tokenizer
from data_prep.build_corpus import BUILD_DIR, BuildCorpusArgs
from data_prep.io import read_documents
from data_prep.tokenizer import import_gpt2, save_tokenizer

REPO = Path(__file__).resolve().parents[1]
JARGON = REPO / "data" / "jargon.txt.gz"
GPT2 = REPO / "tests" / "assets" / "gpt2"


@dataclass
class BenchArgs:
    """The settings of `python -m bench.data_prep` (conf/commands/bench_data_prep.yaml)."""

    runs: int = 3
    """Runs per figure (the median is reported)."""
    small: int = 2
    """Copies of the Jargon File in the small input."""
    large: int = 8
    """Copies of the Jargon File in the large input."""
    tokenizer: str = ""
    """Tokenizer dir (default: GPT-2's vocabulary imported)."""
    shard_tokens: int = 1_000_000
    """Build setting: both inputs span whole shards."""
    paragraphs: int = 1
    """Paragraphs per document (1: the Jargon File's own, ~140 bytes)."""
    workers: List[int] = field(default_factory=lambda: [1, 2])
    """Worker counts to time."""
    out: str = ""
    """Also write the figures to this JSON file."""


def make_input(directory: Path, copies: int, paragraphs: int = 1) -> tuple[Path, list[str]]:
    """The Jargon File's documents `copies` times as one .txt; with `paragraphs` > 1, that many
    consecutive paragraphs make one document (longer documents, like web pages)."""
    paras = list(read_documents(JARGON))
    docs = ["\n".join(paras[i : i + paragraphs]) for i in range(0, len(paras), paragraphs)]
    path = directory / f"jargon_x{copies}.txt"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(copies):
            f.write("\n\n".join(docs) + "\n\n")
    return path, docs * copies


def time_raw(tokenizer_dir: Path, docs: list[str], batch_bytes: int) -> float:
    """Seconds for encode_batch_fast over all docs in builder-sized batches."""
    enc = document_encoder(load_tokenizer(tokenizer_dir))
    batches, batch, size = [], [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= batch_bytes:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    start = time.perf_counter()
    for b in batches:
        enc.encode_batch_fast(b, add_special_tokens=False)
    return time.perf_counter() - start


# Runs a command and prints its peak RSS in KiB. The build is started from this small process, not
# from the benchmark: Linux carries a process's peak RSS across exec, so a child forked from the
# (large) benchmark process would report the benchmark's own memory.
_RSS_WRAPPER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print('peak_rss_kib=%d' % usage.ru_maxrss, flush=True)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def time_build(
    tokenizer_dir: Path, text: Path, out: Path, workers: int, shard_tokens: int
) -> tuple[float, float, int]:
    """For a fresh build: (the build's seconds, the seconds of its one input file, its peak RSS in
    bytes: the largest of its processes)."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-c", _RSS_WRAPPER,
            sys.executable, "-m", "data_prep.build_corpus", f"input={text}", f"tokenizer={tokenizer_dir}",
            f"output_dir={out}", f"workers={workers}", f"shard_tokens={shard_tokens}", "progress=false"]
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"build failed ({r.returncode}): {r.stderr}")
    seconds = float(r.stdout.split("seconds=")[1].split()[0])
    file_seconds = sum(json.loads(r.read_text())["seconds"] for r in (out / BUILD_DIR).glob("unit-*.json"))
    rss = int(r.stdout.split("peak_rss_kib=")[1].split()[0]) * 1024
    return seconds, file_seconds, rss


def bench(args: BenchArgs) -> dict:
    """Interleaved runs (raw, then each build), so that a busy machine slows all figures alike."""
    workers = list(args.workers)
    batch_bytes = BuildCorpusArgs.__dataclass_fields__["batch_bytes"].default
    with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp:
        root = Path(tmp)
        tok_dir = Path(args.tokenizer) if args.tokenizer else save_tokenizer(
            import_gpt2(GPT2 / "encoder.json", GPT2 / "vocab.bpe"), root / "tok")
        small, _ = make_input(root, args.small, args.paragraphs)
        large, large_docs = make_input(root, args.large, args.paragraphs)
        mb = sum(len(d.encode("utf-8")) for d in large_docs) / 1e6
        raw: list[float] = []
        build: dict[tuple[int, int], list[tuple[float, float, int]]] = collections.defaultdict(list)
        for _ in range(args.runs):
            raw.append(time_raw(tok_dir, large_docs, batch_bytes))
            for w in workers:
                for copies, text in ((args.large, large), (args.small, small)):
                    build[w, copies].append(time_build(tok_dir, text, root / "out", w, args.shard_tokens))
        raw_s = statistics.median(raw)
        result: dict = {"tokenizer_vocab": load_tokenizer(tok_dir).get_vocab_size(), "cpus": os.cpu_count(),
                        "runs": args.runs, "input_mb": round(mb, 2), "documents": len(large_docs),
                        "raw_mb_s": round(mb / raw_s, 3)}
        for w in workers:
            runs = build[w, args.large]
            secs = statistics.median(r[0] for r in runs)
            file_secs = statistics.median(r[1] for r in runs)
            result[f"build_w{w}_mb_s"] = round(mb / secs, 3)
            result[f"build_w{w}_ratio_to_raw"] = round(raw_s / secs, 3)
            result[f"build_w{w}_file_ratio_to_raw"] = round(raw_s / file_secs, 3)
            for copies in (args.small, args.large):
                rss = statistics.median(r[2] for r in build[w, copies])
                result[f"build_w{w}_peak_rss_mb_x{copies}"] = round(rss / 2**20, 1)
    return result


@command("bench_data_prep", BenchArgs, refused=(RuntimeError, OSError))
def main(args: BenchArgs) -> int:
    report(bench(args), args.out)
    return 0


if __name__ == "__main__":
    main()
