"""Tokenize text into a sharded token corpus (format: data_prep.shards, manifest: data_prep.corpus).

    python -m data_prep.build_corpus input='data/*.txt.gz' tokenizer=out/tok output_dir=out/corpus
    python -m data_prep.build_corpus ... num_tasks=4 task_index=2     # one of 4 independent tasks
    python -m data_prep.build_corpus merge=true output_dir=out/corpus  # after all tasks: manifest.json

How it works, and what it promises:
  - Units of work, independent of the number of tasks (`plan_units`): the sorted input list is cut into
    units of about `unit_bytes` on disk. Consecutive small files are grouped into one unit; an
    uncompressed .txt/.jsonl larger than `unit_bytes` is cut into byte ranges at document starts
    (data_prep.io.document_start), one unit each; a larger .gz stays one unit (it cannot be cut).
    The plan is `.build/units.json`. Unit u writes the shards `<split>-<uuuuu>-<ppppp>.bin/.idx` (a new
    part every `shard_tokens` tokens) and, when complete, a record `.build/unit-<uuuuu>.json` (its
    pieces, shard entries with sha256 and file stamps, counters, seconds, task, a hash of the settings).
  - Split: a document goes to `valid` when blake2b(UTF-8 text) / 2**64 < valid_fraction, so it never
    moves when files are added or reordered. Documents carry no <s>/</s>; text that reads "<mask>" is
    encoded as characters (data_prep.tokenizer.document_encoder).
  - Deterministic: the bytes depend only on the input and the settings (tokenizer, valid_fraction,
    shard_tokens, unit_bytes, join_lines), never on `workers` or `num_tasks`: a K-task build merged gives
    exactly the files of a one-process build. The manifest holds no timings (those go to the records).
  - Parallel: `workers`=1 (the default; use it) tokenizes in a background thread with the tokenizers
    library's own threads, which already use every core, while the main thread reads and writes a
    ~1 MB list of documents at a time (no Python work per document on the hot path). `workers`=N>1
    runs N single-threaded processes instead: it pays process start-up and pickling, and measured
    slower on 2 cores (bench/data_prep.py: 0.74-0.84 of raw vs 0.86-0.98). Try N>1 only on a big node
    where one process's serial part (turning encodings into arrays, split hashes) limits it, and
    keep it only if `python -m bench.data_prep workers=1,N` says so. Output bytes never depend on it.
    Batches are ~`batch_bytes` of text, at most 2 a worker in flight: memory does not grow with the
    corpus.
  - Corpus directory: the shards, manifest.json, and .build/ (settings.json, units.json, the per-unit
    records, the lock files start.lock, running.lock, unit-*.lock, merge.lock); a `.verified.json`
    appears once data_prep.corpus.Corpus.open has checked hashes. `.build/` grows linearly with the
    number of inputs: a record names its settings by hash, not by value.
  - Scale-out: task t of K starts at unit tU/K and takes, in turn, every unit that no task holds (a
    non-blocking flock on `.build/unit-<u>.lock`) and none has built; then it waits for the units held
    by others, and builds any whose task died. Big and small inputs balance, whatever K. When every
    unit has a record (after the last task, or in a one-task build), the task writes manifest.json;
    `merge=true` does it explicitly.
  - Resumable per unit: a rerun skips every unit whose record exists and whose shards match it (file
    size and mtime as recorded, else their sha256); other units are redone from their start (their
    stale shards removed first). A killed build, rerun, ends with the same bytes as an uninterrupted one.
  - Safe: an output directory that holds a corpus built with other settings is refused unless
    overwrite=true (which removes that corpus's files, and only those); one whose earlier build failed
    before finishing any file is started afresh. Any number of tasks may start at once, identical
    commands included: they agree on the settings and the plan under a lock, and each unit is built by
    one task while a duplicate waits for it and then skips it (see _BuildStart).
"""
from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Optional

import numpy as np
from omegaconf import MISSING
from tokenizers import Tokenizer

from core.cli import as_list, command
from core.tokenizer import TokenizerError, document_encoder, load_tokenizer, special_ids, tokenizer_hash
from data_prep.corpus import MANIFEST, VERIFIED, check_shard_hashes, write_manifest
from data_prep.io import InputError, Progress, ReadStats, document_start, expand_inputs, read_document_lists
from data_prep.shards import FORMAT_VERSION, CorpusError, ShardWriter, token_dtype

SPLITS = ("train", "valid")
BUILD_DIR = ".build"  # settings.json, units.json and the per-unit records
SETTINGS = "settings.json"
UNITS = "units.json"


@dataclass
class BuildCorpusArgs:
    """The settings of `python -m data_prep.build_corpus` (conf/commands/build_corpus.yaml)."""

    output_dir: str = MISSING
    """Corpus directory (shards, manifest.json, .build/)."""
    input: Any = None
    """Text: a file or glob, or a list of them (`input=[a.txt,'b/*.jsonl.gz']`); .txt/.jsonl[.gz]."""
    tokenizer: Optional[str] = None
    """Tokenizer directory (python -m data_prep.build_tokenizer)."""
    valid_fraction: float = 0.001
    """Share of documents in the valid split (chosen by a hash of each document's text)."""
    shard_tokens: int = 100_000_000
    """Start a new shard part after this many tokens."""
    join_lines: bool = False
    """Join the lines of each .txt document into one (a line break and the indentation around it become
    one space: for hard-wrapped text); .jsonl is read as it is. A setting of the corpus (recorded)."""
    workers: int = 1
    """1 (best on few cores): tokenizers' own threads; N>1: N processes."""
    batch_bytes: int = 1 << 20
    """Text per tokenizer batch (no effect on the output)."""
    unit_bytes: int = 256 << 20
    """Input bytes per unit of work: small files are grouped, and a larger uncompressed file cut at
    document starts, into units of about this size (a .gz is one unit). Units are shared by the tasks
    whatever their number; their shards are named by unit, so it is a setting of the corpus."""
    num_tasks: int = 1
    """Independent tasks sharing the units of work (a SLURM array)."""
    task_index: int = 0
    """This task, 0..num_tasks-1."""
    overwrite: bool = False
    """Replace a different corpus found in output_dir."""
    merge: bool = False
    """Only write manifest.json from the tasks' records."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.input is not None:
            self.input = as_list("input", self.input)
        if not self.merge and not (self.input and self.tokenizer):
            raise ValueError("input= and tokenizer= are required (or merge=true)")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction={self.valid_fraction}: must be in [0, 1)")
        for key in ("shard_tokens", "workers", "batch_bytes", "unit_bytes", "num_tasks"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be >= 1")
        if not 0 <= self.task_index < self.num_tasks:
            raise ValueError(f"task_index={self.task_index}: must be in 0..{self.num_tasks - 1}")


# ---------------------------------------------------------------- tokenizing (in workers or in-process)

_ENCODER = None  # the document encoder of this process
_DTYPE: np.dtype | None = None


def _set_encoder(tok: Tokenizer) -> None:
    global _ENCODER, _DTYPE
    _ENCODER = document_encoder(tok)
    _DTYPE = token_dtype(tok.get_vocab_size())


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the build process dies (even by kill -9), instead of being
    left running; elsewhere nothing."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(tokenizer_dir: str) -> None:
    _die_with_parent()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread a worker process
    _set_encoder(load_tokenizer(tokenizer_dir))


def is_valid_doc(text: str, valid_fraction: float) -> bool:
    """The split of a document, from a hash of its text alone."""
    return bool(_valid_mask([text], valid_fraction)[0])


def _valid_mask(texts: list[str], valid_fraction: float) -> np.ndarray:
    """is_valid_doc for each text: blake2b-64 (little-endian) < valid_fraction * 2**64, compared
    exactly (integers below the float threshold are those below its ceiling)."""
    threshold = math.ceil(valid_fraction * 2.0**64)
    if threshold == 0:
        return np.zeros(len(texts), dtype=bool)
    if threshold >= 2**64:
        return np.ones(len(texts), dtype=bool)
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(t.encode("utf-8"), digest_size=8).digest() for t in texts])
    return np.frombuffer(digests, dtype="<u8") < np.uint64(threshold)


def _encode(texts: list[str], valid_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(is_valid per doc, tokens per doc, all token ids back to back) for one batch."""
    assert _ENCODER is not None and _DTYPE is not None, "_set_encoder first"
    encodings = _ENCODER.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
    all_ids = itertools.chain.from_iterable(e.ids for e in encodings)
    ids = np.fromiter(all_ids, dtype=_DTYPE, count=int(lengths.sum()))
    return _valid_mask(texts, valid_fraction), lengths, ids


def _batches(doc_lists: Iterator[list[str]], batch_bytes: int) -> Iterator[list[str]]:
    """Batches of documents: each ends with the document that brings it to `batch_bytes` characters
    (the last batch may be smaller); one bisection a batch, no test a document."""
    batch: list[str] = []
    size = 0  # characters in `batch`
    for docs in doc_lists:
        ends = list(itertools.accumulate(map(len, docs)))  # characters up to and including each doc
        start = 0
        while start < len(docs):
            before = ends[start - 1] if start else 0
            last = bisect.bisect_left(ends, before + batch_bytes - size, lo=start)  # first to fill it
            if last == len(docs):
                batch.extend(docs[start:])
                size += ends[-1] - before
                break
            batch.extend(docs[start : last + 1])
            yield batch
            batch, size, start = [], 0, last + 1
    if batch:
        yield batch


class Encoder:
    """Tokenizes batches, results in input order, with at most 2 batches a worker in flight.

    workers=1: one background thread (the tokenizers library releases the GIL and uses its own
    threads), so reading and writing in the main thread overlap with tokenizing.
    workers=N>1: N single-threaded processes.
    """

    def __init__(self, tok: Tokenizer, tokenizer_dir: str, workers: int, valid_fraction: float):
        self.workers = workers
        self.valid_fraction = valid_fraction
        self._executor: concurrent.futures.Executor
        if workers == 1:
            _set_encoder(tok)
            self._executor = concurrent.futures.ThreadPoolExecutor(1)
        else:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(tokenizer_dir,),
            )

    def map(self, batches: Iterator[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        try:
            for batch in batches:
                pending.append(self._executor.submit(_encode, batch, self.valid_fraction))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- output directory bookkeeping

def _settings(args: BuildCorpusArgs, paths: list[Path], tok: Tokenizer) -> dict:
    """What defines the corpus bytes (and nothing that does not: no workers, tasks, timings).
    `join_lines` is recorded only when true, so a corpus built without it has the settings (and the
    manifest bytes) it had before the option existed."""
    settings = {
        "format_version": FORMAT_VERSION,
        "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in paths],
        "tokenizer_hash": tokenizer_hash(args.tokenizer),
        "vocab_size": tok.get_vocab_size(),
        "special_tokens": special_ids(tok),
        "valid_fraction": args.valid_fraction,
        "shard_tokens": args.shard_tokens,
        "unit_bytes": args.unit_bytes,
    }
    if args.join_lines:
        settings["join_lines"] = True
    return settings


def settings_hash(settings: dict) -> str:
    """What a unit record keeps of the settings: a hash (the settings list every input, so a record
    holding them would make `.build/` grow with the square of the number of inputs)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def plan_units(paths: list[Path], unit_bytes: int) -> list[list[dict]]:
    """The units of work: each a list of pieces {"input": index in `paths`, "start", "end"} (a byte
    range; `end` is the file's size for a whole file, or for any .gz). Consecutive files no larger
    than `unit_bytes` are grouped up to `unit_bytes`; a larger uncompressed file is cut into ranges of
    about `unit_bytes` at document starts, one unit each; a larger .gz is one unit. Depends only on
    the files and `unit_bytes`: every task computes the same plan."""
    units: list[list[dict]] = []
    group: list[dict] = []
    group_bytes = 0
    for i, path in enumerate(paths):
        size = path.stat().st_size
        if size <= unit_bytes:
            if group and group_bytes + size > unit_bytes:
                units.append(group)
                group, group_bytes = [], 0
            group.append({"input": i, "start": 0, "end": size})
            group_bytes += size
            continue
        if group:
            units.append(group)
            group, group_bytes = [], 0
        if path.name.lower().endswith(".gz"):
            units.append([{"input": i, "start": 0, "end": size}])
            continue
        cuts = sorted({0, size} | {document_start(path, k * unit_bytes) for k in range(1, -(-size // unit_bytes))})
        units.extend([{"input": i, "start": a, "end": b}] for a, b in zip(cuts, cuts[1:]))
    if group:
        units.append(group)
    return units


def _write_json(path: Path, obj: dict) -> None:
    """Atomic write; the temporary name is per process, as tasks may write the same file at once."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _corpus_files(out: Path) -> list[Path]:
    """The files a build writes into `out` (shards, temporaries, manifest, records, settings): what a
    restart with other settings removes. Never the lock files: others may be waiting on them."""
    shards = [f"{s}-*.{ext}" for s in SPLITS for ext in ("bin", "idx", "bin.tmp", "idx.tmp")]
    names = shards + [MANIFEST, MANIFEST + ".tmp", VERIFIED, f"{BUILD_DIR}/*.json", f"{BUILD_DIR}/*.tmp"]
    return sorted({p for pattern in names for p in out.glob(pattern) if p.is_file()})


def _finished_files(out: Path) -> list[Path]:
    """What makes `out` a corpus, finished or in part: a manifest, a unit record (a built unit),
    or a complete shard. A failed start leaves none of these, only settings and temporaries."""
    names = [MANIFEST, f"{BUILD_DIR}/unit-*.json"] + [f"{s}-*.{ext}" for s in SPLITS for ext in ("bin", "idx")]
    return sorted({p for pattern in names for p in out.glob(pattern) if p.is_file()})


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    """Hold an flock (fcntl.LOCK_EX or LOCK_SH, optionally | LOCK_NB) on `path` for the block.
    flock needs a file system that supports it across nodes (local disks, Lustre with -o flock, NFSv4)."""
    with open(path, "a") as f:
        fcntl.flock(f, mode)
        yield


class _BuildStart:
    """Task start-up that any number of tasks may run at once (a SLURM array starts them in one second).

    `.build/start.lock` (exclusive, held for the few milliseconds of the decision) lets one task at a
    time read `.build/settings.json` and decide: same settings: go on; no corpus yet: write the settings
    (atomically) and go on; other settings: refuse if `out` holds finished work (a manifest, a file
    record or a complete shard) unless overwrite=true, and otherwise (a failed earlier start, which left
    only its settings) start afresh. Clearing `out` also needs `.build/running.lock` exclusively, which
    every running task holds shared from its start to its end: a task never clears what another is
    writing; it refuses, naming the running tasks' host and pid.
    """

    def __init__(self, out: Path, settings: dict, overwrite: bool, plan: Callable[[], list] | None = None):
        self.out, self.settings, self.overwrite = out, settings, overwrite
        self.build = out / BUILD_DIR
        self.marker = self.build / f"task-{socket.gethostname()}-{os.getpid()}.running"
        self._running: IO[str] | None = None
        self._plan = plan
        self.units: list[list[dict]] = []  # the plan (.build/units.json), read or made under the lock

    def __enter__(self) -> _BuildStart:
        self.out.mkdir(parents=True, exist_ok=True)
        self.build.mkdir(exist_ok=True)
        with _flock(self.build / "start.lock", fcntl.LOCK_EX):
            old = self._old_settings()
            if old != self.settings:
                self._clear_for_new_settings(old)
                _write_json(self.build / SETTINGS, self.settings)
            if self._plan is not None:
                self.units = self._read_or_make_plan()
            self._running = open(self.build / "running.lock", "a")
            fcntl.flock(self._running, fcntl.LOCK_SH)  # nobody holds it exclusively: we hold start.lock
            self.marker.write_text(f"{socket.gethostname()} {os.getpid()}\n")
        return self

    def __exit__(self, *exc: object) -> None:
        self.marker.unlink(missing_ok=True)
        if self._running is not None:
            self._running.close()  # releases the shared lock

    def _old_settings(self) -> dict | None:
        """The settings of what `out` holds: None for nothing, {} for files of unknown origin."""
        spath = self.build / SETTINGS
        if spath.is_file():
            return json.loads(spath.read_text())
        if (self.out / MANIFEST).is_file():
            return json.loads((self.out / MANIFEST).read_text()).get("build", {}).get("settings") or {}
        return {} if _corpus_files(self.out) else None

    def _clear_for_new_settings(self, old: dict | None) -> None:
        if old is None:
            return  # an empty directory
        if _finished_files(self.out) and not self.overwrite:
            differ = sorted(k for k in self.settings.keys() | old.keys() if old.get(k) != self.settings.get(k))
            raise CorpusError(
                f"{self.out}: holds a different corpus (settings differ in {', '.join(differ)}); "
                "pass overwrite=true to replace it, or choose another output_dir"
            )
        try:
            with _flock(self.build / "running.lock", fcntl.LOCK_EX | fcntl.LOCK_NB):
                for p in _corpus_files(self.out):
                    p.unlink()
        except BlockingIOError:
            holders = sorted(m.read_text().strip() for m in self.build.glob("task-*.running"))
            raise CorpusError(
                f"{self.out}: another build with other settings is running in it "
                f"(host pid: {'; '.join(holders) or 'unknown'}); wait for it to end or choose another output_dir"
            ) from None

    def _read_or_make_plan(self) -> list[list[dict]]:
        """The plan of these settings: `.build/units.json` when it was made for them, else made now
        and written (the first task to start makes it; the others read it)."""
        path = self.build / UNITS
        want = settings_hash(self.settings)
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
                if saved.get("settings_hash") == want:
                    return saved["units"]
            except (json.JSONDecodeError, KeyError):
                pass
        assert self._plan is not None
        units = self._plan()
        _write_json(path, {"settings_hash": want, "units": units})
        return units

    def try_unit_lock(self, unit: int) -> IO[str] | None:
        """The unit's lock if no other task holds it (close the file to release it), else None."""
        f = open(self.build / f"unit-{unit:05d}.lock", "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f

    def unit_lock(self, unit: int) -> contextlib.AbstractContextManager[None]:
        """Wait for the unit's lock (a task building it ends, or dies and the lock goes with it)."""
        return _flock(self.build / f"unit-{unit:05d}.lock", fcntl.LOCK_EX)


def _record_path(out: Path, unit: int) -> Path:
    return out / BUILD_DIR / f"unit-{unit:05d}.json"


def _load_record(out: Path, unit: int, shash: str) -> dict | None:
    """The unit's record if it exists, is of these settings (hash) and its shards match it: the file
    stamps (size, mtime) it recorded, or else their sha256. None otherwise."""
    path = _record_path(out, unit)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("settings_hash") != shash:
            return None
        stamps = record["stamps"]
        changed = []
        for entry in (e for split in SPLITS for e in record["shards"][split]):
            if any(_stamp(out / entry[kind]) != stamps.get(entry[kind]) for kind in ("bin", "idx")):
                changed.append(entry)
        if changed:
            check_shard_hashes(out, changed, use_cache=False)
    except (json.JSONDecodeError, KeyError, TypeError, OSError, CorpusError):
        return None
    return record


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _shard_prefix(split: str, unit: int) -> str:
    """Shards are named by the unit of work (the plan's numbering), whatever the task."""
    return f"{split}-{unit:05d}-"


def _shard_name(split: str, index: int, part: int) -> str:
    return f"{_shard_prefix(split, index)}{part:05d}"


# ---------------------------------------------------------------- the build

class _SplitShards:
    """The shards of one split of one unit of work: `<split>-<unit>-<part>`, a new part once a part
    reaches `shard_tokens` tokens (the document that crosses the limit ends its part)."""

    def __init__(self, out: Path, split: str, index: int, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.index, self.dtype = out, split, index, dtype
        self.shard_tokens = shard_tokens
        self.entries: list[dict] = []  # the closed parts' manifest entries
        self._writer: ShardWriter | None = None

    def add_many(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (ids back to back, `lengths` tokens each), cutting parts where they fill."""
        ends = np.cumsum(lengths)
        doc, tok = 0, 0  # the first document, and its first token, not yet written
        while doc < len(lengths):
            if self._writer is None:
                name = _shard_name(self.split, self.index, len(self.entries))
                self._writer = ShardWriter(self.out, name, self.dtype)
            room = self.shard_tokens - self._writer.num_tokens  # > 0: a full part is closed at once
            stop = min(int(np.searchsorted(ends, tok + room)) + 1, len(lengths))  # past the filling doc
            stop_tok = int(ends[stop - 1])
            self._writer.add_many(ids[tok:stop_tok], lengths[doc:stop])
            if self._writer.num_tokens >= self.shard_tokens:
                self.entries.append(self._writer.close())
                self._writer = None
            doc, tok = stop, stop_tok

    def close(self) -> list[dict]:
        if self._writer is not None:
            self.entries.append(self._writer.close())
            self._writer = None
        return self.entries


def _build_unit(out: Path, unit: int, pieces: list[dict], paths: list[Path], encoder: Encoder,
                args: BuildCorpusArgs, shash: str, dtype: np.dtype, progress: Progress) -> dict:
    """Tokenize one unit (its pieces of input files, in order) into its shards; write and return its
    record."""
    start = time.perf_counter()
    _record_path(out, unit).unlink(missing_ok=True)  # a stale record must not be merged meanwhile
    for split in SPLITS:  # leftovers of an interrupted attempt
        for stale in out.glob(_shard_prefix(split, unit) + "*"):
            stale.unlink()
    stats = ReadStats()
    writers = {s: _SplitShards(out, s, unit, dtype, args.shard_tokens) for s in SPLITS}

    def documents() -> Iterator[list[str]]:
        for piece in pieces:
            path = paths[piece["input"]]
            whole = piece["start"] == 0 and piece["end"] == path.stat().st_size
            yield from read_document_lists(path, stats, progress, join_lines=args.join_lines,
                                           byte_range=None if whole else (piece["start"], piece["end"]))

    for valid, lengths, ids in encoder.map(_batches(documents(), args.batch_bytes)):
        for split, mine in (("train", ~valid), ("valid", valid)):
            if mine.all():
                writers[split].add_many(ids, lengths)
            elif mine.any():  # the split's documents, a vectorised gather
                writers[split].add_many(ids[np.repeat(mine, lengths)], lengths[mine])
    shards = {s: writers[s].close() for s in SPLITS}
    record = {
        "unit": unit,
        "pieces": [{**piece, "path": str(paths[piece["input"]])} for piece in pieces],
        "settings_hash": shash,
        "shards": shards,
        "stamps": {e[kind]: _stamp(out / e[kind]) for split in SPLITS for e in shards[split] for kind in ("bin", "idx")},
        "counters": {
            **stats.as_dict(),
            **{f"{s}_documents": sum(e["documents"] for e in shards[s]) for s in SPLITS},
            **{f"{s}_tokens": sum(e["tokens"] for e in shards[s]) for s in SPLITS},
        },
        "seconds": round(time.perf_counter() - start, 3),
        "task": f"{args.task_index}/{args.num_tasks} {socket.gethostname()} {os.getpid()}",
    }
    _write_json(_record_path(out, unit), record)
    return record


def merge(output_dir: str | os.PathLike) -> dict:
    """Write manifest.json from the per-unit records of all tasks; raises if one is missing."""
    out = Path(output_dir)
    spath = out / BUILD_DIR / SETTINGS
    upath = out / BUILD_DIR / UNITS
    for path in (spath, upath):
        if not path.is_file():
            raise CorpusError(f"{path}: missing; {out} is not a corpus build directory")
    # tasks that finish together take turns here: write_manifest uses one temporary file name
    with open(out / BUILD_DIR / "merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        settings = json.loads(spath.read_text())
        return _merge_locked(out, settings, json.loads(upath.read_text()))


def _merge_locked(out: Path, settings: dict, plan: dict) -> dict:
    """The records of every unit, in plan (= input) order, summed into one manifest."""
    shash = settings_hash(settings)
    if plan.get("settings_hash") != shash:
        raise CorpusError(f"{out / BUILD_DIR / UNITS}: made for other settings than {SETTINGS}; rerun the build")
    records = []
    missing = []
    for unit in range(len(plan["units"])):
        path = _record_path(out, unit)
        record = json.loads(path.read_text()) if path.is_file() else None
        if record is None or record.get("settings_hash") != shash:
            missing.append(unit)
        else:
            records.append(record)
    if missing:
        raise CorpusError(
            f"{out}: units {missing[:20]}{'…' if len(missing) > 20 else ''} are not built yet "
            f"({len(missing)} of {len(plan['units'])}); run the remaining tasks first"
        )
    counters: dict[str, int] = collections.Counter()
    for record in records:
        counters.update(record["counters"])
    if counters["documents"] == 0:
        raise CorpusError(
            f"the input holds no documents ({counters['files']} files, {counters['skipped_empty']} empty "
            f"documents skipped): nothing to write to {out}"
        )
    return write_manifest(
        out,
        tokenizer_hash=settings["tokenizer_hash"],
        vocab_size=settings["vocab_size"],
        special_tokens=settings["special_tokens"],
        splits={s: [e for r in records for e in r["shards"][s]] for s in SPLITS},
        build={"settings": settings, "counters": dict(sorted(counters.items()))},
    )


def _task_order(num_units: int, task_index: int, num_tasks: int) -> list[int]:
    """The units in the order task t of K tries them: from unit tU/K on, round to the start."""
    first = task_index * num_units // num_tasks
    return [(first + k) % num_units for k in range(num_units)]


def build_corpus(args: BuildCorpusArgs) -> dict:
    """Build units until none is left that no task holds (skipping verified ones), then wait for the
    units other tasks hold; write the manifest when all are done. Returns a summary: units built /
    skipped, counters, seconds, and whether the manifest was written."""
    if args.merge:
        manifest = merge(args.output_dir)
        return {"manifest": str(Path(args.output_dir) / MANIFEST), **manifest["build"]["counters"]}
    start = time.perf_counter()
    out = Path(args.output_dir)
    paths = expand_inputs(args.input)
    tok = load_tokenizer(args.tokenizer)
    settings = _settings(args, paths, tok)
    shash = settings_hash(settings)
    dtype = token_dtype(settings["vocab_size"])
    built = skipped = 0
    counters: dict[str, int] = collections.Counter()
    with _BuildStart(out, settings, args.overwrite, plan=lambda: plan_units(paths, args.unit_bytes)) as started:
        units = started.units
        left = [u for u in range(len(units)) if not _record_path(out, u).is_file()]
        unit_bytes = {u: sum(p["end"] - p["start"] for p in units[u]) for u in left}
        encoder: Encoder | None = None
        progress = Progress([], f"task {args.task_index}", enabled=args.progress, total=sum(unit_bytes.values()))

        def build_locked(u: int) -> None:
            nonlocal built, skipped, encoder
            if _load_record(out, u, shash) is not None:
                skipped += 1  # built before (a resume), or by another task meanwhile
                return
            if encoder is None:
                encoder = Encoder(tok, args.tokenizer, args.workers, args.valid_fraction)
            record = _build_unit(out, u, units[u], paths, encoder, args, shash, dtype, progress)
            built += 1
            counters.update(record["counters"])

        try:
            held = []
            for u in _task_order(len(units), args.task_index, args.num_tasks):
                lock = started.try_unit_lock(u)
                if lock is None:
                    held.append(u)  # another task is at it: see below
                    continue
                with lock:
                    build_locked(u)
            for u in held:  # wait for each; a task that died left it unbuilt: build it here
                with started.unit_lock(u):
                    build_locked(u)
        finally:
            progress.close()
            if encoder is not None:
                encoder.close()
        done = all(_record_path(out, u).is_file() for u in range(len(units)))
        if done:
            merge(out)
    return {
        "units_built": built, "units_skipped": skipped, **dict(sorted(counters.items())),
        "seconds": round(time.perf_counter() - start, 2),
        "manifest": str(out / MANIFEST) if done else "not yet (other tasks still to run; then merge=true)",
    }


@command("build_corpus", BuildCorpusArgs, refused=(InputError, TokenizerError, CorpusError, OSError))
def main(args: BuildCorpusArgs) -> int:
    summary = build_corpus(args)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    main()
