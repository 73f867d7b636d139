"""Evaluation of checkpoints: the same numbers as the trainer's own validation, from any backend."""
from __future__ import annotations

import gzip
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import REPO, final_validation, trained_runs

from core.checkpoint import (
    CheckpointError,
    load_checkpoint_model,
    load_model_and_tokenizer,
    resolve_checkpoint,
)
from core.cli import compose_args
from core.tokenizer import document_encoder, load_tokenizer, special_ids
from data_prep.corpus import Corpus
from data_prep.io import read_documents
from pretrain.config import ConfigError, load_run_config
from pretrain.data import ValidLoader
from pretrain.evaluate import (
    EVAL_JSON,
    TEXT_EVAL_JSON,
    EvaluateArgs,
    evaluate,
    evaluate_checkpoint,
    evaluate_text,
    masked_text_batches,
    pack_documents,
)
from pretrain.masking import word_start_table
from serving.export import export


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


# ---------------------------------------------------------------------------------------------------
# text mode: any .txt / .jsonl, packed and masked as training does


@pytest.fixture(scope="module")
def texts(tmp_path_factory, jargon_path) -> dict:
    """300 documents of the Jargon File (~8K tokens) as a .txt and as a .jsonl.gz."""
    docs = list(read_documents(jargon_path))[3000:3300]
    root = tmp_path_factory.mktemp("texts")
    txt, jsonl = root / "sample.txt", root / "sample.jsonl.gz"
    txt.write_text("\n\n".join(docs) + "\n")
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return {"txt": txt, "jsonl": jsonl, "docs": docs}


def assert_sane(summary: dict) -> None:
    assert math.isfinite(summary["loss"]) and summary["ppl"] == pytest.approx(math.exp(summary["loss"]))
    assert 0.0 <= summary["top1_accuracy"] <= summary["top5_accuracy"] <= 1.0
    assert 0.12 < summary["masked_tokens"] / summary["tokens"] < 0.18  # 15% of the tokens


def test_text_mode_on_txt_and_jsonl(runs, texts, jargon_tokenizer):
    proc = run_cli(f"checkpoint={runs['torch']}", f"text={texts['txt']}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    ckpt = resolve_checkpoint(runs["torch"])
    assert json.loads((ckpt / TEXT_EVAL_JSON).read_text()) == summary
    assert set(summary) == {"model", "text", "documents", "sequences", "tokens", "masked_tokens", "loss",
                            "ppl", "top1_accuracy", "top5_accuracy", "whole_word", "join_lines", "mask_seed",
                            "seq_len"}
    assert summary["model"] == str(ckpt) and summary["text"] == str(texts["txt"])
    assert summary["seq_len"] == 64  # the run's data.seq_len
    assert summary["mask_seed"] == 0 and summary["whole_word"] is False and summary["join_lines"] is False
    enc = document_encoder(load_tokenizer(jargon_tokenizer))
    lengths = [len(e.ids) for e in enc.encode_batch(texts["docs"], add_special_tokens=False)]
    tokens = sum(lengths)
    assert summary["documents"] == 300 and summary["tokens"] == tokens
    assert summary["sequences"] == -(-(tokens + 299) // 62)  # </s> between documents, 62 a block
    assert_sane(summary)
    assert summary["loss"] < math.log(8192) - 1.0  # well below a uniform guess: it has learned
    # the same documents as JSON lines: the same numbers
    jsonl = evaluate_text(runs["torch"], str(texts["jsonl"]))
    assert {**jsonl, "text": None} == {**summary, "text": None}
    # max_documents takes the first ones
    first = evaluate_text(runs["torch"], str(texts["txt"]), max_documents=10)
    assert first["documents"] == 10 and first["tokens"] == sum(lengths[:10])


def test_text_mode_is_deterministic_and_seeded(runs, texts):
    one = evaluate_text(runs["torch"], str(texts["txt"]), mask_seed=7)
    assert evaluate_text(runs["torch"], str(texts["txt"]), mask_seed=7) == one
    smaller = evaluate_text(runs["torch"], str(texts["txt"]), mask_seed=7, batch_size=5)
    assert smaller["masked_tokens"] == one["masked_tokens"] and smaller["loss"] == pytest.approx(one["loss"])
    other = evaluate_text(runs["torch"], str(texts["txt"]), mask_seed=8)
    assert other["loss"] != one["loss"] and other["tokens"] == one["tokens"]
    _, tok = load_model_and_tokenizer(runs["torch"])
    samples = pack_documents([e.ids for e in document_encoder(tok).encode_batch(texts["docs"],
                                                                                add_special_tokens=False)],
                             64, special_ids(tok))
    masks = {seed: torch.cat([b["labels"] for b in masked_text_batches(samples, tok, 16, seed)])
             for seed in (7, 8)}
    again = torch.cat([b["labels"] for b in masked_text_batches(samples, tok, 5, 7)])
    assert torch.equal(masks[7], again)  # the masks do not depend on the batch size
    assert not torch.equal(masks[7].ne(-100), masks[8].ne(-100))


def test_text_mode_whole_word_masks_whole_words(runs, texts):
    summary = evaluate_text(runs["torch"], str(texts["txt"]), whole_word=True)
    assert summary["whole_word"] is True
    assert math.isfinite(summary["loss"]) and 0.0 <= summary["top1_accuracy"] <= summary["top5_accuracy"] <= 1
    _, tok = load_model_and_tokenizer(runs["torch"])
    samples = pack_documents([e.ids for e in document_encoder(tok).encode_batch(texts["docs"],
                                                                                add_special_tokens=False)],
                             64, special_ids(tok))
    labels = torch.cat([b["labels"] for b in masked_text_batches(samples, tok, 16, 0, whole_word=True)])
    chosen = labels.ne(-100).numpy()
    starts = word_start_table(tok)[samples]
    starts[:, 1:] |= samples[:, :-1] < 4  # a token after a special one starts a word
    # a chosen token that continues a word has its word's previous token chosen too, and vice versa
    continues = ~starts[:, 1:]
    assert (chosen[:, 1:][continues] == chosen[:, :-1][continues]).all()
    assert chosen.sum() == summary["masked_tokens"] and continues[chosen[:, 1:]].any()


def test_top1_and_top5_are_the_models_argmax_on_the_masked_batch(runs, texts):
    """An independent check: the full logits of the model on the same masked batches, by hand."""
    model, tok = load_model_and_tokenizer(runs["torch"])
    specials = special_ids(tok)
    ids = [e.ids for e in document_encoder(tok).encode_batch(texts["docs"], add_special_tokens=False)]
    samples = pack_documents(ids, 64, specials)
    stream = [t for doc in ids for t in doc + [specials["eos"]]][:-1]  # FULL-SENTENCES, by hand
    for row, start in enumerate(range(0, len(stream), 62)):
        block = stream[start : start + 62]
        want = [specials["bos"], *block, specials["eos"]] + [specials["pad"]] * (62 - len(block))
        assert samples[row].tolist() == want
    assert len(samples) == -(-len(stream) // 62)
    n = correct = in_top5 = 0
    loss = 0.0
    mask_tokens = 0
    with torch.no_grad():
        for batch in masked_text_batches(samples, tok, 16, 0):
            logits = model(batch["input_ids"], batch["attention_mask"]).logits  # [B, S, V]
            where = batch["labels"].ne(-100)
            targets, chosen = batch["labels"][where], logits[where]
            n += len(targets)
            correct += int((chosen.argmax(-1) == targets).sum())
            in_top5 += int((chosen.topk(5, dim=-1).indices == targets[:, None]).any(-1).sum())
            loss += float(torch.nn.functional.cross_entropy(chosen, targets, reduction="sum"))
            mask_tokens += int(batch["input_ids"][where].eq(specials["mask"]).sum())
    summary = evaluate_text(runs["torch"], str(texts["txt"]))
    assert summary["masked_tokens"] == n and 0.75 < mask_tokens / n < 0.85  # 80% of them <mask>
    assert summary["top1_accuracy"] == pytest.approx(correct / n, abs=1e-12)
    assert summary["top5_accuracy"] == pytest.approx(in_top5 / n, abs=1e-12)
    assert summary["loss"] == pytest.approx(loss / n, rel=1e-5)


def test_text_mode_on_an_hf_export_gives_the_checkpoints_numbers(runs, texts, tmp_path):
    hf = tmp_path / "hf"
    export(runs["torch"], hf)
    ckpt = evaluate_text(runs["torch"], str(texts["txt"]))
    proc = run_cli(f"checkpoint={hf}", f"text={texts['txt']}", "seq_len=64", f"output={tmp_path / 'e.json'}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary == json.loads((tmp_path / "e.json").read_text()) and summary["model"] == str(hf)
    for key in ("documents", "sequences", "tokens", "masked_tokens", "seq_len"):
        assert summary[key] == ckpt[key], key
    for key in ("loss", "ppl", "top1_accuracy", "top5_accuracy"):
        assert summary[key] == pytest.approx(ckpt[key], rel=1e-5), key
    longest = evaluate_text(hf, str(texts["txt"]), max_documents=20)  # an HF dir: the model's maximum length
    assert longest["seq_len"] == 512 and longest["sequences"] == -(-(longest["tokens"] + 19) // 510)


def test_text_mode_bad_inputs_name_what_is_wrong(runs, texts, tmp_path):
    ckpt = f"checkpoint={runs['torch']}"
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "blank.txt").write_text("\n   \n")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    cases = [
        ([ckpt, f"text={tmp_path}/missing.txt"], f"text: {tmp_path}/missing.txt: no such file"),
        ([ckpt, f"text={texts['txt']}", "seq_len=600"], "seq_len=600 must be within [3, 512] (the model's"),
        ([ckpt, "mask_seed=3"], "mask_seed: settings of the text mode; give text=<file> too"),
        ([ckpt, f"text={bad_json}"], "bad.jsonl:2: not valid JSON"),
        ([ckpt, f"text={tmp_path / 'blank.txt'}"], "holds no documents"),
        ([f"checkpoint={hf}"], "is an HF directory: it names no corpus to evaluate on; give text=<file>"),
    ]
    for argv, message in cases:
        proc = run_cli(*argv)
        assert proc.returncode == 2 and message in proc.stderr, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
    for overrides, message in [
        (["text=x.csv"], "text: x.csv: no such file"),
        ([f"text={texts['txt']}", "seq_len=2"], "seq_len=2 must be >= 3"),
        ([f"text={texts['txt']}", "batch_size=0"], "batch_size=0 must be >= 1"),
        ([f"text={texts['txt']}", "device=tpu"], "device='tpu' must be one of"),
        ([f"text={texts['txt']}", "max_documents=-1"], "max_documents=-1 must be >= 0"),
        ([f"text={texts['txt']}", "+system.device=cuda"], "+system.*: overrides of the run's config"),
        (["whole_word=true", "seq_len=32"], "seq_len, whole_word: settings of the text mode"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            compose_args("evaluate", EvaluateArgs, ["checkpoint=c", *overrides])
