"""Every kind of damage to a corpus is caught by verify_corpus AND by Corpus.open, naming the file."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from data_prep.corpus import Corpus, load_manifest, write_manifest
from data_prep.shards import CorpusError, ShardWriter, token_dtype
from data_prep.verify_corpus import verify_corpus

REPO = Path(__file__).resolve().parents[1]
BIN, IDX = "train-00000-00000.bin", "train-00000-00000.idx"


@pytest.fixture
def corpus(tmp_path, jargon_corpus) -> Path:
    """A private copy of the session corpus (without the hash cache) to damage."""
    copy = shutil.copytree(jargon_corpus, tmp_path / "c", ignore=shutil.ignore_patterns(".verified.json"))
    return Path(copy)


def truncate(path: Path, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - nbytes)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated bin": (BIN, lambda c: truncate(c / BIN, 2)),
    "truncated idx": (IDX, lambda c: truncate(c / IDX, 8)),
    "flipped bin byte": (BIN, lambda c: flip(c / BIN, 1001)),
    "flipped idx offset": (IDX, lambda c: flip(c / IDX, 24 + 8 * 500)),
    "wrong magic": (IDX, lambda c: flip(c / IDX, 0)),
    "wrong version": (IDX, lambda c: flip(c / IDX, 8)),
    "wrong itemsize": (IDX, lambda c: flip(c / IDX, 12)),
    "missing bin": (BIN, lambda c: (c / BIN).unlink()),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_caught_by_both_naming_the_file(corpus, kind):
    name, damage = DAMAGE[kind]
    damage(corpus)
    with pytest.raises(CorpusError, match=name.replace(".", r"\.")):
        verify_corpus(corpus)
    with pytest.raises(CorpusError, match=name.replace(".", r"\.")):
        Corpus.open(corpus, "train")


def test_intact_corpus_passes_and_cli_reports(corpus):
    summary = verify_corpus(corpus)
    manifest = load_manifest(corpus)
    assert summary["train"]["tokens"] == manifest["splits"]["train"]["tokens"]
    r = subprocess.run([sys.executable, "-m", "data_prep.verify_corpus", f"path={corpus}"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith("ok ")
    flip(corpus / BIN, 7)
    r = subprocess.run([sys.executable, "-m", "data_prep.verify_corpus", f"path={corpus}"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and BIN in r.stderr and "sha256" in r.stderr


def test_a_cached_open_is_not_fooled_by_verify(corpus):
    """verify_corpus never trusts the hash cache: damage that keeps size and mtime is still caught."""
    Corpus.open(corpus, "train")  # fills .verified.json
    path = corpus / BIN
    st = path.stat()
    flip(path, 2001)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CorpusError, match="sha256"):
        verify_corpus(corpus)


def test_token_id_beyond_the_vocab_is_caught(tmp_path):
    writer = ShardWriter(tmp_path, "train-00000-00000", token_dtype(300))
    writer.add(np.array([5, 6, 299], dtype=np.int64))
    writer.add(np.array([7, 300], dtype=np.int64))  # 300 >= vocab_size
    write_manifest(tmp_path, tokenizer_hash="h", vocab_size=300,
                   special_tokens={"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 299},
                   splits={"train": [writer.close()]})
    with pytest.raises(CorpusError, match=r"train-00000-00000\.bin: token id 300 >= vocab_size 300"):
        verify_corpus(tmp_path)


def test_manifest_sizes_are_checked(corpus):
    mpath = corpus / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["splits"]["valid"]["shards"][0]["bin_bytes"] += 2
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match=r"valid-00000-00000\.bin: \d+ bytes, the manifest says"):
        verify_corpus(corpus)
