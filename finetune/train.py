"""Fine-tune a pretrained RoBERTa on a task, over several seeds: `python -m finetune task=<name> model=<dir>`.

    python -m finetune task=movie_sentiment model=demo_out/run seeds=[1,2,3]          # a pretraining run
    python -m finetune task=wikigold model=outputs/hf optim.lr=2e-5 train.epochs=5     # an HF directory
    torchrun --nproc_per_node 8 -m finetune task=squad task.train=... model=...        # DDP, one GPU per rank

For each seed: the task model (the pretrained encoder and a new head, seeded) trains `train.epochs`
epochs with AdamW and linear warm-up/decay (fairseq's GLUE recipe, finetune/config.py); after each epoch
it is scored on validation, and the epoch with the best `task.metric` is that seed's result (and is
scored on test, when the task has one). Written to `<output_dir>/`:

    results.json   the settings, the data counts, every seed's metrics per epoch, its best epoch, and the
                   summary over seeds (median, mean, std, min, max of each metric)
    best/          the best seed's best epoch as an HF directory (config.json with architectures,
                   id2label/label2id and problem_type, model.safetensors, the tokenizer files)

and the summary is printed as a table. With several ranks (torchrun, srun) each optimizer step's batch
is split over the ranks and the gradients averaged (DDP, or DeepSpeed with `train.backend=deepspeed`,
ZeRO 0-2); every rank evaluates, rank 0 writes.
Exit codes: 0 done, 2 refused at start-up (a bad setting or input file, named).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.checkpoint import CheckpointError
from core.cli import command
from core.hf import HFCheckpointError
from core.tokenizer import TokenizerError
from finetune.config import FinetuneConfig
from finetune.data import DataError
from finetune.metrics import METRICS
from finetune.model import Pretrained, build_task_model, load_pretrained, save_best
from finetune.tasks import Task, is_better, load_task_data, make_task, summarize
from pretrain import distributed
from pretrain.optim import lr_at, param_groups

log = logging.getLogger("finetune")

REFUSED = (DataError, CheckpointError, HFCheckpointError, TokenizerError, FileNotFoundError)
"""Errors that are the input's fault (with ValueError, a bad setting): exit 2 with one line."""


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Finetuner:
    """One task, one pretrained model, several seeds."""

    def __init__(self, cfg: FinetuneConfig, env: distributed.DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.metric = cfg.task.selection_metric
        if self.metric not in METRICS[cfg.task.kind]:
            raise ValueError(f"task.metric={self.metric!r}: a {cfg.task.kind} task reports "
                             f"{', '.join(METRICS[cfg.task.kind])}")
        self.data = load_task_data(cfg.task)  # first: a bad file or dataset is named before a model loads
        self.pretrained: Pretrained = load_pretrained(cfg.model, cfg.tokenizer, verify=cfg.verify)
        self.task: Task = make_task(cfg.task, self.data, self.pretrained.tokenizer)
        self.items = self.task.train_items()
        deepspeed_bf16 = cfg.train.backend == "deepspeed" and cfg.train.precision == "bf16"
        self.autocast = _autocast(device, "fp32" if deepspeed_bf16 else cfg.train.precision)
        world = env.world_size
        if cfg.train.batch_size % world:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} is not a multiple of the {world} ranks")
        self.steps_per_epoch = math.ceil(len(self.items) / cfg.train.batch_size)
        self.total_steps = cfg.train.max_steps or self.steps_per_epoch * cfg.train.epochs

    # ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Every seed; returns (and rank 0 writes) results.json's content."""
        cfg = self.cfg
        out = Path(cfg.out_dir)
        log.info("task %s (%s): %s | train %d, %s | %d steps of %d examples per seed, seeds %s",
                 cfg.task.name, cfg.task.kind, self.pretrained.source, len(self.items),
                 ", ".join(f"{k} {len(v)}" for k, v in self.data.splits.items() if k != "train"),
                 self.total_steps, cfg.train.batch_size, cfg.seeds)
        runs, best = [], None
        for seed in cfg.seeds:
            result, state = self.one_seed(seed)
            runs.append(result)
            if best is None or is_better(self.metric, result["validation"][self.metric], best[0]["validation"][self.metric]):
                best = (result, state)
        results = {
            "task": asdict(cfg.task), "model": self.pretrained.source, "from_scratch": cfg.from_scratch,
            "optim": asdict(cfg.optim), "train": asdict(cfg.train), "seeds": list(cfg.seeds),
            "metric": self.metric, "world_size": self.env.world_size,
            "data": {"sizes": {k: len(v) for k, v in self.data.splits.items()}, "labels": self.data.labels,
                     "read": self.data.counts, "truncated": self.task.truncated,
                     "train_rows": len(self.items)},
            "baselines": self.baselines(), "runs": runs, "summary": self.summary(runs),
        }
        assert best is not None
        results["best"] = {"seed": best[0]["seed"], "epoch": best[0]["best_epoch"],
                           self.metric: best[0]["validation"][self.metric]}
        if self.env.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.save_best:
                model = self.new_model(best[0]["seed"])
                model.load_state_dict(best[1])
                results["best"]["dir"] = str(save_best(model, self.pretrained, self.data.labels, out / "best"))
            tmp = out / "results.json.tmp"
            tmp.write_text(json.dumps(results, indent=1) + "\n")
            tmp.replace(out / "results.json")
            print(table(results), flush=True)
        return results

    def baselines(self) -> dict[str, float]:
        """What always answering the most frequent training label (tag, label set) scores on validation."""
        return self.task.baselines("validation")

    def summary(self, runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
        summary = {}
        for split in ("validation", "test"):
            if all(split in r for r in runs):
                names = runs[0][split].keys()
                summary[split] = {m: summarize([r[split][m] for r in runs]) for m in names}
        return summary

    # ----------------------------------------------------------------------------------------------

    def new_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the head's initialisation (and from_scratch's encoder)
        return build_task_model(self.pretrained, self.cfg.task.kind, self.task.num_labels,
                                dropout=self.cfg.train.dropout, from_scratch=self.cfg.from_scratch)

    def one_seed(self, seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg, t = self.cfg, self.cfg.train
        model = self.new_model(seed).to(self.device)
        torch.manual_seed(seed + 1 + distributed.SEED_STRIDE * self.env.rank)  # dropout, per rank
        groups = param_groups(model, cfg.optim.weight_decay)
        # fused on the CPU too: one kernel per parameter group (~5x faster than foreach there, bench/finetune.py)
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                      weight_decay=cfg.optim.weight_decay, fused=True)
        warmup = int(cfg.optim.warmup_ratio * self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_at(s, cfg.optim.lr, warmup, self.total_steps) / cfg.optim.lr)
        runner = self.engine(model, optimizer, scheduler)
        rng = np.random.default_rng(seed)
        epochs, best_value, best_state, best_epoch, step = [], None, None, 0, 0
        for epoch in range(1, t.epochs + 1):
            if step >= self.total_steps:
                break
            order = rng.permutation(len(self.items))
            losses, started = [], time.time()
            bar = self._bar(seed, epoch)
            runner.train()
            for start in range(0, len(order), t.batch_size):
                if step >= self.total_steps:
                    break
                chunk = order[start:start + t.batch_size]
                if len(chunk) < self.env.world_size:
                    break  # a last batch too small to give every rank an example
                mine = np.array_split(chunk, self.env.world_size)[self.env.rank]
                loss = self.train_step(runner, optimizer, [self.items[i] for i in mine], len(mine), len(chunk))
                if cfg.train.backend == "torch":
                    scheduler.step()  # DeepSpeed's engine steps it itself
                step += 1
                losses.append(loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                elif step % t.log_every == 0:
                    log.info("seed %d epoch %d step %d/%d: loss %.4f lr %.3g", seed, epoch, step,
                             self.total_steps, loss, scheduler.get_last_lr()[0])
            if bar is not None:
                bar.close()
            scores = self.task.evaluate(model, "validation", self.device, t.eval_batch_size, self.autocast)
            record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)) if losses else None,
                      "seconds": round(time.time() - started, 3), "validation": scores}
            epochs.append(record)
            log.info("seed %d epoch %d: train loss %.4f | validation %s", seed, epoch, record["train_loss"] or 0,
                     " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            if is_better(self.metric, scores[self.metric], best_value):
                best_value, best_epoch = scores[self.metric], epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        assert best_state is not None, "no epoch ran"
        result: dict[str, Any] = {"seed": seed, "epochs": epochs, "best_epoch": best_epoch,
                                  "validation": epochs[best_epoch - 1]["validation"]}
        if "test" in self.data.splits:
            model.load_state_dict(best_state)
            result["test"] = self.task.evaluate(model, "test", self.device, t.eval_batch_size, self.autocast)
        return result, best_state

    def engine(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> Any:
        """What trains `model`: itself (one process), DDP over the ranks, or a DeepSpeed engine (ZeRO 0-2),
        which owns the optimizer and scheduler steps."""
        t = self.cfg.train
        if t.backend == "deepspeed":
            import deepspeed

            config = {"train_batch_size": t.batch_size, "gradient_accumulation_steps": 1,
                      "train_micro_batch_size_per_gpu": t.batch_size // self.env.world_size,
                      "gradient_clipping": self.cfg.optim.clip_grad_norm, "bf16": {"enabled": t.precision == "bf16"},
                      "zero_optimization": {"stage": t.zero_stage}, "zero_allow_untested_optimizer": True,
                      "zero_force_ds_cpu_optimizer": False, "steps_per_print": 2**62}
            with contextlib.redirect_stdout(sys.stderr):
                engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                       config=config)
            return engine
        if self.env.world_size > 1:
            return nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def train_step(self, model: Any, optimizer: torch.optim.Optimizer, items: list, mine: int, total: int) -> float:
        """Forward/backward this rank's share of the step's batch, average the gradients, step."""
        batch = {k: v.to(self.device) for k, v in self.task.collate(items).items()}
        with self.autocast():
            out = model(**batch)
        # each rank's mean loss weighted by its share, so the average over the ranks is the batch mean
        loss = out.loss * (mine * self.env.world_size / total)
        if self.cfg.train.backend == "deepspeed":
            model.backward(loss)
            model.step()  # clipping, the optimizer, the scheduler, zeroing the gradients
        else:
            loss.backward()
            if self.cfg.optim.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.env.world_size == 1:
            return float(out.loss.detach())
        # the batch's mean loss (each rank's mean weighted by its share), for the log
        return float(distributed.all_reduce(out.loss.detach().float() * (mine / total)))

    def _bar(self, seed: int, epoch: int):
        if not self.cfg.train.progress_bar or self.env.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=min(self.steps_per_epoch, self.total_steps), desc=f"seed {seed} epoch {epoch}",
                    unit="step", file=sys.stderr, leave=False)


def table(results: dict[str, Any]) -> str:
    """The summary over seeds as a text table: a row per split and metric."""
    n = len(results["runs"])
    lines = [f"{results['task']['name']}: {n} seed(s), best epoch by validation {results['metric']}",
             f"{'split':<11} {'metric':<18} {'median':>8} {'mean':>8} {'± std':>8} {'min':>8} {'max':>8}"]
    for split, metrics in results["summary"].items():
        for name, s in metrics.items():
            if name == "n":
                continue
            lines.append(f"{split:<11} {name:<18} {s['median']:>8.4f} {s['mean']:>8.4f} {s['std']:>8.4f} "
                         f"{s['min']:>8.4f} {s['max']:>8.4f}")
    for name, value in results.get("baselines", {}).items():
        lines.append(f"{'validation':<11} {name:<18} {value:>8.4f}")
    best = results["best"]
    lines.append(f"best: seed {best['seed']} epoch {best['epoch']} -> {best.get('dir', '(not saved)')}")
    return "\n".join(lines)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, force=True,
                        format=f"[%(asctime)s rank {rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("finetune").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Set up the process group (when launched on several ranks) and run every seed."""
    env = distributed.detect()
    setup_logging(env.rank)
    device = distributed.select_device(env, cfg.train.device)
    distributed.init(env, device, 600, use_deepspeed=cfg.train.backend == "deepspeed")
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    results = Finetuner(cfg, env, device).run()
    distributed.shutdown()
    return results


@command("finetune", FinetuneConfig, refused=REFUSED)
def main(cfg: FinetuneConfig) -> int:
    """`python -m finetune`: a refused setting or input exits 2 with one line (core/cli.py)."""
    finetune(cfg)
    return 0


if __name__ == "__main__":
    main()
