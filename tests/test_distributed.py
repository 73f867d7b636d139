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
