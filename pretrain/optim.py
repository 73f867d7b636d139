"""The optimizer and the learning-rate schedule (RoBERTa: AdamW, linear warm-up, linear decay to 0).

    optimizer = build_optimizer(model, cfg.optim)       # AdamW; biases and LayerNorm weights: no decay
    scheduler = build_scheduler(optimizer, cfg.optim.lr, cfg.schedule)
    lr_at(step, peak, warmup, max_steps)                 # the rate of optimizer step `step` (0-based)

The schedule is a pure function of the step; the scheduler only applies it. A skipped step (a
non-finite loss) still advances the step and the schedule, so step k always uses `lr_at(k)` and reads
the same data whatever happened before it.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pretrain.config import OptimConfig, ScheduleConfig


def lr_at(step: int, peak: float, warmup_steps: int, max_steps: int, final_lr: float = 0.0) -> float:
    """Learning rate of the optimizer step with 0-based index `step`.

    Warm-up: `peak * (step + 1) / warmup_steps` for the first `warmup_steps` steps (the last of them
    uses `peak`); then linear from `peak` at `warmup_steps` to `final_lr` at `max_steps`; `final_lr` after.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if step >= max_steps:
        return final_lr
    frac = (max_steps - step) / (max_steps - warmup_steps)
    return final_lr + (peak - final_lr) * frac


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weights with decay; biases and LayerNorm weights without (as HF and fairseq).

    Embedding tables are decayed (they are weights). A parameter shared by two modules (the tied
    decoder) appears once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if name == "bias" or isinstance(module, nn.LayerNorm):
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next `step()` can be turned into a no-op (`skip_next = True`).

    The trainer sets it on every rank when any rank saw a non-finite loss or gradient norm: the step is
    then skipped everywhere, inside whichever engine wraps this optimizer (DeepSpeed calls `step()` on
    it at the accumulation boundary), leaving parameters and moments untouched. The flag clears itself.
    """

    def __init__(self, params: Iterable, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.skip_next = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> SkippableAdamW:
    """AdamW with the config's peak rate (the scheduler scales it), betas, eps and weight decay.

    Parameters on CUDA get the fused kernel (`fused=True`: one launch for all parameters, no host sync);
    elsewhere the foreach implementation, whose results the CPU golden losses were made with (the fused
    CPU kernel rounds differently). DeepSpeed hands its own fp32 partitions to this optimizer's groups on
    the same device, so the choice holds under ZeRO too (offloaded states: the CPU's fused kernel)."""
    groups = param_groups(model, cfg.weight_decay)
    on_cuda = any(p.is_cuda for group in groups for p in group["params"])
    return SkippableAdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **({"fused": True} if on_cuda else {"foreach": True}),
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, peak: float, cfg: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `lr_at` (its `last_epoch` is the number of steps taken)."""
    warmup, max_steps, final = cfg.warmup_steps, cfg.max_steps, cfg.final_lr

    def factor(step: int) -> float:
        return lr_at(step, peak, warmup, max_steps, final) / peak

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
