"""finetune.encode and finetune.qa on the real jargon tokenizer, against HF's tokenizer on the same files.

Sequence and pair formats, longest-first truncation, word alignment (add_prefix_space, labels on first
sub-tokens), collate, word predictions, QA windows and offsets, and QA post-processing from crafted logits.
"""
from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from core.model import IGNORE_INDEX
from core.tokenizer import load_tokenizer
from finetune.encode import EncodeStats, collate, encode_sequences, encode_words, word_predictions
from finetune.qa import QAFeature, qa_features, qa_predictions

REPO = Path(__file__).resolve().parents[1]
TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
TRICKY = [
    "Hello world", "  leading spaces", "trailing space ", "", " ", "multiple    spaces\n\nand lines",
    "café naïve — 日本語 ‘quoted’ 😀", "a literal <mask> and </s> in text", "x" * 700,
]


@pytest.fixture(scope="module")
def tok(jargon_tokenizer):
    return load_tokenizer(jargon_tokenizer)


@pytest.fixture(scope="module")
def hf(jargon_tokenizer):
    return AutoTokenizer.from_pretrained(str(jargon_tokenizer))


@pytest.fixture(scope="module")
def hf_prefix(jargon_tokenizer):
    return AutoTokenizer.from_pretrained(str(jargon_tokenizer), add_prefix_space=True)


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """Real text of varied lengths: the first 300 paragraphs of the bundled Jargon File."""
    with gzip.open(REPO / "data" / "jargon.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read(400_000)
    paras = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return paras[:300]


# ---------------------------------------------------------------- sequences and pairs

def test_single_and_pair_format_equal_hf(tok, hf, paragraphs):
    texts = TRICKY + paragraphs[:60]
    pairs = list(reversed(texts))
    ids, stats = encode_sequences(tok, texts, None, 100_000)
    assert ids == hf(texts)["input_ids"]
    assert stats == EncodeStats(examples=len(texts), truncated=0)
    for row, text in zip(ids, texts):
        assert row == [0, *tok.encode(text, add_special_tokens=False).ids, 2]
    ids, stats = encode_sequences(tok, texts, pairs, 100_000)
    assert ids == hf(texts, pairs)["input_ids"]
    assert stats.truncated == 0
    for row, a, b in zip(ids, texts, pairs):
        a_ids = tok.encode(a, add_special_tokens=False).ids
        b_ids = tok.encode(b, add_special_tokens=False).ids
        assert row == [0, *a_ids, 2, 2, *b_ids, 2]  # <s> a </s></s> b </s>


def test_truncation_longest_first_counted(tok, hf, paragraphs):
    texts = TRICKY + paragraphs
    pairs = paragraphs + TRICKY
    full_single = [len(r) for r in hf(texts)["input_ids"]]
    full_pair = [len(r) for r in hf(texts, pairs)["input_ids"]]
    for max_length in (16, 48):
        ids, stats = encode_sequences(tok, texts, None, max_length)
        assert ids == hf(texts, truncation=True, max_length=max_length)["input_ids"]
        assert max(len(r) for r in ids) == max_length
        assert all(r[0] == 0 and r[-1] == 2 for r in ids)
        want = sum(n > max_length for n in full_single)
        assert 0 < want < len(texts) and stats == EncodeStats(examples=len(texts), truncated=want)
        ids, stats = encode_sequences(tok, texts, pairs, max_length)
        assert ids == hf(texts, pairs, truncation="longest_first", max_length=max_length)["input_ids"]
        assert all(len(r) <= max_length and r[0] == 0 and r[-1] == 2 for r in ids)
        assert stats.truncated == sum(n > max_length for n in full_pair) > 0


def test_format_does_not_rely_on_the_files_post_processor(tok, jargon_tokenizer, tmp_path, paragraphs):
    copy = shutil.copytree(jargon_tokenizer, tmp_path / "tok")
    spec = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["post_processor"]["type"] == "RobertaProcessing"
    spec["post_processor"] = None
    (copy / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    bare = load_tokenizer(copy)
    texts, pairs = paragraphs[:20], paragraphs[20:40]
    assert bare.encode(texts[0]).ids[0] != 0  # the file no longer adds <s>
    assert encode_sequences(bare, texts, pairs, 64) == encode_sequences(tok, texts, pairs, 64)
    assert encode_sequences(bare, texts, None, 64) == encode_sequences(tok, texts, None, 64)
    words = [t.split() for t in texts]
    assert encode_words(bare, words, None, 64) == encode_words(tok, words, None, 64)
    assert qa_features(bare, _qa_examples(), 64, 16, 16) == qa_features(tok, _qa_examples(), 64, 16, 16)


def test_callers_tokenizer_is_left_alone(tok):
    before = tok.to_str()
    encode_sequences(tok, ["a b c d e f"], ["g h"], 5)
    encode_words(tok, [["a", "b"]], [[0, 0]], 8)
    qa_features(tok, _qa_examples()[:2], 64, 16, 16)
    assert tok.to_str() == before
    assert tok.truncation is None and tok.encode("Hello").tokens[1] == "H"  # no prefix space added


# ---------------------------------------------------------------- words (token classification)

def _word_examples(paragraphs: list[str]) -> tuple[list[list[str]], list[list[int]]]:
    rng = random.Random(0)
    words = [p.split()[:40] for p in paragraphs[:150]]
    words += [["café", "naïve", "Zürich", "日本語", "😀"], ["New York", "is", "big"], ["<mask>", "x"]]
    words += [["a"]]
    tags = [[rng.randrange(len(TAGS)) for _ in w] for w in words]
    return words, tags


def _hf_alignment(enc, i: int, tags: list[int]) -> list[int]:
    """HF run_ner's tokenize_and_align_labels (label_all_tokens=False)."""
    labels, previous = [], None
    for w in enc.word_ids(i):
        labels.append(IGNORE_INDEX if w is None or w == previous else tags[w])
        previous = w
    return labels


@pytest.mark.parametrize("max_length", [512, 24])
def test_word_alignment_equals_hf(tok, hf_prefix, paragraphs, max_length):
    words, tags = _word_examples(paragraphs)
    rows, stats = encode_words(tok, words, tags, max_length)
    enc = hf_prefix(words, is_split_into_words=True, truncation=True, max_length=max_length)
    assert [r.input_ids for r in rows] == enc["input_ids"]
    assert [r.word_ids for r in rows] == [enc.word_ids(i) for i in range(len(words))]
    assert [r.labels for r in rows] == [_hf_alignment(enc, i, t) for i, t in enumerate(tags)]
    full = hf_prefix(words, is_split_into_words=True)["input_ids"]
    assert stats == EncodeStats(examples=len(words), truncated=sum(len(r) > max_length for r in full))
    assert (stats.truncated > 0) == (max_length == 24)
    multi = 0
    for row, t in zip(rows, tags):
        assert len(row.input_ids) <= max_length and row.input_ids[0] == 0 and row.input_ids[-1] == 2
        assert row.labels[0] == row.labels[-1] == IGNORE_INDEX
        if row.labels is not None and tok.id_to_token(row.input_ids[1]) != "<mask>":
            assert tok.id_to_token(row.input_ids[1]).startswith("Ġ")  # the first word has its space too
        for pos, w in enumerate(row.word_ids):
            first = w is not None and (pos == 0 or row.word_ids[pos - 1] != w)
            assert row.labels[pos] == (t[w] if first else IGNORE_INDEX)
            multi += w is not None and not first
    assert multi > 100  # words of several sub-tokens were exercised


def test_word_predictions_round_trip(tok, paragraphs):
    words, tag_ids = _word_examples(paragraphs)
    rng = random.Random(1)
    iob = [[TAGS[t] for t in ts] for ts in tag_ids]
    ids = [[TAGS.index(t) for t in ts] for ts in iob]
    for max_length in (512, 20):
        rows, stats = encode_words(tok, words, ids, max_length)
        cut = 0
        for row, ws, want in zip(rows, words, iob):
            # the labels as "predictions": garbage on every position that is not a word's first sub-token
            preds = [lab if lab != IGNORE_INDEX else rng.randrange(len(TAGS)) for lab in row.labels]
            got = word_predictions(preds + [0] * 5, row.word_ids, len(ws))  # padded like a batch row
            kept = [g is not None for g in got]
            assert kept == sorted(kept, reverse=True)  # only a tail of words is ever cut
            assert [TAGS[g] for g in got if g is not None] == want[: sum(kept)]
            cut += not all(kept)
        assert cut <= stats.truncated and (cut > 0) == (max_length == 20)


def test_word_predictions_none_for_words_without_tokens():
    assert word_predictions([5, 7, 8, 9, 4], [None, 0, 0, 2, None], 4) == [7, None, 9, None]


# ---------------------------------------------------------------- collate

def test_collate_pads_right_with_mask_and_labels():
    rows = [[0, 5, 6, 2], [0, 7, 2], [0, 2]]
    batch = collate(rows, pad_id=1)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[0, 5, 6, 2], [0, 7, 2, 1], [0, 2, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
    ints = collate(rows, 1, [2, 0, 1])["labels"]
    assert ints.dtype == torch.long and ints.tolist() == [2, 0, 1]
    floats = collate(rows, 1, [0.5, 1.0, 4.25])["labels"]
    assert floats.dtype == torch.float and floats.tolist() == [0.5, 1.0, 4.25]
    per_token = collate(rows, 1, [[-100, 3, 4, -100], [-100, 1, -100], [-100, -100]])["labels"]
    assert per_token.dtype == torch.long and per_token.shape == (3, 4)
    assert per_token.tolist() == [[-100, 3, 4, -100], [-100, 1, -100, -100], [-100, -100, -100, -100]]
    with pytest.raises(ValueError):
        collate(rows, 1, [[-100, 3], [-100, 1, -100], [-100, -100]])  # labels not one per position
    with pytest.raises(ValueError):
        collate(rows, 1, [1, 2])


# ---------------------------------------------------------------- question answering

CONTEXT = (
    "The Jargon File is a glossary of hacker slang. It was started in 1975 at the Stanford AI Lab by "
    "Raphael Finkel, and Don Woods became the SAIL contact soon after. The File expanded by fits and "
    "starts until about 1983; Richard Stallman was prominent among the contributors, adding many MIT "
    "and ITS-related coinages.  In Spring 1981, a hacker named Charles Spurgeon got a large chunk of "
    "the File published in Stewart Brand's CoEvolution Quarterly (issue 29, pages 26—35) with "
    "illustrations by Phil Wadler and Guy Steele.\n\nA late version of jargon-1 was edited into a book "
    "published in 1983 as The Hacker's Dictionary (ISBN 0-06-091082-8), hereafter referred to as "
    "‘Steele-1983’ for short. A naïve café in Zürich later printed a copy of it for its regulars. The "
    "last word of this story is serendipity"
)
# (question, answer, the text just before the answer in CONTEXT to find its start)
QA = [
    ("What is this text about?", "The Jargon File", ""),
    ("What is the Jargon File?", "a glossary of hacker slang", "File is "),
    ("When was it started?", "1975", "started in "),
    ("Where was it started?", "the Stanford AI Lab", "1975 at "),
    ("Who started the File?", "Raphael Finkel", "Lab by "),
    ("Until when did the File expand?", "1983", "until about "),
    ("Who was prominent among the contributors?", "Richard Stallman", "1983; "),
    ("Which hacker got the File published?", "Charles Spurgeon", "named "),
    ("Which pages?", "26—35", "pages "),
    ("Who drew the illustrations?", "Phil Wadler and Guy Steele", "illustrations by "),
    ("What is the ISBN of the book?", "0-06-091082-8", "ISBN "),
    ("How is the book referred to?", "‘Steele-1983’", "referred to as "),
    ("Where is the café?", "Zürich", "café in "),
    ("What kind of café?", "naïve", "A "),
    ("What was the book called?", "The Hacker's Dictionary", "1983 as "),
    ("What is the last word?", "serendipity", "story is "),
]


def _qa_examples() -> list[dict]:
    examples = []
    for n, (question, answer, before) in enumerate(QA):
        start = CONTEXT.index(before + answer) + len(before)
        assert CONTEXT[start: start + len(answer)] == answer
        examples.append({"id": f"q{n}", "question": question, "context": CONTEXT,
                         "answers": {"text": [answer], "answer_start": [start]}})
    examples.append({"id": "none", "question": "Who wrote the sequel?", "context": CONTEXT,
                     "answers": {"text": [], "answer_start": []}})
    return examples


MAX_LENGTH, STRIDE, MAX_QUESTION = 64, 16, 16


@pytest.fixture(scope="module")
def qa(tok):
    examples = _qa_examples()
    return examples, qa_features(tok, examples, MAX_LENGTH, STRIDE, MAX_QUESTION)


def _context_positions(feature: QAFeature) -> list[int]:
    return [i for i, o in enumerate(feature.offsets) if o is not None]


def test_qa_features_equal_hf_windows(qa, hf):
    examples, features = qa
    hf_enc = hf([ex["question"] for ex in examples], [ex["context"] for ex in examples],
                truncation="only_second", max_length=MAX_LENGTH, stride=STRIDE,
                return_overflowing_tokens=True, return_offsets_mapping=True)
    assert [f.example_index for f in features] == hf_enc["overflow_to_sample_mapping"]
    assert [f.input_ids for f in features] == hf_enc["input_ids"]
    for k, f in enumerate(features):
        pairs = zip(hf_enc["offset_mapping"][k], hf_enc.sequence_ids(k))
        want = [tuple(o) if s == 1 else None for o, s in pairs]
        assert f.offsets == want  # trimmed like HF's fast tokenizer (trim_offsets=True)


def test_qa_windows_overlap_by_stride_and_cover_the_context(qa, tok):
    examples, features = qa
    for n, ex in enumerate(examples):
        windows = [f for f in features if f.example_index == n]
        assert len(windows) >= 4
        q_ids = tok.encode(ex["question"], add_special_tokens=False).ids
        for w in windows:
            ctx = _context_positions(w)
            assert w.input_ids[: len(q_ids) + 3] == [0, *q_ids, 2, 2]  # <s> question </s></s>
            assert w.input_ids[ctx[0] - 2: ctx[0]] == [2, 2] and ctx[-1] == len(w.input_ids) - 2
            assert w.input_ids[-1] == 2 and len(w.input_ids) <= MAX_LENGTH
        for a, b in zip(windows, windows[1:]):
            assert len(a.input_ids) == MAX_LENGTH
            ca, cb = _context_positions(a), _context_positions(b)
            assert [a.input_ids[i] for i in ca[-STRIDE:]] == [b.input_ids[i] for i in cb[:STRIDE]]
            assert [a.offsets[i] for i in ca[-STRIDE:]] == [b.offsets[i] for i in cb[:STRIDE]]
        # exactly: window k is full[k * step: k * step + size] of the context's own tokens
        full = tok.encode(CONTEXT, add_special_tokens=False).ids
        size = MAX_LENGTH - 4 - len(q_ids)
        for k, w in enumerate(windows):
            assert [w.input_ids[i] for i in _context_positions(w)] == full[k * (size - STRIDE):][:size]
        assert (len(windows) - 1) * (size - STRIDE) + len(_context_positions(windows[-1])) == len(full)
        assert windows[0].offsets[_context_positions(windows[0])[0]][0] == 0
        assert windows[-1].offsets[_context_positions(windows[-1])[-1]][1] == len(CONTEXT)


def test_qa_answer_spans_decode_exactly(qa):
    examples, features = qa
    for n, ex in enumerate(examples):
        windows = [f for f in features if f.example_index == n]
        if not ex["answers"]["text"]:
            assert all(w.start_position == w.end_position == 0 for w in windows)
            continue
        answer, start = ex["answers"]["text"][0], ex["answers"]["answer_start"][0]
        hits = 0
        for w in windows:
            ctx = _context_positions(w)
            inside = w.offsets[ctx[0]][0] <= start and start + len(answer) <= w.offsets[ctx[-1]][1]
            if not inside:
                assert (w.start_position, w.end_position) == (0, 0)
                continue
            assert ctx[0] <= w.start_position <= w.end_position <= ctx[-1]
            s, e = w.offsets[w.start_position][0], w.offsets[w.end_position][1]
            assert CONTEXT[s:e] == answer, (answer, CONTEXT[s:e])
            hits += 1
        assert hits >= 1, answer


def test_qa_question_truncated_to_max_question_length(tok):
    question = "Who, among all of the many hackers and people named in this long text, was prominent " * 3
    ex = [{"id": "long", "question": question, "context": CONTEXT, "answers": {"text": ["Richard Stallman"],
           "answer_start": [CONTEXT.index("Richard Stallman")]}}]
    features = qa_features(tok, ex, MAX_LENGTH, STRIDE, MAX_QUESTION)
    q_ids = tok.encode(question, add_special_tokens=False).ids
    assert len(q_ids) > MAX_QUESTION
    for f in features:
        assert f.input_ids[: MAX_QUESTION + 3] == [0, *q_ids[:MAX_QUESTION], 2, 2]
        assert len(f.input_ids) <= MAX_LENGTH
    full = tok.encode(CONTEXT, add_special_tokens=False).ids
    size = MAX_LENGTH - 4 - MAX_QUESTION  # the context room left by the cut question
    for k, f in enumerate(features):
        assert [f.input_ids[i] for i in _context_positions(f)] == full[k * (size - STRIDE):][:size]
    hits = [f for f in features if f.start_position > 0]
    assert hits
    for f in hits:
        assert CONTEXT[f.offsets[f.start_position][0]: f.offsets[f.end_position][1]] == "Richard Stallman"
    with pytest.raises(ValueError, match="stride"):
        qa_features(tok, ex, max_length=40, stride=20, max_question_length=16)


def _perfect_logits(examples, features, null: float = 0.0, pad_to: int = MAX_LENGTH + 6):
    """Small noise, 10 at each window's gold start and end (the <s> where the answer is not inside), and
    +100 on the padding past each feature (which must never be picked)."""
    rng = np.random.default_rng(0)
    starts = rng.normal(0, 0.1, (len(features), pad_to))
    ends = rng.normal(0, 0.1, (len(features), pad_to))
    for k, f in enumerate(features):
        starts[k, f.start_position] += 10
        ends[k, f.end_position] += 10
        starts[k, 0] += null
        ends[k, 0] += null
        starts[k, len(f.input_ids):] = ends[k, len(f.input_ids):] = 100
    return starts, ends


def test_qa_predictions_from_perfect_logits_give_the_gold_answers(qa):
    examples, features = qa
    gold = {ex["id"]: (ex["answers"]["text"] or [""])[0] for ex in examples}
    starts, ends = _perfect_logits(examples, features)
    v1 = qa_predictions(examples, features, starts, ends)
    assert {k: v for k, v in v1.items() if k != "none"} == {k: v for k, v in gold.items() if k != "none"}
    assert v1["none"] != ""  # v1 always answers with a span
    assert qa_predictions(examples, features, starts, ends, version_2=True) == gold
    rows = [(s[: len(f.input_ids)], e[: len(f.input_ids)]) for s, e, f in zip(starts, ends, features)]
    unpadded = qa_predictions(examples, features, [s for s, _ in rows], [e for _, e in rows], version_2=True)
    assert unpadded == gold  # ragged rows, one per feature, are accepted too


def test_qa_version_2_null_answer_and_threshold(qa):
    examples, features = qa
    starts, ends = _perfect_logits(examples, features, null=12.0)  # <s> beats every gold span (24 vs 20)
    v2 = qa_predictions(examples, features, starts, ends, version_2=True)
    assert set(v2.values()) == {""}
    # the null score is the minimum over windows: ~12 + 12 where the answer is, the gold span ~10 + 10
    kept = qa_predictions(examples, features, starts, ends, version_2=True, null_threshold=6.0)
    assert {k: v for k, v in kept.items() if k != "none"} == {
        ex["id"]: ex["answers"]["text"][0] for ex in examples if ex["answers"]["text"]
    }
    assert kept["none"] == ""  # its null (every window 22 + 22) still wins
    v1 = qa_predictions(examples, features, starts, ends)
    assert v1["q1"] == "a glossary of hacker slang"


def _one_window(qa, example_id: str):
    examples, features = qa
    n = next(i for i, ex in enumerate(examples) if ex["id"] == example_id)
    f = next(f for f in features if f.example_index == n and f.start_position > 0)
    return [examples[n]], [QAFeature(0, f.input_ids, f.offsets, f.start_position, f.end_position)], f


def test_qa_n_best_and_max_answer_length(qa):
    examples, feats, f = _one_window(qa, "q9")
    ctx = _context_positions(f)
    assert len(ctx) > 20
    size = len(f.input_ids)
    text = lambda s, e: CONTEXT[f.offsets[s][0]: f.offsets[e][1]]  # noqa: E731

    # n_best: the only good start is the 3rd-best start logit
    k, i, j, m = ctx[2], ctx[10], ctx[11], ctx[15]
    starts, ends = np.full(size, -50.0), np.full(size, -50.0)
    starts[[i, j, k]] = [10, 9, 8]
    ends[[k + 1, m]] = [10, 0]
    one = (examples, feats, starts[None], ends[None])
    assert qa_predictions(*one, n_best=3) == {"q9": text(k, k + 1)}  # 8 + 10
    assert qa_predictions(*one, n_best=2) == {"q9": text(i, m)}  # k is not among the 2 best starts

    # max_answer_length: a long span (6 tokens, 20) against a short one (2 tokens, 15)
    starts, ends = np.full(size, -50.0), np.full(size, -50.0)
    s = ctx[5]
    starts[s] = 10
    ends[[s + 5, s + 1]] = [10, 5]
    one = (examples, feats, starts[None], ends[None])
    assert qa_predictions(*one, max_answer_length=6) == {"q9": text(s, s + 5)}
    assert qa_predictions(*one, max_answer_length=5) == {"q9": text(s, s + 1)}
    ends[s - 1] = 50  # an end before the start is never a span
    assert qa_predictions(*one, max_answer_length=6) == {"q9": text(s, s + 5)}


def test_qa_spans_stay_inside_the_context(qa):
    examples, feats, f = _one_window(qa, "q3")
    ctx = _context_positions(f)
    starts, ends = np.zeros((1, len(f.input_ids))), np.zeros((1, len(f.input_ids)))
    starts[0, 1], ends[0, 2] = 100, 100  # question tokens
    starts[0, ctx[-1] + 1] = ends[0, ctx[-1] + 1] = 100  # the final </s>
    starts[0, ctx[3]], ends[0, ctx[4]] = 1, 1
    want = CONTEXT[f.offsets[ctx[3]][0]: f.offsets[ctx[4]][1]]
    assert qa_predictions(examples, feats, starts, ends) == {"q3": want}
