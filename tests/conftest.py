"""Shared pytest fixtures.

Data fixtures (built once per test session, from the bundled Jargon File, through the real builders):
  jargon_path       data/jargon.txt.gz
  jargon_tokenizer  a tokenizer directory trained on it, vocab_size 8192 (<mask> = 8191)
  jargon_corpus     a corpus directory built from it with that tokenizer, valid_fraction 0.02
                    (~11.6K train and ~230 valid documents, ~0.4M tokens, one shard per split)
Treat the session fixtures as read-only: copy them (shutil.copytree) before changing anything.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JARGON = REPO / "data" / "jargon.txt.gz"
JARGON_VOCAB_SIZE = 8192
JARGON_VALID_FRACTION = 0.02

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")


# ---------------------------------------------------------------- data_prep fixtures

@pytest.fixture(scope="session")
def jargon_path() -> Path:
    return JARGON


@pytest.fixture(scope="session")
def jargon_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer directory (tokenizer.json, vocab.json, merges.txt, HF files), vocab 8192."""
    from data_prep.build_tokenizer import BuildTokenizerArgs, build_tokenizer

    out = tmp_path_factory.mktemp("jargon_tokenizer")
    build_tokenizer(
        BuildTokenizerArgs(
            output_dir=str(out), input=str(JARGON), vocab_size=JARGON_VOCAB_SIZE, progress=False
        )
    )
    return out


@pytest.fixture(scope="session")
def jargon_corpus(tmp_path_factory: pytest.TempPathFactory, jargon_tokenizer: Path) -> Path:
    """A corpus directory (manifest.json, train and valid shards) of the Jargon File."""
    from data_prep.build_corpus import BuildCorpusArgs, build_corpus

    out = tmp_path_factory.mktemp("jargon_corpus")
    build_corpus(
        BuildCorpusArgs(
            output_dir=str(out), input=str(JARGON), tokenizer=str(jargon_tokenizer),
            valid_fraction=JARGON_VALID_FRACTION, progress=False,
        )
    )
    return out
