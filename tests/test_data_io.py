"""The document reader (data_prep.io): formats, gzip, and every kind of bad input."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.io import (
    InputError,
    ReadStats,
    expand_inputs,
    iter_documents,
    join_wrapped_lines,
    read_document_lists,
    read_documents,
)


def docs_of(path: Path) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    return list(read_documents(path, stats)), stats


def test_txt_blank_lines_separate_documents(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first line\nsecond line\n\n\n   \nnext doc\n\nlast")
    docs, stats = docs_of(p)
    assert docs == ["first line\nsecond line", "next doc", "last"]
    assert stats.documents == 3 and stats.bytes == sum(len(d.encode()) for d in docs)
    assert stats.skipped_empty == 0 and stats.invalid_utf8 == 0


def test_jsonl_and_gzip_give_the_same_documents(tmp_path):
    texts = ["one\n\ntwo paragraphs", "ünïcödé 😀", "  padded  "]
    lines = [json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)]
    (tmp_path / "a.jsonl").write_text("".join(lines))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert docs_of(tmp_path / "a.jsonl")[0] == texts
    assert docs_of(tmp_path / "b.jsonl.gz")[0] == texts


def test_empty_and_whitespace_only_documents_are_skipped_and_counted(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["", "  \n\t ", "real", "\u3000"]) + "\n")
    docs, stats = docs_of(p)
    assert docs == ["real"]
    assert stats.skipped_empty == 3 and stats.documents == 1


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"good \xff\xfe bad\n\nalso \xc3 cut\n\nkept \xef\xbf\xbd literal\n")
    docs, stats = docs_of(p)
    assert docs == ["good \ufffd\ufffd bad", "also \ufffd cut", "kept \ufffd literal"]
    assert stats.invalid_utf8 == 3  # the literal U+FFFD of the last document is not counted


def test_lone_surrogates_in_json_are_replaced(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a\\ud800b"}\n')
    docs, stats = docs_of(p)
    assert docs == ["a\ufffdb"] and stats.invalid_utf8 == 1
    docs[0].encode("utf-8")  # encodable


def test_bom_crlf_nul_and_no_final_newline(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"\xef\xbb\xbfline one\r\nline\x00two\r\n\r\nsecond doc")
    docs, _ = docs_of(p)
    assert docs == ["line one\nline\x00two", "second doc"]


def test_one_ten_megabyte_line(tmp_path):
    line = ("word " * 2_000_000).strip()
    p = tmp_path / "big.txt"
    p.write_text("small\n\n" + line + "\n")
    docs, stats = docs_of(p)
    assert len(docs) == 2 and docs[1] == line and stats.bytes == len("small") + len(line)


def test_max_bytes_takes_a_deterministic_prefix(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("\n\n".join(f"document number {i}" for i in range(100)))
    stats = ReadStats()
    docs = list(iter_documents([p], stats, max_bytes=100))
    assert docs == [f"document number {i}" for i in range(len(docs))]
    assert 100 <= stats.bytes < 100 + len("document number 99") and len(docs) < 100


def test_expand_inputs_globs_commas_sorted_dedup(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl.gz"):
        (tmp_path / name).write_bytes(b"")
    got = expand_inputs(f"{tmp_path}/*.txt, {tmp_path}/c.jsonl.gz,{tmp_path}/a.txt")
    assert got == [(tmp_path / n).resolve() for n in ("a.txt", "b.txt", "c.jsonl.gz")]


@pytest.mark.parametrize(
    "spec, message",
    [("", "no input given"), ("{tmp}/missing.txt", "missing.txt: no such file"),
     ("{tmp}/*.nothing", "matches no file"), ("{tmp}/data.csv", "unknown input kind")],
)
def test_expand_inputs_errors_name_the_entry(tmp_path, spec, message):
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(InputError, match=message):
        expand_inputs(spec.format(tmp=tmp_path))


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(InputError, match=r"a\.jsonl:2: not valid JSON"):
        docs_of(p)
    p.write_text('{"body": "no text field"}\n')
    with pytest.raises(InputError, match=r"a\.jsonl:1: .*'text'"):
        docs_of(p)


def test_corrupt_gzip_is_an_input_error(tmp_path):
    p = tmp_path / "a.txt.gz"
    p.write_bytes(gzip.compress(b"some text\n" * 1000)[:-30])
    with pytest.raises(InputError, match="a.txt.gz: cannot read"):
        docs_of(p)


def reference_txt_documents(data: bytes) -> list[str]:
    """The .txt convention written the slow, obvious way: line by line."""
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff").replace("\r\n", "\n")
    docs, buf = [], []
    for line in text.split("\n"):
        if line.strip():
            buf.append(line)
        elif buf:
            docs.append("\n".join(buf))
            buf = []
    if buf:
        docs.append("\n".join(buf))
    return docs


def test_block_reader_matches_the_line_by_line_definition(tmp_path):
    """A file of several read blocks (1 MiB each) of random lines, blank lines, whitespace and CRLF."""
    rng = np.random.default_rng(0)
    pieces = ["word", "ünï", "😀", " ", "\t", "  x  ", "\x00", "\x0b", "\u3000", "\u2028", "\r"]
    lines = []
    for _ in range(60_000):
        kind = rng.integers(0, 10)
        if kind == 0:
            lines.append("")
        elif kind == 1:
            lines.append(" \t " if rng.integers(0, 2) else "\u3000")
        else:
            lines.append("".join(rng.choice(pieces, size=int(rng.integers(1, 30)))))
    ends = rng.choice(["\n", "\r\n"], size=len(lines))
    data = "".join(line + end for line, end in zip(lines, ends)).encode()
    data += b"\xff tail without newline"
    p = tmp_path / "big.txt"
    p.write_bytes(data)
    assert len(data) > 3 * (1 << 20) // 2
    docs, stats = docs_of(p)
    assert docs == reference_txt_documents(data)
    assert stats.invalid_utf8 == 1


def test_a_directory_as_input_says_so(tmp_path):
    from data_prep.io import InputError, expand_inputs

    (tmp_path / "texts").mkdir()
    with pytest.raises(InputError, match=r"texts: is a directory; give its files or a glob"):
        expand_inputs(str(tmp_path / "texts"))


def test_join_lines_makes_a_wrapped_paragraph_one_line(tmp_path):
    """join_lines: a line break and the whitespace around it become one space; blank lines still separate."""
    p = tmp_path / "wrapped.txt"
    p.write_text("   The first paragraph is\n   hard-wrapped  \n\tand indented.\n\n  \n"
                 "   A second one,   with  inner spaces\r\n   kept.\n\nlast\n")
    stats = ReadStats()
    docs = list(read_documents(p, stats, join_lines=True))
    assert docs == ["The first paragraph is hard-wrapped and indented.",
                    "A second one,   with  inner spaces kept.", "last"]
    assert stats.documents == 3 and stats.bytes == sum(len(d.encode()) for d in docs)
    # without it the documents are what they always were
    assert docs_of(p)[0] == ["   The first paragraph is\n   hard-wrapped  \n\tand indented.",
                             "   A second one,   with  inner spaces\n   kept.", "last"]
    assert list(iter_documents([p], join_lines=True)) == docs
    assert [d for b in read_document_lists(p, join_lines=True) for d in b] == docs


def test_join_lines_leaves_jsonl_as_it_is(tmp_path):
    p = tmp_path / "a.jsonl"
    texts = ["one\n   wrapped\n\ntwo paragraphs", "  padded  "]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert list(read_documents(p, join_lines=True)) == texts


def test_join_lines_matches_the_line_by_line_definition(tmp_path):
    """Over several read blocks of random lines: the same documents as without it, each one's lines
    stripped and joined with one space."""
    rng = np.random.default_rng(1)
    pieces = ["word", "ünï", " ", "\t", "  x  ", "\u3000", "\r"]
    lines = ["" if rng.integers(0, 6) == 0 else "".join(rng.choice(pieces, size=int(rng.integers(1, 40))))
             for _ in range(80_000)]
    data = ("\n".join(lines) + "\n").encode()
    p = tmp_path / "big.txt.gz"
    p.write_bytes(gzip.compress(data))
    assert len(data) > (1 << 20)
    want = [" ".join(line.strip() for line in d.split("\n")) for d in reference_txt_documents(data)]
    assert list(read_documents(p, join_lines=True)) == want
    assert want == [join_wrapped_lines(d) for d in docs_of(p)[0]] and not any("\n" in d for d in want)


def test_a_blank_line_run_across_a_read_block_boundary_separates(tmp_path):
    """A block (1 MiB) that ends inside a run of blank lines: the blank lines at the next block's start
    are separator too, not the start of a document."""
    head = "x" * ((1 << 20) - 6) + "\n \n"  # the first block ends here, after a separator...
    data = (head + "  \n \nnext doc\n").encode()  # ...and the next one starts with blank lines
    p = tmp_path / "a.txt"
    p.write_bytes(data)
    assert docs_of(p)[0] == reference_txt_documents(data) == ["x" * ((1 << 20) - 6), "next doc"]


def ranges_read(path: Path, cuts: list[int]) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    docs = [d for a, b in zip(cuts, cuts[1:]) for lst in read_document_lists(path, stats, byte_range=(a, b))
            for d in lst]
    return docs, stats


def test_byte_ranges_cut_at_document_starts_read_every_document_once(tmp_path, jargon_path):
    """Cut anywhere, moved to the next document start (data_prep.io.document_start), the ranges read the
    file's documents, each once and in order, with the same counters (a file counted once): .txt with
    blank-line runs, whitespace lines, CRLF and a BOM; .jsonl with blank lines and a BOM; the Jargon File."""
    from data_prep.io import document_start

    rng = np.random.default_rng(1)
    pieces = ["word", "ünï", "😀", " ", "\t", "  x  ", "\u3000", "\r"]
    lines = []
    for _ in range(3000):
        kind = rng.integers(0, 6)
        lines.append("" if kind == 0 else " \t " if kind == 1 else "".join(rng.choice(pieces, size=int(rng.integers(1, 9)))))
    ends = rng.choice(["\n", "\r\n"], size=len(lines))
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"\xef\xbb\xbf" + "".join(x + e for x, e in zip(lines, ends)).encode() + b"tail")
    jsonl = tmp_path / "b.jsonl"
    records = [json.dumps({"text": f"doc {i}"}) if i % 7 else "" for i in range(800)]
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n".join(records).encode() + b"\n")
    jargon = tmp_path / "jargon.txt"
    jargon.write_bytes(gzip.decompress(jargon_path.read_bytes()))
    for path in (txt, jsonl, jargon):
        want, want_stats = docs_of(path)
        size = path.stat().st_size
        assert len(want) > 100
        for trial in range(6):
            n = [1, 3, 10, 40, 200, 1000][trial]
            cuts = sorted({0, size} | {document_start(path, int(o)) for o in rng.integers(0, size + 1, size=n)})
            assert len(cuts) > min(n, 20) // 2, (path, n)
            docs, stats = ranges_read(path, cuts)
            assert docs == want and stats == want_stats, (path.name, n)
    # a document start: .jsonl at any line start, .txt only after a blank line
    assert document_start(jsonl, 1) == jsonl.read_bytes().index(b"\n") + 1
    t = tmp_path / "c.txt"
    t.write_bytes(b"ab\ncd\n \r\n\nef\n")
    assert [document_start(t, o) for o in (0, 1, 3, 6, 9, 10, 11, 99)] == [0, 9, 9, 9, 9, 10, 13, 13]
    with pytest.raises(InputError, match="read whole"):
        list(read_document_lists(jargon_path, byte_range=(0, 10)))
