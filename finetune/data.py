"""Downstream data: readers of labelled files into plain lists of dict records, and deterministic splits.

    records, stats = read_sequence_file("data/downstream/sentiment/movieReviewSnippets_GroundTruth.txt",
                                        text_field="text", label_field="rating",
                                        column_names=["id", "rating", "text"])
    sentences, _ = read_conll("data/downstream/wikigold/wikigold.conll.txt")   # {"tokens", "tags"} in IOB2
    splits, stats, names = read_dataset("nyu-mll/glue", "sst2", ["train", "validation"], "sentence", "label")
    questions, _ = read_squad("train-v1.1.json")       # {"id", "title", "context", "question", "answers"}
    splits = hash_split(records, key=lambda r: r["text"], fractions={"validation": 0.1, "test": 0.1})

- Sequence files (JSON, JSON lines, CSV, TSV) are read with HF `datasets` (`load_dataset("json" | "csv")`,
  offline, in a throw-away cache so a changed file is never served stale). TSV is read with no quoting
  (GLUE's convention: texts may hold `"`). A record with an empty text (or pair) or a null label is dropped
  and counted in `ReadStats`, never a crash; a missing field, a missing file or one that does not parse is
  a `DataError` that names the file.
- HF datasets (`read_dataset`): a hub name, a local directory of data files or a `save_to_disk` directory,
  each split to the same records; a ClassLabel label column gives its names (its -1, "no label", is null).
- CoNLL (token first, tag last, blank line between sentences) and SQuAD (v1.1 / v2.0, nested as published,
  or the flat layout of HF datasets' export) are read by hand; tags come out in IOB2, and every answer is
  checked to be at its `answer_start` in the context.
- A set that ships without a validation/test split gets one from `hash_split`: a record's split is a
  function of its text alone (sha256), so every run, seed and machine sees the same split.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("json", "jsonl", "csv", "tsv")
_SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}
_COMPRESSIONS = (".gz",)
# Cells of a delimited file's label column that mean "no label" (pandas' defaults, less the exotic ones);
# text columns keep every cell as written, so a sentence "NA" stays a sentence.
_NULL_CELLS = ["", "NA", "N/A", "n/a", "NaN", "nan", "NULL", "null", "None", "<NA>"]
_QUOTE_NONE = 3  # csv.QUOTE_NONE


class DataError(ValueError):
    """Bad input data; the message names the file and the line or record."""


@dataclass
class ReadStats:
    """What a reader saw: records read, kept, and dropped (each dropped record counted once, under the first
    reason that applies: an empty text or pair, then a null label), so
    read == kept + empty_text + null_label."""

    read: int = 0
    kept: int = 0
    empty_text: int = 0
    null_label: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for logs and metrics)."""
        return dataclasses.asdict(self)


# --- JSON / JSONL / CSV / TSV ------------------------------------------------------------------------------


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"{path}: unknown format {fmt!r} (one of {list(FORMATS)})")
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _SUFFIX_FORMATS:
        raise DataError(f"{path}: cannot tell the format from the suffix (one of {sorted(_SUFFIX_FORMATS)}, "
                        f"optionally {'/'.join(_COMPRESSIONS)}); give fmt= one of {list(FORMATS)}")
    return _SUFFIX_FORMATS[suffixes[-1]]


def _load_rows(path: Path, fmt: str, text_fields: list[str], label_field: str | None,
               column_names: Sequence[str] | None) -> tuple[list[dict], list[str]]:
    """All rows of the file as dicts, and its column names, read with HF datasets."""
    import datasets  # heavy: imported on first use only

    kwargs: dict[str, Any] = {}
    builder = "json"
    if fmt in ("csv", "tsv"):
        builder = "csv"
        kwargs = {
            "delimiter": "\t" if fmt == "tsv" else ",",
            "converters": {name: str for name in text_fields},  # a text of digits stays a str
            "keep_default_na": False,
            "na_values": {label_field: _NULL_CELLS} if label_field else None,
        }
        if fmt == "tsv":
            kwargs["quoting"] = _QUOTE_NONE
        if column_names is not None:
            kwargs["column_names"] = list(column_names)
    elif column_names is not None:
        raise DataError(f"{path}: column_names is for a csv/tsv file without a header row, not {fmt}")
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-data-") as cache_dir:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir,
                                       keep_in_memory=True, **kwargs)
            columns = list(ds.column_names)
            label_dtype = str(getattr(ds.features.get(label_field), "dtype", ""))
            rows = ds.to_list()
    except Exception as e:  # datasets / pandas / pyarrow each raise their own types for a bad file
        cause = e.__cause__ or e.__context__ or e
        raise DataError(f"{path}: cannot be read as {fmt}: {type(cause).__name__}: {cause}") from e
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if builder == "csv" and label_field and label_dtype.startswith("float"):
        _undo_nan_promotion(rows, label_field)
    return rows, columns


def _undo_nan_promotion(rows: list[dict], field: str) -> None:
    """pandas turns an int column with an empty cell into floats (1 -> 1.0); give such a column its ints back.
    Only a column with a null and nothing but whole numbers besides, i.e. exactly what pandas promoted."""
    values = [r[field] for r in rows]
    if None not in values or not all(v is None or float(v).is_integer() for v in values):
        return
    for r in rows:
        if r[field] is not None:
            r[field] = int(r[field])


def _text(value: Any, path: str, index: int, field: str) -> str | None:
    """The value of a text field as a str; None when it is null, empty or whitespace."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{path}: record {index}: field {field!r} is a {type(value).__name__}, not a text")
    return value if value.strip() else None


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def read_sequence_file(
    path: str | os.PathLike,
    text_field: str,
    label_field: str | None,
    pair_field: str | None = None,
    fmt: str | None = None,
    column_names: Sequence[str] | None = None,
) -> tuple[list[dict], ReadStats]:
    """Records {"text": str, "pair": str (only when pair_field), "label": <raw value> (only when
    label_field)} of a JSON / JSONL / CSV / TSV file, read with HF datasets.

    fmt: "json", "jsonl", "csv", "tsv" or None (from the suffix: .json/.jsonl/.csv/.tsv/.txt -> .txt means
    tsv; a trailing .gz is looked through). TSV is read with no quoting. column_names: for a delimited file
    without a header row (then no header is read). An empty/whitespace text (or pair) or a null label is
    dropped and counted, never a crash; a missing field is a DataError naming the file and the field and
    the fields that exist; a file that does not exist or does not parse is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = _format_of(path, fmt)
    text_fields = [text_field] + ([pair_field] if pair_field else [])
    rows, columns = _load_rows(path, fmt, text_fields, label_field, column_names)
    return _records(rows, columns, str(path), text_field, label_field, pair_field)


def _records(rows: Sequence[dict], columns: Sequence[str], where: str, text_field: str, label_field: str | None,
             pair_field: str | None) -> tuple[list[dict], ReadStats]:
    """The records of `rows` (see read_sequence_file), dropping and counting empty texts and null labels."""
    text_fields = [text_field] + ([pair_field] if pair_field else [])
    for field in text_fields + ([label_field] if label_field else []):
        if field not in columns:
            raise DataError(f"{where}: no field {field!r} (the fields are {list(columns)})")
    stats = ReadStats(read=len(rows))
    records = []
    for i, row in enumerate(rows):
        texts = [_text(row[f], where, i, f) for f in text_fields]
        if any(t is None for t in texts):
            stats.empty_text += 1
            continue
        if label_field and _is_null(row[label_field]):
            stats.null_label += 1
            continue
        record: dict[str, Any] = {"text": texts[0]}
        if pair_field:
            record["pair"] = texts[1]
        if label_field:
            record["label"] = row[label_field]
        records.append(record)
    stats.kept = len(records)
    return records, stats


# --- HF datasets: a hub name, a directory of data files, a save_to_disk directory ------------------------


def _is_saved_dataset(path: Path) -> bool:
    """Whether `path` is what `save_to_disk` writes: a DatasetDict (dataset_dict.json) or a Dataset."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                       and (path / "dataset_info.json").is_file())


def _label_names(feature: Any) -> list[str] | None:
    """The names of a ClassLabel feature, or of a list of ClassLabels (multi-label); else None."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    inner = getattr(feature, "feature", None)  # datasets.List / Sequence of ClassLabel
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names)
    return None


def _class_names(rows: list[dict], field: str, names: list[str], where: str) -> None:
    """Replace the ClassLabel ids of `field` by their names, in place; -1 (no label, as in GLUE's test sets)
    becomes null."""
    for i, row in enumerate(rows):
        value = row[field]
        ids = value if isinstance(value, list) else [value]
        for v in ids:
            if v is not None and not -1 <= v < len(names):
                raise DataError(f"{where}: record {i}: class id {v} of {field!r} is outside its "
                                f"{len(names)} names")
        if isinstance(value, list):
            row[field] = [names[v] for v in value if v is not None and v >= 0]
        else:
            row[field] = None if value is None or value < 0 else names[value]


def read_dataset(
    name: str,
    config: str | None,
    splits: Sequence[str],
    text_field: str,
    label_field: str | None,
    pair_field: str | None = None,
) -> tuple[dict[str, list[dict]], dict[str, ReadStats], list[str] | None]:
    """The records (as read_sequence_file's) of each of `splits` of an HF dataset, what reading each kept and
    dropped, and the label names when the label column is a ClassLabel (or a list of them), else None.

    `name`: a `save_to_disk` directory (`datasets.load_from_disk`; a lone Dataset is the split "train"), a
    local directory of data files or a hub name (`datasets.load_dataset(name, config)`; a local directory is
    read in a throw-away cache, a hub dataset in the user's HF cache). Nothing loads (no network under
    HF_DATASETS_OFFLINE=1, an unknown name), a split the dataset lacks, or a field a split lacks: a
    DataError naming the dataset and what is missing."""
    import datasets  # heavy: imported on first use only

    where = f"task.dataset={name!r}" + (f" (config {config!r})" if config else "")
    path = Path(name)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-dataset-") as cache_dir:
            try:
                if path.is_dir() and _is_saved_dataset(path):
                    if config is not None:
                        raise DataError(f"{where}: a save_to_disk directory has no configurations; "
                                        "drop task.dataset_config")
                    loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
                elif path.is_dir():
                    loaded = datasets.load_dataset(str(path), config, cache_dir=cache_dir, keep_in_memory=True)
                else:
                    loaded = datasets.load_dataset(name, config)
            except DataError:
                raise
            except Exception as e:  # datasets, the hub client, pyarrow: each its own types
                hint = ""
                if not path.exists():
                    hint = (" (not a local directory; as a hub name it needs the network, or the HF cache "
                            "under HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1)")
                raise DataError(f"{where}: cannot be loaded{hint}: {type(e).__name__}: {e}") from e
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({"train": loaded})
            if not isinstance(loaded, datasets.DatasetDict):
                raise DataError(f"{where}: loaded a {type(loaded).__name__}, not a dataset with splits")
            out: dict[str, list[dict]] = {}
            stats: dict[str, ReadStats] = {}
            names: list[str] | None = None
            for split in splits:
                if split not in loaded:
                    raise DataError(f"{where}: no split {split!r} (the splits are {sorted(loaded)}); set "
                                    "task.train_split / task.validation_split / task.test_split, or null for a "
                                    "hash split of train")
            for split in splits:
                ds = loaded[split]
                split_where = f"{where} split {split!r}"
                columns = list(ds.column_names)
                for field in [text_field, pair_field, label_field]:
                    if field is not None and field not in columns:
                        raise DataError(f"{split_where}: no field {field!r} (the fields are {columns})")
                split_names = None if label_field is None else _label_names(ds.features[label_field])
                if split_names is not None:
                    if names is not None and split_names != names:
                        raise DataError(f"{split_where}: its ClassLabel names {split_names} differ from "
                                        f"another split's {names}")
                    names = split_names
                rows = ds.to_list()
                if split_names is not None:
                    _class_names(rows, label_field, split_names, split_where)
                out[split], stats[split] = _records(rows, columns, split_where, text_field, label_field,
                                                    pair_field)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return out, stats, names


# --- CoNLL ------------------------------------------------------------------------------------------------


def _check_tag(tag: str) -> bool:
    return tag == "O" or (len(tag) > 2 and tag[0] in "BI" and tag[1] == "-")


def to_iob2(tags: Sequence[str]) -> list[str]:
    """IOB1 or IOB2 tags -> IOB2 (an I-X that does not continue an X entity begins one: B-X)."""
    out = []
    for i, tag in enumerate(tags):
        if not _check_tag(tag):
            raise ValueError(f"tag {tag!r} at position {i} is not O, B-X or I-X")
        if tag.startswith("I-") and (i == 0 or tags[i - 1] == "O" or tags[i - 1][2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


def read_conll(path: str | os.PathLike) -> tuple[list[dict], ReadStats]:
    """Sentences {"tokens": [...], "tags": [...]} of a CoNLL file: whitespace-separated columns, token first,
    tag last (so 2-column WikiGold and 4-column CoNLL-2003 both work); blank lines separate sentences;
    `-DOCSTART-` lines are skipped; tags converted to IOB2 (IOB1 input like WikiGold's `I-PER` starting an
    entity becomes `B-PER`; IOB2 input is unchanged). A line with one column or a tag that is not O / B-X /
    I-X is a DataError naming path:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from None
    sentences: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []

    def end_sentence() -> None:
        if tokens:
            sentences.append({"tokens": tokens.copy(), "tags": to_iob2(tags)})
            tokens.clear()
            tags.clear()

    for lineno, line in enumerate(text.splitlines(), start=1):
        cols = line.split()
        if not cols:
            end_sentence()
            continue
        if cols[0] == "-DOCSTART-":
            end_sentence()
            continue
        if len(cols) < 2:
            raise DataError(f"{path}:{lineno}: one column {line.strip()!r}; expected `token ... tag`")
        if not _check_tag(cols[-1]):
            raise DataError(f"{path}:{lineno}: tag {cols[-1]!r} is not O, B-X or I-X")
        tokens.append(cols[0])
        tags.append(cols[-1])
    end_sentence()
    return sentences, ReadStats(read=len(sentences), kept=len(sentences))


# --- SQuAD ------------------------------------------------------------------------------------------------


def _squad_questions(doc: Any, path: Path) -> list[tuple[str, str, dict]]:
    """(title, context, question dict with answers as a list of {"text", "answer_start"}) of either layout."""
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: not SQuAD JSON (expected an object with a list \"data\")")
    out = []
    for a, article in enumerate(doc["data"]):
        if not isinstance(article, dict):
            raise DataError(f"{path}: data[{a}] is not an object")
        if "paragraphs" in article:  # as published: data[].paragraphs[].qas[]
            for p, para in enumerate(article["paragraphs"]):
                if not isinstance(para, dict) or not isinstance(para.get("context"), str) \
                        or not isinstance(para.get("qas"), list):
                    raise DataError(f"{path}: data[{a}].paragraphs[{p}] has no \"context\" and \"qas\"")
                for q in para["qas"]:
                    out.append((article.get("title", ""), para["context"], q))
        elif "context" in article and "question" in article:  # HF datasets' flat export: answers as columns
            answers = article.get("answers") or {"text": [], "answer_start": []}
            if not isinstance(answers, dict) \
                    or len(answers.get("text", [])) != len(answers.get("answer_start", [])):
                raise DataError(f"{path}: question {article.get('id')!r}: answers is not "
                                "{\"text\": [...], \"answer_start\": [...]} of equal lengths")
            q = dict(article, answers=[{"text": t, "answer_start": s}
                                       for t, s in zip(answers["text"], answers["answer_start"])])
            out.append((article.get("title", ""), article["context"], q))
        else:
            raise DataError(f"{path}: data[{a}] has neither \"paragraphs\" nor \"context\"/\"question\"")
    return out


def read_squad(path: str | os.PathLike) -> tuple[list[dict], ReadStats]:
    """Questions {"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}
    of a SQuAD v1.1 / v2.0 JSON file (v2's is_impossible questions have empty answer lists).

    An answer whose text is not at its answer_start in the context is a DataError naming the file and the
    question id; a file that is not SQuAD JSON is a DataError naming it. Also reads the flat layout of HF
    datasets' export (`{"data": [{"id", "question", "context", "answers": {"text", "answer_start"}}]}`).
    A question with an empty text (or context) is dropped and counted (empty_text)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not SQuAD JSON ({e})") from None
    stats = ReadStats()
    records = []
    for title, context, q in _squad_questions(doc, path):
        stats.read += 1
        if not isinstance(q, dict) or not all(k in q for k in ("id", "question", "answers")):
            raise DataError(f"{path}: question {stats.read - 1} has no \"id\", \"question\" and \"answers\"")
        qid = q["id"]
        if not isinstance(q["question"], str) or not q["question"].strip() or not context.strip():
            stats.empty_text += 1
            continue
        answers = [] if q.get("is_impossible") else q["answers"]
        texts, starts = [], []
        for ans in answers:
            if not isinstance(ans, dict) or not isinstance(ans.get("text"), str) \
                    or not isinstance(ans.get("answer_start"), int):
                raise DataError(f"{path}: question {qid!r}: answer {ans!r} is not {{\"text\": str, "
                                "\"answer_start\": int}")
            start, answer = ans["answer_start"], ans["text"]
            found = context[start:start + len(answer)] if start >= 0 else ""
            if found != answer:
                raise DataError(f"{path}: question {qid!r}: answer {answer!r} is not at answer_start {start} "
                                f"of the context (found {found!r})")
            texts.append(answer)
            starts.append(start)
        records.append({"id": str(qid), "title": title, "context": context, "question": q["question"],
                        "answers": {"text": texts, "answer_start": starts}})
    stats.kept = len(records)
    return records, stats


# --- splits and labels ------------------------------------------------------------------------------------


def split_key(text: str) -> float:
    """A number in [0, 1) from the sha256 of the text: the same text always lands in the same split."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)  # 53 bits: exact in a float, never 1.0


def hash_split(
    records: Sequence[dict], key: Callable[[dict], str], fractions: Mapping[str, float]
) -> dict[str, list[dict]]:
    """Deterministic splits of a set that has none: e.g. fractions {"validation": 0.1, "test": 0.1} ->
    {"train": ..., "validation": ..., "test": ...}; a record goes to a split by split_key(key(record)), so
    every run and seed sees the same split, and records keep their order within a split. Fractions must be
    >= 0 and sum < 1 (ValueError naming them). The splits take consecutive intervals of [0, 1) in the order
    of `fractions`; "train" is the rest (and is not a key of `fractions`)."""
    if "train" in fractions:
        raise ValueError(f"fractions={dict(fractions)}: 'train' is what the others leave; do not give it")
    if any(not (f >= 0) for f in fractions.values()) or not sum(fractions.values()) < 1:
        raise ValueError(f"fractions={dict(fractions)}: each must be >= 0 and their sum < 1")
    bounds = []
    upper = 0.0
    for name, fraction in fractions.items():
        upper += fraction
        bounds.append((upper, name))
    out: dict[str, list[dict]] = {"train": [], **{name: [] for name in fractions}}
    for record in records:
        u = split_key(key(record))
        out[next((name for upper, name in bounds if u < upper), "train")].append(record)
    return out


def _label_order(label: str) -> tuple:
    try:
        number = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (0, number, label) if math.isfinite(number) else (1, 0.0, label)


def _labels_of(record: dict) -> list[str]:
    """A record's label as a list of strings: its labels (multi-label, a list) or its one label."""
    label = record["label"]
    return [str(x) for x in label] if isinstance(label, list) else [str(label)]


def label_set(records: Sequence[dict]) -> list[str]:
    """The sorted distinct labels (as strings) of records' "label" values, or of their lists of labels
    (multi-label); ints sort numerically: 0, 1, 2, 10; numbers before other strings, which sort as strings."""
    return sorted({name for r in records for name in _labels_of(r)}, key=_label_order)


def check_labels(records: Sequence[dict], labels: Sequence[str], where: str) -> None:
    """DataError naming `where` and the first record index with a label (as a string; any of a list's) not in
    `labels`, and the set."""
    allowed = set(labels)
    for i, record in enumerate(records):
        for label in _labels_of(record):
            if label not in allowed:
                raise DataError(f"{where}: record {i} has label {label!r}, not one of {list(labels)}")


def label_list(value: Any, delimiter: str, where: str) -> list[str]:
    """A multi-label example's labels, in their order, once each: a list (a JSON/JSONL list field, or a
    ClassLabel list's names) as it is; a text that is a JSON list (`["a", "b"]`) as that list; any other text
    split at `delimiter` (`a,b`), each label stripped, empty pieces skipped; a number as its one label. A
    list holding something other than texts and integers is a DataError naming `where`."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise DataError(f"{where}: labels {value!r} start with '[' but are not a JSON list") from None
        else:
            return list(dict.fromkeys(p.strip() for p in text.split(delimiter) if p.strip()))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    if not isinstance(value, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                              for x in value):
        raise DataError(f"{where}: labels {value!r} are not a list of labels "
                        f"(nor a {delimiter!r}-separated text)")
    return list(dict.fromkeys(str(x).strip() for x in value if str(x).strip()))
