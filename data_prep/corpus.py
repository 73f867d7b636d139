"""Read a token corpus written by `data_prep.build_corpus`: the API the rest of the project uses.

    corpus = Corpus.open("data/corpus", split="train", expect_tokenizer_hash=h, expect_vocab_size=50265)
    len(corpus)          # documents
    corpus[i]            # token ids of document i: a read-only numpy memmap view, no copy
    corpus.doc_lengths   # tokens per document (from the .idx files alone; no token is read)
    corpus.num_tokens
    corpus.manifest      # the parsed manifest.json

`Corpus.open` checks every shard's header and sizes against the manifest (cheap), and the sha256 of
every file the first time a given set of files is opened (the result is remembered in
`.verified.json` beside the manifest, keyed by each file's size and mtime, so later opens of a large
corpus are instant). A mismatch raises `CorpusError` naming the file and the problem.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.hashing import file_sha256
from core.tokenizer import check_built_with
from data_prep.shards import (
    FORMAT_VERSION,
    CorpusError,
    dtype_from_name,
    dtype_name,
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
            cache[key] = {"stamp": stamp, "sha256": digest}
            changed = True
    if use_cache and changed:
        try:
            tmp = cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a read-only corpus is fine: we verify again next time


@dataclass
class _Shard:
    tokens: np.ndarray  # memmap of the .bin
    offsets: np.ndarray  # memmap of the .idx offsets (num_docs + 1)


class Corpus:
    """The documents of one split of a corpus, as memory-mapped token arrays."""

    def __init__(self, path: Path, split: str, manifest: dict, shards: list[_Shard]):
        self.path = path
        self.split = split
        self.manifest = manifest
        self.dtype = dtype_from_name(manifest["dtype"])
        self.vocab_size: int = manifest["vocab_size"]
        self.tokenizer_hash: str = manifest["tokenizer_hash"]
        self._shards = shards
        counts = np.array([len(s.offsets) - 1 for s in shards], dtype=np.int64)
        self._doc_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.doc_lengths = (
            np.concatenate([np.diff(s.offsets).astype(np.int64) for s in shards])
            if shards
            else np.zeros((0,), dtype=np.int64)
        )
        self.num_tokens = int(self.doc_lengths.sum())

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
        shards = []
        for entry in entries:
            offsets = read_idx(path / entry["idx"], expected_itemsize=dtype.itemsize)
            if len(offsets) - 1 != entry["documents"]:
                raise CorpusError(
                    f"{path / entry['idx']}: {len(offsets) - 1} documents, manifest says {entry['documents']}"
                )
            if int(offsets[-1]) != entry["tokens"]:
                raise CorpusError(
                    f"{path / entry['idx']}: {int(offsets[-1])} tokens, manifest says {entry['tokens']}"
                )
            tokens = open_bin(path / entry["bin"], dtype, entry["tokens"])
            shards.append(_Shard(tokens, offsets))
        if verify_hashes:
            check_shard_hashes(path, entries)
        return cls(path, split, manifest, shards)

    def __len__(self) -> int:
        return int(self._doc_starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range for a corpus of {n} documents")
        s = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        shard = self._shards[s]
        j = i - int(self._doc_starts[s])
        return shard.tokens[int(shard.offsets[j]) : int(shard.offsets[j + 1])]

    def shard_arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens, offsets) memmaps of each shard, in order: for readers that index by token."""
        return [(s.tokens, s.offsets) for s in self._shards]

    def __repr__(self) -> str:
        return (
            f"Corpus({str(self.path)!r}, split={self.split!r}, documents={len(self)}, "
            f"tokens={self.num_tokens}, vocab_size={self.vocab_size})"
        )
