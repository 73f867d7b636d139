"""Export: checkpoints of the plain-PyTorch path and of DeepSpeed ZeRO-0 / ZeRO-3 (2 ranks) -> HF
directories that transformers loads, whose fill-mask pipeline answers like ours."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency (make install): a missing one must fail, not skip  # noqa: E402
from checkpoint_fixtures import REPO, trained_runs

from core.checkpoint import CheckpointError, load_checkpoint_model, resolve_checkpoint
from core.hf import HFCheckpointError, load_hf
from core.tokenizer import TokenizerError, load_tokenizer
from data_prep.tokenizer import save_tokenizer, train_tokenizer
from pretrain.config import load_run_config
from serving.export import TOKENIZER_FILES, export
from serving.masker import load_fill_masker, parse_request

STRINGS = ["Paris is the <mask> of France.", "Today is a <mask> day!", "The hacker wrote a <mask> in C.",
           "<mask> is the answer.", "Use the <mask>, Luke."]
TOP_K = 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, jargon_corpus, jargon_tokenizer) -> dict[str, Path]:
    return trained_runs(tmp_path_factory, jargon_corpus, jargon_tokenizer)


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    """Each run's latest checkpoint exported (ZeRO-3 through the CLI, whose stdout is only its JSON summary;
    the others in-process)."""
    root = tmp_path_factory.mktemp("exported")
    out = {name: root / name for name in runs}
    cmd = [sys.executable, "-m", "serving.export", f"checkpoint={runs['zero3']}/checkpoints/latest",
           f"output_dir={out['zero3']}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output_dir"] == str(out["zero3"])
    for name in ("torch", "zero0"):
        export(runs[name], out[name])
    return out


@pytest.mark.parametrize("name", ["torch", "zero3", "zero0"])
def test_transformers_pipeline_answers_like_ours(exported, runs, name):
    hf_dir = exported[name]
    files = sorted(p.name for p in hf_dir.iterdir())
    assert files == sorted(["config.json", "model.safetensors", *TOKENIZER_FILES])
    model = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir)
    assert type(model).__name__ == "RobertaForMaskedLM"
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    pipe = transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer, device="cpu")
    ours = load_fill_masker(hf_dir)
    for text in STRINGS:
        assert tokenizer(text)["input_ids"] == ours.tokenizer.encode(text).ids
        theirs = pipe(text, top_k=TOP_K)
        [mine] = ours(parse_request({"inputs": {"input_string": [text]}, "parameters": {"top_k": TOP_K}}))
        assert [(c["token"], c["token_str"], c["sequence"]) for c in mine] == \
               [(c["token"], c["token_str"], c["sequence"]) for c in theirs]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(mine, theirs)) < 1e-4
    # the checkpoint itself and its export give the same answers
    from_ckpt = load_fill_masker(runs[name])
    request = parse_request({"inputs": {"input_string": STRINGS}, "parameters": {"top_k": TOP_K}})
    assert from_ckpt(request) == ours(request)


def test_zero3_export_holds_the_consolidated_weights(exported, runs):
    """ZeRO-3 partitions every parameter over the 2 ranks: the export has them whole, equal to DeepSpeed's
    own consolidation, with the padded vocabulary rows cut off."""
    ckpt = resolve_checkpoint(runs["zero3"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
    reloaded = load_hf(exported["zero3"]).state_dict()
    assert reloaded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(reloaded[key], value.float()), key
    word = reloaded["embeddings.word.weight"]
    assert word.shape[0] % 64 == 0 and word[8192:].abs().sum() == 0


def test_bf16_export(runs, tmp_path):
    out = export(runs["torch"], tmp_path / "bf16", dtype="bf16")
    config = json.loads((Path(out["output_dir"]) / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    ckpt = resolve_checkpoint(runs["torch"])
    fp32 = load_checkpoint_model(ckpt, load_run_config(ckpt).model).state_dict()
    bf16 = load_hf(out["output_dir"]).state_dict()
    assert all(torch.equal(bf16[k], fp32[k].bfloat16().float()) for k in fp32)


def test_export_refuses_bad_inputs(runs, tmp_path, jargon_tokenizer, jargon_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export(runs["torch"], target)
    assert (target / "keep.txt").is_file()
    export(runs["torch"], target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        export(tmp_path / "nowhere", tmp_path / "o1")
    broken = tmp_path / "broken"
    shutil.copytree(resolve_checkpoint(runs["torch"]), broken)
    (broken / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="file model.pt is missing"):
        export(broken, tmp_path / "o2")

    text = gzip.open(jargon_path, "rt", encoding="utf-8").read().split("\n\n")
    small = save_tokenizer(train_tokenizer(text[:500], vocab_size=300), tmp_path / "t300")
    with pytest.raises(CheckpointError, match="300 ids, but the model has model.vocab_size=8192"):
        export(runs["torch"], tmp_path / "o3", tokenizer=small)
    other = save_tokenizer(train_tokenizer(reversed(text), vocab_size=8192, min_frequency=3),
                           tmp_path / "other")
    assert load_tokenizer(other).get_vocab_size() == 8192
    with pytest.raises(CheckpointError, match="made with another tokenizer"):
        export(runs["torch"], tmp_path / "o4", tokenizer=other)
    lacking = tmp_path / "lacking"
    shutil.copytree(jargon_tokenizer, lacking)
    (lacking / "merges.txt").unlink()
    with pytest.raises(TokenizerError, match="lacks \\['merges.txt'\\]"):
        export(runs["torch"], tmp_path / "o5", tokenizer=lacking)
    assert not any(p.name.startswith(("o1", "o2", "o3", "o4", "o5")) for p in tmp_path.iterdir())
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="output_dir=.*a_file is a file, not a directory"):
            export(runs["torch"], a_file, overwrite=overwrite)
    assert a_file.read_text() == "keep me"


def test_a_truncated_or_corrupt_hf_export_is_named_exit_2(exported, tmp_path):
    """A truncated model.safetensors (or a corrupt pytorch_model.bin) is named, exit 2, no traceback."""
    cases = {"truncated": ("model.safetensors", lambda b: b[: len(b) // 2]),
             "bin": ("pytorch_model.bin", lambda b: b"PK\x03\x04" + b[4:100])}
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": {"input_string": ["Hello <mask>."]}}))
    for case, (name, damage) in cases.items():
        hf = tmp_path / case
        shutil.copytree(exported["torch"], hf)
        weights = (hf / "model.safetensors").read_bytes()
        if name != "model.safetensors":
            (hf / "model.safetensors").unlink()
        (hf / name).write_bytes(damage(weights))
        with pytest.raises(HFCheckpointError, match="truncated or corrupt"):
            load_hf(hf)
        proc = subprocess.run([sys.executable, "-m", "serving.fill_mask", f"model={hf}", f"request={request}"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"{hf / name}: unreadable (" in proc.stderr and "truncated or corrupt" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("run", ["torch", "zero0"])
def test_readers_refuse_a_checkpoint_that_fails_its_sha256(runs, run, tmp_path):
    """A flipped byte in the weights: export, evaluate and fill-mask refuse the checkpoint (exit 2, the file
    named), as training's resume does; verify=false reads it anyway, with a warning."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(runs[run]), ckpt)
    weights = ckpt / ("model.pt" if run == "torch" else "deepspeed/mp_rank_00_model_states.pt")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    rel = weights.relative_to(ckpt).as_posix()
    sample = REPO / "tests" / "assets" / "fill_mask_request.json"
    commands = {
        "serving.export": [f"checkpoint={ckpt}", f"output_dir={tmp_path / 'hf'}"],
        "pretrain.evaluate": [f"checkpoint={ckpt}", "+data.valid_max_batches=1", f"output={tmp_path / 'e.json'}"],
        "serving.fill_mask": [f"model={ckpt}", f"request={sample}"],
    }
    for module, args in commands.items():
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, (module, proc.stderr[-2000:])
        assert f"file {rel}: sha256 differs" in proc.stderr and "Traceback" not in proc.stderr, module
    assert not (tmp_path / "hf").exists()
    with pytest.raises(CheckpointError, match="sha256 differs"):
        export(ckpt, tmp_path / "hf")
    summary = export(ckpt, tmp_path / "hf", verify=False)
    assert summary["parameters"] > 0


def test_a_run_dir_without_latest_reads_its_newest_complete_checkpoint(runs, tmp_path):
    """With checkpoints/latest deleted, readers find the newest complete checkpoint, as training does."""
    run = tmp_path / "run"
    shutil.copytree(runs["torch"], run)
    newest = resolve_checkpoint(run)
    (run / "checkpoints" / "latest").unlink()
    assert resolve_checkpoint(run) == newest and resolve_checkpoint(run / "checkpoints") == newest
