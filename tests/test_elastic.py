"""Elastic resume: a checkpoint of 2 ranks resumes on 1 and on 3 (real DeepSpeed, gloo, torchrun, CPU).

ZeRO 0, 1, 2 and 3, fp32, no dropout, global batch 12 (2 ranks x 3 micro-batches of 2; 1 x 6; 3 x 2).
2 ranks run through step 6 (`ref`), saving at step 3 on the way. On W' = 1 and 3 ranks, each stage
resumes from that step-3 checkpoint twice: `same` stops at step 3 at once, so it writes step 3 again as W'
ranks hold it (compared with the saved one), and `cont` trains steps 4 and 5 (compared with `ref`).
ZeRO-3 on 3 ranks then resumes from `cont`'s 3-rank checkpoint once more (`again`) to step 6.

Start-up dominates, so each world size is one launch that trains all its runs (tests/train_runner.py).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_runner import REPO

from core.checkpoint import DEEPSPEED_DIR, load_model_state, problem
from pretrain.universal import UNIVERSAL_DIR, to_universal

STAGES = (0, 1, 2, 3)
WORLDS = (1, 3)
SAVED_AT, CONT_TO, AGAIN_TO = 3, 5, 6
LAUNCH_TIMEOUT = 600


def overrides(corpus: Path, tokenizer: Path, out: Path, stage: int, *extra: str) -> list[str]:
    return [
        f"data.corpus={corpus}", f"data.tokenizer={tokenizer}", f"trainer.output_dir={out}",
        "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.ffn_size=128",
        "model.hidden_dropout=0", "model.attention_dropout=0", "data.seq_len=32", "data.valid_max_batches=1",
        "schedule.global_batch_size=12",
        "system.micro_batch_size=2", "schedule.warmup_steps=2", "schedule.max_steps=6", "optim.lr=1e-3",
        "system.precision=fp32", f"deepspeed=zero{stage}", "system.dist_timeout_s=120", "trainer.log_every=1",
        "trainer.eval_every=0", f"trainer.save_every={SAVED_AT}", "trainer.keep_last=3",
        "trainer.progress_bar=false", "wandb.enabled=false", *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(runs: list[dict], tmp: Path, nproc: int) -> tuple[dict[str, int], str]:
    """Train `runs` in one process group of `nproc` ranks: ({name: exit code}, the launch's output)."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec, result = tmp / "spec.json", tmp / "result.json"
    spec.write_text(json.dumps({"runs": runs, "result": str(result)}))
    runner = str(REPO / "tests" / "train_runner.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), runner, str(spec)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    (tmp / "output.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return json.loads(result.read_text()), proc.stdout + proc.stderr


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def records(out: Path) -> dict[int, dict]:
    """metrics.jsonl's training records by step."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, jargon_corpus, jargon_tokenizer):
    """Every launch: 2 ranks, then 1, then 3. Returns (root, {world size: launch output})."""
    root = tmp_path_factory.mktemp("elastic")

    def run(name: str, stage: int, *extra: str) -> dict:
        return {"name": name, "overrides": overrides(jargon_corpus, jargon_tokenizer, root / name, stage, *extra)}

    outputs = {}
    first = [run(f"z{s}_ref", s) for s in STAGES]
    codes, outputs[2] = launch(first, root / "launch2", 2)
    assert set(codes.values()) == {0}, codes
    for world in WORLDS:
        later = []
        for s in STAGES:
            saved = f"trainer.resume={ckpt(root / f'z{s}_ref', SAVED_AT)}"
            later += [run(f"z{s}_w{world}_same", s, saved, f"trainer.stop_at_step={SAVED_AT}"),
                      run(f"z{s}_w{world}_cont", s, saved, f"trainer.stop_at_step={CONT_TO}")]
        if world == 3:
            again = run("z3_w3_cont", 3, "trainer.resume=auto", f"trainer.stop_at_step={AGAIN_TO}")
            later.append(again | {"name": "z3_w3_again"})
        codes, outputs[world] = launch(later, root / f"launch{world}", world)
        assert set(codes.values()) == {0}, codes
    return root, outputs


def optimizer_tensors(step_dir: Path, stage: int) -> dict[str, torch.Tensor]:
    """The Adam states (and fp32 weights) of a checkpoint by name, without padding: from the model-states
    file (ZeRO-0, which holds the whole optimizer) or from its universal copy (ZeRO-1/2/3, made here
    when the checkpoint has none yet), one tensor per parameter and state."""
    if stage == 0:
        states = torch.load(step_dir / DEEPSPEED_DIR / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)["optimizer"]["state"]
        return {f"{i}/{k}": v for i, s in states.items() for k, v in s.items() if isinstance(v, torch.Tensor)}
    zero = to_universal(step_dir) / "zero"
    found = {}
    for path in sorted(zero.glob("*/*.pt")):
        value = torch.load(path, map_location="cpu", weights_only=False)
        found[f"{path.parent.name}/{path.stem}"] = value["param"] if isinstance(value, dict) else value
    return found


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
def test_a_resume_on_another_world_size_holds_exactly_the_saved_states(runs, stage, world):
    """fp32 weights and Adam moments as W' ranks hold them after the load equal those 2 ranks saved,
    bit for bit; and the loss of the next steps is the uninterrupted 2-rank run's."""
    root, outputs = runs
    saved, again = ckpt(root / f"z{stage}_ref", SAVED_AT), ckpt(root / f"z{stage}_w{world}_same", SAVED_AT)
    a, b = load_model_state(saved), load_model_state(again)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa, sb = optimizer_tensors(saved, stage), optimizer_tensors(again, stage)
    assert sa.keys() == sb.keys()
    assert any("exp_avg_sq" in k for k in sa), sorted(sa)[:5]
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    if stage:
        assert (saved / UNIVERSAL_DIR).is_dir()
        assert problem(saved, check_hashes=True) is None  # the copy is not in checkpoint.json
        assert f"ZeRO states of 2 rank(s), loading on {world}: through the universal checkpoint" in outputs[world]
    ref, cont = records(root / f"z{stage}_ref"), records(root / f"z{stage}_w{world}_cont")
    assert min(cont) == 4 and {4, 5} <= set(cont)  # resumed, not from scratch (z3_w3's `again` adds 6)
    for step in (4, 5):
        assert cont[step]["samples"] == ref[step]["samples"] == step * 12
    assert abs(cont[4]["loss"] - ref[4]["loss"]) <= 1e-6, (cont[4]["loss"], ref[4]["loss"])
    assert abs(cont[5]["loss"] - ref[5]["loss"]) <= 1e-5, (cont[5]["loss"], ref[5]["loss"])


def zero3_optimizer(step_dir: Path) -> tuple[set[int], list[float]]:
    """(the Adam step counts, each parameter group's weight decay) in rank 0's ZeRO-3 optimizer file."""
    sd = torch.load(step_dir / DEEPSPEED_DIR / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                    weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]
    return {int(s["step"]) for s in sd["state"].values()}, [g["weight_decay"] for g in sd["param_groups"]]


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_the_zero3_universal_load_keeps_each_groups_weight_decay_and_step(runs, world):
    """DeepSpeed 0.19's ZeRO-3 universal load gives every group group 0's hyper-parameters and one
    shared step tensor (advanced once per group); pretrain.universal repairs both after the load."""
    root, outputs = runs
    assert "ZeRO-3 universal load repaired" in outputs[world]
    steps, decay = zero3_optimizer(ckpt(root / "z3_ref", SAVED_AT))
    assert steps == {SAVED_AT} and decay[0] > 0 and decay[1] == 0.0  # biases and LayerNorm: no decay
    assert zero3_optimizer(ckpt(root / f"z3_w{world}_cont", CONT_TO)) == ({CONT_TO}, decay)


@pytest.mark.slow
def test_a_zero3_save_after_a_resume_on_3_ranks_holds_3_ranks_states_and_resumes_again(runs):
    root, _ = runs
    ds_dir = ckpt(root / "z3_w3_cont", CONT_TO) / DEEPSPEED_DIR
    assert len(list(ds_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))) == 3
    assert len(list(ds_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == 3
    ref, again = records(root / "z3_ref"), records(root / "z3_w3_cont")
    assert sorted(again) == [4, 5, 6], "the second resume started from scratch"
    assert again[6]["samples"] == 72
    assert abs(again[6]["loss"] - ref[6]["loss"]) <= 1e-5, (again[6]["loss"], ref[6]["loss"])
