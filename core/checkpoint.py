"""The checkpoint layout, in one place: file names, atomic save, keep-last-K, finding the checkpoint to
resume from, and reading one back (for evaluation, export, fill-mask, fine-tuning) with any ZeRO stage
consolidated.

Layout under a run's `checkpoints/` directory:

    step_00001000/            one complete checkpoint
        checkpoint.json       {"step", "files": {relative path: {"bytes", "sha256"}}} written last
        config.yaml           the resolved run config (RUN_CONFIG)
        trainer_state.json    step, counters, wandb run id (TRAINER_STATE)
        rank_00000.pt ...     each rank's loader position and RNG states (RANK_STATE)
        model.pt, optimizer.pt, scheduler.pt      the torch backend (TORCH_MODEL, ...)
        deepspeed/            DeepSpeed's own files, any ZeRO stage (DEEPSPEED_DIR)
    latest                    the name of the newest complete checkpoint (a hint for people and tools)
    .tmp-step_00002000/       a checkpoint being written (or left by a crash): never resumed from

`save` is called by every rank: each writes its files into the temporary directory, a barrier, then
rank 0 lists the files with sizes and sha256 into `checkpoint.json`, renames the directory into place,
rewrites `latest` atomically and deletes the oldest complete checkpoints beyond `keep_last`; a second
barrier lets no rank run ahead of the rename. A checkpoint is complete when its `checkpoint.json`
parses and every listed file is there with its size (and sha256, when verified); `find_resumable`
walks the checkpoints newest first and passes over incomplete ones, saying why.

Also here: the RNG states of a process (python, numpy, torch, cuda), saved per rank.

Reading (every reader goes through these):

    ckpt = resolve_checkpoint("outputs/debug")     # a run dir, its checkpoints/, `latest` or a step_* dir
    cfg = read_run_config(ckpt)                    # config.yaml as an omegaconf DictConfig
    model = load_checkpoint_model(ckpt, model_config(cfg))   # fp32, eval mode, on the CPU
    model, tokenizer = load_model_and_tokenizer(path)        # an HF export dir or a checkpoint

The typed run config (with overrides) is pretrain.config.load_run_config: the schema is the trainer's.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from core.hashing import file_sha256
from core.hf import CONFIG_NAME, load_hf
from core.model import RobertaConfig, RobertaForMaskedLM
from core.tokenizer import TokenizerError, check_built_with, load_tokenizer, tokenizer_hash

log = logging.getLogger(__name__)

CHECKPOINT_JSON = "checkpoint.json"
LATEST = "latest"
RUN_CONFIG = "config.yaml"
TRAINER_STATE = "trainer_state.json"
RANK_STATE = "rank_{:05d}.pt"
TORCH_MODEL, TORCH_OPTIMIZER, TORCH_SCHEDULER = "model.pt", "optimizer.pt", "scheduler.pt"
DEEPSPEED_DIR = "deepspeed"
"""The DeepSpeed tag: its files go to `<step dir>/deepspeed/`."""
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _list_files(directory: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != CHECKPOINT_JSON:
            files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return files


class UnresumableError(ValueError):
    """A saved state this run cannot continue from (a loader position of another order, ZeRO states that
    cannot be converted for this world size); the message says why. The trainer exits 2 on it."""


class NoSpaceError(OSError):
    """A checkpoint that could not be written for want of disk space; the partial directory is gone and
    the newest complete checkpoint is untouched. The message names the path, the step and the size."""


_MB = 2**20
_NEARLY_FULL = 4 * _MB
"""A write error with less than this free on the checkpoint's file system is "no space" (torch.save
reports a full disk as a RuntimeError of its zip writer, not as ENOSPC)."""


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _out_of_space(e: BaseException, path: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return isinstance(e, (OSError, RuntimeError)) and _free_bytes(path) < _NEARLY_FULL
    except OSError:
        return False


def _agree(error: str | None) -> str | None:
    """The first rank's error, on every rank (None when no rank has one): ranks stop together."""
    if not (dist.is_available() and dist.is_initialized()):
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """The size of a complete checkpoint, from its checkpoint.json."""
    return sum(meta["bytes"] for meta in json.loads((Path(path) / CHECKPOINT_JSON).read_text())["files"].values())


def save(root: str | os.PathLike, step: int, write: Callable[[Path], None], keep_last: int,
         needed_bytes: int = 0, known_size: bool = False) -> Path:
    """Write checkpoint `step` under `root` atomically; every rank calls this with its own `write(dir)`.

    `needed_bytes`: about how much the checkpoint takes (said when the disk fills). With `known_size`
    (an earlier checkpoint of the run measured it) the save is refused before writing when the file
    system has less free. A full disk raises NoSpaceError on every rank, with the partial directory
    removed. Returns the final directory (on every rank).
    """
    root = Path(root)
    name = step_dir_name(step)
    tmp = root / f".tmp-{name}"
    final = root / name

    def no_space(free: int) -> str:
        return (f"no space left on {root} while writing checkpoint step {step} (needs ~{needed_bytes / _MB:.0f} MB, "
                f"{free / _MB:.0f} MB free); the newest complete checkpoint is untouched")

    error = None
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save of the same step
        tmp.mkdir(parents=True)
        free = _free_bytes(tmp)
        if known_size and free < needed_bytes:
            error = no_space(free)
    error = _agree(error)
    if error is None:
        try:
            write(tmp)
        except (OSError, RuntimeError) as e:
            if not _out_of_space(e, tmp):
                raise
            error = no_space(_free_bytes(tmp))
        error = _agree(error)
    if error is not None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise NoSpaceError(errno.ENOSPC, error)
    _barrier()
    if _rank() == 0:
        record = {"step": step, "files": _list_files(tmp)}
        _write_text_atomic(tmp / CHECKPOINT_JSON, json.dumps(record, indent=1, sort_keys=True) + "\n")
        if final.exists():  # the same step saved again (e.g. a resumed run that ends where it began)
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, name + "\n")
        prune(root, keep_last)
    _barrier()
    return final


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of the `step_*` directories under `root`, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, and leftover temporary directories."""
    for _, path in complete_checkpoints(root)[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)
    for p in root.glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)


def problem(path: str | os.PathLike, check_hashes: bool = True) -> str | None:
    """Why checkpoint `path` cannot be resumed from, or None when it is complete. A file that cannot be
    read (permissions, an I/O error) is a problem named like the others, never an exception."""
    path = Path(path)
    record_path = path / CHECKPOINT_JSON
    try:
        if not record_path.is_file():
            return f"no {CHECKPOINT_JSON} (the save did not finish)"
        try:
            record = json.loads(record_path.read_text())
            files = record["files"]
            int(record["step"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            return f"{CHECKPOINT_JSON} is unreadable ({type(e).__name__}: {e})"
        for rel, meta in files.items():
            f = path / rel
            if not f.is_file():
                return f"file {rel} is missing"
            size = f.stat().st_size
            if size != meta["bytes"]:
                return f"file {rel} has {size} bytes, {CHECKPOINT_JSON} says {meta['bytes']} (truncated?)"
            if check_hashes and file_sha256(f) != meta["sha256"]:
                return f"file {rel}: sha256 differs from {CHECKPOINT_JSON} (corrupt)"
            if not check_hashes and not os.access(f, os.R_OK):
                return f"file {rel} is not readable (permissions)"
    except OSError as e:
        return f"unreadable: {type(e).__name__}: {e.strerror or e} ({e.filename or path})"
    return None


def step_of(path: str | os.PathLike) -> int:
    """The step recorded in a checkpoint's checkpoint.json."""
    return int(json.loads((Path(path) / CHECKPOINT_JSON).read_text())["step"])


def find_resumable(root: str | os.PathLike, check_hashes: bool = True) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under `root` (or None), and a line for each one passed over."""
    passed_over = []
    for _, path in complete_checkpoints(root):
        why = problem(path, check_hashes)
        if why is None:
            return path, passed_over
        passed_over.append(f"{path}: {why}")
    return None, passed_over


# ---------------------------------------------------------------------------------------------------
# the manager: what the trainer saves and loads, through state_dict() / load_state_dict()


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EngineFiles(Protocol):
    """A training engine's own files (the torch backend's model.pt..., DeepSpeed's deepspeed/ tag)."""

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


class CheckpointManager:
    """The checkpoints of one run, under `<output_dir>/checkpoints/` (the layout at the top of this
    module). Every rank calls `save` and `load`:

        manager = CheckpointManager(root, rank, keep_last, engine, trainer=trainer, per_rank={"loader": loader},
                                    run_config=lambda: resolved_yaml)
        manager.save(step)            # engine files, rank_XXXXX.pt, trainer_state.json, config.yaml, checkpoint.json
        path = manager.find("auto")   # rank 0 decides (passing over incomplete ones, saying why), all ranks agree
        manager.load(path)            # the engine, then each object's load_state_dict, then the RNG states

    `trainer` is saved by rank 0 as JSON (its state_dict must be JSON-able) and loaded on every rank;
    `per_rank` objects are saved by each rank with its RNG states; a rank the saving run did not have
    (a resume on more ranks) loads rank 0's objects (their state must be the same on every rank, as the
    loader's global position is) and seeds its RNGs from `new_rank_seed(seed, rank, step)`.
    `estimate_bytes` (about the size of
    a checkpoint) is what a full disk's message says before the run has a checkpoint to measure; once it
    has one, a save is refused up front when the disk has less free than that checkpoint took.
    """

    def __init__(self, root: str | os.PathLike, rank: int, keep_last: int, engine: EngineFiles, *,
                 trainer: Stateful, per_rank: dict[str, Stateful], run_config: Callable[[], str],
                 estimate_bytes: int = 0, seed: int = 0):
        self.root, self.rank, self.keep_last, self.estimate_bytes = Path(root), rank, keep_last, estimate_bytes
        self.seed = seed
        self.engine, self.trainer, self.per_rank, self.run_config = engine, trainer, per_rank, run_config

    def save(self, step: int) -> Path:
        def write(directory: Path) -> None:
            self.engine.save(directory)
            torch.save({"rng": rng_state(), **{k: v.state_dict() for k, v in self.per_rank.items()}},
                       directory / RANK_STATE.format(self.rank))
            if self.rank == 0:
                (directory / RUN_CONFIG).write_text(self.run_config())
                (directory / TRAINER_STATE).write_text(json.dumps(self.trainer.state_dict(), indent=1) + "\n")

        needed, measured = self.estimate_bytes, False
        if self.rank == 0:  # the newest checkpoint's size is the best estimate of the next one's
            for _, path in complete_checkpoints(self.root):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    needed, measured = checkpoint_bytes(path), True
                    break
        return save(self.root, step, write, self.keep_last, needed_bytes=needed, known_size=measured)

    def has(self, step: int) -> bool:
        """Whether a complete checkpoint of `step` exists (a resumed run that is already done)."""
        path = self.root / step_dir_name(step)
        return path.is_dir() and (path / CHECKPOINT_JSON).is_file()

    def find(self, resume: str, verify: bool = True) -> Path | None:
        """`resume`: `auto` (the newest complete checkpoint, or None), `none`, or a checkpoint path
        (CheckpointError when it is not complete). Rank 0 decides; every rank gets the same answer."""
        chosen: str | None = None
        error: str | None = None
        if self.rank == 0 and resume != "none":
            if resume == "auto":
                path, passed_over = find_resumable(self.root, verify)
                for line in passed_over:
                    log.warning("resume=auto passes over %s", line)
                chosen = None if path is None else str(path)
            else:
                why = problem(resume, verify)
                if why is not None:
                    error = f"trainer.resume={resume}: cannot resume from it: {why}"
                chosen = resume
        if dist.is_available() and dist.is_initialized():
            box = [(chosen, error)]
            dist.broadcast_object_list(box, src=0)
            chosen, error = box[0]
        if error:
            raise CheckpointError(error)
        return None if chosen is None else Path(chosen)

    def load(self, path: Path) -> None:
        self.trainer.load_state_dict(json.loads((path / TRAINER_STATE).read_text()))  # may refuse first
        self.engine.load(path)
        own = path / RANK_STATE.format(self.rank)
        state = torch.load(own if own.is_file() else path / RANK_STATE.format(0), weights_only=False)
        for key, obj in self.per_rank.items():
            obj.load_state_dict(state[key])
        if own.is_file():
            set_rng_state(state["rng"])
        else:  # a rank the saving run did not have: its streams cannot follow any saved one
            seed = new_rank_seed(self.seed, self.rank, step_of(path))
            log.info("rank %d: not in the checkpoint's run; RNG seeded from (seed %d, rank, step)", self.rank,
                     self.seed)
            seed_rngs(seed)


# ---------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    """The random states this process draws from: python, numpy, torch CPU and every CUDA device."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def new_rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a rank that a resumed run has and the saving run had not: a function of (seed, rank,
    step) only, so a rerun of the same resume draws the same dropout (63 bits)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_rngs(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------
# reading what training left


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint (or whose tokenizer does not fit); the message says why."""


def resolve_checkpoint(path: str | os.PathLike, verify: bool = True) -> Path:
    """The complete `step_*` directory that `path` names: the directory itself, the `latest` pointer
    file, a `checkpoints/` directory (its `latest`), or a run directory (its `checkpoints/latest`).

    A checkpoint is valid only with its checkpoint.json and every file's size and sha256 as recorded
    there: a file that differs is refused, named (CheckpointError). `verify=False` checks sizes only,
    with a warning."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        path = path.parent / path.read_text().strip()
    elif path.is_dir() and not _STEP_DIR.match(path.name):
        root = path if (path / LATEST).is_file() or complete_checkpoints(path) else path / "checkpoints"
        if (root / LATEST).is_file():
            path = root / (root / LATEST).read_text().strip()
        elif complete_checkpoints(root):  # no `latest` (deleted, or a copy without it): the newest complete
            newest, passed_over = find_resumable(root, check_hashes=False)
            for line in passed_over:
                log.warning("passing over %s", line)
            if newest is None:
                raise CheckpointError(f"{root}: no complete checkpoint ({'; '.join(passed_over)})")
            path = newest
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not verify:
        log.warning("%s: verify=false: the files' sha256 are not checked against %s", path, CHECKPOINT_JSON)
    why = problem(path, check_hashes=verify)
    if why is not None:
        raise CheckpointError(f"{path}: not a complete checkpoint: {why}")
    if not (path / RUN_CONFIG).is_file():
        raise CheckpointError(f"{path}: no {RUN_CONFIG} (the run config the trainer saves beside the "
                              f"weights)")
    return path


def read_run_config(ckpt: Path) -> DictConfig:
    """The run config saved in checkpoint `ckpt`, untyped (pretrain.config.load_run_config types it)."""
    try:
        cfg = OmegaConf.load(ckpt / RUN_CONFIG)
    except Exception as e:  # a YAML error
        raise CheckpointError(f"{ckpt / RUN_CONFIG}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg:
        raise CheckpointError(f"{ckpt / RUN_CONFIG}: not a run config (no `model` section)")
    return cfg


def model_config(cfg: DictConfig) -> RobertaConfig:
    """The model's sizes from a run config (checked by RobertaConfig)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RobertaConfig), cfg.model)
        obj = OmegaConf.to_object(merged)
    except Exception as e:  # omegaconf's ValidationError, RobertaConfig's __post_init__
        raise CheckpointError(f"model: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    assert isinstance(obj, RobertaConfig)
    return obj


def load_model_state(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's weights (fp32, on the CPU) from a checkpoint of either backend, any ZeRO stage.

    torch backend: `model.pt`. DeepSpeed: the fp32 master weights gathered from the ZeRO partitions
    (stages 1-3), or the module's weights saved by rank 0 (stage 0).
    """
    directory = Path(checkpoint_dir)
    if (directory / TORCH_MODEL).is_file():
        return torch.load(directory / TORCH_MODEL, map_location="cpu")
    ds_dir = directory / DEEPSPEED_DIR
    if not ds_dir.is_dir():
        raise CheckpointError(f"{directory}: neither {TORCH_MODEL} nor {DEEPSPEED_DIR}/: not a checkpoint")
    if any(ds_dir.glob("*optim_states.pt")) and any(ds_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DEEPSPEED_DIR)
        return {k: v.float() for k, v in state.items()}
    module = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}


def load_checkpoint_model(ckpt: Path, config: RobertaConfig) -> RobertaForMaskedLM:
    """The model of checkpoint `ckpt` (any backend, any ZeRO stage), fp32 on the CPU, in eval mode."""
    try:
        # DeepSpeed's consolidation (and its logger, created on first import) print to stdout: keep
        # stdout for the commands' JSON answers.
        with contextlib.redirect_stdout(sys.stderr):
            state = load_model_state(ckpt)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    model = RobertaForMaskedLM(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def checkpoint_tokenizer_dir(cfg: DictConfig, tokenizer: str | os.PathLike | None = None) -> Path:
    """The tokenizer directory of a run: `tokenizer` when given, else the run's `data.tokenizer` (a
    relative path is taken from the current directory, as the trainer took it).

    Checks that it loads, has `model.vocab_size` ids and, when the run's corpus manifest can be read,
    the `tokenizer_hash` the corpus was built with."""
    data = cfg.get("data") or {}
    chosen = tokenizer if tokenizer is not None else data.get("tokenizer")
    if chosen is None:
        raise CheckpointError("the run recorded no data.tokenizer: give the tokenizer directory "
                              "(tokenizer=<dir>)")
    directory = Path(chosen)
    tok = load_tokenizer(directory)
    vocab_size = cfg.model.vocab_size
    if tok.get_vocab_size() != vocab_size:
        raise CheckpointError(f"{directory}: {tok.get_vocab_size()} ids, but the model has "
                              f"model.vocab_size={vocab_size}: not the run's tokenizer")
    manifest = Path(str(data.get("corpus"))) / "manifest.json"
    try:
        recorded = json.loads(manifest.read_text())
        corpus_vocab, corpus_hash = recorded["vocab_size"], recorded["tokenizer_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return directory  # the corpus is not here (e.g. another machine): the vocabulary check stands
    check_built_with(f"{manifest} (the run's corpus)", corpus_vocab, corpus_hash, expect_hash=tokenizer_hash(directory),
                     error=CheckpointError)
    return directory


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is an HF model directory (a `config.json`), as `serving.export` writes."""
    return (Path(path) / CONFIG_NAME).is_file()


def load_model_and_tokenizer(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                             verify: bool = True) -> tuple[RobertaForMaskedLM, Tokenizer]:
    """Model (fp32, eval mode, CPU) and tokenizer from an HF directory (its own tokenizer files unless
    `tokenizer` is given) or from a checkpoint (anything `resolve_checkpoint` accepts)."""
    if is_hf_dir(path):
        model = load_hf(path).eval()
        tok = load_tokenizer(tokenizer if tokenizer is not None else path)
        if tok.get_vocab_size() != model.config.vocab_size:
            raise TokenizerError(f"{tokenizer or path}: {tok.get_vocab_size()} ids, but the model in {path} "
                                 f"has vocab_size={model.config.vocab_size}")
        return model, tok
    ckpt = resolve_checkpoint(path, verify)
    cfg = read_run_config(ckpt)
    return load_checkpoint_model(ckpt, model_config(cfg)), load_tokenizer(checkpoint_tokenizer_dir(cfg, tokenizer))
