"""Benchmark of a corpus build from many tiny input files (a benchmark, not a test).

    python -m bench.prep_scale [--files 2000,20000] [--tasks 1]

For each count N: N one-document .txt files and the GPT-2 vocabulary of tests/assets (imported once);
then, every step in a fresh process under `ulimit -n 1024` (the usual soft limit):
  - build: `python -m data_prep.build_corpus` (--tasks tasks at once when > 1), seconds;
  - `.build/` size in bytes and file count (a record holds a settings hash: linear in N);
  - merge: `data_prep.build_corpus.merge` again, seconds in the process (reads every unit record);
  - training start-up: Corpus.open (hashes checked, `.verified.json` written), a TrainLoader with 2
    workers, the first batch: seconds after the imports, and open file descriptors of the main
    process then.
Build seconds include the processes' start (imports, tokenizer load).
Prints one line per N and a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOFILE = 1024


def _low_nofile() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(NOFILE, hard), hard))


def _run(argv: list[str], timeout: float = 1800) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, preexec_fn=_low_nofile, timeout=timeout)
    seconds = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(argv)[:300]}\n{r.stderr[-3000:]}")
    return seconds, r.stdout


_START = r"""
import json, os, sys, time
from data_prep.corpus import Corpus
from pretrain.data import TrainLoader
t = time.perf_counter()
corpus = Corpus.open(sys.argv[1], "train")
loader = TrainLoader(corpus, seq_len=64, micro_batch_size=4, num_workers=2)
it = iter(loader)
next(it)
seconds = time.perf_counter() - t
fds = len(os.listdir("/proc/self/fd"))
loader.close()
print(json.dumps({"start_s": round(seconds, 3), "fds": fds}))
"""

_MERGE = r"""
import json, sys, time
from data_prep.build_corpus import merge
t = time.perf_counter()
merge(sys.argv[1])
print(json.dumps({"merge_s": round(time.perf_counter() - t, 3)}))
"""


def tokenizer(tmp: Path) -> Path:
    from data_prep.tokenizer import import_gpt2, save_tokenizer

    gpt2 = REPO / "tests" / "assets" / "gpt2"
    return save_tokenizer(import_gpt2(gpt2 / "encoder.json", gpt2 / "vocab.bpe"), tmp / "tok")


def measure(tmp: Path, files: int, tok: Path, tasks: int) -> dict:
    src = tmp / f"in-{files}"
    src.mkdir()
    for i in range(files):
        (src / f"{i:06d}.txt").write_text(f"document number {i} of a corpus of {files} tiny files.\n")
    out = tmp / f"corpus-{files}"
    argv = [sys.executable, "-m", "data_prep.build_corpus", f"input={src}/*.txt", f"tokenizer={tok}",
            f"output_dir={out}", "progress=false", "valid_fraction=0"]
    t = time.perf_counter()
    procs = [subprocess.Popen(argv + [f"num_tasks={tasks}", f"task_index={k}"], cwd=REPO, preexec_fn=_low_nofile,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k in range(tasks)]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode:
            sys.exit(f"build failed: {err[-3000:]}")
    build_s = time.perf_counter() - t
    build_dir = out / ".build"
    build_bytes = sum(p.stat().st_size for p in build_dir.iterdir() if p.is_file())
    _, stdout = _run([sys.executable, "-c", _MERGE, str(out)])
    merge_s = json.loads(stdout.strip().splitlines()[-1])["merge_s"]
    _, stdout = _run([sys.executable, "-c", _START, str(out)])
    start = json.loads(stdout.strip().splitlines()[-1])
    return {"files": files, "tasks": tasks, "build_s": round(build_s, 2), "build_dir_bytes": build_bytes,
            "build_dir_files": len(list(build_dir.iterdir())), "merge_s": round(merge_s, 3),
            "train_start_s": start["start_s"], "train_start_fds": start["fds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="2000,20000", help="comma-separated counts of input files")
    parser.add_argument("--tasks", type=int, default=1, help="build tasks at once")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tok = tokenizer(tmp)
        for n in (int(x) for x in args.files.split(",")):
            r = measure(tmp, n, tok, args.tasks)
            results.append(r)
            print(f"{n:>6} files, {args.tasks} task(s), ulimit -n {NOFILE}: build {r['build_s']} s, .build/ "
                  f"{r['build_dir_bytes'] / 1e6:.2f} MB in {r['build_dir_files']} files, merge {r['merge_s']} s, "
                  f"training start-up {r['train_start_s']} s with {r['train_start_fds']} fds", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
