"""The two training backends behind one small interface: DeepSpeed (ZeRO 0-3) and plain PyTorch.

    engine = build_engine(run_cfg, model, optimizer, scheduler, device)   # grad_accum: run_cfg.system
    out = engine.forward(batch, max_predictions)   # MaskedLMOutput, loss summed over masked tokens
    engine.backward(out.loss * engine.grad_scale / global_count)   # then, per micro-batch:
    engine.micro_step(boundary, skip)              # at the boundary: the optimizer step (or a skip)
    engine.save(dir) / engine.load(dir)

Loss scaling: the step's loss is the sum of token losses over all masked tokens of the global batch
divided by their number. Each micro-batch's summed loss is multiplied by `grad_scale / global_count`:
DeepSpeed averages gradients over the data-parallel ranks, so its `grad_scale` is the world size
(and `backward` is told not to divide by the accumulation steps); the torch backend's is 1.

Skipping: `micro_step(boundary=True, skip=True)` leaves parameters and optimizer moments untouched
(`SkippableAdamW`) while the step count and the learning-rate schedule advance. It returns whether the
update was applied (False also when DeepSpeed's own overflow check found a non-finite gradient).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.checkpoint import DEEPSPEED_DIR, TORCH_MODEL, TORCH_OPTIMIZER, TORCH_SCHEDULER
from core.model import MaskedLMOutput
from pretrain.config import PretrainConfig
from pretrain.optim import SkippableAdamW
from pretrain.universal import (UNIVERSAL_DIR, load_universal, mark_for_universal, partitioned_world_size,
                                to_universal)

log = logging.getLogger(__name__)

log = logging.getLogger("pretrain.engine")


class TorchEngine:
    """One process, one device: autocast for bf16 (fp32 master weights), AdamW, optional clipping."""

    def __init__(self, model: nn.Module, optimizer: SkippableAdamW, scheduler: Any, cfg: PretrainConfig,
                 device: torch.device):
        self.module = model.to(device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device = device
        self.grad_clip = cfg.optim.grad_clip
        self.bf16 = cfg.system.precision == "bf16"
        self.grad_scale = 1.0
        self._norm: torch.Tensor | None = None
        self._params = [p for p in model.parameters() if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, batch: dict[str, torch.Tensor], max_predictions: int | None = None) -> MaskedLMOutput:
        with self._autocast():
            return self.module(batch["input_ids"], batch.get("attention_mask"), batch["labels"], reduction="sum",
                               max_predictions=max_predictions)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm (a device tensor, no host sync), after clipping to it when asked."""
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self._params, self.grad_clip, norm)
        self._norm = norm
        return norm

    @property
    def last_grad_norm(self) -> float | None:
        return None if self._norm is None else float(self._norm)

    def micro_step(self, boundary: bool, skip: bool) -> bool:
        if not boundary:
            return True
        self.optimizer.skip_next = skip
        self.optimizer.step()
        self.optimizer.skip_next = False
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return not skip

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, directory: Path) -> None:
        """Model, optimizer and scheduler state (one process: rank 0 writes them)."""
        torch.save(self.module.state_dict(), directory / TORCH_MODEL)
        torch.save(self.optimizer.state_dict(), directory / TORCH_OPTIMIZER)
        torch.save(self.scheduler.state_dict(), directory / TORCH_SCHEDULER)

    def load(self, directory: Path) -> None:
        self.module.load_state_dict(torch.load(directory / TORCH_MODEL, map_location=self.device))
        self.optimizer.load_state_dict(torch.load(directory / TORCH_OPTIMIZER, map_location=self.device))
        self.scheduler.load_state_dict(torch.load(directory / TORCH_SCHEDULER))


def grad_accum_dtype(cfg: PretrainConfig) -> str | None:
    """The `data_types.grad_accum_dtype` of a run: "fp32" for bf16 at ZeRO 1-3, else None (the default).

    DeepSpeed's bf16 accumulates gradients in bf16 unless told otherwise: over many micro-batches (256 on
    one GPU for the paper's batch) the small contributions are lost to bf16's 8-bit mantissa. DeepSpeed
    0.19.8 accumulates in fp32 at ZeRO-1 (BF16_Optimizer: fp32 gradient buffers, one all-reduce per
    step), ZeRO-1 with offload, ZeRO-2 and ZeRO-3 (fp32 gradient partitions). It refuses bf16 with fp32
    accumulation at ZeRO-0 (`NotImplementedError: unsupported mix`), so ZeRO-0 keeps bf16 accumulation
    (DeepSpeedEngine warns when it accumulates; use ZeRO-1 for bf16 with accumulation)."""
    if cfg.system.precision == "bf16" and cfg.deepspeed.zero_stage >= 1:
        return "fp32"
    return None


def deepspeed_config(cfg: PretrainConfig, grad_accum: int) -> dict[str, Any]:
    """The DeepSpeed config dict of a run (the optimizer and scheduler are client objects)."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.allgather_bucket_size,
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.system.pin_memory}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.system.pin_memory}
    config = {
        "train_batch_size": cfg.schedule.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.system.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.system.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    accum_dtype = grad_accum_dtype(cfg)
    if accum_dtype is not None:
        config["data_types"] = {"grad_accum_dtype": accum_dtype}
    return config


def accumulation_dtype(ds_engine: Any) -> torch.dtype:
    """The dtype in which a DeepSpeed engine's optimizer wrapper actually accumulates gradients (read
    from the wrapper DeepSpeed built, not from the config)."""
    opt = ds_engine.optimizer
    for attr in ("grad_acc_dtype", "gradient_accumulation_dtype"):  # BF16_Optimizer; ZeRO 1-3
        if getattr(opt, attr, None) is not None:
            return getattr(opt, attr)
    return next(p.dtype for p in ds_engine.module.parameters())  # ZeRO-0: in the parameters' .grad


class DeepSpeedEngine:
    """`deepspeed.initialize` with the client AdamW and LambdaLR; any ZeRO stage, fp32 or bf16."""

    TAG = DEEPSPEED_DIR
    """The DeepSpeed checkpoint tag: its files live in `<checkpoint>/deepspeed/`."""

    def __init__(self, model: nn.Module, optimizer: SkippableAdamW, scheduler: Any, cfg: PretrainConfig,
                 device: torch.device, grad_accum: int):
        import deepspeed

        self.optimizer, self.scheduler = optimizer, scheduler
        mark_for_universal(model)  # so that its ZeRO states can be converted for another world size
        self.engine, _, _, _ = deepspeed.initialize(
            model=model.to(device),
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, grad_accum),
        )
        self.module = self.engine.module
        self.device = device
        self.grad_scale = float(self.engine.dp_world_size)
        accum = accumulation_dtype(self.engine)
        log.info("DeepSpeed ZeRO-%d, %s: optimizer %s, gradients accumulated in %s", cfg.deepspeed.zero_stage,
                 cfg.system.precision, type(self.engine.optimizer).__name__, str(accum).removeprefix("torch."))
        if accum == torch.bfloat16 and grad_accum > 1:
            log.warning("gradients of %d micro-batches are accumulated in bf16 (DeepSpeed has no fp32 accumulation "
                        "at ZeRO-0): use deepspeed=zero1 for bf16 with accumulation", grad_accum)

    @property
    def last_grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def forward(self, batch: dict[str, torch.Tensor], max_predictions: int | None = None) -> MaskedLMOutput:
        return self.engine(batch["input_ids"], batch.get("attention_mask"), batch["labels"], reduction="sum",
                           max_predictions=max_predictions)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def grad_norm(self) -> None:
        """None: DeepSpeed checks the gradients inside its step (bf16, or fp32 with clipping)."""
        return None

    def micro_step(self, boundary: bool, skip: bool) -> bool:
        if boundary:
            self.optimizer.skip_next = skip
        self.engine.step()
        if not boundary:
            return True
        self.optimizer.skip_next = False
        applied = self.engine.was_step_applied()
        if not applied:  # DeepSpeed's overflow check skipped it and left the schedule behind: catch up
            self.scheduler.step()
        return applied and not skip

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: Path) -> None:
        """All ranks: model (rank 0), ZeRO partitions (each rank), optimizer and scheduler."""
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        """Any world size: partitioned ZeRO states of another one go through the universal checkpoint
        (pretrain.universal); ZeRO-0's whole optimizer loads as it is."""
        saved = partitioned_world_size(directory)
        world_size = self.engine.dp_world_size
        if saved and saved != world_size:
            log.info("ZeRO states of %d rank(s), loading on %d: through the universal checkpoint %s", saved,
                     world_size, directory / UNIVERSAL_DIR)
            load_universal(self.engine, to_universal(directory).parent)
            return
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=self.TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"{directory}/{self.TAG}: DeepSpeed found no checkpoint to load")


Engine = TorchEngine | DeepSpeedEngine


def build_engine(cfg: PretrainConfig, model: nn.Module, optimizer: SkippableAdamW, scheduler: Any,
                 device: torch.device) -> Engine:
    if cfg.trainer.backend == "torch":
        return TorchEngine(model, optimizer, scheduler, cfg, device)
    assert cfg.system.grad_accum is not None  # derived by to_run_config
    return DeepSpeedEngine(model, optimizer, scheduler, cfg, device, cfg.system.grad_accum)
