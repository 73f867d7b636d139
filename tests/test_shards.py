"""ShardWriter: the batched `add_many` writes the same bytes as `add` a document at a time."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep.shards import CorpusError, ShardWriter, open_bin, read_idx, token_dtype


def write_one_by_one(root: Path, docs: list[np.ndarray], dtype: np.dtype) -> dict:
    writer = ShardWriter(root, "one", dtype)
    for doc in docs:
        writer.add(doc)
    return writer.close()


@pytest.mark.parametrize("vocab_size", [300, 70_000])  # uint16 and uint32 tokens
def test_add_many_equals_repeated_add_byte_for_byte(tmp_path, vocab_size):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, size=500)
    lengths[[0, 7, 8, 499]] = 0  # empty documents first, in a row, and last
    docs = [rng.integers(0, vocab_size, size=n, dtype=np.int64) for n in lengths]
    dtype = token_dtype(vocab_size)
    one = write_one_by_one(tmp_path, docs, dtype)
    writer = ShardWriter(tmp_path, "many", dtype)
    for lo, hi in [(0, 1), (1, 1), (1, 250), (250, 499), (499, 500)]:  # uneven batches, one of none
        writer.add_many(np.concatenate([np.zeros(0, np.int64), *docs[lo:hi]]), lengths[lo:hi])
    many = writer.close()
    for ext in ("bin", "idx"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"many.{ext}").read_bytes()
    assert {k: v for k, v in one.items() if k not in ("bin", "idx")} == {
        k: v for k, v in many.items() if k not in ("bin", "idx")
    }
    assert many["documents"] == 500 and many["tokens"] == int(lengths.sum())
    offsets = read_idx(tmp_path / "many.idx", dtype.itemsize)
    tokens = open_bin(tmp_path / "many.bin", dtype, int(offsets[-1]))
    assert [tokens[offsets[k] : offsets[k + 1]].tolist() for k in (0, 1, 9, 498)] == [
        docs[k].tolist() for k in (0, 1, 9, 498)
    ]


def test_add_many_refuses_bad_batches(tmp_path):
    writer = ShardWriter(tmp_path, "bad", token_dtype(300))
    with pytest.raises(CorpusError, match=r"bad: token id 70000 does not fit uint16"):
        writer.add_many(np.array([1, 70_000, 2]), np.array([2, 1]))
    with pytest.raises(CorpusError, match=r"bad: token id -1 does not fit uint16"):
        writer.add_many(np.array([1, -1]), np.array([2]))
    with pytest.raises(CorpusError, match=r"lengths sum to 4, but 3 tokens given"):
        writer.add_many(np.array([1, 2, 3]), np.array([2, 2]))
    with pytest.raises(CorpusError, match=r"lengths must be non-negative"):
        writer.add_many(np.array([1, 2, 3]), np.array([4, -1]))
    with pytest.raises(CorpusError, match=r"3 tokens given with no document lengths"):
        writer.add_many(np.array([1, 2, 3]), np.array([], dtype=np.int64))
    with pytest.raises(CorpusError, match=r"must be 1-D"):
        writer.add_many(np.array([[1, 2]]), np.array([2]))
    # nothing of the refused batches was written
    assert writer.num_docs == 0 and writer.close()["bin_bytes"] == 0
