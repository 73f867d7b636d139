"""Benchmark of the training data path: packing + dynamic masking at seq 512, per core.

    python -m bench.loader [--tokens 50000000] [--seq-len 512] [--batch 8] [--repeats 5]

Builds a synthetic corpus of random token ids (document lengths log-normal, median ~400 tokens, like
web text) in a temporary directory, then measures on one core, in one process, the median over repeats
of samples/s (per wall second, and per CPU second of this process) for:

- raw read: a 510-token window copied out of the token memmap at a random place (the floor);
- packing: `PackedBlocks` samples (block index lookup, gather across documents, `</s>`, `<s>`, pad);
- packing + masking: whole micro-batches as a DataLoader worker makes them (collate + `Masker`), with
  token masking and with whole-word masking;
- TrainLoader: the full loader with 2 worker processes, as the trainer sees it (uses every core);

and the time to compute a block index from the lengths of --index-docs documents (no corpus needed).

The corpus is in the page cache after it is written, so this measures CPU cost, not the disk.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep.corpus import Corpus, write_manifest
from data_prep.shards import ShardWriter, token_dtype
from pretrain.data import PackedBlocks, TrainLoader, block_index, epoch_permutation, separator_positions
from pretrain.masking import MaskingConfig

VOCAB = 50265
SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": VOCAB - 1}


def synthetic_corpus(root: Path, num_tokens: int, shard_tokens: int = 20_000_000, seed: int = 0) -> Corpus:
    """Random non-special ids in documents of log-normal length (1 to 20,000 tokens), several shards."""
    rng = np.random.default_rng(seed)
    entries, shard, written, s = [], None, 0, 0
    while written < num_tokens:
        if shard is None:
            shard = ShardWriter(root, f"train-00000-{s:05d}", token_dtype(VOCAB))
        n = int(np.clip(rng.lognormal(mean=6.0, sigma=1.0), 1, 20_000))
        shard.add(rng.integers(4, VOCAB - 1, size=n, dtype=np.uint16))
        written += n
        if shard.num_tokens >= shard_tokens:
            entries.append(shard.close())
            shard, s = None, s + 1
    if shard is not None:
        entries.append(shard.close())
    write_manifest(root, tokenizer_hash="synthetic", vocab_size=VOCAB, special_tokens=SPECIALS,
                   splits={"train": entries})
    return Corpus.open(root, "train")


def rate(fn, samples: int, repeats: int) -> tuple[float, float]:
    """Median samples per wall second and per CPU second (this process) of `fn()`, which makes `samples`.

    On a shared machine the CPU-second figure is the per-core speed; the wall figure includes waiting.
    """
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return samples / statistics.median(wall), samples / statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=50_000_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4000, help="samples per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--index-docs", type=int, default=10_000_000, help="documents for the index timing")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        corpus = synthetic_corpus(Path(tmp), args.tokens)
        print(f"corpus: {corpus.num_tokens:,} tokens, {len(corpus):,} documents, "
              f"{len(corpus.shard_arrays())} shards, built in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        ds = PackedBlocks(corpus, args.seq_len, "full_sentences")
        print(f"block index: {len(ds):,} blocks, computed + cached in {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        PackedBlocks(corpus, args.seq_len, "full_sentences")
        print(f"block index: reopened from cache in {(time.perf_counter() - t) * 1e3:.1f} ms")

        lengths = np.clip(np.random.default_rng(3).lognormal(6.0, 1.0, size=args.index_docs), 1, 20_000)
        for packing in ("full_sentences", "doc_sentences"):
            t = time.perf_counter()
            blocks = block_index(lengths.astype(np.int64), args.seq_len - 2, packing)
            separator_positions(lengths)
            print(f"block index of {args.index_docs:,} documents ({packing}): {len(blocks):,} blocks "
                  f"in {time.perf_counter() - t:.2f} s (from document lengths alone)")

        n, body = args.samples, args.seq_len - 2
        order = epoch_permutation(len(ds), 0, 0)[:n]
        tokens0 = corpus.shard_arrays()[0][0]
        starts = np.random.default_rng(1).integers(0, len(tokens0) - body, size=n)

        def raw() -> None:
            for s in starts:
                np.array(tokens0[s : s + body], dtype=np.int64)

        def packing() -> None:
            for i, b in enumerate(order):
                ds[(0, i, int(b))]

        loader = TrainLoader(corpus, args.seq_len, args.batch, masking=MaskingConfig(), num_workers=0)

        def packing_masking() -> None:
            for i in range(0, n, args.batch):
                loader.collate([ds[(0, i + j, int(order[i + j]))] for j in range(args.batch)])

        # whole words: a synthetic table where 3 ids in 4 start a word (about GPT-2's share of Ġ-tokens)
        word_start = np.random.default_rng(2).random(VOCAB) < 0.75
        whole = TrainLoader(corpus, args.seq_len, args.batch, masking=MaskingConfig(whole_word=True),
                            num_workers=0, word_start=word_start)

        def packing_whole_words() -> None:
            for i in range(0, n, args.batch):
                whole.collate([ds[(0, i + j, int(order[i + j]))] for j in range(args.batch)])

        results = {
            "raw memmap read (510-token window)": rate(raw, n, args.repeats),
            "packing (PackedBlocks)": rate(packing, n, args.repeats),
            "packing + masking + collate": rate(packing_masking, n, args.repeats),
            "packing + whole-word masking + collate": rate(packing_whole_words, n, args.repeats),
        }
        workers = TrainLoader(corpus, args.seq_len, args.batch, num_workers=2, prefetch_factor=4)
        it = iter(workers)
        for _ in range(20):
            next(it)

        def full() -> None:
            for _ in range(n // args.batch):
                next(it)

        name = "TrainLoader, 2 workers (whole machine)"
        results[name] = rate(full, n // args.batch * args.batch, args.repeats)
        del it
        print(f"seq_len {args.seq_len}, micro-batch {args.batch}, median of {args.repeats} x {n} samples "
              f"(samples/s per wall second | per CPU second of the main process):")
        for name, (wall, cpu) in results.items():
            print(f"  {name:42s} {wall:10,.0f} | {cpu:10,.0f}")
        print("  (TrainLoader's CPU figure counts only the main process; its workers do the packing.)")


if __name__ == "__main__":
    main()
