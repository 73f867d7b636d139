"""Elastic resume of partitioned ZeRO states through DeepSpeed's Universal Checkpointing.

A ZeRO-1/2/3 checkpoint holds one optimizer partition per rank (`*zero_pp_rank_<r>_*optim_states.pt`),
which DeepSpeed loads only on the world size that wrote them. For another world size:

    mark_for_universal(engine.module)      # at start-up: the module attribute `universal_checkpoint_info`
    universal = to_universal(ckpt)         # every rank: rank 0 converts once, the others wait
    load_universal(engine, ckpt)           # `load_universal_checkpoint` on for this one load only

- `mark_for_universal`: DeepSpeed writes `universal_checkpoint_info` into the model-states file only
  when the module carries it as an attribute (passing it in `client_state` raises KeyError in 0.19),
  and `ds_to_universal` refuses a checkpoint without it. Checkpoints saved before this have it not:
  they resume on their own world size only (DeepSpeed's own error says so).
- `to_universal` runs `deepspeed.checkpoint.ds_to_universal` in this process on rank 0, into
  `<ckpt>/deepspeed_universal/` (through a scratch directory and a rename, so a crash leaves no
  half-written copy, and a second call finds it done). The copy is not listed in the checkpoint's
  `checkpoint.json` (written before it): verification of the checkpoint is unchanged, and the copy
  goes with the checkpoint when `keep_last` deletes it.
- `load_universal` repairs, after the load, two defects of DeepSpeed 0.19's ZeRO-3 universal load
  (`DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3`): every
  parameter group gets group 0's hyper-parameters (weight decay on the no-decay group), and one `step`
  tensor is shared by every group, so it advances once per group per step.

The torch backend and ZeRO-0 need none of this: their files hold the whole optimizer (ZeRO-0 keeps it
in `mp_rank_00_model_states.pt`) and load on any world size.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.checkpoint import DEEPSPEED_DIR, UnresumableError
from pretrain import distributed

log = logging.getLogger(__name__)

UNIVERSAL_DIR = "deepspeed_universal"
"""The universal copy of a checkpoint's `deepspeed/` files: `<step dir>/deepspeed_universal/`."""
UNIVERSAL_CHECKPOINT_INFO = "universal_checkpoint_info"  # deepspeed.checkpoint.constants
_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def mark_for_universal(module: nn.Module) -> None:
    """Make DeepSpeed record `universal_checkpoint_info` in every checkpoint of `module` (idempotent)."""
    if getattr(module, UNIVERSAL_CHECKPOINT_INFO, None) is None:
        setattr(module, UNIVERSAL_CHECKPOINT_INFO, {})


def partitioned_world_size(ckpt: str | os.PathLike) -> int:
    """The number of ranks whose optimizer partitions a checkpoint holds (0: none, as ZeRO-0 or the torch
    backend, which load on any world size)."""
    ds_dir = Path(ckpt) / DEEPSPEED_DIR
    if not ds_dir.is_dir():
        return 0
    return len({m.group(1) for p in ds_dir.iterdir() if (m := _OPTIM_STATES.match(p.name))})


def to_universal(ckpt: str | os.PathLike) -> Path:
    """`<ckpt>/deepspeed_universal/`, converted from `<ckpt>/deepspeed/` by rank 0 unless it is there.

    Every rank calls it; the others wait for rank 0 (and raise if it fails). DeepSpeed's progress output
    is logged at debug level, and shown when the conversion fails."""
    ckpt = Path(ckpt)
    out = ckpt / UNIVERSAL_DIR
    with distributed.rank_zero_first(f"converting {ckpt / DEEPSPEED_DIR} to a universal checkpoint"):
        if distributed.rank() == 0 and not out.is_dir():
            from deepspeed.checkpoint import ds_to_universal

            scratch = Path(tempfile.mkdtemp(dir=ckpt, prefix=".universal-"))
            args = Namespace(input_folder=str(ckpt / DEEPSPEED_DIR), output_folder=str(scratch / UNIVERSAL_DIR),
                             num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                             inject_missing_state=False)
            said = io.StringIO()
            try:
                with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                    ds_to_universal.main(args)
                os.replace(scratch / UNIVERSAL_DIR, out)
            except BaseException as e:
                tail = said.getvalue()[-2000:]
                if isinstance(e, AssertionError) and UNIVERSAL_CHECKPOINT_INFO in str(e):
                    raise UnresumableError(
                        f"{ckpt}: saved without {UNIVERSAL_CHECKPOINT_INFO} (by a version before elastic resume): "
                        "its ZeRO states resume only on the world size that wrote them"
                    ) from None
                log.error("ds_to_universal failed; its output:\n%s", tail)
                raise
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            log.debug("ds_to_universal: %s", said.getvalue())
    return out


def load_universal(ds_engine: Any, ckpt: str | os.PathLike) -> None:
    """Load checkpoint `ckpt` (model, optimizer, scheduler) into a DeepSpeed engine of any world size
    through its universal copy (`to_universal` first), then repair the ZeRO-3 defects."""
    ckpt = Path(ckpt)
    config = ds_engine._config
    config.load_universal_checkpoint = True  # DeepSpeed reads it only inside load_checkpoint
    try:
        path, _ = ds_engine.load_checkpoint(str(ckpt), tag=UNIVERSAL_DIR, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise FileNotFoundError(f"{ckpt / UNIVERSAL_DIR}: DeepSpeed found no checkpoint to load")
    if ds_engine.zero_optimization_stage() == 3:
        repair_zero3_universal_load(ds_engine.optimizer.optimizer, ckpt / UNIVERSAL_DIR)


def repair_zero3_universal_load(optimizer: torch.optim.Optimizer, universal: Path) -> list[str]:
    """Undo the two defects of DeepSpeed 0.19's ZeRO-3 universal load on the inner (client) optimizer:
    each group gets its own saved hyper-parameters back, and each parameter its own `step` tensor.
    Returns what was repaired (logged)."""
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    repaired = []
    if len(saved_groups) != len(optimizer.param_groups):
        raise RuntimeError(f"{universal}: {len(saved_groups)} saved parameter groups, the optimizer has "
                           f"{len(optimizer.param_groups)}")
    for i, (group, want) in enumerate(zip(optimizer.param_groups, saved_groups)):
        wrong = sorted(k for k, v in want.items() if k != "params" and group.get(k) != v)
        if wrong:
            repaired.append(f"group {i}: {', '.join(f'{k}={group.get(k)!r} -> {want[k]!r}' for k in wrong)}")
            group.update({k: want[k] for k in wrong})
    seen: set[int] = set()
    shared = 0
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
                shared += 1
            seen.add(id(step))
    if shared:
        repaired.append(f"the optimizer states of {shared + 1} flat parameter groups shared one step tensor: "
                        "each has its own now")
    for line in repaired:
        log.info("ZeRO-3 universal load repaired (DeepSpeed 0.19 defect): %s", line)
    return repaired
