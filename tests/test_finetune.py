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
        ["task.train=x.json"] if name in ("classification", "regression", "multi_label", "ner", "qa") else []
    args = compose_args("finetune", FinetuneConfig, [f"task={name}", "model=m", *extra])
    assert args.task.name == name and args.optim.betas == [0.9, 0.98] and args.optim.eps == 1e-6
    assert args.optim.weight_decay == 0.1 and args.optim.warmup_ratio == 0.06 and args.train.epochs == 10
    if args.task.train.startswith(("data/", "tests/")):
        assert (REPO / args.task.train).is_file(), args.task.train


def test_bad_settings_exit_2_naming_the_key(ckpt, small, tmp_path):
    base = [f"model={ckpt}", f"output_dir={tmp_path / 'o'}", *FAST]
    odd = tmp_path / "odd_label.jsonl"
    odd.write_text(json.dumps({"sentence": "fine", "label": "pos"}) + "\n" +
                   json.dumps({"sentence": "hm", "label": "maybe"}) + "\n")
    for extra, message in [
        (["task=classification", f"task.train={small['sentiment']}", "task.kind=sorting"], "task.kind='sorting'"),
        (["task=classification", f"task.train={small['sentiment']}", "optim.lr=0"], "optim.lr=0"),
        (["task=classification", f"task.train={small['sentiment']}", "seeds=[]"], "seeds=[]"),
        (["task=classification", f"task.train={small['sentiment']}", "+task.nope=1"], "nope"),
        (["task=classification", f"task.train={tmp_path / 'missing.jsonl'}"], "missing.jsonl"),
        (["task=classification", f"task.train={small['sentiment']}", "task.text_field=nope"], "nope"),
        (["task=movie_sentiment", f"model={tmp_path / 'no_model'}"], "no_model"),
        (["task=classification", f"task.train={small['sentiment']}", f"task.validation={odd}",
          "task.text_field=sentence"], "'maybe'"),
        (["task=movie_sentiment", "train.backend=deepspeed", "train.zero_stage=3"], "train.zero_stage=3"),
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
    """Train and validate on the same examples: the metric reaches the bar, from the checkpoint and from its
    HF export."""
    extra, metric, bar = OVERFIT[kind]
    files = [] if kind == "squad" else [f"task.train={small[kind]}"]
    validation = f"task.validation={SQUAD if kind == 'squad' else small[kind]}"
    for source in (ckpt, hf_dir):
        out = tmp_path / f"{kind}_{source.name}"
        proc = run_finetune(f"model={source}", f"output_dir={out}", *extra, *files, validation, *FAST,
                            "optim.lr=2e-3", "optim.weight_decay=0", "train.epochs=30", "train.dropout=0",
                            "optim.warmup_ratio=0.1")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        r = results(out)
        assert r["runs"][0]["validation"][metric] >= bar, r["runs"][0]["epochs"][-1]
        assert "median" in proc.stdout and metric in proc.stdout  # the table
        assert (out / "best" / "config.json").is_file() and (out / "best" / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------------
# seeds, best/ in HF's pipelines


@pytest.fixture(scope="module")
def sentiment_runs(ckpt, small, tmp_path_factory) -> dict[str, Path]:
    """The 32-sentence task over seeds [1, 2], twice (same settings), and once with seeds [2]."""
    root = tmp_path_factory.mktemp("sentiment_runs")
    args = [f"model={ckpt}", "task=classification", "task.text_field=sentence", f"task.train={small['sentiment']}",
            f"task.validation={small['sentiment']}", *FAST, "optim.lr=1e-3", "train.epochs=3"]
    outs = {}
    for name, seeds in [("a", "[1,2]"), ("b", "[1,2]"), ("c", "[2]")]:
        outs[name] = root / name
        proc = run_finetune(*args, f"output_dir={outs[name]}", f"seeds={seeds}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return outs


def _without_times(r: dict) -> dict:
    return [{k: v for k, v in e.items() if k != "seconds"} for run in r["runs"] for e in run["epochs"]]


def test_seeds_reproduce_exactly_and_the_summary_is_over_them(sentiment_runs):
    a, b, c = (results(sentiment_runs[k]) for k in "abc")
    assert _without_times(a) == _without_times(b)  # the same seeds: the same metrics, bit for bit
    assert _without_times({"runs": a["runs"][1:]}) == _without_times(c)  # seed 2 alone = seed 2 after seed 1
    assert a["runs"][0]["epochs"] != a["runs"][1]["epochs"]  # another seed: another run
    assert [r["seed"] for r in a["runs"]] == [1, 2] and len(a["runs"][0]["epochs"]) == 3
    accs = [r["validation"]["accuracy"] for r in a["runs"]]
    s = a["summary"]["validation"]["accuracy"]
    assert s["mean"] == pytest.approx(sum(accs) / 2) and s["min"] == min(accs) and s["max"] == max(accs)
    assert s["median"] == pytest.approx(sum(accs) / 2) and s["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2)
    for run in a["runs"]:  # the best epoch is the best validation accuracy (the first of equals)
        values = [e["validation"]["accuracy"] for e in run["epochs"]]
        assert run["best_epoch"] == values.index(max(values)) + 1
    best = max(a["runs"], key=lambda r: r["validation"]["accuracy"])
    assert a["best"]["seed"] == best["seed"] and a["data"]["labels"] == ["neg", "pos"]
    assert a["baselines"]["majority_accuracy"] >= 0.5


def test_best_is_an_hf_directory_the_text_classification_pipeline_reads_with_label_names(sentiment_runs, small):
    import transformers

    from core.hf import load_hf_task
    from core.tokenizer import load_tokenizer
    from finetune.encode import collate, encode_sequences

    best = sentiment_runs["a"] / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["architectures"] == ["RobertaForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    assert config["problem_type"] == "single_label_classification"
    texts = [json.loads(line)["sentence"] for line in small["sentiment"].read_text().splitlines()]
    pipe = transformers.pipeline("text-classification", model=str(best), device="cpu")
    answers = pipe(texts, top_k=None)
    model, _ = load_hf_task(best)
    rows, _ = encode_sequences(load_tokenizer(best), texts, None, 512)
    batch = collate(rows, 1)
    with torch.no_grad():
        probs = model.eval()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
    for answer, p in zip(answers, probs):
        scores = {a["label"]: a["score"] for a in answer}
        assert set(scores) == {"neg", "pos"}
        assert scores["pos"] == pytest.approx(float(p[1]), abs=1e-5)


def test_token_classification_best_in_the_ner_pipeline_and_qa_spans_by_hand(ckpt, small, tmp_path):
    """NER: best/ in pipeline("token-classification", aggregation_strategy="simple") gives entity groups
    with the real tag names, the same words our evaluation tags. QA: AutoModelForQuestionAnswering on
    best/ gives our logits (transformers 5 has no QA pipeline), so the same spans."""
    import transformers

    ner = tmp_path / "ner"
    proc = run_finetune(f"model={ckpt}", f"output_dir={ner}", "task=ner", f"task.train={small['ner']}",
                        f"task.validation={small['ner']}", *FAST, "optim.lr=2e-3", "train.epochs=20",
                        "train.dropout=0", "optim.weight_decay=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((ner / "best" / "config.json").read_text())
    assert config["architectures"] == ["RobertaForTokenClassification"]
    names = set(config["id2label"].values())
    assert "O" in names and {"B-PER", "I-PER", "B-ORG", "B-LOC"} <= names
    pipe = transformers.pipeline("token-classification", model=str(ner / "best"), aggregation_strategy="simple",
                                 device="cpu")
    sentence = small["ner"].read_text().split("\n\n")[0]
    words = [line.split()[0] for line in sentence.splitlines()]
    gold = [line.split()[-1] for line in sentence.splitlines()]
    found = pipe(" ".join(words))
    assert found, "no entity found in a training sentence the model overfits"
    gold_types = {t[2:] for t in gold if t != "O"}
    assert {g["entity_group"] for g in found} <= {"PER", "ORG", "LOC", "MISC"}
    assert {g["entity_group"] for g in found} & gold_types

    qa = tmp_path / "qa"
    proc = run_finetune(f"model={ckpt}", f"output_dir={qa}", "task=qa", f"task.train={SQUAD}",
                        f"task.validation={SQUAD}", *FAST, "optim.lr=2e-3", "train.epochs=30", "train.dropout=0",
                        "optim.weight_decay=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from core.hf import load_hf_task
    from core.tokenizer import load_tokenizer
    from finetune.data import read_squad
    from finetune.qa import qa_features, qa_predictions

    examples, _ = read_squad(SQUAD)
    features = qa_features(load_tokenizer(qa / "best"), examples, max_length=384, stride=128)
    theirs = transformers.AutoModelForQuestionAnswering.from_pretrained(str(qa / "best")).eval()
    ours, _ = load_hf_task(qa / "best")
    starts, ends = [], []
    for f in features:
        ids = torch.tensor([f.input_ids])
        with torch.no_grad():
            h, o = theirs(input_ids=ids), ours.eval()(ids)
        assert torch.allclose(h.start_logits, o.start_logits, atol=1e-5)
        starts.append(h.start_logits[0].numpy())
        ends.append(h.end_logits[0].numpy())
    answers = qa_predictions(examples, features, starts, ends)
    exact = sum(answers[e["id"]] in e["answers"]["text"] for e in examples)
    assert exact >= len(examples) // 2, (answers, [e["answers"]["text"] for e in examples])
    assert results(qa)["runs"][0]["validation"]["exact_match"] == pytest.approx(100 * exact / len(examples))


# ---------------------------------------------------------------------------------------------------
# a pretrained checkpoint beats the majority class on the real tasks, over 3 seeds


def test_three_seeds_beat_the_majority_on_sentiment_and_wikigold(ckpt, tmp_path):
    """The median over 3 seeds (the RoBERTa paper reports medians: a seed of a small model can collapse to
    the majority answer) beats the majority class on the bundled sentiment task and the majority tag (O)
    in WikiGold token accuracy, with entity F1 above 0. Measured with this fixture's checkpoint: sentiment
    0.62 vs 0.52, WikiGold 0.858 vs 0.840 (F1 0.19)."""
    for task, extra in [
        ("movie_sentiment", ["task.max_length=64", "train.epochs=2", "optim.lr=3e-4", "train.batch_size=32"]),
        ("wikigold", ["task.max_length=96", "train.epochs=3", "optim.lr=3e-3", "train.batch_size=16",
                      "train.dropout=0"]),
    ]:
        out = tmp_path / task
        proc = run_finetune(f"model={ckpt}", f"task={task}", f"output_dir={out}", "seeds=[1,2,3]", *FAST[:2],
                            "train.eval_batch_size=128", *extra, "save_best=false", timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        r = results(out)
        majority = r["baselines"]["majority_accuracy"]
        summary = r["summary"]["validation"]
        assert summary["accuracy"]["median"] > majority + 0.01, (task, summary["accuracy"], majority)
        assert summary["accuracy"]["min"] >= majority - 0.02, (task, summary["accuracy"], majority)
        if task == "wikigold":
            assert summary["f1"]["median"] > 0, summary["f1"]


def test_two_ranks_under_torchrun_train_like_one(ckpt, small, tmp_path):
    """DDP, and DeepSpeed ZeRO-2: each step's batch split over 2 ranks, gradients averaged: without dropout
    the same run as one process, up to the order of float sums (losses within 1e-4 relative, the same
    validation metrics)."""
    import os

    args = [f"model={ckpt}", "task=classification", "task.text_field=sentence", f"task.train={small['sentiment']}",
            f"task.validation={small['sentiment']}", *FAST, "optim.lr=1e-3", "train.epochs=2", "train.dropout=0",
            "save_best=false"]
    one = tmp_path / "one"
    assert run_finetune(*args, f"output_dir={one}").returncode == 0
    a = results(one)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    for backend in ("torch", "deepspeed"):
        out = tmp_path / backend
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                               "finetune", *args, f"output_dir={out}", f"train.backend={backend}",
                               "train.zero_stage=2"], cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**env, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        b = results(out)
        assert a["world_size"] == 1 and b["world_size"] == 2 and b["train"]["backend"] == backend
        for ea, eb in zip(a["runs"][0]["epochs"], b["runs"][0]["epochs"]):
            assert eb["train_loss"] == pytest.approx(ea["train_loss"], rel=1e-4), backend
            assert eb["validation"]["accuracy"] == ea["validation"]["accuracy"], backend
