"""Launch tests on a real SLURM (slurmctld + slurmd + munge on this machine, started by .ci/run via
launch/ci_slurm.sh): pretraining through launch/pretrain.sbatch with 2 DeepSpeed ranks, preemption ->
checkpoint -> requeue -> resume with the same losses, Hydra's submitit preset, and a data-prep array.

Where no SLURM runs these tests skip and say why; with REQUIRE_SLURM=1 (set by .ci/run) they fail instead.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 300


def _slurm_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and any(s in ("idle", "mix", "alloc") for s in r.stdout.split())


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    if not _slurm_up():
        why = "no running SLURM here (start one as root with `launch/ci_slurm.sh start`)"
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)


def _env() -> dict[str, str]:
    """The job's environment: the venv first on PATH (FACTS.md: keeps the ninja cache valid)."""
    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}"
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def sbatch(args: list[str]) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"scontrol show job {job}: {r.stderr}"
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def wait_for(job: str, done, what: str, timeout: float = JOB_TIMEOUT_S, log: Path | None = None) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        info = job_info(job)
        if done(info):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], timeout=30)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    pytest.fail(f"job {job}: not {what} after {timeout} s (state {info.get('JobState')})\n{tail}")


def finished(info: dict) -> bool:
    return info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl; asserts no step was logged twice."""
    seen: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec and not any(k.startswith("valid") for k in rec):
            assert rec["step"] not in seen, f"step {rec['step']} logged twice in {run_dir}"
            seen[rec["step"]] = rec["loss"]
    return seen


def train_overrides(corpus: Path, tokenizer: Path, out: Path, max_steps: int) -> list[str]:
    return [
        "experiment=debug", f"data.corpus={corpus}", f"data.tokenizer={tokenizer}", "data.seq_len=64",
        f"schedule.max_steps={max_steps}", "schedule.warmup_steps=4", "schedule.global_batch_size=8",
        "system.micro_batch_size=2", "deepspeed=zero2", f"trainer.output_dir={out}", "trainer.log_every=1",
        "trainer.save_every=10", "trainer.eval_every=1000", "trainer.progress_bar=false",
    ]


def submit_pretrain(tmp: Path, overrides: list[str], name: str) -> tuple[str, Path]:
    log = tmp / f"{name}.log"
    job = sbatch([f"--job-name={name}", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                  f"--output={log}", str(REPO / "launch" / "pretrain.sbatch"), *overrides])
    return job, log


@pytest.fixture(scope="module")
def reference_run(jargon_corpus: Path, jargon_tokenizer: Path, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted 2-rank ZeRO-2 run of 30 steps through launch/pretrain.sbatch."""
    tmp = tmp_path_factory.mktemp("slurm_ref")
    out = tmp / "run"
    job, log = submit_pretrain(tmp, train_overrides(jargon_corpus, jargon_tokenizer, out, 30), "ref")
    info = wait_for(job, finished, "finished", log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    return out, log


def test_sbatch_two_ranks_trains_and_checkpoints(reference_run) -> None:
    out, log = reference_run
    text = log.read_text()
    assert "tasks=2" in text, text[-2000:]
    assert re.search(r"\b2 rank\(s\)", text), "the run did not report 2 ranks:\n" + text[-3000:]
    steps = losses(out)
    assert sorted(steps) == list(range(1, 31))
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts, "no checkpoint written"
    assert (out / "checkpoints" / "latest").read_text().strip().endswith(ckpts[-1])


def test_signal_checkpoints_requeues_and_resumes_with_same_losses(
    reference_run, jargon_corpus: Path, jargon_tokenizer: Path, tmp_path: Path
) -> None:
    ref_out, _ = reference_run
    out = tmp_path / "run"
    job, log = submit_pretrain(tmp_path, train_overrides(jargon_corpus, jargon_tokenizer, out, 30), "preempt")

    def reached_step_8(_info: dict) -> bool:
        return (out / "metrics.jsonl").exists() and max(losses(out), default=0) >= 8

    wait_for(job, reached_step_8, "at step 8", log=log)
    r = subprocess.run(["scancel", "--signal=USR1", job], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    # The job checkpoints, exits 75 and requeues itself; it then waits for its BeginTime (FACTS.md).
    info = wait_for(job, lambda i: i.get("Restarts", "0") != "0", "requeued", log=log)
    time.sleep(2.5)  # not in the same second as the requeue (FACTS.md: "Job credential revoked")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30)
    info = wait_for(job, lambda i: finished(i) and i.get("Restarts") != "0", "finished after requeue", log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1"
    assert "requeue 1/" in text and "restart 1/" in text, text[-4000:]
    got, want = losses(out), losses(ref_out)
    assert sorted(got) == list(range(1, 31)), f"steps lost or repeated: {sorted(got)}"
    assert got == want, {s: (got[s], want[s]) for s in got if got[s] != want[s]}


def test_a_preempted_two_task_job_is_requeued_as_a_one_task_job_and_resumes(
    reference_run, jargon_corpus: Path, jargon_tokenizer: Path, tmp_path: Path
) -> None:
    """Elastic resume on SLURM: a 2-task ZeRO-2 job (`--ntasks=2`), preempted (USR1), checkpoints and
    requeues itself; while it waits it becomes a 1-task job (`scontrol update NumTasks=1 NumCPUs=1`). The
    requeued job runs 1 task (the script reads the job's current NumTasks), loads the 2 ranks' ZeRO
    states through the universal checkpoint and finishes: no step lost or repeated, the losses up to the
    checkpoint are the uninterrupted 2-task run's bit for bit, the later ones within 1e-5 relative."""
    ref_out, _ = reference_run
    out, log = tmp_path / "run", tmp_path / "elastic.log"
    job = sbatch(["--job-name=elastic", "--nodes=1", "--ntasks=2", "--cpus-per-task=1", f"--output={log}",
                  str(REPO / "launch" / "pretrain.sbatch"),
                  *train_overrides(jargon_corpus, jargon_tokenizer, out, 30)])
    wait_for(job, lambda _i: (out / "metrics.jsonl").exists() and max(losses(out), default=0) >= 8, "at step 8",
             log=log)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    wait_for(job, lambda i: i.get("Restarts", "0") != "0", "requeued", log=log)
    time.sleep(2.5)  # not in the same second as the requeue (FACTS.md)
    r = subprocess.run(["scontrol", "update", f"JobId={job}", "NumTasks=1", "NumCPUs=1"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30)
    info = wait_for(job, lambda i: finished(i) and i.get("Restarts") != "0", "finished after requeue", log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert "tasks=2 " in text and "tasks=1 " in text, text[-4000:]
    assert "ZeRO states of 2 rank(s), loading on 1: through the universal checkpoint" in text, text[-4000:]
    stopped = int(re.findall(r"checkpoint at step (\d+) written", text)[0])
    got, want = losses(out), losses(ref_out)
    assert sorted(got) == list(range(1, 31)), f"steps lost or repeated: {sorted(got)}"
    assert all(got[s] == want[s] for s in range(1, stopped + 1))
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in range(stopped + 1, 31))
    assert worst <= 1e-5, worst


def test_submitit_preset_two_ranks(jargon_corpus: Path, jargon_tokenizer: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = submitit_command(tmp_path, train_overrides(jargon_corpus, jargon_tokenizer, out, 12))
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    logs = "\n".join(p.read_text()[-2000:] for p in (tmp_path / "submitit").rglob("*.out"))
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}\n{logs}"
    assert sorted(losses(out)) == list(range(1, 13))
    assert (out / "checkpoints" / "latest").is_file()
    assert re.search(r"\b2 rank\(s\)", logs), "the submitit job did not run 2 ranks:\n" + logs


def submitit_command(tmp: Path, overrides: list[str], tasks: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "pretrain.train", "-m", "hydra/launcher=slurm_1node",
        f"hydra.launcher.tasks_per_node={tasks}", "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", f"hydra.launcher.name={tmp.name}",
        f"hydra.sweep.dir={tmp / 'sweep'}", f"hydra.launcher.submitit_folder={tmp / 'submitit'}", *overrides,
    ]


def test_submitit_preemption_checkpoints_requeues_and_resumes_with_same_losses(
    reference_run, jargon_corpus: Path, jargon_tokenizer: Path, tmp_path: Path
) -> None:
    """submitit's preemption signal (SIGUSR2): the ranks stop at one step and checkpoint, then submitit's
    own handler requeues the job, which resumes; the losses equal the uninterrupted sbatch run's."""
    ref_out, _ = reference_run
    out = tmp_path / "run"
    proc = subprocess.Popen(submitit_command(tmp_path, train_overrides(jargon_corpus, jargon_tokenizer, out, 30)),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        job = ""
        while not job and time.monotonic() - t0 < 60:
            job = subprocess.run(["squeue", "-h", "-n", tmp_path.name, "-o", "%i"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
            time.sleep(0.5)
        assert job, "the submitit job did not appear in squeue"
        wait_for(job, lambda _i: (out / "metrics.jsonl").exists() and max(losses(out), default=0) >= 8,
                 "at step 8")
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        wait_for(job, lambda i: i.get("Restarts", "0") != "0", "requeued")
        time.sleep(2.5)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30)
        stdout, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "submitit").rglob("*.out")))
    assert proc.returncode == 0, f"{stdout[-3000:]}\n{logs[-6000:]}"
    assert "stopped by signal (SIGUSR2" in logs and "Requeued job" in logs, logs[-6000:]
    got, want = losses(out), losses(ref_out)
    assert sorted(got) == list(range(1, 31)), f"steps lost or repeated: {sorted(got)}"
    assert got == want, {s: (got[s], want[s]) for s in got if got[s] != want[s]}


def test_prep_array_equals_single_process_build(jargon_tokenizer: Path, tmp_path: Path) -> None:
    parts = tmp_path / "text"
    parts.mkdir()
    docs = gzip.open(REPO / "data" / "jargon.txt.gz", "rt", encoding="utf-8").read().split("\n\n")
    third = len(docs) // 3
    for i in range(3):
        chunk = docs[i * third:(i + 1) * third] if i < 2 else docs[2 * third:]
        (parts / f"part{i}.txt").write_text("\n\n".join(chunk), encoding="utf-8")
    settings = [f"input={parts}/*.txt", f"tokenizer={jargon_tokenizer}", "valid_fraction=0.02", "progress=false"]

    single = tmp_path / "single"
    r = subprocess.run([sys.executable, "-m", "data_prep.build_corpus", *settings, f"output_dir={single}"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]

    array = tmp_path / "array"
    env = _env() | {"SBATCH_ARGS": f"--cpus-per-task=1 --output={tmp_path}/%x-%j.out"}
    r = subprocess.run([str(REPO / "launch" / "submit_prep.sh"), "2", *settings, f"output_dir={array}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ids = dict(line.split() for line in r.stdout.splitlines())
    merge = wait_for(ids["merge"], finished, "merged")
    outs = "\n".join(p.read_text()[-1500:] for p in tmp_path.glob("*.out"))
    assert merge["JobState"] == "COMPLETED", outs

    def files(d: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.name.startswith(".")}

    a, b = files(single), files(array)
    assert sorted(a) == sorted(b)
    assert [n for n in a if a[n] != b[n]] == []


def test_data_prep_runs_under_the_submitit_launcher_as_training_does(jargon_tokenizer: Path, tmp_path: Path) -> None:
    """Every command is a Hydra app: a `-m` sweep of build_corpus (two valid fractions) through
    `hydra/launcher=slurm_1node` runs one SLURM job per point; each corpus equals a local build."""
    text = tmp_path / "a.txt"
    docs = gzip.open(REPO / "data" / "jargon.txt.gz", "rt", encoding="utf-8").read().split("\n\n")[:600]
    text.write_text("\n\n".join(docs), encoding="utf-8")
    settings = [f"input={text}", f"tokenizer={jargon_tokenizer}", "progress=false"]
    cmd = [sys.executable, "-m", "data_prep.build_corpus", "-m", "hydra/launcher=slurm_1node",
           "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=10", f"hydra.launcher.name={tmp_path.name}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.launcher.submitit_folder={tmp_path / 'submitit'}",
           *settings, "valid_fraction=0.05,0.2", f"output_dir={tmp_path}/swept-${{valid_fraction}}"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    logs = "\n".join(p.read_text()[-1500:] for p in (tmp_path / "submitit").rglob("*.out"))
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}\n{logs}"
    assert len(list((tmp_path / "submitit").rglob("*_log.out"))) == 2, logs  # one SLURM job a point
    for fraction in ("0.05", "0.2"):
        local = tmp_path / f"local-{fraction}"
        r = subprocess.run([sys.executable, "-m", "data_prep.build_corpus", *settings, f"valid_fraction={fraction}",
                            f"output_dir={local}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=JOB_TIMEOUT_S)
        assert r.returncode == 0, r.stderr[-3000:]
        swept = tmp_path / f"swept-{fraction}"
        assert (swept / "manifest.json").read_bytes() == (local / "manifest.json").read_bytes()
        assert sorted(p.name for p in swept.glob("*.bin")) == sorted(p.name for p in local.glob("*.bin"))


def test_requeues_are_bounded(jargon_corpus: Path, jargon_tokenizer: Path, tmp_path: Path) -> None:
    """With MAX_REQUEUES=0 a signalled job checkpoints and ends with exit 75 instead of requeueing."""
    out = tmp_path / "run"
    log = tmp_path / "bounded.log"
    job = sbatch(["--job-name=bounded", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                  f"--output={log}", "--export=ALL,MAX_REQUEUES=0", str(REPO / "launch" / "pretrain.sbatch"),
                  *train_overrides(jargon_corpus, jargon_tokenizer, out, 200)])
    wait_for(job, lambda _i: (out / "metrics.jsonl").exists() and max(losses(out), default=0) >= 3,
             "at step 3", log=log)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    info = wait_for(job, finished, "finished", log=log)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", text[-3000:]
    assert info["Restarts"] == "0"
    assert "requeues are used up: not requeueing" in text
    assert (out / "checkpoints" / "latest").is_file()
    assert max(losses(out)) < 200
