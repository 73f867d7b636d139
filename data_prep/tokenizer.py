"""Build, import, save and load the byte-level BPE tokenizer (RoBERTa's: GPT-2 bytes, no prefix space).

Id layout, the same for a trained and an imported vocabulary:
    <s>=0  <pad>=1  </s>=2  <unk>=3  ...the BPE tokens...  <mask>=vocab_size-1

Training (`train_tokenizer`): the trainer learns vocab_size-1 entries (the 4 specials, the 256 byte
symbols, then merges) and `<mask>` is added after them. When the text runs out of pairs occurring
`min_frequency` times before that size, training fails (`TokenizerError`) with the size reached and
the vocab_size to ask for instead: we never pad the vocabulary with unused ids, so `<mask>` is always
the last id and the model's vocab_size equals the tokenizer's.

Import (`import_gpt2`): a published GPT-2/RoBERTa `vocab.json` + `merges.txt`.
  - If the vocabulary already has RoBERTa's layout (the 4 specials at 0-3 and `<mask>` last), the ids
    are kept as they are.
  - Otherwise (GPT-2's own files) the specials take ids 0-3, every GPT-2 token is shifted by 4, and
    `<mask>` comes last: GPT-2's 50,257 tokens give vocab_size 50,262. (RoBERTa's published vocabulary
    is GPT-2's permuted by fairseq's dictionary order; that permutation needs the corpus counts, so we
    use the plain shift.) GPT-2's `<|endoftext|>` stays an ordinary token.

A tokenizer directory holds `tokenizer.json` (the source of truth; its sha256 is `tokenizer_hash`),
`vocab.json` + `merges.txt` (GPT-2 format, `<mask>` included in vocab.json as in RoBERTa's) and the
HF files `tokenizer_config.json` + `special_tokens_map.json`, so that
`transformers.AutoTokenizer.from_pretrained(dir)` gives a RoBERTa tokenizer with these ids.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from core.tokenizer import (
    BOS,
    EOS,
    MASK,
    MODEL_MAX_LENGTH,
    NUM_LEADING_SPECIALS,
    PAD,
    SPECIALS,
    TOKENIZER_JSON,
    UNK,
    TokenizerError,
    special_ids,
)


def _assemble(bpe: models.BPE) -> Tokenizer:
    """Wrap a byte-level BPE model with RoBERTa's pre-tokenizer, decoder and post-processor."""
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        (EOS, 2), (BOS, 0), trim_offsets=True, add_prefix_space=False
    )
    return tok


def _finish(tok: Tokenizer, vocab_size: int) -> Tokenizer:
    """Mark the 4 leading specials, append `<mask>` at vocab_size-1, and check the layout."""
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_special_tokens([AddedToken(MASK, special=True, lstrip=True, normalized=False)])
    special_ids(tok)  # raises if the layout came out wrong
    if tok.get_vocab_size() != vocab_size:
        raise TokenizerError(f"built {tok.get_vocab_size()} ids, expected {vocab_size}")
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of exactly `vocab_size` ids on a stream of documents."""
    if vocab_size < NUM_LEADING_SPECIALS + 256 + 1:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: it needs at least 4 + 256 + 1 = 261")
    tok = _assemble(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    reached = tok.get_vocab_size()
    if reached != vocab_size - 1:
        raise TokenizerError(
            f"the text ran out of pairs seen at least min_frequency={min_frequency} times: the trainer "
            f"stopped at {reached} of the {vocab_size - 1} BPE entries asked for. Use more text, a lower "
            f"min_frequency, or vocab_size={reached + 1} (which puts <mask> at {reached})"
        )
    return _finish(tok, vocab_size)


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """GPT-2 `merges.txt` / `vocab.bpe`: drop only a leading `#version` line (real merges such as
    `# #` also begin with '#')."""
    path = Path(path)
    merges = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if n == 1 and line.startswith("#version"):
                continue
            if not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{path}:{n}: a merge is two symbols and one space, got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def import_gpt2(vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a published GPT-2/RoBERTa vocabulary (see the module docstring for ids)."""
    try:
        vocab: dict[str, int] = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{vocab_path}: cannot read a vocabulary ({e})") from None
    merges = read_merges(merges_path)
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise TokenizerError(f"{vocab_path}: ids are not 0..{len(ids) - 1} without gaps")
    leading = all(vocab.get(t) == i for i, t in enumerate(SPECIALS))
    roberta_layout = leading and vocab.get(MASK) == len(ids) - 1
    if roberta_layout:
        vocab = {t: i for t, i in vocab.items() if t != MASK}
    else:
        clash = [t for t in SPECIALS + [MASK] if t in vocab]
        if clash:
            raise TokenizerError(f"{vocab_path}: has {clash} but not at RoBERTa's ids (0-3, last)")
        shifted = {t: i + NUM_LEADING_SPECIALS for t, i in vocab.items()}
        vocab = {**{t: i for i, t in enumerate(SPECIALS)}, **shifted}
    tok = _assemble(models.BPE(vocab=vocab, merges=merges))
    return _finish(tok, len(vocab) + 1)


def save_tokenizer(tok: Tokenizer, output_dir: str | os.PathLike) -> Path:
    """Write tokenizer.json, vocab.json + merges.txt and the HF config files; return the directory."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    special_ids(tok)
    tok.save(str(out / TOKENIZER_JSON))
    spec = json.loads((out / TOKENIZER_JSON).read_text(encoding="utf-8"))
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (out / "vocab.json").write_text(json.dumps(by_id, ensure_ascii=False) + "\n", encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    names = {
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "sep_token": EOS,
        "cls_token": BOS, "pad_token": PAD, "mask_token": MASK,
    }
    config = {
        "tokenizer_class": "RobertaTokenizer",
        **names,
        "add_prefix_space": False,
        "trim_offsets": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {
        **names,
        "mask_token": {
            "content": MASK, "lstrip": True, "rstrip": False, "normalized": False, "single_word": False,
        },
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out
