"""Atomic checkpoints, keep-last-K, and what `resume=auto` accepts (one process, real files)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from core import checkpoint
from core.checkpoint import (
    CHECKPOINT_JSON,
    LATEST,
    CheckpointError,
    find_resumable,
    problem,
    rng_state,
    set_rng_state,
)


def write_files(step: int):
    def write(directory: Path) -> None:
        torch.save({"w": torch.full((64,), float(step))}, directory / "model.pt")
        (directory / "sub").mkdir()
        (directory / "sub" / "rank_00000.pt").write_bytes(bytes(range(256)) * (step + 1))
    return write


def test_save_is_complete_listed_and_pointed_to(tmp_path):
    path = checkpoint.save(tmp_path, 7, write_files(7), keep_last=3)
    assert path == tmp_path / "step_00000007" and path.is_dir()
    record = json.loads((path / CHECKPOINT_JSON).read_text())
    assert record["step"] == 7 and set(record["files"]) == {"model.pt", "sub/rank_00000.pt"}
    assert record["files"]["sub/rank_00000.pt"]["bytes"] == 256 * 8
    assert len(record["files"]["model.pt"]["sha256"]) == 64
    assert (tmp_path / LATEST).read_text().strip() == "step_00000007"
    assert not list(tmp_path.glob(".tmp-*"))
    assert problem(path) is None and checkpoint.step_of(path) == 7


def test_keep_last_k_deletes_the_oldest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        checkpoint.save(tmp_path, step, write_files(step), keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000005"]


def test_resume_auto_passes_over_missing_truncated_corrupt_and_unfinished(tmp_path):
    for step in (1, 2, 3, 4, 5):
        checkpoint.save(tmp_path, step, write_files(step), keep_last=10)
    (tmp_path / "step_00000005" / "sub" / "rank_00000.pt").unlink()                 # missing
    model4 = tmp_path / "step_00000004" / "model.pt"
    model4.write_bytes(model4.read_bytes()[:-10])                                     # truncated
    rank3 = tmp_path / "step_00000003" / "sub" / "rank_00000.pt"
    data = bytearray(rank3.read_bytes()); data[5] ^= 0xFF; rank3.write_bytes(bytes(data))  # corrupt, same size
    (tmp_path / ".tmp-step_00000006").mkdir()                                         # a save in progress
    (tmp_path / "step_00000007").mkdir()                                              # no checkpoint.json
    path, passed_over = find_resumable(tmp_path)
    assert path == tmp_path / "step_00000002"
    assert [line.split(":")[0] for line in passed_over] == [str(tmp_path / f"step_0000000{s}") for s in (7, 5, 4, 3)]
    assert "checkpoint.json" in passed_over[0] and "missing" in passed_over[1]
    assert "truncated" in passed_over[2] and "corrupt" in passed_over[3]
    # without hash checks the same-size corruption is not seen (sizes still are)
    assert find_resumable(tmp_path, check_hashes=False)[0] == tmp_path / "step_00000003"


def test_no_checkpoint(tmp_path):
    assert find_resumable(tmp_path / "absent") == (None, [])


def test_saving_the_same_step_again_replaces_it(tmp_path):
    checkpoint.save(tmp_path, 3, write_files(3), keep_last=2)
    checkpoint.save(tmp_path, 3, write_files(4), keep_last=2)
    assert problem(tmp_path / "step_00000003") is None
    assert torch.load(tmp_path / "step_00000003" / "model.pt")["w"][0] == 4.0


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


class _Box:
    """A Stateful object (state_dict / load_state_dict) holding a dict."""

    def __init__(self, **state):
        self.state = state

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


class _Engine:
    """An engine that writes one file of its own."""

    def __init__(self, value: float):
        self.w = torch.full((4,), value)

    def save(self, directory):
        torch.save(self.w, directory / "model.pt")

    def load(self, directory):
        self.w = torch.load(directory / "model.pt")


def test_manager_round_trips_every_object_and_the_rng(tmp_path):
    from core.checkpoint import CheckpointManager

    def manager(engine, trainer, loader):
        return CheckpointManager(tmp_path, 0, 2, engine, trainer=trainer, per_rank={"loader": loader},
                                 run_config=lambda: "name: x\n")

    saver = manager(_Engine(3.0), _Box(step=5), _Box(epoch=1, position=17))
    torch.manual_seed(7)
    path = saver.save(5)
    expected = torch.rand(3)  # what the RNG gives after the save
    assert saver.has(5) and not saver.has(4) and (path / "config.yaml").read_text() == "name: x\n"
    assert saver.find("auto") == path and saver.find("none") is None
    loader, trainer, engine = _Box(), _Box(), _Engine(0.0)
    torch.manual_seed(99)
    manager(engine, trainer, loader).load(path)
    assert trainer.state == {"step": 5} and loader.state == {"epoch": 1, "position": 17}
    assert torch.equal(engine.w, torch.full((4,), 3.0)) and torch.equal(torch.rand(3), expected)
    with pytest.raises(CheckpointError, match="cannot resume from it: no checkpoint.json"):
        saver.find(str(tmp_path / "step_00000009"))


def test_a_rank_the_saving_run_had_not_takes_rank_0s_objects_and_a_seed_of_seed_rank_step(tmp_path):
    """Elastic resume on more ranks: rank 1 of a run resumed from a 1-rank checkpoint loads rank 0's
    per-rank objects (the loader's state is global) and seeds its RNGs from new_rank_seed(seed, 1, step)."""
    from core.checkpoint import CheckpointManager, new_rank_seed, seed_rngs

    def manager(rank, engine, trainer, loader):
        return CheckpointManager(tmp_path, rank, 2, engine, trainer=trainer, per_rank={"loader": loader},
                                 run_config=lambda: "name: x\n", seed=11)

    path = manager(0, _Engine(3.0), _Box(step=5), _Box(epoch=1, position=12)).save(5)
    assert not (path / "rank_00001.pt").exists()
    loader = _Box()
    torch.manual_seed(99)
    manager(1, _Engine(0.0), _Box(), loader).load(path)
    drawn = torch.rand(3)
    seed_rngs(new_rank_seed(11, 1, 5))
    assert loader.state == {"epoch": 1, "position": 12} and torch.equal(drawn, torch.rand(3))
    seeds = {new_rank_seed(11, r, s) for r in (1, 2) for s in (5, 6)} | {new_rank_seed(12, 1, 5)}
    assert len(seeds) == 5 and all(0 <= x < 2**63 for x in seeds)


def test_an_unreadable_file_is_a_problem_named_not_a_crash(tmp_path, monkeypatch):
    """resume=auto passes over a newest checkpoint whose file cannot be read and names why (root reads a
    chmod 000 file, so the permission error is raised where the file is read)."""
    for step in (1, 2):
        checkpoint.save(tmp_path, step, write_files(step), keep_last=5)
    unreadable = tmp_path / "step_00000002" / "model.pt"
    real = checkpoint.file_sha256

    def sha256(path, *a):
        if Path(path) == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a)

    monkeypatch.setattr(checkpoint, "file_sha256", sha256)
    path, passed_over = find_resumable(tmp_path)
    assert path == tmp_path / "step_00000001"
    assert "unreadable: PermissionError: Permission denied" in passed_over[0] and "model.pt" in passed_over[0]
