"""The tokenizer files every stage reads: the special-token layout, loading, and the hash that names
everything built with a tokenizer. Building, importing and saving one: data_prep.tokenizer.

Id layout: <s>=0  <pad>=1  </s>=2  <unk>=3  ...the BPE tokens...  <mask>=vocab_size-1
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from core.hashing import file_sha256

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
SPECIALS = [BOS, PAD, EOS, UNK]  # ids 0..3, in this order
TOKENIZER_JSON = "tokenizer.json"
MODEL_MAX_LENGTH = 512
# the number of specials before the BPE tokens, and the one (<mask>) after them
NUM_LEADING_SPECIALS = len(SPECIALS)


TOKENIZER_FILES = (TOKENIZER_JSON, "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
"""What `data_prep.tokenizer.save_tokenizer` writes and an HF directory needs (export, fine-tuning's best/)."""


class TokenizerError(ValueError):
    """A tokenizer cannot be built as asked, or a tokenizer directory is not one of ours."""


def copy_tokenizer_files(source: str | os.PathLike, directory: str | os.PathLike) -> list[str]:
    """Copy every one of TOKENIZER_FILES from `source` into `directory` (TokenizerError naming the missing
    ones before anything is copied); returns their names."""
    source, directory = Path(source), Path(directory)
    missing = [name for name in TOKENIZER_FILES if not (source / name).is_file()]
    if missing:
        raise TokenizerError(f"{source}: lacks {missing}; rebuild it with python -m data_prep.build_tokenizer")
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, directory / name)
    return list(TOKENIZER_FILES)


def document_encoder(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` for encoding corpus text: the same BPE and ids, but no special-token matching
    and no post-processor, so a document that happens to contain the text "<mask>" or "</s>" is
    encoded as those characters (as fairseq did), never as a special id. decode(encode(s)) == s for
    every string."""
    encoder = Tokenizer(tok.model)  # shares the BPE model: no copy of the vocabulary
    encoder.normalizer = tok.normalizer
    encoder.pre_tokenizer = tok.pre_tokenizer
    encoder.decoder = tok.decoder
    return encoder


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load `<directory>/tokenizer.json`, checking that it has our special-token layout."""
    path = Path(directory) / TOKENIZER_JSON
    if not path.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json; build one with python -m data_prep.build_tokenizer")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise TokenizerError(f"{path}: cannot load ({e})") from None
    special_ids(tok)
    return tok


def tokenizer_hash(directory: str | os.PathLike) -> str:
    """sha256 of the bytes of `<directory>/tokenizer.json`: names everything built with it."""
    path = Path(directory) / TOKENIZER_JSON
    if not path.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json")
    return file_sha256(path)


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """{'bos': 0, 'pad': 1, 'eos': 2, 'unk': 3, 'mask': vocab_size-1}; raises if the layout differs."""
    ids = {key: tok.token_to_id(t) for key, t in zip(("bos", "pad", "eos", "unk", "mask"), SPECIALS + [MASK])}
    want = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": tok.get_vocab_size() - 1}
    if ids != want:
        raise TokenizerError(f"special token ids are {ids}, expected {want}")
    return ids


def check_built_with(where: object, vocab_size: int, tokenizer_hash_: str, *, expect_vocab_size: int | None = None,
                     expect_hash: str | None = None, vocab_key: str = "model.vocab_size",
                     error: type[Exception] = TokenizerError) -> None:
    """The one check that something built with a tokenizer (a corpus manifest: `vocab_size` and
    `tokenizer_hash` recorded at `where`) fits what is expected; raises `error` naming both values."""
    if expect_vocab_size is not None and vocab_size != expect_vocab_size:
        raise error(f"{where}: the corpus has vocab_size={vocab_size}, but {vocab_key}={expect_vocab_size}")
    if expect_hash is not None and tokenizer_hash_ != expect_hash:
        raise error(f"{where}: the corpus was built with tokenizer_hash {tokenizer_hash_}, not {expect_hash} "
                    f"(the tokenizer given): it was made with another tokenizer")
