"""Task examples -> model inputs: RoBERTa's special-token format, truncation, word alignment, batching.

    ids, stats = encode_sequences(tok, texts, pairs, max_length=128)       # <s> a </s></s> b </s>
    rows, stats = encode_words(tok, words, tag_ids, max_length=128)        # labels on first sub-tokens
    batch = collate(ids, pad_id=1, labels=[0, 2, 1])                       # input_ids, attention_mask, labels
    word_predictions(logits[i].argmax(-1).tolist(), rows[i].word_ids, len(words[i]))

Everything goes through a private copy of the tokenizer (`input_encoder`) whose post-processor is always
RoBERTa's (`<s>`/`</s>` from the tokenizer's own ids, offsets trimmed of the byte-level space), whatever the
tokenizer.json holds, so the ids equal HF's `RobertaTokenizer` on the same directory; truncation, pair
encoding and pre-split words are the `tokenizers` library's own (`encode_batch`, `is_pretokenized`).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Encoding, Tokenizer, pre_tokenizers, processors

from core.model import IGNORE_INDEX
from core.tokenizer import BOS, EOS, TokenizerError, special_ids

SequenceLabels = int | float | list[int] | list[float] | None


@dataclass
class Encoded:
    """One model input row: token ids, its labels and, for word tasks, each position's word index."""

    input_ids: list[int]
    labels: SequenceLabels
    word_ids: list[int | None] | None = None


@dataclass
class EncodeStats:
    """How many examples were encoded, and how many of them were cut to max_length."""

    examples: int = 0
    truncated: int = 0


def roberta_processor(tokenizer: Tokenizer, add_prefix_space: bool = False) -> processors.RobertaProcessing:
    """RoBERTa's post-processor with the tokenizer's own `<s>`/`</s>` ids and trimmed offsets."""
    ids = special_ids(tokenizer)
    return processors.RobertaProcessing(
        (EOS, ids["eos"]), (BOS, ids["bos"]), trim_offsets=True, add_prefix_space=add_prefix_space
    )


def input_encoder(tokenizer: Tokenizer, *, add_prefix_space: bool | None = None,
                  post_process: bool = True) -> Tokenizer:
    """A private copy of `tokenizer` (the caller's is never changed) without truncation or padding.

    add_prefix_space: None keeps the pre-tokenizer's setting; True/False sets it (byte-level only).
    post_process: True installs RoBERTa's post-processor (specials + offset trimming), False none at all
    (no specials, untrimmed offsets: for encodings that `Tokenizer.post_process` finishes later).
    """
    encoder = Tokenizer.from_str(tokenizer.to_str())
    encoder.no_truncation()
    encoder.no_padding()
    pre = encoder.pre_tokenizer
    if add_prefix_space is not None:
        if not isinstance(pre, pre_tokenizers.ByteLevel):
            raise TokenizerError(
                f"add_prefix_space needs a ByteLevel pre-tokenizer, not {type(pre).__name__}"
            )
        pre.add_prefix_space = add_prefix_space
    prefix = bool(pre.add_prefix_space) if isinstance(pre, pre_tokenizers.ByteLevel) else False
    encoder.post_processor = roberta_processor(tokenizer, prefix) if post_process else None
    return encoder


def _check_max_length(encoder: Tokenizer, max_length: int, pair: bool) -> None:
    """Refuse a max_length that leaves no room for a single token besides the specials."""
    specials = encoder.num_special_tokens_to_add(pair)
    if max_length <= specials:
        raise ValueError(
            f"max_length={max_length} leaves no room for text besides the {specials} special tokens"
        )


def _count_truncated(encodings: Sequence[Encoding], max_length: int) -> int:
    """How many encodings the tokenizer's truncation cut (it left the rest in `overflowing`)."""
    # only a full-length encoding can have been cut: skip copying the others' overflowing
    return sum(1 for e in encodings if len(e.ids) >= max_length and e.overflowing)


def encode_sequences(tokenizer: Tokenizer, texts: Sequence[str], pairs: Sequence[str] | None,
                     max_length: int) -> tuple[list[list[int]], EncodeStats]:
    """RoBERTa's format: `<s> a </s>` or `<s> a </s></s> b </s>` (as HF's RobertaTokenizer), each at
    most max_length ids; longer inputs are truncated (longest-first for pairs, as HF) and counted in
    stats.truncated."""
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
    encoder = input_encoder(tokenizer)
    _check_max_length(encoder, max_length, pair=pairs is not None)
    encoder.enable_truncation(max_length, strategy="longest_first")
    inputs = list(texts) if pairs is None else list(zip(texts, pairs))
    encodings = encoder.encode_batch(inputs) if inputs else []
    return [e.ids for e in encodings], EncodeStats(len(encodings), _count_truncated(encodings, max_length))


def encode_words(tokenizer: Tokenizer, words: Sequence[Sequence[str]],
                 tags: Sequence[Sequence[int]] | None, max_length: int) -> tuple[list[Encoded], EncodeStats]:
    """Token classification: each word encoded with a leading space (add_prefix_space, as HF's run_ner
    does for RoBERTa, so the first word gets its `Ġ` too); the word's tag id on its FIRST sub-token,
    -100 (IGNORE_INDEX from core.model) on the other sub-tokens and on <s>, </s>; word_ids gives each
    position's word index (None for specials). Truncated examples are counted (their cut words get no
    prediction)."""
    if tags is not None:
        if len(tags) != len(words):
            raise ValueError(f"{len(words)} word lists but {len(tags)} tag lists")
        for n, (w, t) in enumerate(zip(words, tags)):
            if len(w) != len(t):
                raise ValueError(f"example {n}: {len(w)} words but {len(t)} tags")
    encoder = input_encoder(tokenizer, add_prefix_space=True)
    _check_max_length(encoder, max_length, pair=False)
    encoder.enable_truncation(max_length)
    encodings = encoder.encode_batch([list(w) for w in words], is_pretokenized=True) if words else []
    rows = []
    for n, enc in enumerate(encodings):
        word_ids = list(enc.word_ids)
        labels = None
        if tags is not None:
            labels = [IGNORE_INDEX] * len(word_ids)
            previous = None
            for pos, w in enumerate(word_ids):
                if w is not None and w != previous:
                    labels[pos] = int(tags[n][w])
                previous = w
        rows.append(Encoded(input_ids=enc.ids, labels=labels, word_ids=word_ids))
    return rows, EncodeStats(len(encodings), _count_truncated(encodings, max_length))


def _is_per_token(labels: Sequence) -> bool:
    """Per-token labels are lists of ints (multi-label targets, lists of floats, are not)."""
    first = labels[0]
    return isinstance(first, (list, tuple)) and all(
        isinstance(x, numbers.Integral) for row in labels for x in row
    )


BatchLabels = Sequence[int] | Sequence[float] | Sequence[Sequence[int]] | Sequence[Sequence[float]]


def collate(rows: Sequence[Sequence[int]], pad_id: int,
            labels: BatchLabels | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids [B, S], attention_mask [B, S] (1 token / 0 pad), and labels: a [B]
    long or float tensor for sequence labels, a [B, S] long tensor padded with -100 for per-token labels.

    Per-token labels are lists of ints, one per position of their row; lists of floats (multi-label
    targets) give a [B, L] float tensor."""
    if not rows:
        raise ValueError("collate: no rows")
    width = max(len(r) for r in rows)
    ids = [list(r) + [pad_id] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    batch = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }
    if labels is None:
        return batch
    if len(labels) != len(rows):
        raise ValueError(f"collate: {len(rows)} rows but {len(labels)} labels")
    if _is_per_token(labels):
        for n, (r, lab) in enumerate(zip(rows, labels)):
            if len(lab) != len(r):
                raise ValueError(f"collate: row {n} has {len(r)} ids but {len(lab)} labels")
        padded = [list(lab) + [IGNORE_INDEX] * (width - len(lab)) for lab in labels]
        batch["labels"] = torch.tensor(padded, dtype=torch.long)
    elif isinstance(labels[0], (list, tuple)):
        batch["labels"] = torch.tensor([list(lab) for lab in labels], dtype=torch.float)
    elif all(isinstance(x, numbers.Integral) for x in labels):
        batch["labels"] = torch.tensor(list(labels), dtype=torch.long)
    else:
        batch["labels"] = torch.tensor([float(x) for x in labels], dtype=torch.float)
    return batch


def word_predictions(pred_ids: Sequence[int], word_ids: Sequence[int | None],
                     num_words: int) -> list[int | None]:
    """The prediction of each word: the one at its first sub-token (None for a word cut by truncation)."""
    out: list[int | None] = [None] * num_words
    previous = None
    for pos, w in enumerate(word_ids):
        if w is not None and w != previous and out[w] is None:
            out[w] = int(pred_ids[pos])
        previous = w
    return out
