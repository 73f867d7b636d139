"""Evaluation of checkpoints: the same numbers as the trainer's own validation, from any backend."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import REPO, final_validation, trained_runs

from core.checkpoint import CheckpointError, load_checkpoint_model, resolve_checkpoint
from data_prep.corpus import Corpus
from pretrain.config import ConfigError, load_run_config
from pretrain.data import ValidLoader
from pretrain.evaluate import EVAL_JSON, evaluate, evaluate_checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory, jargon_corpus, jargon_tokenizer) -> dict[str, Path]:
    return trained_runs(tmp_path_factory, jargon_corpus, jargon_tokenizer)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def assert_metrics_equal(summary: dict, trainer: dict) -> None:
    assert summary["tokens"] == trainer["valid/tokens"]
    for key in ("loss", "ppl", "accuracy"):
        assert summary[key] == pytest.approx(trainer[f"valid/{key}"], rel=1e-9, abs=1e-12), key


def test_cli_equals_the_trainers_final_validation(runs):
    """One rank, the whole valid split: the trainer's last validation record, reproduced."""
    proc = run_cli(f"checkpoint={runs['torch']}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    ckpt = resolve_checkpoint(runs["torch"])
    assert summary["checkpoint"] == str(ckpt) and summary["step"] == 120 and summary["split"] == "valid"
    assert_metrics_equal(summary, final_validation(runs["torch"]))
    assert json.loads((ckpt / EVAL_JSON).read_text()) == summary
    assert summary["loss"] < math.log(8192) - 1.0  # well below a uniform guess: it has learned


@pytest.mark.parametrize("name", ["zero3", "zero0"])
def test_consolidated_deepspeed_weights_reproduce_the_two_rank_validation(runs, name):
    """The trainer validated with 2 ranks (blocks 0, 2, 4, ... and 1, 3, 5, ...); the consolidated weights
    on both ranks' batches in one process give the same totals."""
    ckpt = resolve_checkpoint(runs[name])
    run = load_run_config(ckpt)
    model = load_checkpoint_model(ckpt, run.model)
    corpus = Corpus.open(run.data.corpus, "valid")
    loaders = [ValidLoader(corpus, seq_len=run.data.seq_len, batch_size=run.system.micro_batch_size,
                           masking=run.data.masking, seed=run.trainer.seed, rank=r, world_size=2,
                           packing=run.data.packing) for r in (0, 1)]

    def forward(batch: dict[str, torch.Tensor]):
        return model(batch["input_ids"], batch["attention_mask"], batch["labels"], reduction="sum")

    metrics = evaluate(forward, itertools.chain(*loaders), torch.device("cpu"))
    assert_metrics_equal(metrics, final_validation(runs[name]))


def test_overrides_and_output(runs, tmp_path):
    output = tmp_path / "e.json"
    proc = run_cli(f"checkpoint={runs['torch']}/checkpoints", "+data.valid_max_batches=2",
                   "+system.micro_batch_size=4", f"output={output}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(output.read_text())
    assert summary == json.loads(proc.stdout)
    assert summary["batch_size"] == 4 and summary["max_batches"] == 2
    assert 0 < summary["tokens"] < final_validation(runs["torch"])["valid/tokens"]
    # the same two batches in-process
    again = evaluate_checkpoint(runs["torch"], ["data.valid_max_batches=2", "system.micro_batch_size=4"])
    assert again["loss"] == summary["loss"] and again["tokens"] == summary["tokens"]


def test_bad_inputs_name_what_is_wrong(runs, tmp_path):
    proc = run_cli(f"checkpoint={runs['torch']}", "+data.no_such_key=1")
    assert proc.returncode == 2 and "data.no_such_key" in proc.stderr
    proc = run_cli(f"checkpoint={runs['torch']}", "data.valid_max_batches=1")  # a run-config key needs +
    assert proc.returncode == 2 and "To append to your config use +data.valid_max_batches=1" in proc.stderr
    proc = run_cli(f"checkpoint={runs['torch']}", "+model.hidden_size=8")  # the model is the checkpoint's
    assert proc.returncode == 2 and "unknown key 'model'" in proc.stderr
    proc = run_cli(f"checkpoint={tmp_path}")
    assert proc.returncode == 2
    assert f"{tmp_path}: not a complete checkpoint: no checkpoint.json" in proc.stderr
    proc = run_cli(f"checkpoint={runs['torch']}", f"+data.corpus={tmp_path}")
    assert proc.returncode == 2 and f"{tmp_path}/manifest.json: no manifest" in proc.stderr
    with pytest.raises(ConfigError, match="data.seq_len=many"):
        evaluate_checkpoint(runs["torch"], ["data.seq_len=many"])
    with pytest.raises(ConfigError, match=r"system.precision='fp16' must be one of \['fp32', 'bf16'\]"):
        evaluate_checkpoint(runs["torch"], ["system.precision=fp16"])
    with pytest.raises(ConfigError, match=r"data.seq_len=600 must be within \[3, 512\]"):
        evaluate_checkpoint(runs["torch"], ["data.seq_len=600"])
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        evaluate_checkpoint(tmp_path / "absent")
