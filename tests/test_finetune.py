"""`python -m finetune` end to end on CPU: every task kind from a real pretraining checkpoint (the trainer's
own, tests/checkpoint_fixtures.py) and from its HF export, on the bundled downstream data; results.json,
the table, best/ in HF's pipelines with the real label names; seeds reproduce exactly; bad input exits 2.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import REPO, trained_runs

from core.cli import EXIT_BAD_INPUT, compose_args
from finetune.config import FinetuneConfig

DOWNSTREAM = REPO / "data" / "downstream"
MOVIES = DOWNSTREAM / "sentiment" / "movieReviewSnippets_GroundTruth.txt"
WIKIGOLD = DOWNSTREAM / "wikigold" / "wikigold.conll.txt"
SQUAD = REPO / "tests" / "assets" / "squad" / "dev-v1.1.json"
FAST = ["train.progress_bar=false", "train.log_every=1000", "train.batch_size=8", "train.eval_batch_size=32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, jargon_corpus, jargon_tokenizer) -> Path:
    return trained_runs(tmp_path_factory, jargon_corpus, jargon_tokenizer)["torch"]


@pytest.fixture(scope="module")
def hf_dir(ckpt, tmp_path_factory) -> Path:
    from serving.export import export

    out = tmp_path_factory.mktemp("finetune_hf") / "hf"
    export(ckpt, out)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """32 examples of each kind, from the bundled data: sentiment (jsonl), rating (jsonl), NER (CoNLL)."""
    root = tmp_path_factory.mktemp("small")
    rows = [line.split("\t") for line in MOVIES.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if float(r[1]) != 0][:32]
    with open(root / "sentiment.jsonl", "w") as f:
        for _, rating, text in rows:
            f.write(json.dumps({"sentence": text, "label": "pos" if float(rating) > 0 else "neg"}) + "\n")
    with open(root / "rating.jsonl", "w") as f:
        for _, rating, text in rows:
            f.write(json.dumps({"text": text, "score": float(rating)}) + "\n")
    sentences = [s for s in WIKIGOLD.read_text(encoding="utf-8").split("\n\n") if "-DOCSTART-" not in s][:32]
    (root / "ner.conll").write_text("\n\n".join(sentences) + "\n")
    return {"sentiment": root / "sentiment.jsonl", "rating": root / "rating.jsonl", "ner": root / "ner.conll"}


def run_finetune(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ---------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "commands" / "task").glob("*.yaml")))
def test_every_shipped_task_composes_and_validates(name):
    extra = ["task.train=x.json", "task.validation=y.json"] if name in ("squad",) else \
        ["task.train=x.json"] if name in ("classification", "regression", "ner", "qa") else []
    args = compose_args("finetune", FinetuneConfig, [f"task={name}", "model=m", *extra])
    assert args.task.name == name and args.optim.betas == [0.9, 0.98] and args.optim.eps == 1e-6
    assert args.optim.weight_decay == 0.1 and args.optim.warmup_ratio == 0.06 and args.train.epochs == 10
    if args.task.train.startswith(("data/", "tests/")):
        assert (REPO / args.task.train).is_file(), args.task.train


def test_bad_settings_exit_2_naming_the_key(ckpt, small, tmp_path):
    base = [f"model={ckpt}", f"output_dir={tmp_path / 'o'}", *FAST]
    for extra, message in [
        (["task=classification", f"task.train={small['sentiment']}", "task.kind=sorting"], "task.kind='sorting'"),
        (["task=classification", f"task.train={small['sentiment']}", "optim.lr=0"], "optim.lr=0"),
        (["task=classification", f"task.train={small['sentiment']}", "seeds=[]"], "seeds=[]"),
        (["task=classification", f"task.train={small['sentiment']}", "+task.nope=1"], "nope"),
        (["task=classification", f"task.train={tmp_path / 'missing.jsonl'}"], "missing.jsonl"),
        (["task=classification", f"task.train={small['sentiment']}", "task.text_field=nope"], "nope"),
        (["task=movie_sentiment", f"model={tmp_path / 'no_model'}"], "no_model"),
    ]:
        proc = run_finetune(*base, *extra)
        assert proc.returncode == EXIT_BAD_INPUT, (extra, proc.stdout[-2000:], proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr[-2000:])
    assert not (tmp_path / "o" / "results.json").exists()


# ---------------------------------------------------------------------------------------------------
# every kind overfits 32 examples, from the checkpoint and from its HF export


OVERFIT = {
    "sentiment": (["task=classification", "task.text_field=sentence"], "accuracy", 0.9),
    "rating": (["task=regression", "task.label_field=score"], "pearson", 0.9),
    "ner": (["task=ner", "task.max_length=96"], "accuracy", 0.9),
    "squad": (["task=qa", f"task.train={SQUAD}"], "f1", 50.0),
}


@pytest.mark.parametrize("kind", sorted(OVERFIT))
def test_a_tiny_model_overfits_32_examples(kind, ckpt, hf_dir, small, tmp_path):
    """Train and validate on the same examples: the metric reaches the bar, from the checkpoint (and the
    sentiment task from the HF export too)."""
    extra, metric, bar = OVERFIT[kind]
    files = [] if kind == "squad" else [f"task.train={small[kind]}"]
    validation = f"task.validation={SQUAD if kind == 'squad' else small[kind]}"
    for source in [ckpt] + ([hf_dir] if kind == "sentiment" else []):
        out = tmp_path / f"{kind}_{source.name}"
        proc = run_finetune(f"model={source}", f"output_dir={out}", *extra, *files, validation, *FAST,
                            "optim.lr=2e-3", "optim.weight_decay=0", "train.epochs=30", "train.dropout=0",
                            "optim.warmup_ratio=0.1")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        r = results(out)
        assert r["runs"][0]["validation"][metric] >= bar, r["runs"][0]["epochs"][-1]
        assert "median" in proc.stdout and metric in proc.stdout  # the table
        assert (out / "best" / "config.json").is_file() and (out / "best" / "tokenizer.json").is_file()
