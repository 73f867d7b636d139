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
                        "--workers", "1", "--dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout.strip().splitlines()[-1])["runs"]
    assert [(x["packing"], x["start"]) for x in runs] == [
        (p, s) for p in ("full_sentences", "doc_sentences") for s in ("first", "reopen")]
    assert all(x["index_s"] > 0 for x in runs[::2]) and all(x["index_s"] == 0 for x in runs[1::2])
    r = subprocess.run([sys.executable, "-m", "bench.prep_scale", "--files", "30"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    (result,) = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["files"] == 30 and result["build_dir_files"] == 7 and result["train_start_fds"] > 0




_OPEN_DATA = r"""
import json, sys
import torch
from hydra import compose, initialize_config_dir
import data_prep.corpus
import pretrain.data
from core.tokenizer import tokenizer_hash
from data_prep.shards import CorpusError
from pretrain import distributed
from pretrain.config import CONF_DIR, to_run_config
from pretrain.train import open_data

counts = {"hashed": 0, "indexed": 0}
sha, write_index = data_prep.corpus.file_sha256, pretrain.data._write_index
def counted_sha(path):
    counts["hashed"] += 1
    return sha(path)
def counted_index(*args):
    counts["indexed"] += 1
    return write_index(*args)
data_prep.corpus.file_sha256, pretrain.data._write_index = counted_sha, counted_index
env = distributed.detect()
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("pretrain", overrides=sys.argv[1:])
run = to_run_config(cfg, env.world_size)
distributed.init(env, torch.device("cpu"), 120, use_deepspeed=False)
try:
    loader, valid = open_data(run, env, tokenizer_hash(run.data.tokenizer))
    code, error = 0, None
except CorpusError as e:
    code, error = 2, str(e)
print(json.dumps({"rank": env.rank, "error": error, **counts}), flush=True)
distributed.shutdown(wait=True)
sys.exit(code)
"""


def test_rank_zero_verifies_and_indexes_first_and_a_damaged_corpus_is_refused_on_every_rank(
        tmp_path, jargon_corpus, jargon_tokenizer):
    """`pretrain.train.open_data` on 2 ranks (gloo): rank 0 hashes the corpus and writes the block index;
    rank 1 then hashes nothing and writes nothing (`.verified.json`, `cache/`). A damaged shard is refused
    (exit 2) on both ranks: rank 0 names the file, rank 1 gets rank 0's error instead of waiting."""
    import os
    import shutil
    import socket

    good = Path(shutil.copytree(jargon_corpus, tmp_path / "good", ignore=shutil.ignore_patterns(".verified.json", "cache")))
    bad = Path(shutil.copytree(good, tmp_path / "bad"))
    shard = bad / "train-00000-00000.bin"
    data = bytearray(shard.read_bytes())
    data[1001] ^= 1
    shard.write_bytes(bytes(data))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}

    def open_on_two_ranks(corpus: Path) -> tuple[int, dict[int, dict]]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        overrides = [f"data.corpus={corpus}", f"data.tokenizer={jargon_tokenizer}", f"trainer.output_dir={tmp_path}/run",
                     "data.seq_len=32", "schedule.global_batch_size=4", "system.micro_batch_size=2",
                     "system.num_workers=0", "wandb.enabled=false"]
        script = tmp_path / "open_data.py"
        script.write_text(_OPEN_DATA)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(port), str(script), *overrides],
                           cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        assert len(lines) == 2, r.stdout[-3000:] + r.stderr[-3000:]
        return r.returncode, {x["rank"]: x for x in lines}

    code, ranks = open_on_two_ranks(good)
    assert code == 0 and ranks[0]["error"] is None and ranks[1]["error"] is None, ranks
    assert ranks[0]["hashed"] == 2 * len(list(good.glob("*.bin"))) and ranks[0]["indexed"] == 2  # train, valid
    assert ranks[1]["hashed"] == 0 and ranks[1]["indexed"] == 0
    code, ranks = open_on_two_ranks(bad)
    assert code != 0 and set(ranks) == {0, 1}, ranks
    assert ranks[0]["error"].startswith(f"{shard}: sha256")
    assert ranks[1]["error"].startswith("rank 0 failed while verifying the corpus") and str(shard) in ranks[1]["error"]
