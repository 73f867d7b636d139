"""Benchmark of the trainer's start-up on a corpus of 10^8 documents (a benchmark, not a test).

    python -m bench.scale [--docs 100000000] [--shards 64] [--seq-len 512] [--workers 2]

Writes a synthetic corpus in a temporary directory (or --dir): real `.idx` files of --docs documents
(log-normal lengths, median ~400 tokens, like web text) over --shards shards, and sparse `.bin` files
of the right sizes made with `truncate` (they read as zeros, and take no disk). The manifest's sha256 of
the `.bin` files are placeholders, and `.verified.json` is pre-filled with them: hashing is what the
first start of a real corpus does once (sha256 runs ~880 MB/s here), and is not measured.

Then, for each packing, two fresh processes each build a TrainLoader as `pretrain.train` does (Corpus.open,
the block index, 2 loader workers) and take the first batch: the first process writes the block index
cache (and the shared permutation of epoch 0 when it has >= 2^20 blocks), the second finds them. For
each: seconds to the first batch, seconds of the block index, GiB of the index files, peak RSS of the
main process and of the largest loader worker, open file descriptors of the main process after the first
batch. Prints one line per run and a JSON summary at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep.corpus import VERIFIED, write_manifest
from data_prep.shards import HEADER_BYTES, OFFSET_DTYPE, encode_idx_header, token_dtype
from core.hashing import file_sha256

VOCAB = 50265
SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": VOCAB - 1}


def synthetic_corpus(root: Path, docs: int, shards: int, seed: int = 0) -> dict:
    """Real .idx files, sparse .bin files; a manifest and a `.verified.json` that vouches for them."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(VOCAB)
    entries, verified = [], {}
    per = [docs // shards + (s < docs % shards) for s in range(shards)]
    for s, n in enumerate(per):
        name = f"train-{s:05d}-00000"
        lengths = np.clip(rng.lognormal(mean=6.0, sigma=1.0, size=n), 1, 20_000).astype(np.int64)
        idx = root / f"{name}.idx"
        with open(idx, "wb") as f:
            f.write(encode_idx_header(dtype.itemsize, n))
            f.write(np.zeros(1, OFFSET_DTYPE).tobytes())
            f.write(np.cumsum(lengths).astype(OFFSET_DTYPE).tobytes())
        tokens = int(lengths.sum())
        binf = root / f"{name}.bin"
        with open(binf, "wb") as f:
            f.truncate(tokens * dtype.itemsize)  # sparse
        entry = {"bin": binf.name, "idx": idx.name, "documents": n, "tokens": tokens,
                 "bin_bytes": binf.stat().st_size, "idx_bytes": idx.stat().st_size,
                 "bin_sha256": "0" * 64, "idx_sha256": file_sha256(idx)}
        entries.append(entry)
        for kind in ("bin", "idx"):
            st = (root / entry[kind]).stat()
            verified[entry[kind]] = {"stamp": [st.st_size, st.st_mtime_ns], "sha256": entry[f"{kind}_sha256"]}
    write_manifest(root, tokenizer_hash="synthetic", vocab_size=VOCAB, special_tokens=SPECIALS,
                   splits={"train": entries})
    (root / VERIFIED).write_text(json.dumps(verified))
    return {"documents": docs, "tokens": sum(e["tokens"] for e in entries), "shards": shards,
            "idx_gib": sum(e["idx_bytes"] for e in entries) / 2**30,
            "bin_gib_sparse": sum(e["bin_bytes"] for e in entries) / 2**30}


def _child(root: str, packing: str, seq_len: int, workers: int) -> None:
    """One start-up, as the trainer does it; prints a JSON line."""
    import pretrain.data as data
    from data_prep.corpus import Corpus

    t0 = time.perf_counter()
    index_s = [0.0]
    write_index = data._write_index

    def timed(*args, **kw):  # the block index's own seconds
        t = time.perf_counter()
        write_index(*args, **kw)
        index_s[0] += time.perf_counter() - t

    data._write_index = timed
    corpus = Corpus.open(root, "train")
    loader = data.TrainLoader(corpus, seq_len=seq_len, micro_batch_size=8, packing=packing, num_workers=workers)
    it = iter(loader)
    batch = next(it)
    first_batch_s = time.perf_counter() - t0
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1
    assert batch["input_ids"].shape == (8, seq_len)
    loader.close()
    del it
    cache = Path(root) / "cache"
    index_bytes = sum(p.stat().st_size for p in cache.glob(f"*-train-*.npy")
                      if p.name.startswith("separators") or f"-{packing}-{seq_len}-" in p.name)
    kib = 1024  # ru_maxrss is in KiB on Linux
    print(json.dumps({
        "packing": packing, "first_batch_s": round(first_batch_s, 2), "index_s": round(index_s[0], 2),
        "index_gib": round(index_bytes / 2**30, 3), "blocks": len(loader.dataset),
        "main_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 2**30, 3),
        "worker_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 2**30, 3),
        "open_fds": fds,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000_000)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write the corpus (default: a temporary dir)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: root packing
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.seq_len, args.workers)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "corpus"
        t = time.perf_counter()
        info = synthetic_corpus(root, args.docs, args.shards)
        print(f"corpus: {info['documents']:,} documents, {info['tokens']:,} tokens, {info['shards']} shards, "
              f".idx {info['idx_gib']:.2f} GiB, sparse .bin {info['bin_gib_sparse']:.1f} GiB "
              f"(written in {time.perf_counter() - t:.1f} s)", flush=True)
        runs = []
        for packing in ("full_sentences", "doc_sentences"):
            for attempt in ("first", "reopen"):
                cmd = [sys.executable, "-m", "bench.scale", "--child", str(root), packing,
                       "--seq-len", str(args.seq_len), "--workers", str(args.workers)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f"start-up failed ({packing}, {attempt}):\n{r.stderr[-3000:]}")
                run = {"start": attempt, **json.loads(r.stdout.strip().splitlines()[-1])}
                runs.append(run)
                print(f"{packing:14s} {attempt:6s}: first batch {run['first_batch_s']:6.2f} s, index "
                      f"{run['index_s']:6.2f} s ({run['index_gib']:.2f} GiB, {run['blocks']:,} blocks), peak RSS "
                      f"main {run['main_peak_rss_gib']:.2f} GiB, worker {run['worker_peak_rss_gib']:.2f} GiB, "
                      f"{run['open_fds']} fds", flush=True)
        print(json.dumps({"corpus": info, "runs": runs}))


if __name__ == "__main__":
    main()
