"""What the trainer reports, on rank 0: metrics.jsonl, wandb, and the progress display.

    metrics = StepMetrics(out, writer, tokens_per_step, ...)      # rank 0; other ranks pass writer=None
    with metrics.waiting():  batches = next_batches()              # the data-wait share
    metrics.advance()                                              # a step is done: the window, the display
    if metrics.should_log(step, end, stop): metrics.log(step, loss=..., lr=..., ...)
    metrics.log_validation(step, valid_metrics)

Records (one JSON object per line of `<output_dir>/metrics.jsonl`, and the same to wandb): a training
record every `trainer.log_every` steps, at the last step and at a stop (step, loss, lr, tokens_per_s,
data_wait, skipped_steps, epoch, grad_norm when known, mfu when the device's peak is known: over the
real, non-padding tokens only), and a
validation record (step, valid/*). The progress display is a tqdm bar on a terminal; anywhere else
(a SLURM .out file, a pipe) it is one plain log line per training record, never a line per refresh.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pretrain.config import PretrainConfig
from pretrain.flops import mfu

log = logging.getLogger("pretrain.train")


class MetricsWriter:
    """Rank 0: JSON lines in `<output_dir>/metrics.jsonl` and, when enabled, wandb."""

    def __init__(self, path: Path, wandb_run: Any):
        self.path, self.wandb_run = path, wandb_run

    def drop_after(self, step: int) -> int:
        """A run resumed from `step` redoes the steps after it: drop their old records (a plot of the
        file then shows each step once); returns how many were dropped."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        return len(lines) - len(kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(run: PretrainConfig, cfg: DictConfig, out: Path, run_id: str | None) -> tuple[Any, str | None]:
    """wandb.init on rank 0 (offline unless configured); the same run id continues a resumed run."""
    if not run.wandb.enabled:
        return None, None
    import wandb

    mode = run.wandb.mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return None, None
    run_id = run_id or uuid.uuid4().hex[:8]
    wb = wandb.init(
        project=run.wandb.project, entity=run.wandb.entity, name=run.wandb.name or run.name,
        tags=list(run.wandb.tags), id=run_id, resume="allow", mode=mode, dir=str(out),
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
    )
    return wb, run_id


class StepMetrics:
    """The throughput window, the records and the progress display of the loop (rank 0 writes; every
    rank may call it: without a writer it only keeps time)."""

    def __init__(self, writer: MetricsWriter | None, *, name: str, log_every: int, tokens_per_step: int,
                 max_steps: int, step: int, flops_per_token: float, peak_flops: float | None,
                 progress_bar: bool):
        self.writer, self.log_every, self.tokens_per_step = writer, log_every, tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._start, self._wait, self._steps, self._real = time.perf_counter(), 0.0, 0, 0.0
        self._bar = None
        if writer is not None and progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=step, desc=name, dynamic_ncols=True, file=sys.stderr)
        self._plain = writer is not None and progress_bar and self._bar is None
        self._max_steps = max_steps

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Time spent waiting for data (the `data_wait` share of the window)."""
        t0 = time.perf_counter()
        yield
        self._wait += time.perf_counter() - t0

    def should_log(self, step: int, end: int, stop: bool) -> bool:
        return step % self.log_every == 0 or step == end or stop

    def log(self, step: int, *, loss: float, lr: float, skipped_steps: int, epoch: int,
            grad_norm: float | None, samples: int | None = None) -> None:
        """One training record over the window since the last one; then a new window. `samples`: the
        global count of samples consumed so far (step x global batch, continuing across resumes)."""
        elapsed = time.perf_counter() - self._start
        tok_s = self.tokens_per_step * self._steps / elapsed
        record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tok_s, "data_wait": self._wait / elapsed,
                  "skipped_steps": skipped_steps, "epoch": epoch}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if samples is not None:
            record["samples"] = samples
        if self.peak_flops:  # model FLOPs of the real tokens only: padding is not useful work
            record["mfu"] = mfu(self._real / elapsed, self.flops_per_token, self.peak_flops)
        if self.writer is not None:
            self.writer.write(record)
        shown = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
        if "mfu" in record:
            shown["mfu"] = f"{record['mfu']:.1%}"
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
        elif self._plain:
            log.info("step %d/%d %s", step, self._max_steps, " ".join(f"{k}={v}" for k, v in shown.items()))
        self._start, self._wait, self._steps, self._real = time.perf_counter(), 0.0, 0, 0.0

    def advance(self, real_tokens: float | None = None) -> None:
        """A step is done (before `log`); `real_tokens`: its non-padding tokens over all ranks (None: all
        `tokens_per_step` are real). `tokens_per_s` counts every position, `mfu` the real tokens only."""
        self._steps += 1
        self._real += self.tokens_per_step if real_tokens is None else real_tokens
        if self._bar is not None:
            self._bar.update(1)

    def log_validation(self, step: int, metrics: dict[str, float]) -> None:
        log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self.writer is not None:
            self.writer.write({"step": step, **metrics})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.writer is not None:
            self.writer.close()
