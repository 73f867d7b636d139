"""Extractive question answering (SQuAD v1.1 / v2.0): examples -> windowed features, logits -> answers.

The pre- and post-processing of HF's `run_qa.py` (`prepare_train_features`, `prepare_validation_features`,
`postprocess_qa_predictions`), on our `tokenizers.Tokenizer`:

    features = qa_features(tok, examples, max_length=384, stride=128)   # one per window of each context
    # model -> start_logits, end_logits: [len(features), S]
    answers = qa_predictions(examples, features, start_logits, end_logits, version_2=True)  # {id: text}

An example is {"id", "context", "question", "answers": {"text": [...], "answer_start": [...]}}; empty lists
mean unanswerable (v2). A feature is `<s> question </s></s> context window </s>`. The question and the
context are encoded once each without specials (untrimmed offsets), the question is cut to
`max_question_length` tokens and the context into overlapping windows by `Encoding.truncate(window, stride)`,
and each (question, window) pair gets RoBERTa's specials from `Tokenizer.post_process`, whose
`trim_offsets` removes the byte-level space from the offsets (a token `Ġword` maps to "word", not " word"),
so `context[start:end]` of a span is the answer text exactly. Offsets are relative to the context.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from finetune.encode import input_encoder


@dataclass
class QAFeature:
    """One window of one example: the model input, each token's character span in the context (None for
    the question and the specials) and the training targets (token indices; 0, the `<s>`, when the
    answer is not inside this window or the example is unanswerable)."""

    example_index: int
    input_ids: list[int]
    offsets: list[tuple[int, int] | None]
    start_position: int = 0
    end_position: int = 0


def answer_span(example: dict) -> tuple[int, int] | None:
    """The character span [start, end) of the example's first answer (as HF training), its surrounding
    whitespace left out; None when unanswerable."""
    answers = example.get("answers") or {}
    texts, starts = answers.get("text") or [], answers.get("answer_start") or []
    if not texts or not starts:
        return None
    text, start = texts[0], int(starts[0])
    start_char = start + len(text) - len(text.lstrip())
    end_char = start + len(text.rstrip())
    return (start_char, end_char) if end_char > start_char else None


def token_span(offsets: Sequence[tuple[int, int] | None], span: tuple[int, int] | None) -> tuple[int, int]:
    """The first and last token of a character span inside the window's context tokens (HF's mapping);
    (0, 0) when the span is None or not wholly inside this window."""
    context = [i for i, o in enumerate(offsets) if o is not None]
    if span is None or not context:
        return 0, 0
    start_char, end_char = span
    first, last = context[0], context[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return 0, 0
    start = first
    while start <= last and offsets[start][0] <= start_char:  # the last token starting at or before it
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:  # the first token ending at or after it
        end -= 1
    return start - 1, end + 1


def qa_features(tokenizer: Tokenizer, examples: Sequence[dict], max_length: int = 384, stride: int = 128,
                max_question_length: int = 64) -> list[QAFeature]:
    """`<s> question </s></s> context </s>`; a context longer than the window is split into overlapping
    windows (`stride` tokens of overlap, as HF's doc_stride); the question truncated to
    max_question_length tokens. Each answer's character span (the first answer, as HF training) is
    mapped through the offsets to token start/end."""
    encoder = input_encoder(tokenizer)
    processor = encoder.post_processor
    specials = encoder.num_special_tokens_to_add(True)
    if max_question_length < 1 or stride < 0:
        raise ValueError(f"max_question_length={max_question_length} and stride={stride}: need >= 1 and >= 0")
    if max_length - specials - max_question_length <= stride:
        raise ValueError(
            f"max_length={max_length} leaves {max_length - specials - max_question_length} context tokens "
            f"after {specials} specials and a question of max_question_length={max_question_length}: it "
            f"must be more than stride={stride}"
        )
    encoder.post_processor = None  # raw encodings: no specials, offsets not trimmed yet
    questions = encoder.encode_batch([ex["question"].lstrip() for ex in examples], add_special_tokens=False)
    contexts = encoder.encode_batch([ex["context"] for ex in examples], add_special_tokens=False)
    encoder.post_processor = processor  # post_process adds the specials and trims the offsets, once
    features = []
    for n, (question, context) in enumerate(zip(questions, contexts)):
        if len(question.ids) > max_question_length:
            question.truncate(max_question_length)
        window = max_length - specials - len(question.ids)
        if len(context.ids) > window:
            context.truncate(window, stride=stride)
        span = answer_span(examples[n])
        for piece in [context, *context.overflowing]:
            enc = encoder.post_process(question, piece, add_special_tokens=True)
            offsets = [o if s == 1 else None for o, s in zip(enc.offsets, enc.sequence_ids)]
            start, end = token_span(offsets, span)
            features.append(QAFeature(n, enc.ids, offsets, start, end))
    return features


def qa_predictions(examples: Sequence[dict], features: Sequence[QAFeature],
                   start_logits: np.ndarray | Sequence, end_logits: np.ndarray | Sequence, n_best: int = 20,
                   max_answer_length: int = 30, version_2: bool = False,
                   null_threshold: float = 0.0) -> dict[str, str]:
    """The best answer text of each example id over all its windows: the n_best start and end logits of
    each window, spans inside the context with end >= start and at most max_answer_length tokens, scored
    start+end; with version_2, the null answer (score of <s> start+end, minimum over windows) wins when
    it beats the best span by more than null_threshold -> "".

    Rows of the logits may be longer than their feature (a padded batch): the positions past it are
    neither among the n_best nor in a span. An example with no valid span gets "" (HF writes "empty")."""
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(
            f"{len(features)} features but {len(start_logits)} start / {len(end_logits)} end logit rows"
        )
    windows: list[list[int]] = [[] for _ in examples]
    for f, feature in enumerate(features):
        windows[feature.example_index].append(f)
    predictions = {}
    for n, example in enumerate(examples):
        best_score, best_span, null_score = -math.inf, None, math.inf
        for f in windows[n]:
            offsets = features[f].offsets
            # the window's own positions: a batch's padding past the feature is not part of it
            starts = np.asarray(start_logits[f], dtype=np.float64)[: len(offsets)]
            ends = np.asarray(end_logits[f], dtype=np.float64)[: len(offsets)]
            null_score = min(null_score, float(starts[0] + ends[0]))
            in_context = np.array([o is not None for o in offsets[: len(starts)]], dtype=bool)
            top_starts = np.argsort(-starts, kind="stable")[:n_best]
            top_ends = np.argsort(-ends, kind="stable")[:n_best]
            top_starts, top_ends = top_starts[in_context[top_starts]], top_ends[in_context[top_ends]]
            if not len(top_starts) or not len(top_ends):
                continue
            length = top_ends[None, :] - top_starts[:, None] + 1  # [n_starts, n_ends] tokens in the span
            scores = np.where((length >= 1) & (length <= max_answer_length),
                              starts[top_starts][:, None] + ends[top_ends][None, :], -np.inf)
            i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
            if scores[i, j] > best_score:
                best_score = float(scores[i, j])
                best_span = (offsets[top_starts[i]][0], offsets[top_ends[j]][1])
        text = "" if best_span is None else example["context"][best_span[0]: best_span[1]]
        if version_2 and best_span is not None and null_score - best_score > null_threshold:
            text = ""
        predictions[str(example["id"])] = text
    return predictions
