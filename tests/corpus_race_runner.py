"""One of several build_corpus processes started together, round after round (tests/test_build_corpus.py).

    python tests/corpus_race_runner.py spec.json ID

`spec.json`: {"processes": P, "rounds": [output dirs], "barrier": dir, "delay_s": float,
"args": {BuildCorpusArgs fields but output_dir}, "tasks": [[num_tasks, task_index] for each process]}.
In every round the P processes wait for each other at a file barrier, then build into that round's
output dir at the same moment. Process ID writes `<barrier>/result-ID.json`: {round: error or null}.

The hook that widens the race window: writing `.build/settings.json` pauses `delay_s` between its
temporary file and the rename, the moment at which a start-up without a lock took another task's
half-written settings for another corpus.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import data_prep.build_corpus as bc


def _slow_write_json(path: Path, obj: dict, delay_s: float) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    if path.name == bc.SETTINGS:
        time.sleep(delay_s)
    os.replace(tmp, path)


def wait_for_all(barrier: Path, name: str, count: int, timeout_s: float = 120.0) -> None:
    (barrier / f"{name}-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(barrier.glob(f"{name}-*"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}: the other processes did not arrive")
        time.sleep(0.001)


def main(spec_path: str, ident: int) -> int:
    spec = json.loads(Path(spec_path).read_text())
    barrier = Path(spec["barrier"])
    bc._write_json = lambda path, obj: _slow_write_json(path, obj, spec["delay_s"])
    num_tasks, task_index = spec["tasks"][ident]
    results: dict[str, str | None] = {}
    for r, out in enumerate(spec["rounds"]):
        wait_for_all(barrier, f"round{r}", spec["processes"])
        try:
            bc.build_corpus(bc.BuildCorpusArgs(output_dir=out, num_tasks=num_tasks, task_index=task_index,
                                               progress=False, **spec["args"]))
            results[str(r)] = None
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            results[str(r)] = f"{type(e).__name__}: {e}"
    (barrier / f"result-{ident}.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
