"""Where the rank comes from: torchrun, srun, or nothing; SLURM node lists; stop signals."""
from __future__ import annotations

import os
import signal

import pytest

from pretrain.distributed import StopSignal, detect, first_host


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("gpu[003-005,010],cpu1", "gpu003"), ("a-b[7]", "a-b7"), ("n[01-02]", "n01"),
    ("x1,x2", "x1"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_environment_wins():
    env = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                  "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == \
        (3, 8, 1, "h", 1234, "torchrun")


def test_srun_environment():
    env = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
                  "SLURM_JOB_NODELIST": "gpu[12-15]"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == \
        (5, 16, 1, "gpu12", 20000 + 123456 % 20000, "slurm")
    given = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu1", "MASTER_ADDR": "m",
                    "MASTER_PORT": "999"})
    assert (given.master_addr, given.master_port) == ("m", 999)


def test_single_process():
    env = detect({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single") and env.master_port > 0


def test_stop_signal_sets_a_flag_once_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignal().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert stop.requested and stop.signal_name == "SIGUSR1"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_stop_signal_hands_over_to_the_launchers_handler_after_the_checkpoint():
    """submitit's SIGUSR2 handler (requeue) must run only after our stop checkpoint: `hand_over()`."""
    calls: list[int] = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        stop = StopSignal().install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested and stop.signal_name == "SIGUSR2"
        assert calls == []  # the launcher's handler waits for the checkpoint
        stop.restore()
        stop.hand_over()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_stop_signal_hands_over_nothing_for_default_handlers():
    before = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        stop = StopSignal().install()
        os.kill(os.getpid(), signal.SIGUSR1)
        stop.restore()
        stop.hand_over()  # SIG_DFL would kill the process: it must not be called
        assert stop.requested
    finally:
        signal.signal(signal.SIGUSR1, before)


RANK_ZERO_FIRST = r'''
import os, sys, time
from pathlib import Path
import torch.distributed as dist
from pretrain import distributed
out = Path(sys.argv[1]); fail = sys.argv[2] == "fail"
dist.init_process_group("gloo")
rank = dist.get_rank()
try:
    with distributed.rank_zero_first("making the cache"):
        if rank == 0:
            time.sleep(0.5)  # rank 1 would get here first without the ordering
            if fail:
                raise OSError("disk gone")
            (out / "cache").write_text("made by 0")
        else:
            (out / "seen-by-1").write_text((out / "cache").read_text())
    (out / f"done-{rank}").write_text("ok")
except BaseException as e:
    (out / f"error-{rank}").write_text(f"{type(e).__name__}: {e}")
distributed.shutdown()
'''


@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_rank_zero_first_orders_the_ranks_and_shares_an_error(tmp_path, mode):
    """Rank 0 does the work before the others start it; an error on rank 0 reaches rank 1 instead of
    leaving it at a barrier; both processes exit cleanly (the group destroyed before the exit)."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(RANK_ZERO_FIRST)
    from checkpoint_fixtures import _free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(script), str(tmp_path), mode], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if mode == "ok":
        assert (tmp_path / "seen-by-1").read_text() == "made by 0"
        assert (tmp_path / "done-0").exists() and (tmp_path / "done-1").exists()
    else:
        assert (tmp_path / "error-0").read_text() == "OSError: disk gone"
        assert (tmp_path / "error-1").read_text() == \
            "RuntimeError: rank 0 failed while making the cache: OSError: disk gone"
        assert not (tmp_path / "done-1").exists()


def test_deepspeed_on_a_cpu_builds_no_shared_memory_op(tmp_path):
    """`init` on a CPU keeps DeepSpeed from JIT-building its shm all-reduce op (training never uses it;
    a build killed midway hangs every later start): the comm backend comes up without it, in a fresh
    process with an empty extensions cache, and collectives work."""
    import subprocess
    import sys

    script = (
        "import torch, torch.distributed as dist\n"
        "from pretrain import distributed\n"
        "distributed.init(distributed.detect({}), torch.device('cpu'), 60, use_deepspeed=True)\n"
        "import deepspeed.comm.comm as ds_comm\n"
        "x = torch.ones(2); dist.all_reduce(x)\n"
        "print('shm', ds_comm.cdb.shm_comm_op, x.tolist())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "shm None [1.0, 1.0]" in proc.stdout
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").rglob("*.so"))
