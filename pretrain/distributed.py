"""All distributed set-up, driven by the launcher's environment; collective helpers; stop signals.

Where the rank comes from, first match wins:
  - torchrun / the deepspeed launcher / submitit's export: RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR/PORT);
  - srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR = the job's first node (from
    SLURM_JOB_NODELIST), MASTER_PORT = 20000 + job id % 20000, unless already set;
  - nothing: one process (rank 0 of 1, a free local port).
`init(env)` exports the standard variables (DeepSpeed reads them: without them it looks for MPI),
creates the process group (gloo on CPU, nccl on CUDA) and returns the device of this rank.

Stop signals: `StopSignal.install()` makes SIGUSR1, SIGUSR2 and SIGTERM set a flag (a second signal does
nothing more); the trainer all-reduces the flag with each step's loss (one reduction a step), so that all
ranks stop after the same step, write a checkpoint, and exit with `EXIT_STOPPED` (75, EX_TEMPFAIL:
"stopped, resume me"). The whole preemption story (SLURM, requeue, submitit's SIGUSR2): README.md.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

EXIT_STOPPED = 75
"""Exit code of a run stopped by SIGUSR1/SIGUSR2/SIGTERM after writing its checkpoint (resume it)."""
EXIT_NONFINITE = 3
"""Exit code of a run that saw `trainer.max_consecutive_nonfinite` non-finite steps in a row."""
EXIT_NO_SPACE = 4
"""Exit code of a run whose checkpoint did not fit on the disk (the newest complete one is intact)."""
SEED_STRIDE = 1_000_003
"""A prime that spreads one seed over ranks: rank r draws from a seed a stride apart (data order
workers, dropout), so no two ranks share a stream."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """`single`, `torchrun` (any launcher that sets RANK) or `slurm`."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[003-005,010],cpu1` -> `gpu003`."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if m is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The DistEnv described by the environment (see the module docstring); reads, never writes."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or _free_port()), "single")


def export(env: DistEnv) -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for torch.distributed and DeepSpeed."""
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def select_device(env: DistEnv, device: str) -> torch.device:
    """`cpu`, `cuda` (this rank's local GPU; an error without one) or `auto`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("system.device=cuda, but torch sees no CUDA device (use system=cpu)")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(env: DistEnv, device: torch.device, timeout_s: int, use_deepspeed: bool) -> None:
    """Create the default process group once (idempotent); DeepSpeed's own comm layer when it is used."""
    export(env)
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if use_deepspeed:
        import deepspeed

        if device.type == "cpu":
            _skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    elif env.world_size > 1:
        dist.init_process_group(backend=backend, timeout=timeout)


SHM_COMM_OP = "deepspeed_shm_comm"
"""DeepSpeed's shared-memory all-reduce for CPU inference (`inference_all_reduce`), which training never
calls: DeepSpeed JIT-builds it with g++ on every `init_distributed` on a CPU (~40 s on a fresh machine),
and a build killed midway leaves a lock under ~/.cache/torch_extensions that hangs every later start."""


def _skip_shm_comm_op() -> None:
    """Mark SHM_COMM_OP incompatible in DeepSpeed's table of ops (the one `build_shm_op` reads), so that
    `init_distributed` on a CPU builds nothing and all collectives go through gloo, as they do anyway."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (`sum` or `max`) over all ranks; the identity in a single process."""
    if initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def barrier() -> None:
    if initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def rank_zero_first(what: str) -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (which then find rank 0's work done: a
    cache, a converted checkpoint). An error on rank 0 is shared: the other ranks raise instead of
    waiting at a barrier for a rank that is gone. `what` names the work in that error."""
    if not initialized():
        yield
        return
    if rank() == 0:
        error: str | None = None
        try:
            yield
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            broadcast_object(error)
            raise
        broadcast_object(error)
    else:
        error = broadcast_object(None)
        if error is not None:
            raise RuntimeError(f"rank 0 failed while {what}: {error}")
        yield


def shutdown(wait: bool = True) -> None:
    """Destroy the process group (multi-rank groups only) before the interpreter exits: a gloo group
    left to the exit can abort a rank ("terminate called without an active exception") while its peer
    closes its connections. `wait`: a barrier first, when every rank ends here together (not after an
    error that only some ranks saw)."""
    if not initialized():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


class StopSignal:
    """SIGUSR1 / SIGUSR2 / SIGTERM set `requested` (and remember which signal); the loop decides when to stop.

    A launcher may have its own handler for one of these signals (submitit requeues the job on
    SIGUSR2, its preemption signal). We take the signal first so that the step ends and a checkpoint
    is written; then `hand_over()` calls the launcher's handler, which requeues as it always does.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._launcher_handler: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            previous = self._previous.get(signum)
            self._launcher_handler = (signum, previous) if callable(previous) else None

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def hand_over(self) -> None:
        """After the stop checkpoint: run the handler that the received signal had before `install`
        (a launcher's, e.g. submitit's requeue; it may exit the process). Nothing for the defaults."""
        if self._launcher_handler is not None:
            signum, handler = self._launcher_handler
            handler(signum, None)

    def restore(self) -> None:
        """Put back the handlers that were there before `install` (a run inside a longer process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
