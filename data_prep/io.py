"""Stream documents from text files: the one reader shared by the tokenizer and corpus builders.

Formats (chosen by file name; each may also end in `.gz`):
  `.txt`    plain text; documents are separated by blank lines (a line of only whitespace counts
            as blank), the fairseq convention. A document's lines are joined with "\\n".
            With `join_lines` (for hard-wrapped text such as the bundled Jargon File) they are joined
            into one line instead: every line is stripped of its leading and trailing whitespace
            (indentation included, so indented code or tables are joined too) and the lines are
            joined with one space ("wrapped\\n   text  \\n" -> "wrapped text"). Whitespace inside a
            line is kept; documents are split on blank lines exactly as without it.
  `.jsonl`  JSON lines; one document per line, in the field `text` (taken as it is: `join_lines`
            applies to .txt only, as a JSON record's newlines are the writer's own choice).

Bad input is handled, never a crash, and counted in `ReadStats`:
  - invalid UTF-8 bytes are replaced by U+FFFD (`invalid_utf8` counts the replacements; a JSON
    string's lone surrogates count too);
  - empty and whitespace-only documents are skipped (`skipped_empty`; in `.txt` a run of blank
    lines is a separator, not a document, so only `.jsonl` produces these);
  - a leading byte-order mark is dropped, CRLF line ends become LF, a missing final newline is fine;
    NUL and other control characters are kept (byte-level BPE encodes every character).
A missing file, a pattern that matches nothing, an unknown extension or a malformed JSON line is an
`InputError` naming the file (and line).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

BOM = b"\xef\xbb\xbf"
REPLACEMENT = "\ufffd"
_REPLACEMENT_BYTES = REPLACEMENT.encode()


class InputError(ValueError):
    """An input file is missing, of an unknown kind, or malformed."""


@dataclass
class ReadStats:
    """Counters of what the reader saw (one object may be passed across several files)."""

    files: int = 0
    documents: int = 0  # documents yielded
    bytes: int = 0  # UTF-8 bytes of the documents yielded
    skipped_empty: int = 0  # empty / whitespace-only documents skipped
    invalid_utf8: int = 0  # invalid byte sequences (or lone surrogates) replaced by U+FFFD

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def expand_inputs(spec: str | Iterable[str]) -> list[Path]:
    """File names or glob patterns (a list, or comma-separated) -> the sorted, de-duplicated files.

    Raises InputError naming the entry when a plain name does not exist, a pattern matches no file,
    a file has an unknown extension, or the whole list is empty.
    """
    items = [part.strip() for s in ([spec] if isinstance(spec, str) else spec) for part in s.split(",")]
    items = [s for s in items if s]
    if not items:
        raise InputError("no input given: pass input=<file, glob or comma-separated list>")
    found: set[Path] = set()
    for item in items:
        if glob.has_magic(item):
            matches = [Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file()]
            if not matches:
                raise InputError(f"{item}: the pattern matches no file")
        else:
            if Path(item).is_dir():
                raise InputError(f"{item}: is a directory; give its files or a glob ('{item}/*.txt.gz')")
            if not Path(item).is_file():
                raise InputError(f"{item}: no such file")
            matches = [Path(item)]
        for path in matches:
            document_format(path)  # fail early on an unknown extension
            found.add(path.resolve())
    return sorted(found)


def document_format(path: str | os.PathLike) -> str:
    """'txt' or 'jsonl' from the file name (a trailing .gz is ignored)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for ext in ("txt", "jsonl"):
        if name.endswith("." + ext):
            return ext
    raise InputError(f"{path}: unknown input kind (expected .txt or .jsonl, optionally .gz)")


@contextmanager
def _open_binary(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(stream of decompressed bytes, the raw file whose tell() is the on-disk position)."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror})") from None
    with raw:
        if path.name.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz, raw  # type: ignore[misc]
        else:
            yield raw, raw


def _decode(data: bytes, stats: ReadStats) -> str:
    """UTF-8 text; each invalid byte sequence becomes U+FFFD and is counted."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        stats.invalid_utf8 += text.count(REPLACEMENT) - data.count(_REPLACEMENT_BYTES)
        return text


def _clean(text: str, stats: ReadStats) -> str:
    """Replace lone surrogates (possible from JSON escapes) so that the text encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        stats.invalid_utf8 += sum(1 for ch in text if "\ud800" <= ch <= "\udfff")
        return "".join(REPLACEMENT if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return text


def _blocks(path: Path, stream: BinaryIO, size: int = 1 << 20, limit: int | None = None,
            drop_bom: bool = True) -> Iterator[bytes]:
    """Raw blocks of about `size` bytes, each ending just after a "\n" (except the last), so that no
    line, and no multi-byte character, is cut; the leading BOM dropped (`drop_bom`: the stream starts
    at the file's start). `limit`: read at most that many bytes (a byte range of the file)."""
    carry = b""
    first = True
    while True:
        want = size if limit is None else min(size, limit)
        try:
            block = stream.read(want) if want else b""
        except (OSError, EOFError) as e:  # a corrupt or truncated .gz
            raise InputError(f"{path}: cannot read ({e})") from None
        if limit is not None:
            limit -= len(block)
        if first:
            first = False
            if drop_bom and block.startswith(BOM):
                block = block[len(BOM) :]
        if not block:
            if carry:
                yield carry
            return
        data = carry + block
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        if cut:
            yield data[:cut]


# a blank-line separator: a newline, then one or more lines of only whitespace (other than "\n")
_SEPARATOR = re.compile(r"\n(?:[^\S\n]*\n)+")
# a line break inside a document with the whitespace around it (the previous line's trailing spaces,
# the next one's indentation): what `join_lines` makes one space
_LINE_BREAK = re.compile(r"[^\S\n]*\n[^\S\n]*")


def join_wrapped_lines(document: str) -> str:
    """A .txt document's lines as one line: each line break with the whitespace around it becomes one
    space, and the document's leading and trailing whitespace is dropped (see `join_lines` above)."""
    return _LINE_BREAK.sub(" ", document).strip()


def _txt_documents(path: Path, blocks: Iterator[bytes], raw: BinaryIO, stats: ReadStats,
                   progress: "Progress | None", join_lines: bool = False) -> Iterator[list[str]]:
    """Documents of a blank-line separated text, a block's worth at a time (split by one regex per
    block, no Python loop per line); blank pieces are left for the caller to drop. With `join_lines`,
    each document's lines are joined into one (`join_wrapped_lines`)."""
    tail = "\n\n"  # text after the last separator seen; starts as one, so leading blank lines separate

    def finished(parts: list[str]) -> list[str]:
        return [join_wrapped_lines(part) for part in parts] if join_lines else parts

    for block in blocks:
        if progress is not None:
            progress.at(raw.tell())
        parts = _SEPARATOR.split(tail + _decode(block, stats).replace("\r\n", "\n"))
        # a block that ends with a separator: blank lines at the next block's start separate too
        tail = parts.pop() or "\n\n"
        yield finished(parts)
    # at the end: an implicit final newline, so a last line of only whitespace is blank too
    yield finished([part[:-1] if part.endswith("\n") else part for part in _SEPARATOR.split(tail + "\n")])


def _jsonl_documents(path: Path, blocks: Iterator[bytes], raw: BinaryIO, stats: ReadStats,
                     progress: "Progress | None", join_lines: bool = False,
                     where: str = "") -> Iterator[list[str]]:
    """The `text` field of each JSON line, a block's worth at a time; blank lines between records
    are not documents. `join_lines` does not apply (see the module docstring). `where`: names a byte
    range in errors (its line numbers count from the range's start)."""
    n = 0
    for block in blocks:
        if progress is not None:
            progress.at(raw.tell())
        texts = []
        for line in _decode(block, stats).split("\n"):
            n += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}{where}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f"{path}{where}:{n}: expected a JSON object with a string field 'text'")
            texts.append(_clean(record["text"], stats))
        n -= 1  # a block ends with "\n": its last (empty) piece is not a line
        yield texts


@contextmanager
def _pieces(path: str | os.PathLike, stats: ReadStats, progress: "Progress | None",
            join_lines: bool = False, byte_range: tuple[int, int] | None = None,
            ) -> Iterator[tuple[Iterator[list[str]], bool]]:
    """(the file's pieces a block at a time, blank ones included; whether a blank piece counts as
    a skipped empty document, i.e. the file is .jsonl: in .txt a blank piece is a separator).
    `byte_range` (start, end): only those bytes of an uncompressed file, both ends document starts
    (`document_start`); the file counts in `stats.files` for the range that starts at 0."""
    path = Path(path)
    kind = document_format(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    start, limit, where = 0, None, ""
    if byte_range is not None:
        start, end = (int(v) for v in byte_range)
        if path.name.lower().endswith(".gz"):
            raise InputError(f"{path}: a compressed file is read whole, not by byte range")
        if not 0 <= start <= end:
            raise InputError(f"{path}: bad byte range {start}-{end}")
        limit = end - start
        where = f" (bytes {start}-{end})" if start else ""
    stats.files += start == 0
    with _open_binary(path) as (stream, raw):
        if start:
            stream.seek(start)
        if progress is not None:
            progress.start_at(start)
        blocks = _blocks(path, stream, limit=limit, drop_bom=start == 0)
        if kind == "jsonl":
            yield _jsonl_documents(path, blocks, raw, stats, progress, join_lines, where), True
        else:
            yield _txt_documents(path, blocks, raw, stats, progress, join_lines), False
        if progress is not None:
            progress.at(raw.tell())
            progress.end_file()


def document_start(path: str | os.PathLike, offset: int) -> int:
    """The first byte offset >= `offset` at which a document of an uncompressed file starts, or the
    file's size when none does: for .txt a line start after a blank line (a line of only whitespace;
    offset 0 too), for .jsonl any line start. Reading the ranges between such offsets one by one
    (`read_document_lists(byte_range=...)`) gives the documents of the whole file, each once."""
    path = Path(path)
    kind = document_format(path)
    size = path.stat().st_size
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    with open(path, "rb") as f:
        # back: the start of the line that holds byte offset-1 (the line before the first candidate)
        back = offset
        while back > 0:
            step = min(back, 1 << 16)
            f.seek(back - step)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n", 0, step - 1 if back == offset else step)
            if cut >= 0:
                back = back - step + cut + 1
                break
            back -= step
        f.seek(back)
        pos, prev_blank = back, False  # pos < offset: the first line only sets prev_blank
        for line in f:  # lines of the binary file, each ending with b"\n" but maybe the last
            if pos >= offset and (kind == "jsonl" or prev_blank):
                return pos
            body = line[len(BOM):] if pos == 0 and line.startswith(BOM) else line
            text = body.rstrip(b"\n").decode("utf-8", errors="replace")
            prev_blank = not text or text.isspace()
            pos += len(line)
    return size


def read_documents(
    path: str | os.PathLike, stats: ReadStats | None = None, progress: "Progress | None" = None,
    join_lines: bool = False, byte_range: tuple[int, int] | None = None,
) -> Iterator[str]:
    """Yield the documents of one file (or of a `byte_range` of it), in order, updating `stats` (and
    `progress`) as it reads; `join_lines`: a .txt document's lines joined into one (see the module
    docstring)."""
    stats = stats if stats is not None else ReadStats()
    with _pieces(path, stats, progress, join_lines, byte_range) as (blocks, count_blank):
        for texts in blocks:
            for text in texts:
                if not text or text.isspace():  # blank: the same test as `not text.strip()`
                    stats.skipped_empty += count_blank
                    continue
                stats.documents += 1
                stats.bytes += len(text.encode("utf-8"))
                yield text


def read_document_lists(
    path: str | os.PathLike, stats: ReadStats | None = None, progress: "Progress | None" = None,
    join_lines: bool = False, byte_range: tuple[int, int] | None = None,
) -> Iterator[list[str]]:
    """The documents of `read_documents`, as lists of about 1 MB of input each (the fast path for
    many short documents: no Python work per document beyond list comprehensions); `stats` is
    updated a list at a time. `byte_range`: see `read_documents`."""
    stats = stats if stats is not None else ReadStats()
    with _pieces(path, stats, progress, join_lines, byte_range) as (blocks, count_blank):
        for texts in blocks:
            docs = [t for t in texts if t and not t.isspace()]  # non-blank, as in read_documents
            stats.skipped_empty += count_blank * (len(texts) - len(docs))
            stats.documents += len(docs)
            stats.bytes += len("".join(docs).encode("utf-8"))
            if docs:
                yield docs


class Progress:
    """A tqdm bar over on-disk bytes (compressed bytes for .gz): of a list of files, or `total`."""

    def __init__(self, paths: list[Path], desc: str, enabled: bool = True, total: int | None = None):
        from tqdm import tqdm

        self._bar = tqdm(
            total=sum(p.stat().st_size for p in paths) if total is None else total, unit="B",
            unit_scale=True, desc=desc, disable=not enabled, mininterval=1.0,
        )
        self._pos = 0  # position in the current file

    def start_at(self, pos: int) -> None:
        """A file is read from byte `pos` (a byte range): count from there."""
        self._pos = pos

    def at(self, pos: int) -> None:
        self._bar.update(pos - self._pos)
        self._pos = pos

    def end_file(self) -> None:
        self._pos = 0

    def close(self) -> None:
        self._bar.close()


def iter_documents(
    paths: Iterable[Path],
    stats: ReadStats | None = None,
    max_bytes: int = 0,
    progress: Progress | None = None,
    join_lines: bool = False,
) -> Iterator[str]:
    """All documents of `paths` in order; with `max_bytes` > 0, stop at the first document that
    brings the total past max_bytes (a deterministic prefix sample of the input). `join_lines`: see
    `read_documents`."""
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        for doc in read_documents(path, stats, progress, join_lines):
            yield doc
            if max_bytes and stats.bytes >= max_bytes:
                return
