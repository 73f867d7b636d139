"""The trainer end to end on CPU: real DeepSpeed over gloo, 2 ranks under torchrun, the bundled corpus.

Start-up dominates tiny runs, so the runs are batched: one torchrun launch (2 ranks) trains every
2-rank configuration one after the other (tests/train_runner.py), one plain process every 1-rank one;
the tests then read what those runs wrote (metrics.jsonl, checkpoints).
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_runner import GOLDEN_RTOL, GOLDEN_STEPS, REPO, golden_overrides, losses

from core.checkpoint import CHECKPOINT_JSON, LATEST, find_resumable, load_model_state
from pretrain.train import ResumeError

PY = sys.executable
GOLDEN = REPO / "tests" / "golden" / "debug_losses.txt"
PINNED_TORCH = "2.13.0+cpu"
LAUNCH_TIMEOUT = 420


def tiny(corpus: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    """A tiny model on the jargon corpus: hidden 64, seq 32, global batch 8, every loss logged."""
    return [
        f"data.corpus={corpus}", f"data.tokenizer={tokenizer}", f"trainer.output_dir={out}",
        "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.ffn_size=128",
        "data.seq_len=32", "data.valid_max_batches=2", "schedule.global_batch_size=8",
        "schedule.warmup_steps=3", "schedule.max_steps=20", "optim.lr=1e-3", "system.micro_batch_size=2",
        "system.dist_timeout_s=120", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0",
        "trainer.progress_bar=false", "wandb.enabled=false", *extra,
    ]


NO_DROPOUT = ("model.hidden_dropout=0", "model.attention_dropout=0")
COMPILED = ("system.compile=true", "system.compile_backend=aot_eager", "system.activation_checkpointing=true")


def launch(runs: list[dict], tmp: Path, nproc: int) -> dict[str, int]:
    """Train `runs` in one process group of `nproc` ranks; {name: exit code}."""
    spec, result = tmp / "spec.json", tmp / "result.json"
    spec.write_text(json.dumps({"runs": runs, "result": str(result)}))
    runner = str(REPO / "tests" / "train_runner.py")
    if nproc == 1:
        cmd = [PY, runner, str(spec)]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), runner, str(spec)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return json.loads(result.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in a)


def tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a nested checkpoint object, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


# ---------------------------------------------------------------------------------------------------
# the launches


OPTIONS = {  # ZeRO stages, offload and precisions not covered above; a NaN on rank 1 at step 2 in bf16
    "zero0_bf16": ("deepspeed=zero0", "system.precision=bf16"),
    "zero1": ("deepspeed=zero1",),
    "zero2_offload": ("deepspeed=zero2_offload",),
    "zero3_offload": ("deepspeed=zero3_offload",),
    "zero3_bf16": ("deepspeed=zero3", "system.precision=bf16"),
    "zero2_bf16_nan": ("deepspeed=zero2", "system.precision=bf16"),
    "zero2_fp8": ("deepspeed=zero2", "system.fp8=true"),
}
INJECT_NAN = {"option_zero2_bf16_nan": [2, 1]}  # run name: [step, rank] whose loss is NaN (train_runner.py)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, jargon_corpus, jargon_tokenizer):
    """Every 2-rank run, in one torchrun launch. Returns (root dir, {name: exit code})."""
    root = tmp_path_factory.mktemp("two_ranks")

    def t(name: str, *extra: str) -> dict:
        return {"name": name, "overrides": tiny(jargon_corpus, jargon_tokenizer, root / name, *extra)}

    def resumed(name: str, stage: int, stops: list[int | None]) -> list[dict]:
        return [t(name, f"deepspeed=zero{stage}", f"trainer.stop_at_step={s}" if s else "trainer.stop_at_step=null",
                  "trainer.resume=auto") | {"name": f"{name}-{i}"} for i, s in enumerate(stops)]

    runs = [
        t("eq_zero2", "deepspeed=zero2", "schedule.max_steps=5", *NO_DROPOUT),
        t("full_zero2", "deepspeed=zero2"),
        *resumed("resume_zero2", 2, [5, 10, None]),
        t("full_zero3", "deepspeed=zero3", "schedule.max_steps=15"),
        # system.compile with activation checkpointing (aot_eager: traced forward and backward, no code
        # generation, which takes ~1 min a graph on this CPU; tests/test_gpu.py runs inductor)
        t("compiled_zero2", "deepspeed=zero2", "schedule.max_steps=5", *NO_DROPOUT, *COMPILED),
        t("compiled_zero3", "deepspeed=zero3", "schedule.max_steps=15", "trainer.stop_at_step=5", *COMPILED),
        *[r | {"overrides": r["overrides"] + ["schedule.max_steps=15"]} for r in resumed("resume_zero3", 3, [5, None])],
        t("nan_skip", "deepspeed=zero2", "schedule.max_steps=4", "trainer.save_every=1", "trainer.keep_last=10")
        | {"inject_nan": [3, 1]},
        t("nan_stop", "deepspeed=zero2", "schedule.max_steps=4", "trainer.save_every=1", "trainer.keep_last=10",
          "trainer.max_consecutive_nonfinite=1") | {"inject_nan": [3, 0]},
        *[t(f"option_{name}", *extra, "schedule.max_steps=3", "schedule.warmup_steps=1", "trainer.save_every=0")
          | ({"inject_nan": INJECT_NAN[f"option_{name}"]} if f"option_{name}" in INJECT_NAN else {})
          for name, extra in OPTIONS.items()],
    ]
    return root, launch(runs, root, nproc=2)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, jargon_corpus, jargon_tokenizer):
    """Every 1-process run (DeepSpeed and the torch backend), in one process."""
    root = tmp_path_factory.mktemp("one_rank")
    runs = [
        {"name": "eq_ds1", "overrides": tiny(jargon_corpus, jargon_tokenizer, root / "eq_ds1", "deepspeed=zero2",
                                             "schedule.max_steps=5", "system.micro_batch_size=8", *NO_DROPOUT)},
        {"name": "eq_torch", "overrides": tiny(jargon_corpus, jargon_tokenizer, root / "eq_torch",
                                               "trainer.backend=torch", "schedule.max_steps=5",
                                               "system.micro_batch_size=8", *NO_DROPOUT)},
        {"name": "golden", "overrides": golden_overrides(str(jargon_corpus), str(jargon_tokenizer), str(root / "golden"))},
    ]
    return root, launch(runs, root, nproc=1)


# ---------------------------------------------------------------------------------------------------
# equivalence


@pytest.mark.slow
def test_zero2_two_ranks_with_accumulation_equals_one_process_and_torch(two_ranks, one_rank):
    (root2, codes2), (root1, codes1) = two_ranks, one_rank
    assert codes2["eq_zero2"] == 0 and codes1["eq_ds1"] == 0 and codes1["eq_torch"] == 0
    zero2 = load_model_state(ckpt(root2 / "eq_zero2", 5))
    ds1 = load_model_state(ckpt(root1 / "eq_ds1", 5))
    plain = load_model_state(ckpt(root1 / "eq_torch", 5))
    assert max_param_diff(zero2, ds1) < 1e-6
    assert max_param_diff(zero2, plain) < 1e-6
    # the parameters did move: the comparison is not between untouched initialisations
    assert losses(root1 / "eq_torch" / "metrics.jsonl")[0] != losses(root1 / "eq_torch" / "metrics.jsonl")[-1]
    # the same five losses in all three
    l2, l1, lt = (losses(r / "metrics.jsonl") for r in (root2 / "eq_zero2", root1 / "eq_ds1", root1 / "eq_torch"))
    assert len(l2) == 5 and max(abs(a - b) for a, b in zip(l2, l1)) < 1e-5 and max(abs(a - b) for a, b in zip(l2, lt)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("stage,eager", [(2, "eq_zero2"), (3, "full_zero3")])
def test_compiled_layers_with_activation_checkpointing_train_as_eager(two_ranks, stage, eager):
    """system.compile=true with activation checkpointing under DeepSpeed gives the eager run's losses and
    weights (ZeRO-3 with dropout: the recomputed layers draw the same dropout masks). At ZeRO 0-2 the layers
    compile whole; at ZeRO-3 DeepSpeed's parameter-gathering hooks (`torch.compiler.disable`d) break them."""
    root, codes = two_ranks
    name = f"compiled_zero{stage}"
    assert codes[name] == 0 and codes[eager] == 0
    assert codes[f"{name}:compiled_graphs"] >= 1  # compiled, not silently eager
    if stage < 3:
        assert codes[f"{name}:graph_breaks"] == 0
    compiled, plain = losses(root / name / "metrics.jsonl"), losses(root / eager / "metrics.jsonl")[:5]
    assert len(compiled) == 5 and compiled[0] != compiled[-1]
    assert compiled == pytest.approx(plain, rel=1e-6, abs=0)
    if stage == 2:  # (the eager ZeRO-3 run goes on to step 15 and keeps no step-5 checkpoint)
        assert max_param_diff(load_model_state(ckpt(root / name, 5)), load_model_state(ckpt(root / eager, 5))) < 1e-6


# ---------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.slow
@pytest.mark.parametrize("stage,stops,steps", [(2, [5, 10, None], 20), (3, [5, None], 15)])
def test_resume_is_exact(two_ranks, stage, stops, steps):
    root, codes = two_ranks
    full = losses(root / f"full_zero{stage}" / "metrics.jsonl")
    assert codes[f"full_zero{stage}"] == 0 and len(full) == steps
    for i, _ in enumerate(stops):
        assert codes[f"resume_zero{stage}-{i}"] == 0
    out = root / f"resume_zero{stage}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r["step"] for r in records if "loss" in r]
    assert steps_logged == list(range(1, steps + 1))  # each resumed run went on where the last stopped
    pieced = [r["loss"] for r in records if "loss" in r]
    assert pieced == full  # bit for bit, steps 6..15 after one resume and 11..20 after two


# ---------------------------------------------------------------------------------------------------
# non-finite steps


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_on_both(two_ranks):
    root, codes = two_ranks
    out = root / "nan_skip"
    assert codes["nan_skip"] == 0
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert math.isnan(records[3]["loss"]) and records[3]["skipped_steps"] == 1 and records[4]["skipped_steps"] == 1
    assert math.isfinite(records[4]["loss"])
    for rank in (0, 1):  # every rank's optimizer partition (fp32 weights, moments, step) is untouched by step 3
        name = f"deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        s2, s3, s4 = (tensors(torch.load(ckpt(out, s) / name, weights_only=False)) for s in (2, 3, 4))
        assert all(torch.equal(a, b) for a, b in zip(s2, s3))
        assert not all(torch.equal(a, b) for a, b in zip(s3, s4))
    m2, m3, m4 = (load_model_state(ckpt(out, s)) for s in (2, 3, 4))
    assert max_param_diff(m2, m3) == 0.0 and max_param_diff(m3, m4) > 0
    assert all(torch.isfinite(v).all() for v in m4.values())


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(two_ranks):
    root, codes = two_ranks
    out = root / "nan_stop"
    assert codes["nan_stop"] == 3
    assert (out / "checkpoints" / LATEST).read_text().strip() == "step_00000002"
    assert not ckpt(out, 3).exists()
    path, passed_over = find_resumable(out / "checkpoints")
    assert path == ckpt(out, 2) and passed_over == []


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_deepspeed_option_trains_on_two_ranks(two_ranks, option):
    root, codes = two_ranks
    assert codes[f"option_{option}"] == 0
    records = [r for r in map(json.loads, (root / f"option_{option}" / "metrics.jsonl").read_text().splitlines())
               if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 1e-3, 5e-4])  # the schedule advances, skip or not
    nan_step = 2 if option.endswith("_nan") else None
    for r in records:
        assert math.isnan(r["loss"]) == (r["step"] == nan_step)
        assert r["skipped_steps"] == (1 if nan_step and r["step"] >= nan_step else 0)
    assert find_resumable(root / f"option_{option}" / "checkpoints")[0] is not None


# ---------------------------------------------------------------------------------------------------
# golden losses


@pytest.mark.slow
def test_golden_losses_of_the_debug_experiment(one_rank):
    root, codes = one_rank
    assert codes["golden"] == 0
    got = losses(root / "golden" / "metrics.jsonl")
    assert len(got) == GOLDEN_STEPS and got[-1] < got[0]
    if torch.__version__ != PINNED_TORCH:
        pytest.skip(f"golden losses are for torch {PINNED_TORCH}; this is torch {torch.__version__}")
    want = [float(line) for line in GOLDEN.read_text().splitlines() if line and not line.startswith("#")]
    assert len(want) == GOLDEN_STEPS
    worst = max(range(GOLDEN_STEPS), key=lambda i: abs(got[i] - want[i]) / abs(want[i]))
    rel = abs(got[worst] - want[worst]) / abs(want[worst])
    assert rel <= GOLDEN_RTOL, (
        f"step {worst + 1}: loss {got[worst]!r}, tests/golden/debug_losses.txt says {want[worst]!r} (relative "
        f"difference {rel:.2e} > {GOLDEN_RTOL:g}; see the file's header to remake it)"
    )


# ---------------------------------------------------------------------------------------------------
# resume=auto passes over a damaged checkpoint (torch backend, in this process)


def test_resume_auto_passes_over_a_truncated_checkpoint(tmp_path, jargon_corpus, jargon_tokenizer, monkeypatch):
    from hydra import compose, initialize_config_dir

    from pretrain.train import run

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # run() exports them; restored afterwards
    out = tmp_path / "run"
    base = tiny(jargon_corpus, jargon_tokenizer, out, "trainer.backend=torch", "schedule.max_steps=6",
                "trainer.save_every=2", "trainer.keep_last=5", "wandb.enabled=true", "wandb.mode=offline")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert run(compose("pretrain", overrides=base + ["trainer.stop_at_step=4"])) == 0
        first = losses(out / "metrics.jsonl")
        assert [p.name for p in sorted((out / "checkpoints").glob("step_*"))] == ["step_00000002", "step_00000004"]
        model = ckpt(out, 4) / "model.pt"
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated
        path, passed_over = find_resumable(out / "checkpoints")
        assert path == ckpt(out, 2) and "model.pt" in passed_over[0] and "truncated" in passed_over[0]
        with pytest.raises(ResumeError, match="truncated"):
            run(compose("pretrain", overrides=base + [f"trainer.resume={ckpt(out, 4)}"]))
        # wandb names an offline run's directory by the second it starts and the run id: a resume that
        # starts in the same second as the first run would share its directory. Start it a second later.
        first_ended = time.time()
        while int(time.time()) <= int(first_ended):
            time.sleep(0.05)
        assert run(compose("pretrain", overrides=base + ["trainer.resume=auto"])) == 0
    again = losses(out / "metrics.jsonl")
    # steps 3, 4 redone from step 2, identically; their first records were dropped: each step once
    assert again[:4] == first and len(again) == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once, in order
    assert json.loads((ckpt(out, 6) / CHECKPOINT_JSON).read_text())["step"] == 6
    # the resumed run continued the same wandb run (offline): one id, in both checkpoints and both run dirs
    ids = {json.loads((ckpt(out, s) / "trainer_state.json").read_text())["wandb_run_id"] for s in (2, 6)}
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(ids) == 1 and len(runs) == 2 and all(r.endswith("-" + next(iter(ids))) for r in runs), runs


# ---------------------------------------------------------------------------------------------------
# whole-word masking: the word-start table reaches the training and validation loaders (and evaluation)


def test_whole_word_masking_trains_and_evaluates_the_same(tmp_path, jargon_corpus, jargon_tokenizer, monkeypatch):
    from hydra import compose, initialize_config_dir

    from pretrain.config import ConfigError
    from pretrain.evaluate import evaluate_checkpoint
    from pretrain.train import run

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # run() exports them; restored afterwards
    out = tmp_path / "run"
    base = tiny(jargon_corpus, jargon_tokenizer, out, "trainer.backend=torch", "schedule.max_steps=3",
                "data.masking.whole_word=true")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        with pytest.raises(ConfigError, match="data.tokenizer is required"):  # whole-word masking reads it too
            run(compose("pretrain", overrides=base + ["data.tokenizer=null"]))
        assert run(compose("pretrain", overrides=base)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    final = [r for r in records if "valid/loss" in r][-1]
    assert final["step"] == 3 and final["valid/tokens"] > 0
    summary = evaluate_checkpoint(out)  # the run's whole-word masks, from its tokenizer
    assert summary["tokens"] == final["valid/tokens"]
    assert summary["loss"] == pytest.approx(final["valid/loss"], rel=1e-9)


# ---------------------------------------------------------------------------------------------------
# stop signals: two ranks started the way srun starts them (SLURM_* variables only), SIGUSR1 (twice)
# to one of them


def _srun_env(rank: int, port: int) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop}
    return {**env, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigusr1_on_one_rank_stops_both_at_the_same_step_with_a_checkpoint(tmp_path, jargon_corpus, jargon_tokenizer):
    out = tmp_path / "run"
    overrides = tiny(jargon_corpus, jargon_tokenizer, out, "schedule.max_steps=100000", "schedule.warmup_steps=10")
    port = free_port()
    procs = [subprocess.Popen([PY, "-m", "pretrain.train", *overrides], cwd=REPO, env=_srun_env(r, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGUSR1)
        procs[1].send_signal(signal.SIGUSR1)  # a second signal does no harm
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [75, 75], outputs[0][-3000:] + outputs[1][-3000:]
    assert "stopped by signal" in outputs[0]
    last = [json.loads(line) for line in metrics.read_text().splitlines() if "loss" in line][-1]["step"]
    path, _ = find_resumable(out / "checkpoints")
    assert path == ckpt(out, last)
    assert {p.name for p in path.iterdir()} >= {"rank_00000.pt", "rank_00001.pt", CHECKPOINT_JSON}


def test_resume_with_another_shape_or_data_order_is_refused_naming_both(tmp_path, jargon_corpus, jargon_tokenizer,
                                                                         monkeypatch):
    """A checkpoint fixes the weights' shapes and the data order: a resume that changes them is refused at
    start-up (ResumeError: exit 2 from the CLI) naming the keys and both values, and nothing is written."""
    from hydra import compose, initialize_config_dir

    from pretrain.train import run

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "run"
    base = tiny(jargon_corpus, jargon_tokenizer, out, "trainer.backend=torch", "schedule.max_steps=4",
                "trainer.stop_at_step=2")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert run(compose("pretrain", overrides=base)) == 0
        before = sorted(p.name for p in (out / "checkpoints").iterdir())
        for extra, message in [
            (["model.hidden_size=32", "model.num_heads=2"],
             r"trained with model.hidden_size=64; this run has model.hidden_size=32"),
            (["model.num_layers=1"], r"model.num_layers=2; this run has model.num_layers=1"),
            (["data.seq_len=16"], r"data.seq_len=32; this run has data.seq_len=16"),
        ]:
            with pytest.raises(ResumeError, match=message):
                run(compose("pretrain", overrides=base + extra))
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
        assert run(compose("pretrain", overrides=base + ["model.hidden_dropout=0.0"])) == 0  # not a shape


# ---------------------------------------------------------------------------------------------------
# a full disk: trainer.output_dir on a small tmpfs, mounted in a private mount namespace (unshare)


def _in_small_tmpfs(mount: Path, size_mb: int, keep: Path, command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` with a `size_mb` tmpfs on `mount` (seen by it alone); what it left there is copied
    to `keep` before the namespace (and the tmpfs) goes away."""
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    probe = subprocess.run([*unshare, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.decode()[-200:]}")
    script = ('mount -t tmpfs -o size="$1" tmpfs "$2" && shift 3 && { "$@"; code=$?; cp -a "$0/." "$KEEP/"; '
              'exit $code; }')
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run([*unshare, "sh", "-c", script.replace("$0/.", f"{mount}/."), str(mount), f"{size_mb}m",
                           str(mount), "--", *command], cwd=REPO, env={**env, "KEEP": str(keep), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_a_full_disk_is_named_and_leaves_the_last_good_checkpoint(tmp_path, jargon_corpus, jargon_tokenizer, backend):
    """A checkpoint that does not fit: exit 4 with "no space left on <dir> while writing checkpoint step N
    (needs ~X MB ...)", no traceback, no partial .tmp-step_* left, the newest complete checkpoint intact.
    The tiny model's checkpoint is ~8 MB (torch) / ~10 MB (DeepSpeed): 3 MB cannot hold the first one (it
    fails while writing), 14 MB holds one but not two (the second is refused before writing)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    for size_mb, stop_at, first_good in [(3, 6, None), (14, 6, 2)]:
        keep = tmp_path / f"kept_{size_mb}"
        keep.mkdir()
        overrides = tiny(jargon_corpus, jargon_tokenizer, mount / "run", f"trainer.backend={backend}",
                         "schedule.max_steps=6", "trainer.save_every=2", "trainer.keep_last=3")
        proc = _in_small_tmpfs(mount, size_mb, keep, [PY, "-m", "pretrain.train", *overrides])
        out = proc.stdout + proc.stderr
        assert proc.returncode == 4, out[-4000:]
        failed_step = 2 if first_good is None else 4
        assert f"no space left on {mount / 'run' / 'checkpoints'} while writing checkpoint step {failed_step} " \
               "(needs ~" in out, out[-4000:]
        assert "Traceback" not in out, out[-4000:]
        left = sorted(p.name for p in (keep / "run" / "checkpoints").iterdir())
        assert not [n for n in left if n.startswith(".tmp-")], left
        path, passed_over = find_resumable(keep / "run" / "checkpoints")
        assert path == (None if first_good is None else ckpt(keep / "run", first_good)) and not passed_over, left


# ---------------------------------------------------------------------------------------------------
# the static prediction bound


@pytest.mark.parametrize("whole_word,mask_prob,seq_len,bound", [(False, 0.15, 512, 77), (False, 0.15, 32, 5),
                                                                  (True, 0.15, 32, 32)])
def test_prediction_bound_holds_and_a_sample_above_it_is_refused(whole_word, mask_prob, seq_len, bound):
    """`Trainer.max_predictions`: ceil(mask_prob x seq_len) positions per sample (seq_len with whole-word
    masking); a micro-batch with a sample above it stops the step with the count and the settings (the head
    would otherwise drop predictions silently)."""
    from types import SimpleNamespace

    from pretrain.data import MaskingConfig
    from pretrain.train import Trainer

    masking = MaskingConfig(mask_prob=mask_prob, whole_word=whole_word)
    trainer = SimpleNamespace(run=SimpleNamespace(data=SimpleNamespace(masking=masking, seq_len=seq_len)))
    labels = torch.full((2, seq_len), -100)
    labels[1, :bound] = 7  # a sample at the bound
    assert Trainer.max_predictions(trainer, [{"labels": labels}, {"labels": torch.full((2, seq_len), -100)}]) == bound
    if bound < seq_len:
        labels[0, : bound + 1] = 7
        with pytest.raises(RuntimeError, match=rf"a sample has {bound + 1} masked positions, more than the bound "
                                               rf"{bound} of data.masking.mask_prob={mask_prob} x data.seq_len={seq_len}"):
            Trainer.max_predictions(trainer, [{"labels": labels}])


# ---------------------------------------------------------------------------------------------------
# loading one step ahead


@pytest.mark.parametrize("workers", [0, 2])
def test_step_ahead_gives_the_batches_in_turn_and_the_position_of_the_step_taken(jargon_corpus, workers):
    """StepAhead loads step k+1 on a thread while step k runs: the batches are those loaded in turn, and the
    state a checkpoint of step k records is the position after step k (the thread has read further), so a
    resume from it reads step k+1 again. `close()` mid-run drops the step being loaded."""
    from data_prep.corpus import Corpus
    from pretrain.data import TrainLoader
    from pretrain.train import StepAhead

    def loader() -> TrainLoader:
        return TrainLoader(Corpus.open(jargon_corpus, "train"), seq_len=32, micro_batch_size=2, seed=3,
                           num_workers=workers, global_batch=6)

    def load_step(it, stop=lambda: False):  # the trainer's `_next_batches`, 3 micro-batches a step
        return [next(it) for _ in range(3) if not stop()]

    plain = loader()
    it = iter(plain)
    expected = [(load_step(it), plain.state_dict()) for _ in range(4)]

    ahead_loader = loader()
    it2 = iter(ahead_loader)
    ahead = StepAhead(ahead_loader, lambda stop: load_step(it2, stop))
    for k, (batches, position) in enumerate(expected[:3]):
        got = ahead.take(load_next=True)
        assert [b["input_ids"].tolist() for b in got] == [b["input_ids"].tolist() for b in batches]
        assert [b["labels"].tolist() for b in got] == [b["labels"].tolist() for b in batches]
        assert ahead.state_dict() == position and position["samples_in_epoch"] == 6 * (k + 1)
        if k == 0:
            ahead._next.result()  # the thread has loaded step 2: the loader itself is one step further
            assert ahead_loader.state_dict()["samples_in_epoch"] == 12
    ahead.close()  # step 4 was loading: dropped
    assert ahead.state_dict() == expected[2][1]

    resumed = loader()
    resumed.load_state_dict(ahead.state_dict())
    again = StepAhead(resumed, lambda stop, it3=iter(resumed): load_step(it3, stop))
    assert [b["input_ids"].tolist() for b in again.take(load_next=False)] == \
        [b["input_ids"].tolist() for b in expected[3][0]]
    again.close()


# ---------------------------------------------------------------------------------------------------
# float8 Linear layers (torchao)

FP8_STEPS = 30
# |fp8 - bf16| / bf16 per logged loss of the debug run. Measured on this CPU (torchao 0.18, emulated
# float8 matmuls): at most 5.7e-5 over the first 60 steps and 3.5e-3 over 200 (bf16 itself is 5.5e-3 from
# fp32 there). 1e-2 is ~3x the 200-step worst; a layer left unscaled, or a float8 gradient lost, moves
# the loss by more than that within a few steps (the loss falls ~15% over these 30).
FP8_RTOL = 1e-2


@pytest.fixture(scope="module")
def fp8_runs(tmp_path_factory, jargon_corpus, jargon_tokenizer):
    """The debug experiment, first FP8_STEPS steps, in bf16 with and without system.fp8, one process."""
    root = tmp_path_factory.mktemp("fp8")
    base = golden_overrides(str(jargon_corpus), str(jargon_tokenizer), "")
    runs = [{"name": name, "overrides": [o for o in base if not o.startswith(("trainer.output_dir=",
                                                                               "trainer.stop_at_step="))]
             + [f"trainer.output_dir={root / name}", f"trainer.stop_at_step={FP8_STEPS}", "trainer.log_every=5",
                "system.precision=bf16", *extra]}
            for name, extra in (("bf16", ()), ("fp8", ("system.fp8=true",)))]
    return root, launch(runs, root, nproc=1)


@pytest.mark.slow
def test_fp8_debug_run_stays_within_a_band_of_bf16(fp8_runs):
    root, codes = fp8_runs
    assert codes == {"bf16": 0, "fp8": 0}
    bf16, fp8 = (losses(root / name / "metrics.jsonl") for name in ("bf16", "fp8"))
    assert len(bf16) == len(fp8) == FP8_STEPS // 5 and bf16[-1] < 0.9 * bf16[0]
    distance = max(abs(a - b) / b for a, b in zip(fp8, bf16))
    assert 0 < distance <= FP8_RTOL  # float8 did change the numbers, within the band
    # the same checkpoint files: Float8Linear keeps Linear's parameter names and shapes
    state = {k: v.shape for k, v in load_model_state(ckpt(root / "fp8", FP8_STEPS)).items()}
    assert state == {k: v.shape for k, v in load_model_state(ckpt(root / "bf16", FP8_STEPS)).items()}



# ---------------------------------------------------------------------------------------------------
# attention kernels


def test_sdpa_backends_reach_the_training_loop(tmp_path, jargon_corpus, jargon_tokenizer, monkeypatch):
    """system.sdpa_backends orders the attention kernels of the loop: [math] trains as PyTorch's own choice
    (the CPU flash kernel) within float tolerance."""
    from hydra import compose, initialize_config_dir

    from pretrain.train import run

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # run() exports them; restored afterwards

    def overrides(name: str, *extra: str) -> list[str]:
        return tiny(jargon_corpus, jargon_tokenizer, tmp_path / name, "trainer.backend=torch", "schedule.max_steps=3",
                    *NO_DROPOUT, *extra)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert run(compose("pretrain", overrides=overrides("default"))) == 0
        assert run(compose("pretrain", overrides=overrides("math", "system.sdpa_backends=[math]"))) == 0
    default, math_only = (losses(tmp_path / n / "metrics.jsonl") for n in ("default", "math"))
    assert len(default) == 3 and math_only == pytest.approx(default, rel=1e-5, abs=0)
