"""The pretraining loop: `python -m pretrain.train experiment=<name> key=value ...`.

    python -m pretrain.train experiment=debug                                   # CPU, minutes
    torchrun --nproc_per_node 8 -m pretrain.train experiment=roberta_large data.corpus=/data/corpus
    srun python -m pretrain.train experiment=roberta_large ...                  # see launch/

One optimizer step on each rank: take `grad_accum` micro-batches (loaded one step ahead on a thread,
see StepAhead), all-reduce their masked-token count,
then forward/backward each with its summed loss scaled by 1/(global count) (see pretrain.engine), and
step. The step's loss and flags (non-finite loss on some rank, a stop signal on some rank) travel in
one all-reduce before the optimizer step, so every rank takes the same decision:
  - non-finite: the update is skipped everywhere (parameters and moments untouched), counted and
    logged; `trainer.max_consecutive_nonfinite` in a row end the run with exit code 3, without writing
    a checkpoint (the last good one stays the newest);
  - stop signal (SIGUSR1/SIGUSR2/SIGTERM on any rank): all ranks finish this step, write a checkpoint and exit
    with code 75 ("stopped by signal"; resume with trainer.resume=auto).

Exit codes: 0 done (max_steps, or trainer.stop_at_step), 2 refused at start-up (a bad setting, a corpus
that does not fit the model, a checkpoint that cannot be resumed), 3 non-finite steps, 4 no space left
for a checkpoint (the partial one removed, the newest complete one intact), 75 stopped by a signal
after its checkpoint.

Outputs in the run directory (`trainer.output_dir`, default Hydra's `outputs/<name>`):
`metrics.jsonl` (one JSON object per logged step and per validation), `checkpoints/`, `wandb/`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import random
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from core import checkpoint
from core.cli import EXIT_BAD_INPUT, hydra_app
from core.model import IGNORE_INDEX, RobertaForMaskedLM
from core.tokenizer import tokenizer_hash
from data_prep.corpus import Corpus
from data_prep.shards import CorpusError
from pretrain import distributed, speed
from pretrain.config import CONF_DIR, ConfigError, PretrainConfig, resolved_yaml, to_run_config
from pretrain.data import TrainLoader, ValidLoader, check_corpus, word_starts
from pretrain.engine import Engine, build_engine
from pretrain.evaluate import evaluate
from pretrain.flops import device_peak_flops, flops_per_token
from pretrain.metrics import MetricsWriter, StepMetrics, start_wandb
from pretrain.optim import build_optimizer, build_scheduler

log = logging.getLogger("pretrain.train")

CHECKPOINT_BYTES_PER_PARAM = 16
"""About what a checkpoint holds per parameter (fp32 weights and two Adam moments, 12 bytes; bf16
copies under DeepSpeed): the size a full disk's message names before a first checkpoint measures it."""



class ResumeError(RuntimeError):
    """trainer.resume names a checkpoint that cannot be resumed from (or one of another run's shape)."""


def output_dir_of(run: PretrainConfig) -> Path:
    """`trainer.output_dir`, else Hydra's run directory, else outputs/<name>."""
    if run.trainer.output_dir:
        return Path(run.trainer.output_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / run.name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StepAhead:
    """This rank's micro-batches, one optimizer step ahead: while step k computes, a background thread takes
    step k+1's micro-batches from the loader (pulling them from the workers' queues, pinning them, dropping
    an all-ones mask), so the first forward of a step does not wait for the last micro-batch of it to load.

    `take()` returns a step's host micro-batches with the loader's state right after them: the position a
    checkpoint of that step records (`state_dict`), whatever the thread has taken since. The first step
    loads on the calling thread (the DataLoader starts its workers and signal handlers there). Loading
    draws from no global RNG (the masks are keyed by position), so the batches, and the run, are the same
    as loading in turn. `close()` asks the thread to stop between micro-batches and waits for it.
    """

    def __init__(self, loader: TrainLoader, load: Callable[[Callable[[], bool]], list[dict[str, torch.Tensor]]]):
        self.loader, self._load = loader, load
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._next: concurrent.futures.Future | None = None
        self._closing = threading.Event()
        self._position: dict[str, Any] | None = None

    def _load_step(self) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
        batches = self._load(self._closing.is_set)
        return batches, self.loader.state_dict()

    def take(self, load_next: bool) -> list[dict[str, torch.Tensor]]:
        """The next step's micro-batches; with `load_next`, start loading the step after it."""
        if self._next is None:
            batches, self._position = self._load_step()
        else:
            batches, self._position = self._next.result()
            self._next = None
        if load_next:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-ahead")
            self._next = self._pool.submit(self._load_step)
        return batches

    def state_dict(self) -> dict[str, Any]:
        """The loader's state after the last step taken (what resumes after it)."""
        return self._position if self._position is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._next is not None:
            raise RuntimeError("StepAhead.load_state_dict while a step is loading ahead")
        self.loader.load_state_dict(state)
        self._position = None

    @property
    def epoch(self) -> int:
        """The epoch of the next sample after the last step taken."""
        return int(self.state_dict()["epoch"])

    def close(self) -> None:
        """Stop loading ahead (the step being loaded is dropped) and end the thread; `take` may go on."""
        self._closing.set()
        if self._next is not None:
            with contextlib.suppress(Exception):  # a load cut short, or failed: nothing of it is used
                self._next.result()
            self._next = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._closing.clear()


class Trainer:
    """Builds everything from the run config, then `fit()` runs the loop and returns the exit code."""

    def __init__(self, run: PretrainConfig, cfg: DictConfig, env: distributed.DistEnv, device: torch.device):
        self.run, self.cfg, self.env, self.device = run, cfg, env, device
        self.out = output_dir_of(run)
        self.ckpt_root = self.out / "checkpoints"
        t = run.trainer
        self.grad_accum = int(run.system.grad_accum or 1)

        # Same init on every rank (DeepSpeed also broadcasts rank 0's), then per-rank dropout streams.
        seed_everything(t.seed)
        model = speed.apply(RobertaForMaskedLM(run.model), run.system.fp8, run.system.activation_checkpointing,
                            run.system.compile, run.system.compile_backend)
        model.to(device)
        seed_everything(t.seed + distributed.SEED_STRIDE * (env.rank + 1))

        tok_hash = tokenizer_hash(run.data.tokenizer)  # required: to_run_config refuses a run without it
        self.loader, self.valid = open_data(run, env, tok_hash)
        self.ahead = StepAhead(self.loader, lambda stop: self._next_batches(self._it, stop))
        self._it: Iterator[dict[str, torch.Tensor]] | None = None  # the loader's live iterator, in the loop

        optimizer = build_optimizer(model, run.optim)
        scheduler = build_scheduler(optimizer, run.optim.lr, run.schedule)
        self.engine: Engine = build_engine(run, model, optimizer, scheduler, device)

        self.step = 0
        self.skipped_steps = 0
        self.wandb_id: str | None = None
        self.stop = distributed.StopSignal()
        dtype = torch.bfloat16 if run.system.precision == "bf16" else torch.float32
        self.flops_per_token = flops_per_token(run.model, run.data.seq_len)
        peak = device_peak_flops(device, dtype)
        self.peak_flops = None if peak is None else peak * env.world_size
        self.consecutive_nonfinite = 0
        self.step_real_tokens = 0.0
        """Non-padding tokens of the last step over all ranks (for MFU; read with the step's one sync)."""
        self.metrics: StepMetrics  # set by fit()
        self.checkpoints = checkpoint.CheckpointManager(
            self.ckpt_root, env.rank, run.trainer.keep_last, self.engine, trainer=self,
            per_rank={"loader": self.ahead}, run_config=lambda: resolved_yaml(cfg),
            estimate_bytes=CHECKPOINT_BYTES_PER_PARAM * sum(p.numel() for p in model.parameters()),
            seed=t.seed)

    # ----------------------------------------------------------------------------------------------
    # checkpoints

    def save(self) -> Path:
        path = self.checkpoints.save(self.step)
        log.info("checkpoint: step %d -> %s", self.step, path)
        return path

    def state_dict(self) -> dict[str, Any]:
        """What the trainer itself resumes from (trainer_state.json)."""
        return {"step": self.step, "world_size": self.env.world_size, "backend": self.run.trainer.backend,
                "skipped_steps": self.skipped_steps, "wandb_run_id": self.wandb_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The step and counters; any world size (elastic resume: the loader's position is global, the
        engine converts partitioned ZeRO states), but not another backend."""
        if state["backend"] != self.run.trainer.backend:
            raise ResumeError(
                f"saved by {state['world_size']} rank(s) with trainer.backend={state['backend']}; this run has "
                f"{self.env.world_size} with trainer.backend={self.run.trainer.backend}: a checkpoint resumes "
                "with its own backend"
            )
        if state["world_size"] != self.env.world_size:
            log.info("elastic resume: saved by %d rank(s), resuming on %d", state["world_size"],
                     self.env.world_size)
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])
        self.wandb_id = state.get("wandb_run_id")

    def find_checkpoint(self) -> Path | None:
        try:
            return self.checkpoints.find(self.run.trainer.resume, self.run.trainer.verify_checkpoint)
        except checkpoint.CheckpointError as e:
            raise ResumeError(str(e)) from None

    RESUME_MUST_MATCH = (
        *(f"model.{k}" for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size",
                                  "max_positions", "pad_token_id", "type_vocab_size", "pad_vocab_multiple")),
        "data.seq_len", "data.packing", "schedule.global_batch_size",
    )
    """Settings a checkpoint fixes: the weights' shapes and the data order (the loader's position)."""

    def check_resumable(self, path: Path) -> None:
        """Refuse (ResumeError, exit 2) a checkpoint whose run fixed a setting this run changes, naming
        both values, before any state is loaded."""
        saved = OmegaConf.load(path / checkpoint.RUN_CONFIG)
        differ = [(k, OmegaConf.select(saved, k), OmegaConf.select(self.cfg, k)) for k in self.RESUME_MUST_MATCH
                  if OmegaConf.select(saved, k) != OmegaConf.select(self.cfg, k)]
        if differ:
            raise ResumeError(
                f"{path} was trained with " + ", ".join(f"{k}={a}" for k, a, _ in differ) + "; this run has "
                + ", ".join(f"{k}={b}" for k, _, b in differ)
                + ": resume with the checkpoint's settings, or start afresh (trainer.resume=none)"
            )

    def load(self, path: Path) -> None:
        self.check_resumable(path)
        try:
            self.checkpoints.load(path)
        except (ResumeError, checkpoint.UnresumableError) as e:
            raise ResumeError(f"{path}: {e}") from None
        log.info("resumed from %s at step %d", path, self.step)

    # ----------------------------------------------------------------------------------------------
    # the step

    def _next_batches(self, it: Iterator[dict[str, torch.Tensor]],
                      stop: Callable[[], bool] = lambda: False) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next step, still on the host (pinned when the loader pins:
        `train_step` copies each to the device just before its forward). An all-ones attention mask is
        dropped here, on the host copy, so the model needs no device-side check (a host sync) to use the
        fused attention kernels. Loading draws nothing from torch's global RNG: the dropout stream of a
        resumed run is the uninterrupted run's. Runs on StepAhead's thread, which `stop` ends early."""
        batches: list[dict[str, torch.Tensor]] = []
        for _ in range(self.grad_accum):
            if stop():  # StepAhead.close(): the run ends, the rest of this step is not needed
                return batches
            batch = dict(next(it))
            if bool(batch["attention_mask"].all()):
                del batch["attention_mask"]
            batches.append(batch)
        return batches

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A host micro-batch on the device: asynchronous from pinned memory on CUDA."""
        nb = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=nb) for k, v in batch.items()}

    def max_predictions(self, batches: list[dict[str, torch.Tensor]]) -> int:
        """The static bound of predicted positions per sample the model's head gathers (`max_predictions`):
        the masker chooses floor(mask_prob * n + u) <= ceil(mask_prob * seq_len) positions per sample
        (pretrain/masking.py, u < 1), so that bound holds for token masking; whole-word masking has
        none below seq_len. Checked on the host copy of the labels (no device sync)."""
        masking, seq_len = self.run.data.masking, self.run.data.seq_len
        bound = seq_len if masking.whole_word else max(1, math.ceil(masking.mask_prob * seq_len))
        most = max(int(b["labels"].ne(IGNORE_INDEX).sum(1).max()) for b in batches)
        if most > bound:
            raise RuntimeError(f"a sample has {most} masked positions, more than the bound {bound} of "
                               f"data.masking.mask_prob={masking.mask_prob} x data.seq_len={seq_len}")
        return bound

    def micro_batch_loss(self, batch: dict[str, torch.Tensor],
                         max_predictions: int | None = None) -> torch.Tensor:
        """The loss of one micro-batch, summed over its masked tokens (the tests' fault injection
        overrides this in a subclass: tests/train_runner.py)."""
        return self.engine.forward(batch, max_predictions=max_predictions).loss

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> tuple[float, bool, bool]:
        """One optimizer step over this rank's host micro-batches: (loss, applied, stop requested anywhere).

        Two all-reduces: the masked-token count (counted on the host copies) before the first forward, and
        (loss sum, non-finite flag, stop flag, real tokens) before the optimizer step; the step's one host
        synchronisation reads them with the count. Micro-batch i+1 is copied to the device before the
        forward of micro-batch i, so its copy is queued ahead of the compute that needs it.
        """
        local_count = sum(int(b["labels"].ne(IGNORE_INDEX).sum()) for b in batches)
        real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                   for b in batches)
        bound = self.max_predictions(batches)
        count = distributed.all_reduce(torch.full((1,), local_count, dtype=torch.float64, device=self.device))
        scale = self.engine.grad_scale / count.clamp(min=1)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        ahead = self._to_device(batches[0])
        for i in range(len(batches)):
            batch, ahead = ahead, (self._to_device(batches[i + 1]) if i + 1 < len(batches) else None)
            loss = self.micro_batch_loss(batch, bound)
            self.engine.backward((loss * scale).to(loss.dtype).sum())
            loss_sum += loss.detach().double()
            if i < len(batches) - 1:
                self.engine.micro_step(boundary=False, skip=False)
        bad = ~torch.isfinite(loss_sum)
        norm = self.engine.grad_norm()
        if norm is not None:
            bad |= ~torch.isfinite(norm.reshape(1))
        # Host values enter as fills (a kernel argument), not copies: no transfer to wait for.
        stop = torch.full((1,), float(self.stop.requested), dtype=torch.float64, device=self.device)
        real_tokens = torch.full((1,), float(real), dtype=torch.float64, device=self.device)
        flags = distributed.all_reduce(
            torch.cat([torch.where(bad, 0.0, loss_sum), bad.double(), stop, real_tokens]))
        total, n_bad, n_stop, self.step_real_tokens, n_tokens = torch.cat([flags, count]).tolist()
        skip = n_bad > 0
        applied = self.engine.micro_step(boundary=True, skip=skip)
        return (float("nan") if skip else total / max(n_tokens, 1.0)), applied, n_stop > 0

    def validate(self) -> dict[str, float]:
        """MLM loss, perplexity, accuracy and token count over the masked tokens of the valid split, summed
        over all ranks (`pretrain.evaluate.evaluate`, the loop `python -m pretrain.evaluate` runs)."""
        assert self.valid is not None
        self.engine.train(False)
        try:
            metrics = evaluate(self.engine.forward, self.valid, self.device, self.run.data.valid_max_batches)
        finally:
            self.engine.train(True)
        return {f"valid/{k}": v for k, v in metrics.items()}

    # ----------------------------------------------------------------------------------------------
    # the loop

    def fit(self) -> int:
        run, t = self.run, self.run.trainer
        resume_from = self.find_checkpoint()
        if resume_from is not None:
            self.load(resume_from)
        end = min(run.schedule.max_steps, t.stop_at_step or run.schedule.max_steps)
        writer = None
        if self.env.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            wb, self.wandb_id = start_wandb(run, self.cfg, self.out, self.wandb_id)
            writer = MetricsWriter(self.out / "metrics.jsonl", wb)
            dropped = writer.drop_after(self.step)
            if dropped:
                log.info("metrics.jsonl: %d records after step %d dropped (those steps are redone)", dropped,
                         self.step)
        self.wandb_id = distributed.broadcast_object(self.wandb_id)
        self.metrics = StepMetrics(writer, name=run.name, log_every=t.log_every, max_steps=run.schedule.max_steps,
                                   tokens_per_step=run.schedule.global_batch_size * run.data.seq_len,
                                   step=self.step, flops_per_token=self.flops_per_token,
                                   peak_flops=self.peak_flops, progress_bar=t.progress_bar)
        log.info(
            "run: %s | %d rank(s), backend %s%s, %s, device %s | global batch %d = %d x %d x %d | steps %d -> %d",
            run.name, self.env.world_size, t.backend,
            f" ZeRO-{run.deepspeed.zero_stage}" if t.backend == "deepspeed" else "", run.system.precision,
            self.device, run.schedule.global_batch_size, run.system.micro_batch_size, self.grad_accum,
            self.env.world_size, self.step, end,
        )
        self.stop.install()
        try:
            return self._loop(end)
        finally:
            self.stop.restore()
            self.metrics.close()

    def _loop(self, end: int) -> int:
        self._it = iter(self.loader)
        try:
            with speed.attention_backends(self.run.system.sdpa_backends):
                return self._steps(end)
        finally:
            self.ahead.close()

    def _steps(self, end: int) -> int:
        """The paper's loop: step, count a non-finite step, log, validate, stop on a signal, save."""
        self.engine.train(True)
        last_saved = self.step if self.checkpoints.has(self.step) else -1
        while self.step < end:
            with self.metrics.waiting():
                batches = self.ahead.take(load_next=self.step + 1 < end)
            lr = self.engine.lr
            loss, applied, stop = self.train_step(batches)
            self.step += 1
            self.metrics.advance(self.step_real_tokens)
            if not self.count_step(applied):
                return distributed.EXIT_NONFINITE
            if self.metrics.should_log(self.step, end, stop):
                self.metrics.log(self.step, loss=loss, lr=lr, skipped_steps=self.skipped_steps,
                                 epoch=self.ahead.epoch, grad_norm=self.engine.last_grad_norm,
                                 samples=self.step * self.run.schedule.global_batch_size)
            if self.should_validate(end):
                self.metrics.log_validation(self.step, self.validate())
            if stop:
                log.info("stopped by signal (%s on some rank) after step %d: writing a checkpoint",
                         self.stop.signal_name or "another rank", self.step)
                if last_saved != self.step:
                    self.save()
                log.info("stopped by signal: checkpoint at step %d written; exit %d (resume with "
                         "trainer.resume=auto)", self.step, distributed.EXIT_STOPPED)
                return distributed.EXIT_STOPPED
            if self.should_save(end):
                self.save()
                last_saved = self.step
        if last_saved != self.step:
            self.save()
        log.info("done: step %d", self.step)
        return 0

    def count_step(self, applied: bool) -> bool:
        """Count a skipped (non-finite) step; False once `trainer.max_consecutive_nonfinite` come in a row."""
        if applied:
            self.consecutive_nonfinite = 0
            return True
        t = self.run.trainer
        self.skipped_steps += 1
        self.consecutive_nonfinite += 1
        log.warning("step %d: non-finite loss or gradient norm on some rank: update skipped (%d in a row, %d in "
                    "all)", self.step, self.consecutive_nonfinite, self.skipped_steps)
        if self.consecutive_nonfinite < t.max_consecutive_nonfinite:
            return True
        log.error("stopping: %d non-finite steps in a row (trainer.max_consecutive_nonfinite=%d); no checkpoint "
                  "written, the newest one is still the last good state", self.consecutive_nonfinite,
                  t.max_consecutive_nonfinite)
        return False

    def should_validate(self, end: int) -> bool:
        every = self.run.trainer.eval_every
        return self.valid is not None and ((every and self.step % every == 0) or self.step == end)

    def should_save(self, end: int) -> bool:
        """Every `trainer.save_every` steps; the last step's checkpoint is written after the loop."""
        every = self.run.trainer.save_every
        return bool(every) and self.step % every == 0 and self.step != end


def open_data(run: PretrainConfig, env: distributed.DistEnv, tok_hash: str) -> tuple[TrainLoader, ValidLoader | None]:
    """The run's training loader and validation loader (None without a valid split) for this rank.

    Rank 0 hashes the corpus (remembered in .verified.json) and writes the block index cache first; the
    other ranks then find both done, instead of each hashing and indexing the whole corpus at once.
    """
    t = run.trainer
    word_start = word_starts(run.data.masking, run.data.tokenizer)  # None unless whole-word masking
    with _corpus_refusal_on_every_rank(), \
            distributed.rank_zero_first("verifying the corpus and building its block index"):
        corpus = Corpus.open(run.data.corpus, "train", expect_tokenizer_hash=tok_hash)
        check_corpus(corpus, run.model.vocab_size, tok_hash)
        loader = TrainLoader(
            corpus, seq_len=run.data.seq_len, micro_batch_size=run.system.micro_batch_size,
            packing=run.data.packing, masking=run.data.masking, seed=t.seed, rank=env.rank,
            world_size=env.world_size, num_workers=run.system.num_workers, pin_memory=run.system.pin_memory,
            prefetch_factor=run.system.prefetch_factor, word_start=word_start,
            global_batch=run.schedule.global_batch_size,
        )
        valid: ValidLoader | None = None
        if "valid" in corpus.manifest["splits"] and corpus.manifest["splits"]["valid"]["tokens"] > 0:
            valid_corpus = Corpus.open(run.data.corpus, "valid", expect_tokenizer_hash=tok_hash)
            valid = ValidLoader(
                valid_corpus, seq_len=run.data.seq_len, batch_size=run.system.micro_batch_size,
                masking=run.data.masking, seed=t.seed, rank=env.rank, world_size=env.world_size,
                packing=run.data.packing, word_start=word_start,
            )
    return loader, valid


@contextlib.contextmanager
def _corpus_refusal_on_every_rank() -> Iterator[None]:
    """A corpus refused on rank 0 (under `rank_zero_first`) is refused on every rank: the others get
    rank 0's error as a CorpusError, so that every rank exits 2 as it did when each checked alone."""
    try:
        yield
    except RuntimeError as e:
        if "CorpusError: " in str(e) and "rank 0 failed while" in str(e):
            raise CorpusError(str(e)) from None
        raise


def setup_logging(rank: int) -> None:
    """Our loggers at INFO on rank 0 (WARNING elsewhere); other libraries' at WARNING."""
    logging.basicConfig(
        level=logging.WARNING,
        format=f"[%(asctime)s rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout, force=True,
    )
    logging.getLogger("pretrain").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def build_trainer(cfg: DictConfig, trainer_cls: type[Trainer] | None = None) -> Trainer:
    """Validate the composed config, set up logging and the process group, build the Trainer."""
    env = distributed.detect()
    setup_logging(env.rank)
    run_cfg = to_run_config(cfg, env.world_size)
    device = distributed.select_device(env, run_cfg.system.device)
    distributed.init(env, device, run_cfg.system.dist_timeout_s, use_deepspeed=run_cfg.trainer.backend == "deepspeed")
    return (trainer_cls or Trainer)(run_cfg, cfg, env, device)


def run(cfg: DictConfig, trainer_cls: type[Trainer] | None = None) -> int:
    """Validate, set up the process group, train; returns the exit code (0, 3, 4 or 75)."""
    trainer = build_trainer(cfg, trainer_cls)
    try:
        code = trainer.fit()
    except checkpoint.NoSpaceError as e:
        log.error("%s; exit %d", e.strerror, distributed.EXIT_NO_SPACE)
        return distributed.EXIT_NO_SPACE
    if code == distributed.EXIT_STOPPED:
        trainer.stop.hand_over()  # a launcher's own handler (submitit: requeue) now that the checkpoint is written
    return code


def _task(cfg: DictConfig) -> None:
    try:
        code = run(cfg)
    except (ConfigError, CorpusError, ResumeError) as e:
        log.error("%s", e)
        code = EXIT_BAD_INPUT
    # Every rank ends here together, except after a full disk, which one rank may see alone.
    distributed.shutdown(wait=code != distributed.EXIT_NO_SPACE)
    if code:
        sys.exit(code)


main = hydra_app(CONF_DIR, "pretrain", _task)
"""`python -m pretrain.train`: a refused configuration exits 2 (core.cli), 3 and 75 as the README says."""


if __name__ == "__main__":
    main()
