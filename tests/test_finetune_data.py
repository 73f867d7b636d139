"""finetune.data: the readers on the shipped files (data/downstream, tests/assets/squad) and on small files
written here, the IOB2 conversion, the deterministic hash split and the label helpers. Real files, real HF
datasets."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from finetune.data import (
    DataError,
    ReadStats,
    check_labels,
    hash_split,
    label_set,
    read_conll,
    read_sequence_file,
    read_squad,
    split_key,
    to_iob2,
)

ROOT = Path(__file__).resolve().parents[1]
DOWNSTREAM = ROOT / "data" / "downstream"
MOVIES = DOWNSTREAM / "sentiment" / "movieReviewSnippets_GroundTruth.txt"
IMDB = DOWNSTREAM / "sentiment" / "uci" / "imdb.json"
WIKIGOLD = DOWNSTREAM / "wikigold" / "wikigold.conll.txt"
SQUAD = ROOT / "tests" / "assets" / "squad"


@pytest.fixture(scope="module")
def movies() -> tuple[list[dict], ReadStats]:
    return read_sequence_file(MOVIES, "text", "rating", column_names=["id", "rating", "text"])


# --- sequence files ------------------------------------------------------------------------------------


def test_movie_reviews_read_all_with_float_ratings(movies):
    records, stats = movies
    assert stats.as_dict() == {"read": 10605, "kept": 10605, "empty_text": 0, "null_label": 0}
    ratings = [r["label"] for r in records]
    assert all(isinstance(x, float) and -4 <= x <= 4 for x in ratings)
    assert (sum(x > 0 for x in ratings), sum(x < 0 for x in ratings), ratings.count(0.0)) == (5242, 5326, 37)
    assert records[0] == {"label": 2.26666666667, "text": "The Rock is destined to be the 21st Century's "
                          "new ''Conan'' and that he's going to make a splash even greater than Arnold "
                          "Schwarzenegger, Jean Claud Van Damme or Steven Segal."}
    # record 7873 holds one unbalanced `"`: read with CSV quoting it would swallow the lines after it
    assert records[7872]["text"].endswith('into a 9" black and white portable TV.')
    assert not any("\r" in r["text"] or "\t" in r["text"] for r in records)  # CRLF and the columns split off


def test_uci_imdb_drops_and_counts_the_empty_record():
    records, stats = read_sequence_file(IMDB, "text", "class")
    assert stats.as_dict() == {"read": 1001, "kept": 1000, "empty_text": 1, "null_label": 0}
    assert Counter(r["label"] for r in records) == {0: 500, 1: 500}
    assert all(isinstance(r["label"], int) and r["text"].strip() for r in records)
    assert records[0]["text"].startswith("A very, very, very slow-moving, aimless movie")


def test_csv_with_header_keeps_texts_and_counts_drops(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('premise,hypothesis,label\n'
                    '"A man, tall, walks.","He says ""hi"".",1\n'
                    'NA,123,0\n'           # "NA" and a text of digits are texts, not a null and an int
                    'No label here.,Nor here.,\n'
                    '   ,Blank premise.,2\n'
                    'Last one.,Fine.,10\n', encoding="utf-8")
    records, stats = read_sequence_file(path, "premise", "label", pair_field="hypothesis")
    assert records == [{"text": "A man, tall, walks.", "pair": 'He says "hi".', "label": 1},
                       {"text": "NA", "pair": "123", "label": 0},
                       {"text": "Last one.", "pair": "Fine.", "label": 10}]
    assert all(type(r["label"]) is int for r in records)  # not the floats pandas makes of a column with a gap
    assert stats.as_dict() == {"read": 5, "kept": 3, "empty_text": 1, "null_label": 1}
    unlabelled, stats = read_sequence_file(path, "hypothesis", None)
    assert [r for r in unlabelled if "label" in r or "pair" in r] == [] and stats.kept == 5


def test_tsv_without_header_reads_quotes_literally(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b'a\tpos\tShe said "wow\r\nb\tneg\t"No," he said.\r\nc\t\tno label\r\n'
                     b'd\tneg\tplain text\r\n')
    records, stats = read_sequence_file(path, "sentence", "label", column_names=["id", "label", "sentence"])
    assert records == [{"text": 'She said "wow', "label": "pos"}, {"text": '"No," he said.', "label": "neg"},
                       {"text": "plain text", "label": "neg"}]
    assert (stats.read, stats.null_label) == (4, 1)
    # the same file read as if it had a header row loses its first line to the column names
    with pytest.raises(DataError, match=r"train\.tsv: no field 'sentence' \(the fields are \['a', 'pos'"):
        read_sequence_file(path, "sentence", "label")


def test_jsonl_and_gzipped_jsonl(tmp_path):
    rows = [{"sentence": "good", "label": "pos"}, {"sentence": "  ", "label": "neg"},
            {"sentence": "bad", "label": None}, {"sentence": "meh", "label": "neu"}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.jsonl").write_text(text, encoding="utf-8")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("a.jsonl", "b.jsonl.gz"):
        records, stats = read_sequence_file(tmp_path / name, "sentence", "label")
        assert records == [{"text": "good", "label": "pos"}, {"text": "meh", "label": "neu"}], name
        assert stats.as_dict() == {"read": 4, "kept": 2, "empty_text": 1, "null_label": 1}, name


def test_bad_sequence_files_are_data_errors(tmp_path):
    fields = r"\(the fields are \['text', 'class'\]\)"
    with pytest.raises(DataError, match=r"imdb\.json: no field 'sentence' " + fields):
        read_sequence_file(IMDB, "sentence", "class")
    with pytest.raises(DataError, match=r"nowhere\.csv: no such file"):
        read_sequence_file(tmp_path / "nowhere.csv", "text", "label")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "a", "label": 1}, {"text": ', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json: cannot be read as json"):
        read_sequence_file(broken, "text", "label")
    odd = tmp_path / "data.parquet"
    odd.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.parquet: cannot tell the format"):
        read_sequence_file(odd, "text", "label")
    with pytest.raises(DataError, match="column_names is for a csv/tsv"):
        read_sequence_file(IMDB, "text", "class", column_names=["text", "class"])
    assert issubclass(DataError, ValueError)


# --- CoNLL ---------------------------------------------------------------------------------------------


def test_wikigold_sentences_and_iob2():
    sentences, stats = read_conll(WIKIGOLD)
    assert (stats.read, stats.kept) == (1696, 1696)
    assert sum(len(s["tokens"]) for s in sentences) == 39007
    assert all(len(s["tokens"]) == len(s["tags"]) for s in sentences)
    first = sentences[0]
    assert first["tokens"][:2] == ["010", "is"]
    assert first["tokens"][10:14] == ["The", "Mad", "Capsule", "Markets"]
    assert first["tags"][0] == "B-MISC"  # I-MISC in the file (IOB1)
    assert first["tags"][10:14] == ["B-ORG", "I-ORG", "I-ORG", "I-ORG"]
    tags = Counter(t for s in sentences for t in s["tags"])
    assert tags["O"] == 32721 - 145  # the file's O count includes the 145 `-DOCSTART- O` lines
    # IOB1's I- counts split into B- + I-, and every entity in IOB2 opens with B-
    assert {k: tags[f"B-{k}"] + tags[f"I-{k}"] for k in ("PER", "ORG", "LOC", "MISC")} == \
        {"PER": 1634, "ORG": 1958, "LOC": 1447, "MISC": 1392}
    for s in sentences:
        for prev, tag in zip(["O"] + s["tags"], s["tags"]):
            assert not tag.startswith("I-") or prev[2:] == tag[2:], s


def test_conll2003_four_columns_take_the_last(tmp_path):
    path = tmp_path / "eng.train"
    path.write_text("-DOCSTART- -X- -X- O\n\n"
                    "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\ncall NN I-NP O\n\n"
                    "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n\n"
                    "-DOCSTART- -X- -X- O\n\nBRUSSELS NNP B-NP B-LOC\n", encoding="utf-8")
    sentences, stats = read_conll(path)
    assert sentences == [
        {"tokens": ["EU", "rejects", "German", "call"], "tags": ["B-ORG", "O", "B-MISC", "O"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
        {"tokens": ["BRUSSELS"], "tags": ["B-LOC"]},  # the last sentence needs no blank line after it
    ]
    assert stats.kept == 3


def test_to_iob2():
    assert to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "I-ORG"]) == \
        ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "I-ORG"]
    iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "I-ORG"]
    assert to_iob2(iob2) == iob2
    with pytest.raises(ValueError, match="'S-PER'"):
        to_iob2(["O", "S-PER"])


@pytest.mark.parametrize("bad_line, why", [("lonely", "one column"), ("Paris E-LOC", "tag 'E-LOC'"),
                                           ("Paris B-", "tag 'B-'")])
def test_malformed_conll_names_path_and_line(tmp_path, bad_line, why):
    path = tmp_path / "bad.conll"
    path.write_text(f"Paris B-LOC\nis O\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"bad\.conll:4: {why}"):
        read_conll(path)


# --- SQuAD ---------------------------------------------------------------------------------------------


def test_squad_v2_unanswerable_questions_have_empty_answers():
    questions, stats = read_squad(SQUAD / "dev-v2.0.json")
    assert (stats.read, stats.kept) == (14, 14)
    assert questions[0] == {
        "id": "56ddde6b9a695914005b9628", "title": "Normans",
        "question": "In what country is Normandy located?",
        "context": questions[0]["context"], "answers": {"text": ["France"], "answer_start": [159]}}
    impossible = [q["id"] for q in questions if not q["answers"]["text"]]
    assert len(impossible) == 6 and "5ad39d53604f3c001a3fe8d3" in impossible  # plausible_answers aren't
    assert all(q["answers"] == {"text": [], "answer_start": []} for q in questions if q["id"] in impossible)
    assert {q["title"] for q in questions} == {"Normans", "Computational_complexity_theory"}


def test_squad_v1_and_flat_layouts():
    v1, _ = read_squad(SQUAD / "dev-v1.1.json")
    assert len(v1) == 8 and all(len(q["answers"]["text"]) == 1 for q in v1)
    flat, _ = read_squad(SQUAD / "sample.json")  # HF datasets' export: several answers a question
    by_id = {q["id"]: q for q in flat}
    assert len(flat) == 14 and set(by_id) >= {q["id"] for q in v1}
    assert by_id["56ddde6b9a695914005b9629"]["answers"] == {
        "text": ["10th and 11th centuries", "in the 10th and 11th centuries",
                 "10th and 11th centuries", "10th and 11th centuries"],
        "answer_start": [94, 87, 94, 94]}
    for q in flat:
        for text, start in zip(q["answers"]["text"], q["answers"]["answer_start"]):
            assert q["context"][start:start + len(text)] == text


def test_squad_wrong_offset_names_the_question(tmp_path):
    doc = json.loads((SQUAD / "dev-v2.0.json").read_text(encoding="utf-8"))
    doc["data"][1]["paragraphs"][1]["qas"][1]["answers"][0]["answer_start"] += 1
    path = tmp_path / "shifted.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(DataError, match=r"shifted\.json: question '56e16839cd28a01900c67888': answer "
                                        r"'mathematical models of computation' is not at answer_start 177"):
        read_squad(path)


def test_not_squad_is_a_data_error(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")
    (tmp_path / "half.json").write_text('{"data": [', encoding="utf-8")
    (tmp_path / "other.json").write_text('{"data": [{"text": "x"}]}', encoding="utf-8")
    for name in ("list.json", "half.json", "other.json"):
        with pytest.raises(DataError, match=rf"{name}: .*"):
            read_squad(tmp_path / name)
    with pytest.raises(DataError, match="not SQuAD JSON"):
        read_squad(IMDB)


# --- splits and labels ---------------------------------------------------------------------------------


def test_split_key_is_a_fixed_function_of_the_text():
    assert split_key("hello") == split_key("hello") != split_key("hello ")
    # golden: the first 53 bits of sha256(b"hello") = 2cf24dba5fb0a30e..., over 2**53
    assert split_key("hello") == pytest.approx(0x2CF24DBA5FB0A30E / 2**64, abs=2**-52)
    keys = [split_key(str(i)) for i in range(2000)]
    assert all(0.0 <= k < 1.0 for k in keys) and 0.45 < sum(keys) / len(keys) < 0.55


def test_hash_split_deterministic_order_keeping_and_local(movies):
    records, _ = movies
    fractions = {"validation": 0.1, "test": 0.1}
    split = hash_split(records, lambda r: r["text"], fractions)
    assert list(split) == ["train", "validation", "test"]
    assert split == hash_split(records, lambda r: r["text"], fractions)
    assert sorted(map(id, sum(split.values(), []))) == sorted(map(id, records))  # a partition
    for name, part in split.items():
        assert abs(len(part) / len(records) - fractions.get(name, 0.8)) < 0.02, (name, len(part))
        positions = [records.index(r) for r in part[:50]]
        assert positions == sorted(positions)
    # a record's split does not depend on the other records: split every 7th record alone
    where = {r["text"]: name for name, part in split.items() for r in part}
    sub = hash_split(records[::7], lambda r: r["text"], fractions)
    assert all(where[r["text"]] == name for name, part in sub.items() for r in part)


@pytest.mark.parametrize("fractions", [{"validation": -0.1}, {"validation": 0.6, "test": 0.4},
                                       {"validation": 1.0}, {"train": 0.5}, {"test": float("nan")}])
def test_hash_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions="):
        hash_split([{"text": "a"}], lambda r: r["text"], fractions)


def test_label_set_and_check_labels():
    assert label_set([{"label": v} for v in (10, 2, 0, 1, 2, 0)]) == ["0", "1", "2", "10"]
    assert label_set([{"label": v} for v in ("pos", "neg", "neutral", "neg")]) == ["neg", "neutral", "pos"]
    records = [{"label": 0}, {"label": 1}, {"label": 2}, {"label": 7}]
    check_labels(records[:3], ["0", "1", "2"], "train.csv")
    with pytest.raises(DataError, match=r"validation\.csv: record 2 has label '2', not one of \['0', '1'\]"):
        check_labels(records, ["0", "1"], "validation.csv")
