"""Tiny trained checkpoints for the evaluation, export and fill-mask tests, made by the real trainer.

    runs = trained_runs(tmp_path_factory, jargon_corpus, jargon_tokenizer)   # {name: run directory}

Once per test session (memoized here, so several test modules share the runs), on the jargon corpus:
  torch   trainer.backend=torch, one process, 120 steps (enough to leave the unigram plateau)
  zero3   DeepSpeed ZeRO-3, 2 ranks under torchrun, 10 steps
  zero0   DeepSpeed ZeRO-0 (the module's weights saved by rank 0), 2 ranks, same launch, 10 steps
Each run validates on the whole valid split at its end (metrics.jsonl) and leaves one checkpoint.
The runs go through tests/train_runner.py, which composes conf/pretrain.yaml as the CLI does.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300

_cache: dict[tuple[str, str], dict[str, Path]] = {}


def tiny_overrides(corpus: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    """A 2-layer, hidden-64 model, seq_len 64, no dropout; validation on the whole valid split at the end."""
    return [
        f"data.corpus={corpus}", f"data.tokenizer={tokenizer}", f"trainer.output_dir={out}",
        "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.ffn_size=128",
        "model.hidden_dropout=0", "model.attention_dropout=0", "data.seq_len=64", "data.valid_max_batches=0",
        "schedule.warmup_steps=5", "optim.lr=3e-3", "system.dist_timeout_s=120", "trainer.log_every=10",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.resume=none", "trainer.progress_bar=false",
        "wandb.enabled=false", *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(runs: list[dict], workdir: Path, nproc: int) -> None:
    """Train `runs` one after the other in one process group of `nproc` ranks; fail on any non-zero exit."""
    spec, result = workdir / f"spec{nproc}.json", workdir / f"result{nproc}.json"
    spec.write_text(json.dumps({"runs": runs, "result": str(result)}))
    runner = str(REPO / "tests" / "train_runner.py")
    cmd = [sys.executable, runner, str(spec)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(_free_port()), runner, str(spec)]
    inherited = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    codes = json.loads(result.read_text())
    assert all(code == 0 for code in codes.values()), codes


def trained_runs(factory: pytest.TempPathFactory, corpus: Path, tokenizer: Path) -> dict[str, Path]:
    """{"torch", "zero3", "zero0"} -> run directory (holding metrics.jsonl and checkpoints/)."""
    key = (str(corpus), str(tokenizer))
    if key not in _cache:
        root = factory.mktemp("trained_runs")
        runs = {name: root / name for name in ("torch", "zero3", "zero0")}
        _launch([{"name": "torch", "overrides": tiny_overrides(
            corpus, tokenizer, runs["torch"], "trainer.backend=torch", "schedule.max_steps=120",
            "schedule.global_batch_size=16", "system.micro_batch_size=16")}], root, nproc=1)
        _launch([{"name": name, "overrides": tiny_overrides(
            corpus, tokenizer, runs[name], "trainer.backend=deepspeed", f"deepspeed={name}",
            "schedule.max_steps=10", "schedule.global_batch_size=8", "system.micro_batch_size=2")}
            for name in ("zero3", "zero0")], root, nproc=2)
        _cache[key] = runs
    return _cache[key]


def final_validation(run_dir: Path) -> dict[str, float]:
    """The last validation record of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "valid/loss" in r][-1]
