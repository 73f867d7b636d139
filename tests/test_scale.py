"""Start-up at scale: the block index written in bounded memory, a bounded number of shard files
mapped, the shared permutation of a large epoch (bench/scale.py measures the same at 10^8 documents)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.corpus import Corpus, write_manifest
from data_prep.shards import ShardWriter, token_dtype
from pretrain.data import (
    _write_index,
    block_index,
    epoch_permutation,
    load_block_index,
    load_epoch_permutation,
    separator_positions,
)

REPO = Path(__file__).resolve().parents[1]
SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 99}


def write_corpus(root: Path, lengths_per_shard: list[list[int]], seed: int = 0) -> Path:
    """A corpus of random tokens (vocab 100) with these document lengths, shard by shard."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for s, lengths in enumerate(lengths_per_shard):
        writer = ShardWriter(root, f"train-{s:05d}-00000", token_dtype(100))
        lengths = np.asarray(lengths, dtype=np.int64)
        writer.add_many(rng.integers(4, 99, size=int(lengths.sum())), lengths)
        entries.append(writer.close())
    write_manifest(root, tokenizer_hash="h", vocab_size=100, special_tokens=SPECIALS, splits={"train": entries})
    return root


def test_the_index_written_shard_by_shard_equals_the_whole_corpus_arrays(tmp_path):
    rng = np.random.default_rng(0)
    shards = [list(rng.integers(0, 30, size=int(rng.integers(1, 40)))) for _ in range(14)]
    shards[3] = [0, 0, 5, 0]  # empty documents, also at a shard's ends
    shards[7] = [1]
    corpus = Corpus.open(write_corpus(tmp_path / "c", shards), "train")
    lengths = corpus.doc_lengths
    assert len(lengths) == sum(map(len, shards)) and lengths.tolist() == [x for s in shards for x in s]
    for packing in ("full_sentences", "doc_sentences"):
        for seq_len in (3, 7, 32):
            b, sep = tmp_path / f"b-{packing}-{seq_len}.npy", tmp_path / f"s-{packing}-{seq_len}.npy"
            _write_index(corpus, seq_len - 2, packing, b, sep)
            want = block_index(lengths, seq_len - 2, packing)
            assert np.array_equal(np.load(b), want) and np.load(b).dtype == want.dtype, (packing, seq_len)
            assert np.array_equal(np.load(sep), separator_positions(lengths))
            assert not list(tmp_path.glob("*.tmp"))
            blocks, separators = load_block_index(corpus, seq_len, packing)  # the cache files, mapped
            assert isinstance(blocks, np.memmap) and np.array_equal(blocks, want)
            assert np.array_equal(separators, separator_positions(lengths))


_FD_CHILD = r"""
import json, os, resource, sys
import numpy as np
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from data_prep.corpus import Corpus, max_mapped_files
from pretrain.data import PackedBlocks
def fds():
    return len(os.listdir("/proc/self/fd"))
base = fds()
corpus = Corpus.open(sys.argv[1], "train")  # hashes every file
peak = fds()
docs = []
for i in range(len(corpus)):
    docs.append(corpus[i].tolist())
    peak = max(peak, fds())
blocks = PackedBlocks(corpus, 9, "full_sentences")
stream = []
for b in range(len(blocks)):
    stream.extend(blocks.read_block(b).tolist())
    peak = max(peak, fds())
print(json.dumps({"base": base, "peak": peak, "limit": max_mapped_files(), "docs": docs, "stream": stream}))
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc")
def test_many_shards_under_a_low_file_limit(tmp_path):
    """300 shards (600 files) read in full under a soft RLIMIT_NOFILE of 64: at most 64/4 files mapped."""
    shards = [[3, 1, 2]] * 300
    root = write_corpus(tmp_path / "c", shards)
    r = subprocess.run([sys.executable, "-c", _FD_CHILD, str(root), "64"], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["limit"] == 16 and out["peak"] - out["base"] <= 16 + 2, out["peak"] - out["base"]
    corpus = Corpus.open(root, "train")
    assert out["docs"] == [corpus[i].tolist() for i in range(len(corpus))] and len(out["docs"]) == 900
    want = [t for i, d in enumerate(out["docs"]) for t in ([2] if i else []) + d]  # </s> between documents
    assert out["stream"] == want


def test_a_large_epoch_permutation_is_written_once_and_mapped(tmp_path):
    n = 1 << 20
    cache = tmp_path / "cache"
    first = load_epoch_permutation(cache, n, 7, 0)
    assert isinstance(first, np.memmap) and np.array_equal(first, epoch_permutation(n, 7, 0))
    path = cache / f"permutation-{n}-7-0.npy"
    stamp = path.stat().st_mtime_ns
    assert np.array_equal(load_epoch_permutation(cache, n, 7, 0), first) and path.stat().st_mtime_ns == stamp
    load_epoch_permutation(cache, n, 7, 1)
    assert np.array_equal(load_epoch_permutation(cache, n, 7, 2), epoch_permutation(n, 7, 2))
    assert sorted(p.name for p in cache.glob("permutation-*.npy")) == [
        f"permutation-{n}-7-1.npy", f"permutation-{n}-7-2.npy"]  # epoch 0 removed at epoch 2
    small = load_epoch_permutation(cache, 1000, 7, 0)  # small epochs stay in memory
    assert not isinstance(small, np.memmap) and np.array_equal(small, epoch_permutation(1000, 7, 0))


def test_the_scale_benchmarks_run_at_a_tiny_size(tmp_path):
    """bench/scale.py and bench/prep_scale.py end to end, tiny (their figures are in docs/PERFORMANCE.md)."""
    r = subprocess.run([sys.executable, "-m", "bench.scale", "--docs", "3000", "--shards", "3", "--seq-len", "32",
                        "--dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout.strip().splitlines()[-1])["runs"]
    assert [(x["packing"], x["start"]) for x in runs] == [
        (p, s) for p in ("full_sentences", "doc_sentences") for s in ("first", "reopen")]
    assert all(x["index_s"] > 0 for x in runs[::2]) and all(x["index_s"] == 0 for x in runs[1::2])
    r = subprocess.run([sys.executable, "-m", "bench.prep_scale", "--files", "30", "--tasks", "2"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    (result,) = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["files"] == 30 and result["build_dir_files"] == 7 and result["train_start_fds"] > 0
