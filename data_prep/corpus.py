"""Read a token corpus written by `data_prep.build_corpus`: the API the rest of the project uses.

    corpus = Corpus.open("data/corpus", split="train", expect_tokenizer_hash=h, expect_vocab_size=50265)
    len(corpus)          # documents
    corpus[i]            # token ids of document i: a read-only numpy memmap view, no copy
    corpus.doc_lengths   # tokens per document (from the .idx files alone; no token is read)
    corpus.num_tokens
    corpus.manifest      # the parsed manifest.json

`Corpus.open` checks every shard's header and sizes against the manifest (cheap: a few bytes a file),
and the sha256 of every file the first time a given set of files is opened (the result is remembered
in `.verified.json` beside the manifest, keyed by each file's size and mtime, so later opens of a large
corpus are instant; a hashed `.idx` is also checked for decreasing offsets). A mismatch raises
`CorpusError` naming the file and the problem.

File descriptors: a memory map holds one open. Shards are mapped lazily, when first read, and at most
`max_mapped_files()` files (min(256, RLIMIT_NOFILE/4)) stay mapped per Corpus; the least recently used
shard is unmapped first. A corpus of 640 shards thus keeps at most 256 descriptors in each trainer
process and loader worker, whatever its size.
"""
from __future__ import annotations

import collections
import json
import os
import resource
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from core.hashing import file_sha256
from core.tokenizer import check_built_with
from data_prep.shards import (
    FORMAT_VERSION,
    CorpusError,
    check_bin_size,
    dtype_from_name,
    dtype_name,
    idx_header,
    idx_num_tokens,
    open_bin,
    read_idx,
    token_dtype,
)

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"


def load_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CorpusError(f"{mpath}: no manifest; is {path} a corpus built by data_prep.build_corpus?")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{mpath}: not valid JSON ({e})") from None
    for key in ("format_version", "tokenizer_hash", "vocab_size", "dtype", "splits"):
        if key not in manifest:
            raise CorpusError(f"{mpath}: missing key {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CorpusError(
            f"{mpath}: format_version {manifest['format_version']}, this code reads {FORMAT_VERSION}"
        )
    return manifest


def write_manifest(
    path: str | os.PathLike,
    *,
    tokenizer_hash: str,
    vocab_size: int,
    special_tokens: dict[str, int],
    splits: dict[str, list[dict]],
    build: dict | None = None,
) -> dict:
    """Write `manifest.json` atomically from per-split lists of shard entries (`ShardWriter.close()`)."""
    path = Path(path)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer_hash": tokenizer_hash,
        "vocab_size": vocab_size,
        "dtype": dtype_name(token_dtype(vocab_size)),
        "special_tokens": dict(special_tokens),
        "splits": {
            name: {
                "documents": sum(s["documents"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards),
                "shards": shards,
            }
            for name, shards in splits.items()
        },
        "build": build or {},
    }
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / MANIFEST)
    return manifest


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def check_shard_hashes(root: Path, shards: list[dict], use_cache: bool = True) -> None:
    """sha256 of every shard file against the manifest; remembers verified (size, mtime) stamps."""
    cache_path = root / VERIFIED
    cache: dict = {}
    if use_cache and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            cache = {}
    changed = False
    for shard in shards:
        for kind in ("bin", "idx"):
            fpath = root / shard[kind]
            key, stamp = shard[kind], _stamp(fpath)
            if use_cache and cache.get(key) == {"stamp": stamp, "sha256": shard[f"{kind}_sha256"]}:
                continue
            digest = file_sha256(fpath)
            if digest != shard[f"{kind}_sha256"]:
                raise CorpusError(
                    f"{fpath}: sha256 {digest[:16]}… does not match the manifest's "
                    f"{shard[kind + '_sha256'][:16]}… (the file is corrupt or was modified)"
                )
            if kind == "idx":
                read_idx(fpath)  # the offsets in order (the whole file was just read anyway)
            cache[key] = {"stamp": stamp, "sha256": digest}
            changed = True
    if use_cache and changed:
        try:
            tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a read-only corpus is fine: we verify again next time


def max_mapped_files() -> int:
    """How many shard files one Corpus keeps memory-mapped at most: min(256, RLIMIT_NOFILE / 4) (the
    soft limit), at least 2 (one shard's .bin and .idx)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 256 if soft == resource.RLIM_INFINITY else min(256, soft // 4)
    return max(2, limit)


class _Shards(Sequence):
    """The (tokens, offsets) arrays of every shard, mapped as they are read (`Corpus.shard_arrays`)."""

    def __init__(self, corpus: "Corpus"):
        self._corpus = corpus

    def __len__(self) -> int:
        return self._corpus.num_shards

    def __getitem__(self, s):  # type: ignore[override]
        if isinstance(s, slice):
            return [self[i] for i in range(*s.indices(len(self)))]
        return self._corpus.shard(s)


class Corpus:
    """The documents of one split of a corpus, as memory-mapped token arrays (shards mapped lazily,
    a bounded number at a time)."""

    def __init__(self, path: Path, split: str, manifest: dict, entries: list[dict]):
        self.path = path
        self.split = split
        self.manifest = manifest
        self.dtype = dtype_from_name(manifest["dtype"])
        self.vocab_size: int = manifest["vocab_size"]
        self.tokenizer_hash: str = manifest["tokenizer_hash"]
        self._entries = entries
        counts = np.array([e["documents"] for e in entries], dtype=np.int64)
        tokens = np.array([e["tokens"] for e in entries], dtype=np.int64)
        self._doc_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.token_starts = np.concatenate([[0], np.cumsum(tokens)]).astype(np.int64)
        """Global token offset of each shard's first token (and the total at the end)."""
        self.num_tokens = int(self.token_starts[-1])
        self.max_open_shards = max(1, max_mapped_files() // 2)
        self._open: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        split: str = "train",
        expect_tokenizer_hash: str | None = None,
        expect_vocab_size: int | None = None,
        verify_hashes: bool = True,
    ) -> "Corpus":
        path = Path(path)
        manifest = load_manifest(path)
        check_built_with(path / MANIFEST, manifest["vocab_size"], manifest["tokenizer_hash"],
                         expect_vocab_size=expect_vocab_size, expect_hash=expect_tokenizer_hash, error=CorpusError)
        if split not in manifest["splits"]:
            raise CorpusError(f"{path / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})")
        dtype = dtype_from_name(manifest["dtype"])
        entries = manifest["splits"][split]["shards"]
        for entry in entries:  # headers and sizes: a few bytes a file, nothing mapped
            num_docs = idx_header(path / entry["idx"], expected_itemsize=dtype.itemsize)
            if num_docs != entry["documents"]:
                raise CorpusError(
                    f"{path / entry['idx']}: {num_docs} documents, manifest says {entry['documents']}"
                )
            num_tokens = idx_num_tokens(path / entry["idx"], num_docs)
            if num_tokens != entry["tokens"]:
                raise CorpusError(
                    f"{path / entry['idx']}: {num_tokens} tokens, manifest says {entry['tokens']}"
                )
            check_bin_size(path / entry["bin"], dtype, entry["tokens"])
        if verify_hashes:
            check_shard_hashes(path, entries)
        return cls(path, split, manifest, entries)

    @property
    def num_shards(self) -> int:
        return len(self._entries)

    def shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, offsets) of shard `s`: read-only arrays over memory maps, mapped on first use; the
        least recently used shard is unmapped when more than `max_open_shards` are mapped (its file
        descriptors close once no array of it is held any more)."""
        arrays = self._open.get(s)
        if arrays is not None:
            self._open.move_to_end(s)
            return arrays
        entry = self._entries[s]
        offsets = read_idx(self.path / entry["idx"], self.dtype.itemsize, check_order=False)
        tokens = open_bin(self.path / entry["bin"], self.dtype, entry["tokens"])
        # plain ndarray views: the same pages, without np.memmap's per-index overhead
        arrays = (np.asarray(tokens), np.asarray(offsets))
        self._open[s] = arrays
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return arrays

    @cached_property
    def doc_lengths(self) -> np.ndarray:
        """Tokens per document (int64, 8 bytes a document: computed on first use, one shard at a time)."""
        out = np.empty(len(self), dtype=np.int64)
        for s in range(self.num_shards):
            offsets = self.shard(s)[1]
            out[self._doc_starts[s] : self._doc_starts[s + 1]] = np.diff(offsets)
        return out

    def __len__(self) -> int:
        return int(self._doc_starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range for a corpus of {n} documents")
        s = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        tokens, offsets = self.shard(s)
        j = i - int(self._doc_starts[s])
        return tokens[int(offsets[j]) : int(offsets[j + 1])]

    def shard_arrays(self) -> Sequence[tuple[np.ndarray, np.ndarray]]:
        """(tokens, offsets) of each shard, in order, mapped as they are read (a bounded number at a
        time): for readers that index by token."""
        return _Shards(self)

    def __repr__(self) -> str:
        return (
            f"Corpus({str(self.path)!r}, split={self.split!r}, documents={len(self)}, "
            f"tokens={self.num_tokens}, vocab_size={self.vocab_size})"
        )

