"""On-disk format of a token corpus: one `.bin` + `.idx` pair per shard, and one `manifest.json`.

`<name>.bin`  the token ids of the shard's documents, back to back, little-endian uint16 (vocabularies
              up to 65,536 ids) or uint32; no separators (document boundaries live in the `.idx`).
`<name>.idx`  a 24-byte header, then `num_docs + 1` little-endian uint64 token offsets into the `.bin`
              (offsets[0] == 0, offsets[-1] == tokens in the `.bin`):

                  magic      8 bytes  b"RBTIDX\\x00\\x00"
                  version    uint32   FORMAT_VERSION
                  itemsize   uint8    2 (uint16 tokens) or 4 (uint32 tokens)
                  reserved   3 bytes  zero
                  num_docs   uint64

`manifest.json` format version, tokenizer hash, vocab size, dtype, and per split the list of shards
              with documents, tokens and the sha256 of both files (see `data_prep.corpus`).

This module is the only place that knows the byte layout; writers and readers both go through it.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from core.hashing import file_sha256

FORMAT_VERSION = 1
IDX_MAGIC = b"RBTIDX\x00\x00"
_HEADER = struct.Struct("<8sIB3xQ")  # magic, version, itemsize, reserved, num_docs
HEADER_BYTES = _HEADER.size  # 24
OFFSET_DTYPE = np.dtype("<u8")


class CorpusError(ValueError):
    """A corpus file is missing, truncated, corrupt or does not match what the caller expects."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    if vocab_size <= 0:
        raise CorpusError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return {2: "uint16", 4: "uint32"}[np.dtype(dtype).itemsize]


def dtype_from_name(name: str) -> np.dtype:
    try:
        return {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}[name]
    except KeyError:
        raise CorpusError(f"unknown token dtype {name!r} (expected uint16 or uint32)") from None


def encode_idx_header(itemsize: int, num_docs: int) -> bytes:
    return _HEADER.pack(IDX_MAGIC, FORMAT_VERSION, itemsize, num_docs)


def idx_header(path: str | os.PathLike, expected_itemsize: int | None = None) -> int:
    """Validate an `.idx` file's header, size, first and last offsets (a few bytes read, nothing
    mapped); return its number of documents. Raises CorpusError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: missing index file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise CorpusError(f"{path}: truncated index file ({size} bytes, header needs {HEADER_BYTES})")
    with open(path, "rb") as f:
        magic, version, itemsize, num_docs = _HEADER.unpack(f.read(HEADER_BYTES))
        if magic != IDX_MAGIC:
            raise CorpusError(f"{path}: bad magic {magic!r} (expected {IDX_MAGIC!r}); not a corpus index")
        if version != FORMAT_VERSION:
            raise CorpusError(f"{path}: format version {version}, this code reads version {FORMAT_VERSION}")
        if itemsize not in (2, 4):
            raise CorpusError(f"{path}: bad token itemsize {itemsize} in header (expected 2 or 4)")
        if expected_itemsize is not None and itemsize != expected_itemsize:
            raise CorpusError(f"{path}: header says {itemsize}-byte tokens, manifest says {expected_itemsize}")
        want = HEADER_BYTES + (num_docs + 1) * OFFSET_DTYPE.itemsize
        if size != want:
            raise CorpusError(f"{path}: {size} bytes, header with {num_docs} documents needs {want} (truncated?)")
        first = int(np.frombuffer(f.read(OFFSET_DTYPE.itemsize), dtype=OFFSET_DTYPE)[0])
    if first != 0:
        raise CorpusError(f"{path}: first offset is {first}, expected 0")
    return int(num_docs)


def idx_num_tokens(path: str | os.PathLike, num_docs: int) -> int:
    """The last offset of an `.idx` (its token count), read without mapping the file."""
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES + num_docs * OFFSET_DTYPE.itemsize)
        return int(np.frombuffer(f.read(OFFSET_DTYPE.itemsize), dtype=OFFSET_DTYPE)[0])


def read_idx(path: str | os.PathLike, expected_itemsize: int | None = None, check_order: bool = True) -> np.ndarray:
    """Validate an `.idx` file's header and size; return its offsets as a read-only memmap.

    Raises CorpusError naming the file on a short file, a wrong magic, version or dtype, a size that
    does not match the header, or offsets that are not non-decreasing from zero (`check_order`: over
    the whole array, which is 8 bytes a document; first and last are always checked).
    """
    path = Path(path)
    num_docs = idx_header(path, expected_itemsize)
    offsets = np.memmap(path, dtype=OFFSET_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_docs + 1,))
    if check_order and num_docs and bool(np.any(np.diff(offsets) < 0)):
        raise CorpusError(f"{path}: document offsets decrease; the index is corrupt")
    return offsets


def check_bin_size(path: str | os.PathLike, dtype: np.dtype, num_tokens: int) -> None:
    """A `.bin` exists and holds `num_tokens` tokens of `dtype` (a stat, nothing read)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: missing token file")
    size = path.stat().st_size
    want = num_tokens * np.dtype(dtype).itemsize
    if size != want:
        raise CorpusError(
            f"{path}: {size} bytes, the index says {num_tokens} tokens = {want} bytes (truncated?)"
        )


def open_bin(path: str | os.PathLike, dtype: np.dtype, num_tokens: int) -> np.ndarray:
    """Memory-map a `.bin`, checking its size against the token count the index gives."""
    path = Path(path)
    check_bin_size(path, dtype, num_tokens)
    if num_tokens == 0:
        return np.zeros((0,), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))


class ShardWriter:
    """Writes one shard: documents appended one at a time (`add`) or a batch at a time (`add_many`,
    the fast path: one check and one write a batch), then `close()`.

    Files are written under temporary names and renamed into place by `close()`, so a shard whose
    `.idx` exists was written completely (a killed writer leaves only `*.tmp` files).
    """

    def __init__(self, directory: str | os.PathLike, name: str, dtype: np.dtype):
        self.directory = Path(directory)
        self.name = name
        self.dtype = np.dtype(dtype)
        self.bin_path = self.directory / f"{name}.bin"
        self.idx_path = self.directory / f"{name}.idx"
        self._bin_tmp = self.bin_path.with_suffix(".bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self._offsets: list[np.ndarray] = [np.zeros(1, dtype=OFFSET_DTYPE)]  # chunks, one per add_many
        self._num_docs = 0
        self._num_tokens = 0

    @property
    def num_docs(self) -> int:
        return self._num_docs

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def add(self, tokens: np.ndarray) -> None:
        """Append one document."""
        arr = np.asarray(tokens).reshape(-1)
        self.add_many(arr, np.array([arr.size], dtype=np.int64))

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append `len(lengths)` documents whose token ids lie back to back in `tokens` (document k is
        the next `lengths[k]` ids). The same bytes as `add` called once per document."""
        arr = np.asarray(tokens)
        lens = np.asarray(lengths)
        if arr.ndim != 1 or lens.ndim != 1:
            raise CorpusError(f"{self.name}: tokens and lengths must be 1-D (got {arr.shape}, {lens.shape})")
        if lens.size == 0:
            if arr.size:
                raise CorpusError(f"{self.name}: {arr.size} tokens given with no document lengths")
            return
        if lens.dtype.kind not in "iu" or (lens.dtype.kind == "i" and int(lens.min()) < 0):
            raise CorpusError(f"{self.name}: document lengths must be non-negative integers")
        ends = np.cumsum(lens, dtype=np.int64)
        if int(ends[-1]) != arr.size:
            raise CorpusError(f"{self.name}: lengths sum to {int(ends[-1])}, but {arr.size} tokens given")
        if arr.size:
            if arr.dtype.kind not in "iu":
                raise CorpusError(f"{self.name}: token ids must be integers, got {arr.dtype}")
            top, bottom = int(arr.max()), int(arr.min())
            if top > np.iinfo(self.dtype).max or bottom < 0:
                bad = top if top > np.iinfo(self.dtype).max else bottom
                raise CorpusError(f"{self.name}: token id {bad} does not fit {dtype_name(self.dtype)}")
            self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).data)
        self._offsets.append((ends + self._num_tokens).astype(OFFSET_DTYPE))
        self._num_docs += lens.size
        self._num_tokens += arr.size

    def close(self) -> dict:
        """Finish both files; return the shard's manifest entry."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        idx_tmp = self.idx_path.with_suffix(".idx.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(encode_idx_header(self.dtype.itemsize, self.num_docs))
            for chunk in self._offsets:
                f.write(chunk.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(idx_tmp, self.idx_path)  # the .idx lands last: its presence means "complete"
        return shard_entry(self.bin_path, self.idx_path, self.num_docs, self.num_tokens)


def shard_entry(bin_path: Path, idx_path: Path, documents: int, tokens: int) -> dict:
    return {
        "bin": bin_path.name,
        "idx": idx_path.name,
        "documents": documents,
        "tokens": tokens,
        "bin_bytes": bin_path.stat().st_size,
        "idx_bytes": idx_path.stat().st_size,
        "bin_sha256": file_sha256(bin_path),
        "idx_sha256": file_sha256(idx_path),
    }
