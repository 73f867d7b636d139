"""Atomic checkpoints, the `latest` pointer, keep-last-K, and finding the checkpoint to resume from.

Layout under a run's `checkpoints/` directory:

    step_00001000/            one complete checkpoint
        checkpoint.json       {"step", "files": {relative path: {"bytes", "sha256"}}} written last
        ...                   what the engine and each rank wrote (see pretrain.train)
    latest                    the name of the newest complete checkpoint (a hint for people and tools)
    .tmp-step_00002000/       a checkpoint being written (or left by a crash): never resumed from

`save` is called by every rank: each writes its files into the temporary directory, a barrier, then
rank 0 lists the files with sizes and sha256 into `checkpoint.json`, renames the directory into place,
rewrites `latest` atomically and deletes the oldest complete checkpoints beyond `keep_last`; a second
barrier lets no rank run ahead of the rename. A checkpoint is complete when its `checkpoint.json`
parses and every listed file is there with its size (and sha256, when verified); `find_resumable`
walks the checkpoints newest first and passes over incomplete ones, saying why.

Also here: the RNG states of a process (python, numpy, torch, cuda), saved per rank.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from data_prep.shards import file_sha256
from pretrain import distributed

log = logging.getLogger(__name__)

CHECKPOINT_JSON = "checkpoint.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _list_files(directory: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != CHECKPOINT_JSON:
            files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def save(root: str | os.PathLike, step: int, write: Callable[[Path], None], keep_last: int) -> Path:
    """Write checkpoint `step` under `root` atomically; every rank calls this with its own `write(dir)`.

    Returns the final directory (on every rank).
    """
    root = Path(root)
    name = step_dir_name(step)
    tmp = root / f".tmp-{name}"
    final = root / name
    if distributed.rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save of the same step
        tmp.mkdir(parents=True)
    distributed.barrier()
    write(tmp)
    distributed.barrier()
    if distributed.rank() == 0:
        record = {"step": step, "files": _list_files(tmp)}
        _write_text_atomic(tmp / CHECKPOINT_JSON, json.dumps(record, indent=1, sort_keys=True) + "\n")
        if final.exists():  # the same step saved again (e.g. a resumed run that ends where it began)
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, name + "\n")
        prune(root, keep_last)
    distributed.barrier()
    return final


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of the `step_*` directories under `root`, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, and leftover temporary directories."""
    for _, path in complete_checkpoints(root)[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)
    for p in root.glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)


def problem(path: str | os.PathLike, check_hashes: bool = True) -> str | None:
    """Why checkpoint `path` cannot be resumed from, or None when it is complete."""
    path = Path(path)
    record_path = path / CHECKPOINT_JSON
    if not record_path.is_file():
        return f"no {CHECKPOINT_JSON} (the save did not finish)"
    try:
        record = json.loads(record_path.read_text())
        files = record["files"]
        int(record["step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        return f"{CHECKPOINT_JSON} is unreadable ({type(e).__name__}: {e})"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"file {rel} is missing"
        size = f.stat().st_size
        if size != meta["bytes"]:
            return f"file {rel} has {size} bytes, {CHECKPOINT_JSON} says {meta['bytes']} (truncated?)"
        if check_hashes and file_sha256(f) != meta["sha256"]:
            return f"file {rel}: sha256 differs from {CHECKPOINT_JSON} (corrupt)"
    return None


def step_of(path: str | os.PathLike) -> int:
    """The step recorded in a checkpoint's checkpoint.json."""
    return int(json.loads((Path(path) / CHECKPOINT_JSON).read_text())["step"])


def find_resumable(root: str | os.PathLike, check_hashes: bool = True) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under `root` (or None), and a line for each one passed over."""
    passed_over = []
    for _, path in complete_checkpoints(root):
        why = problem(path, check_hashes)
        if why is None:
            return path, passed_over
        passed_over.append(f"{path}: {why}")
    return None, passed_over


# ---------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    """The random states this process draws from: python, numpy, torch CPU and every CUDA device."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
