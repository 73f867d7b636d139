"""The corpus builder: content, determinism over workers and tasks, resume after a kill, refusals."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core.tokenizer import document_encoder, load_tokenizer, tokenizer_hash
from data_prep.build_corpus import BuildCorpusArgs, build_corpus, is_valid_doc, merge
from data_prep.corpus import Corpus, load_manifest
from data_prep.io import InputError, ReadStats, join_wrapped_lines, read_document_lists, read_documents
from data_prep.shards import CorpusError
from data_prep.tokenizer import import_gpt2, save_tokenizer

REPO = Path(__file__).resolve().parents[1]


def corpus_bytes(root: Path) -> dict[str, bytes]:
    """Everything a corpus is made of (manifest and shards), by name."""
    files = [root / "manifest.json", *sorted(root.glob("*.bin")), *sorted(root.glob("*.idx"))]
    return {p.name: p.read_bytes() for p in files}


def split_jargon(tmp_path: Path, jargon_path: Path, parts: int, max_docs: int = 4000) -> list[Path]:
    """The first max_docs documents of the Jargon File as `parts` .txt files (doc k -> file k % parts)."""
    docs = list(read_documents(jargon_path))[:max_docs]
    paths = []
    for i in range(parts):
        p = tmp_path / "in" / f"part{i:02d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n\n".join(docs[i::parts]) + "\n")
        paths.append(p)
    return paths


def one_unit_each(paths: list[Path]) -> int:
    """A unit_bytes that makes each of these (similar-sized) files a unit of its own."""
    return max(p.stat().st_size for p in paths)


def build(tmp_path: Path, name: str, inputs, tokenizer: Path, **kw) -> Path:
    out = tmp_path / name
    spec = ",".join(str(p) for p in inputs) if isinstance(inputs, list) else str(inputs)
    build_corpus(
        BuildCorpusArgs(output_dir=str(out), input=spec, tokenizer=str(tokenizer), progress=False, **kw)
    )
    return out


def test_jargon_corpus_holds_the_documents(jargon_corpus, jargon_tokenizer, jargon_path):
    manifest = load_manifest(jargon_corpus)
    assert manifest["tokenizer_hash"] == tokenizer_hash(jargon_tokenizer)
    assert manifest["vocab_size"] == 8192 and manifest["dtype"] == "uint16"
    assert manifest["special_tokens"] == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 8191}
    counters = manifest["build"]["counters"]
    assert counters["documents"] == 11857 and counters["skipped_empty"] == 0
    train = Corpus.open(jargon_corpus, "train", expect_tokenizer_hash=tokenizer_hash(jargon_tokenizer),
                        expect_vocab_size=8192)
    valid = Corpus.open(jargon_corpus, "valid")
    assert len(train) + len(valid) == 11857 and 50 < len(valid) < 600
    # every document, in order, is the tokenized text; the split follows the text's hash
    enc = document_encoder(load_tokenizer(jargon_tokenizer))
    it = {"train": iter(range(len(train))), "valid": iter(range(len(valid)))}
    corpora = {"train": train, "valid": valid}
    for k, text in enumerate(read_documents(jargon_path)):
        split = "valid" if is_valid_doc(text, 0.02) else "train"
        ids = corpora[split][next(it[split])]
        if k % 50 == 0:  # decoding all 11.8K documents is slow; check every 50th fully
            assert enc.decode(ids.tolist(), skip_special_tokens=False) == text
            assert ids.tolist() == enc.encode(text, add_special_tokens=False).ids
        assert 0 not in ids[:1] and 2 not in ids[-1:]  # no <s>/</s> added


def test_same_bytes_whatever_the_workers(tmp_path, jargon_tokenizer, jargon_path):
    inputs = split_jargon(tmp_path, jargon_path, parts=3, max_docs=3000)
    unit = one_unit_each(inputs)
    one = build(tmp_path, "w1", inputs, jargon_tokenizer, shard_tokens=5_000, batch_bytes=50_000, unit_bytes=unit)
    two = build(tmp_path, "w2", inputs, jargon_tokenizer, shard_tokens=5_000, batch_bytes=7_000, workers=2,
                unit_bytes=unit)
    assert corpus_bytes(one) == corpus_bytes(two)
    names = sorted(p.name for p in one.glob("*.bin"))
    assert "train-00000-00001.bin" in names and "valid-00002-00000.bin" in names  # parts and per-unit names
    # a part ends with the document that brings it to shard_tokens; only a unit's last part is short
    shards = load_manifest(one)["splits"]["train"]["shards"]
    for entry, after in zip(shards, shards[1:]):
        if entry["bin"].rsplit("-", 1)[0] == after["bin"].rsplit("-", 1)[0]:  # not its unit's last part
            offsets = np.fromfile(one / entry["idx"], dtype="<u8", offset=24)
            assert offsets[-2] < 5_000 <= offsets[-1]
    # reading the parts back gives every file's documents in order, file after file
    enc = document_encoder(load_tokenizer(jargon_tokenizer))
    for split in ("train", "valid"):
        corpus = Corpus.open(one, split)
        want = [d for p in inputs for d in read_documents(p) if is_valid_doc(d, 0.001) == (split == "valid")]
        assert [corpus[i].tolist() for i in range(len(corpus))] == [
            e.ids for e in enc.encode_batch(want, add_special_tokens=False)
        ]


def test_document_lists_are_the_documents(tmp_path, jargon_path):
    """The builder's fast reader gives read_documents' documents and counters, a list at a time."""
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(f'{{"text": "{t}"}}\n' for t in ["", " \\n ", "doc", "x\\ud800y"]) + "\n")
    for path in (jargon_path, jsonl):
        one, lists = ReadStats(), ReadStats()
        docs = list(read_documents(path, one))
        batches = list(read_document_lists(path, lists))
        assert [d for b in batches for d in b] == docs and one == lists
    assert docs == ["doc", "x\ufffdy"] and one.skipped_empty == 2 and one.invalid_utf8 == 1
    assert len(batches) == 1 and len(list(read_document_lists(jargon_path))) > 1  # ~1 MB a list


def test_two_tasks_merged_equal_one_process(tmp_path, jargon_tokenizer, jargon_path):
    """Task 0 of 2 alone takes every unit nobody holds; a unit record lost is named by merge and
    rebuilt by task 1; the merged corpus is the one-process corpus. Records hold a settings hash."""
    inputs = split_jargon(tmp_path, jargon_path, parts=3, max_docs=1500)
    unit = one_unit_each(inputs)
    single = build(tmp_path, "single", inputs, jargon_tokenizer, unit_bytes=unit)
    out = tmp_path / "tasks"
    common = dict(output_dir=str(out), input=",".join(map(str, inputs)), tokenizer=str(jargon_tokenizer),
                  progress=False, unit_bytes=unit)
    summary = build_corpus(BuildCorpusArgs(**common, num_tasks=2, task_index=0))
    assert summary["units_built"] == 3 and (out / "manifest.json").exists()
    record = json.loads((out / ".build" / "unit-00001.json").read_text())
    assert "settings" not in record and len(record["settings_hash"]) == 64
    assert [p["input"] for p in record["pieces"]] == [1] and record["task"].startswith("0/2 ")
    (out / ".build" / "unit-00001.json").unlink()
    (out / "manifest.json").unlink()
    with pytest.raises(CorpusError, match=r"units \[1\] are not built yet \(1 of 3\)"):
        merge(out)
    summary = build_corpus(BuildCorpusArgs(**common, num_tasks=2, task_index=1))
    assert summary["units_built"] == 1 and summary["units_skipped"] == 2 and (out / "manifest.json").exists()
    (out / "manifest.json").unlink()
    build_corpus(BuildCorpusArgs(output_dir=str(out), merge=True))
    assert corpus_bytes(out) == corpus_bytes(single)


def race(tmp_path: Path, name: str, inputs: list[Path], tokenizer: Path, tasks: list[tuple[int, int]],
         rounds: int, delay_s: float, **kw) -> tuple[list[Path], dict[int, dict]]:
    """len(tasks) processes building together into a fresh output dir, `rounds` times (see
    tests/corpus_race_runner.py); returns the output dirs and each process's {round: error or None}."""
    barrier = tmp_path / f"{name}-barrier"
    barrier.mkdir()
    outs = [tmp_path / f"{name}-{r}" for r in range(rounds)]
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({
        "processes": len(tasks), "rounds": [str(o) for o in outs], "barrier": str(barrier), "delay_s": delay_s,
        "tasks": tasks, "args": {"input": ",".join(map(str, inputs)), "tokenizer": str(tokenizer), **kw},
    }))
    runner = str(REPO / "tests" / "corpus_race_runner.py")
    procs = [subprocess.Popen([sys.executable, runner, str(spec), str(i)], cwd=REPO, stderr=subprocess.PIPE,
                              text=True) for i in range(len(tasks))]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return outs, {i: json.loads((barrier / f"result-{i}.json").read_text()) for i in range(len(tasks))}


def test_eight_tasks_at_once_like_a_slurm_array(tmp_path, jargon_tokenizer, jargon_path):
    """8 array tasks start in the same millisecond, 10 times, with the settings write slowed down to
    widen the window in which a start-up without a lock took another task's files for another corpus."""
    inputs = split_jargon(tmp_path, jargon_path, parts=8, max_docs=400)
    unit = one_unit_each(inputs)
    single = build(tmp_path, "single", inputs, jargon_tokenizer, unit_bytes=unit)
    outs, results = race(tmp_path, "array", inputs, jargon_tokenizer, [(8, t) for t in range(8)], rounds=10,
                         delay_s=0.05, unit_bytes=unit)
    errors = [f"task {i} round {r}: {e}" for i, res in results.items() for r, e in res.items() if e]
    assert not errors, "\n".join(errors)
    for out in outs:
        assert corpus_bytes(out) == corpus_bytes(single), out
        assert not list(out.glob("*.tmp")) and not list(out.glob(".build/*.tmp"))


def test_a_skewed_input_built_by_four_tasks_at_once_is_the_one_process_corpus(tmp_path, jargon_tokenizer,
                                                                             jargon_path):
    """5 small files, one 30 times larger (cut into >= 10 byte ranges at document starts, a BOM and CRLF
    line ends in it) and a .gz: 4 tasks at once, twice, give the one-process corpus byte for byte, with
    every document once, in input order."""
    docs = list(read_documents(jargon_path))
    d = tmp_path / "in"
    d.mkdir()
    small = [d / f"a{i}.txt" for i in range(5)]
    for i, path in enumerate(small):
        path.write_text("\n\n".join(docs[i * 40 : (i + 1) * 40]) + "\n")
    unit = one_unit_each(small)
    big = d / "b.txt"  # sorts after the a*.txt
    text, k = "", 200
    while len(text.encode()) < 30 * unit:
        text += docs[k] + ("\n\n" if k % 3 else "\n \n\n")  # blank-line runs, some with spaces
        k += 1
    big.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    gz = d / "c.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in docs[k : k + 50]).encode()))
    from data_prep.build_corpus import plan_units
    from data_prep.io import expand_inputs

    inputs = expand_inputs(f"{d}/*")
    assert inputs == [*small, big, gz]
    plan = plan_units(inputs, unit)
    assert sum(1 for u in plan if u[0]["input"] == 5) >= 10 and len(plan[-1]) == 1 and plan[-1][0]["input"] == 6
    single = build(tmp_path, "single", inputs, jargon_tokenizer, unit_bytes=unit, shard_tokens=3000,
                   valid_fraction=0.05)
    outs, results = race(tmp_path, "skew", inputs, jargon_tokenizer, [(4, t) for t in range(4)], rounds=2,
                         delay_s=0.0, unit_bytes=unit, shard_tokens=3000, valid_fraction=0.05)
    assert all(e is None for res in results.values() for e in res.values()), results
    for out in outs:
        assert corpus_bytes(out) == corpus_bytes(single), out
    tasks = {json.loads(r.read_text())["task"].split()[0] for r in outs[0].glob(".build/unit-*.json")}
    assert len(tasks) >= 2, tasks  # the work was shared
    enc = document_encoder(load_tokenizer(jargon_tokenizer))
    want = [t for p in inputs for t in read_documents(p)]
    assert len(want) == 200 + (k - 200) + 50
    for split in ("train", "valid"):
        corpus = Corpus.open(single, split)
        mine = [t for t in want if is_valid_doc(t, 0.05) == (split == "valid")]
        assert [corpus[i].tolist() for i in range(len(corpus))] == [
            e.ids for e in enc.encode_batch(mine, add_special_tokens=False)
        ]


def test_identical_builds_at_once_are_harmless(tmp_path, jargon_tokenizer, jargon_path):
    """Two copies of one command into one output_dir (a user's double submit): both exit cleanly, each
    file is built once, and the manifest agrees with the shards (verify_corpus passes)."""
    from data_prep.verify_corpus import verify_corpus

    inputs = split_jargon(tmp_path, jargon_path, parts=4, max_docs=2000)
    single = build(tmp_path, "single", inputs, jargon_tokenizer, shard_tokens=5_000)
    outs, results = race(tmp_path, "copies", inputs, jargon_tokenizer, [(1, 0), (1, 0)], rounds=3, delay_s=0.0,
                         shard_tokens=5_000)
    assert all(e is None for res in results.values() for e in res.values()), results
    for out in outs:
        assert corpus_bytes(out) == corpus_bytes(single), out
        verify_corpus(out)


def test_a_build_with_other_settings_never_clears_a_running_one(tmp_path, jargon_tokenizer, jargon_path):
    from data_prep.build_corpus import _BuildStart, _settings
    from data_prep.io import expand_inputs

    (inp,) = split_jargon(tmp_path, jargon_path, parts=1, max_docs=100)
    out = tmp_path / "out"
    args = BuildCorpusArgs(output_dir=str(out), input=str(inp), tokenizer=str(jargon_tokenizer), progress=False)
    settings = _settings(args, expand_inputs(args.input), load_tokenizer(jargon_tokenizer))
    with _BuildStart(out, settings, overwrite=False):  # a task of this build is running (nothing finished)
        for overwrite in (False, True):
            with pytest.raises(CorpusError, match=rf"another build with other settings is running in it "
                                                  rf"\(host pid: \S+ {os.getpid()}\)"):
                build(tmp_path, "out", [inp], jargon_tokenizer, valid_fraction=0.3, overwrite=overwrite)
        assert json.loads((out / ".build" / "settings.json").read_text()) == settings
    assert not list((out / ".build").glob("*.running"))
    build(tmp_path, "out", [inp], jargon_tokenizer, valid_fraction=0.3)  # it ended: nothing finished to keep


def test_a_rerun_after_a_failed_build_is_not_a_different_corpus(tmp_path, jargon_tokenizer):
    """The first build stops on a malformed line; the user fixes the file (its size changes, so the
    settings differ) and reruns with the same command: accepted, as nothing was finished."""
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "first doc"}\n{"text": broken\n')
    with pytest.raises(InputError, match="not valid JSON"):
        build(tmp_path, "out", src, jargon_tokenizer, valid_fraction=0.0)
    src.write_text('{"text": "first doc"}\n{"text": "fixed"}\n')
    out = build(tmp_path, "out", src, jargon_tokenizer, valid_fraction=0.0)
    assert load_manifest(out)["build"]["counters"]["documents"] == 2
    assert corpus_bytes(out) == corpus_bytes(build(tmp_path, "fresh", src, jargon_tokenizer, valid_fraction=0.0))


def test_split_does_not_move_when_files_are_added(tmp_path, jargon_tokenizer, jargon_path):
    a, b = split_jargon(tmp_path, jargon_path, parts=2, max_docs=1000)
    unit = one_unit_each([a, b])
    only_a = build(tmp_path, "a", [a], jargon_tokenizer, valid_fraction=0.1, unit_bytes=unit)
    both = build(tmp_path, "ab", [a, b], jargon_tokenizer, valid_fraction=0.1, unit_bytes=unit)
    for name in ("train-00000-00000.bin", "valid-00000-00000.bin", "valid-00000-00000.idx"):
        assert (only_a / name).read_bytes() == (both / name).read_bytes()


def test_bad_input_is_counted_not_fatal(tmp_path, jargon_tokenizer):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_bytes(
        b"\xef\xbb\xbfBOM first\r\nCRLF line\r\n\r\nbad \xff\xfe bytes\n\nNUL\x00inside\n\n"
        + b"word " * 2_000_000  # a 10 MB last line, no final newline
    )
    (src / "b.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": t}) + "\n" for t in ["", "   ", "json doc", "<mask> as text"]).encode()
    ))
    out = build(tmp_path, "out", f"{src}/*", jargon_tokenizer, valid_fraction=0.0)
    counters = load_manifest(out)["build"]["counters"]
    assert counters["documents"] == 6 and counters["skipped_empty"] == 2 and counters["invalid_utf8"] == 2
    enc = document_encoder(load_tokenizer(jargon_tokenizer))
    train = Corpus.open(out, "train")
    texts = [enc.decode(train[i].tolist(), skip_special_tokens=False) for i in range(len(train))]
    assert texts[:3] == ["BOM first\nCRLF line", "bad \ufffd\ufffd bytes", "NUL\x00inside"]
    assert texts[3] == "word " * 2_000_000 and texts[4:] == ["json doc", "<mask> as text"]
    assert len(Corpus.open(out, "valid")) == 0


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "data_prep.build_corpus", *args, "progress=false"],
                       capture_output=True, text=True, cwd=REPO)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_missing_or_empty_input_fails_clearly(tmp_path, jargon_tokenizer):
    r = run_cli(f"input={tmp_path}/nope.txt", f"tokenizer={jargon_tokenizer}", f"output_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "nope.txt: no such file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(CorpusError, match="the input holds no documents"):
        build(tmp_path, "o2", tmp_path / "blank.txt", jargon_tokenizer)
    r = run_cli(f"input={tmp_path}/blank.txt", f"output_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "tokenizer= are required" in r.stderr
    r = run_cli(f"input={tmp_path}/blank.txt", f"tokenizer={jargon_tokenizer}",
                f"output_dir={tmp_path / 'o'}", "workers=two")
    assert r.returncode == 2 and "Value 'two' of type 'str' could not be converted to Integer" in r.stderr


def test_a_different_corpus_is_refused_unless_overwrite(tmp_path, jargon_tokenizer, jargon_path):
    (inp,) = split_jargon(tmp_path, jargon_path, parts=1, max_docs=300)
    out = build(tmp_path, "out", [inp], jargon_tokenizer, valid_fraction=0.1)
    before = corpus_bytes(out)
    with pytest.raises(CorpusError, match=r"holds a different corpus \(settings differ in valid_fraction\)"):
        build(tmp_path, "out", [inp], jargon_tokenizer, valid_fraction=0.2)
    assert corpus_bytes(out) == before
    r = run_cli(f"input={inp}", f"tokenizer={jargon_tokenizer}", f"output_dir={out}", "shard_tokens=1000")
    assert r.returncode == 2 and "overwrite=true" in r.stderr
    build(tmp_path, "out", [inp], jargon_tokenizer, valid_fraction=0.2, overwrite=True)
    fresh = build(tmp_path, "fresh", [inp], jargon_tokenizer, valid_fraction=0.2)
    assert corpus_bytes(out) == corpus_bytes(fresh)
    # a directory with stray shard files but no build record is refused too
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "train-00000-00000.bin").write_bytes(b"x")
    with pytest.raises(CorpusError, match="holds a different corpus"):
        build(tmp_path, "stray", [inp], jargon_tokenizer)
    # so is a corpus written by other means (a manifest without our build settings)
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format_version": 1, "build": {}}))
    with pytest.raises(CorpusError, match="holds a different corpus"):
        build(tmp_path, "other", [inp], jargon_tokenizer)


def test_join_lines_is_a_setting_of_the_corpus(tmp_path, jargon_tokenizer, jargon_path):
    """join_lines=true joins each document's wrapped lines; the settings record it (and a default build
    records nothing new), so a rebuild into the same directory with the other value is a different corpus."""
    (inp,) = split_jargon(tmp_path, jargon_path, parts=1, max_docs=300)
    plain = build(tmp_path, "plain", [inp], jargon_tokenizer, valid_fraction=0.0)
    joined = build(tmp_path, "joined", [inp], jargon_tokenizer, valid_fraction=0.0, join_lines=True)
    assert "join_lines" not in load_manifest(plain)["build"]["settings"]
    assert load_manifest(joined)["build"]["settings"]["join_lines"] is True
    assert corpus_bytes(plain) != corpus_bytes(joined)
    enc = document_encoder(load_tokenizer(jargon_tokenizer))
    train = Corpus.open(joined, "train")
    docs = list(read_documents(inp))
    assert len(train) == len(docs) == 300
    for i in (0, 1, 150, 299):
        text = enc.decode(train[i].tolist(), skip_special_tokens=False)
        assert text == join_wrapped_lines(docs[i]) and "\n" not in text
    assert sum("\n" in d for d in docs) > 100  # the input is wrapped
    before = corpus_bytes(plain)
    with pytest.raises(CorpusError, match=r"holds a different corpus \(settings differ in join_lines\)"):
        build(tmp_path, "plain", [inp], jargon_tokenizer, valid_fraction=0.0, join_lines=True)
    r = run_cli(f"input={inp}", f"tokenizer={jargon_tokenizer}", f"output_dir={joined}", "valid_fraction=0")
    assert r.returncode == 2 and "settings differ in join_lines" in r.stderr and "Traceback" not in r.stderr
    assert corpus_bytes(plain) == before
    r = run_cli(f"input={inp}", f"tokenizer={jargon_tokenizer}", f"output_dir={joined}", "valid_fraction=0",
                "join_lines=true", check=True)
    assert "units_skipped=1" in r.stdout  # the same settings: the same corpus, nothing rebuilt


def test_rerun_skips_verified_files_and_redoes_corrupt_ones(tmp_path, jargon_tokenizer, jargon_path):
    inputs = split_jargon(tmp_path, jargon_path, parts=2, max_docs=600)
    unit = one_unit_each(inputs)
    out = build(tmp_path, "out", inputs, jargon_tokenizer, unit_bytes=unit)
    before = corpus_bytes(out)
    args = BuildCorpusArgs(output_dir=str(out), input=",".join(map(str, inputs)),
                           tokenizer=str(jargon_tokenizer), progress=False, unit_bytes=unit)
    assert build_corpus(args)["units_skipped"] == 2
    shard = out / "train-00001-00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    summary = build_corpus(args)
    assert summary["units_built"] == 1 and summary["units_skipped"] == 1
    assert corpus_bytes(out) == before


def test_killed_build_resumes_to_the_same_bytes(tmp_path, jargon_tokenizer, jargon_path):
    inputs = split_jargon(tmp_path, jargon_path, parts=12, max_docs=11857)
    spec = ",".join(map(str, inputs))
    unit = one_unit_each(inputs)
    reference = build(tmp_path, "reference", inputs, jargon_tokenizer, shard_tokens=5000, unit_bytes=unit)
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "data_prep.build_corpus", f"input=[{spec}]", f"tokenizer={jargon_tokenizer}",
            f"output_dir={out}", "shard_tokens=5000", "progress=false", "batch_bytes=4000", f"unit_bytes={unit}"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / ".build" / "unit-00000.json"
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (out / "manifest.json").exists(), "the build was not killed mid-way"
    stamp = (out / "train-00000-00000.bin").stat().st_mtime_ns
    rerun = [a for a in argv if not a.startswith("batch_bytes")]
    r = subprocess.run(rerun, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "units_skipped=0" not in r.stdout
    assert (out / "train-00000-00000.bin").stat().st_mtime_ns == stamp  # file 0 was not redone
    assert not list(out.glob("*.tmp"))
    assert corpus_bytes(out) == corpus_bytes(reference)


def test_imported_gpt2_vocabulary_builds_a_corpus(tmp_path):
    gpt2 = REPO / "tests" / "assets" / "gpt2"
    tok_dir = save_tokenizer(import_gpt2(gpt2 / "encoder.json", gpt2 / "vocab.bpe"), tmp_path / "tok")
    (tmp_path / "a.txt").write_text("Hello world\n\nanother document")
    out = build(tmp_path, "out", tmp_path / "a.txt", tok_dir)
    manifest = load_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 50262
    docs = Corpus.open(out, "train")
    assert docs[0].tolist() == [15500, 999] and docs[0].dtype == np.dtype("<u2")


def test_workers_die_with_a_killed_build(tmp_path, jargon_tokenizer, jargon_path):
    """kill -9 of a workers=2 build leaves no worker process behind."""
    import psutil

    inputs = split_jargon(tmp_path, jargon_path, parts=12, max_docs=11857)
    argv = [sys.executable, "-m", "data_prep.build_corpus", f"input=[{','.join(map(str, inputs))}]",
            f"tokenizer={jargon_tokenizer}", f"output_dir={tmp_path / 'out'}", "workers=2", "batch_bytes=2000",
            "progress=false"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    children: list = []
    while time.monotonic() < deadline and proc.poll() is None:
        children = parent.children(recursive=True)
        if sum("spawn_main" in " ".join(c.cmdline()) for c in children) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None and len(children) >= 2, "the workers did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
