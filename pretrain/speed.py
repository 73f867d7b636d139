"""The model-level speed options of `system` (pretrain/config.py SystemConfig), applied to a model before
it is moved to its device and handed to the engine; the trainer and bench.train both use `apply`:

  - `fp8`: the encoder's Linear layers train in float8 with torchao (`torchao.float8`: dynamic tensorwise
    scales, e4m3 inputs and weights, e5m2 gradients, fp32/bf16 weights kept as they are). Only layers whose
    two dimensions are multiples of 16 (what the float8 matmul needs); the embeddings, LayerNorms and the LM
    head stay in the run's precision. Parameter names and shapes do not change: checkpoints, export and
    resume with the option switched are the same files.
  - `activation_checkpointing`: each layer recomputed in the backward pass.
  - `compile`: each transformer layer compiled (`torch.compile`, `compile_backend`), after the float8
    conversion so that the casts fuse into the layer's kernels.
  - `sdpa_backends`: the order in which `scaled_dot_product_attention` tries its kernels
    (`attention_backends`, around the training loop); null leaves PyTorch's own order. A backend that
    cannot run a case (cuDNN with attention dropout, flash with a padding mask) passes it to the next.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Sequence

from torch import nn

from core.model import RobertaPreTrainedModel

log = logging.getLogger("pretrain.speed")

FP8_DIM_MULTIPLE = 16
FP8_PACKAGE = "torchao"


def fp8_available() -> bool:
    """Whether torchao (the float8 training library) is installed."""
    return importlib.util.find_spec(FP8_PACKAGE) is not None


def to_float8(model: RobertaPreTrainedModel) -> int:
    """Swap the encoder's Linear layers for torchao's Float8Linear (in place); returns how many."""
    from torchao.float8 import convert_to_float8_training

    def eligible(module: nn.Module, fqn: str) -> bool:
        return (isinstance(module, nn.Linear) and module.in_features % FP8_DIM_MULTIPLE == 0
                and module.out_features % FP8_DIM_MULTIPLE == 0)

    before = sum(isinstance(m, nn.Linear) for m in model.encoder.modules())
    convert_to_float8_training(model.encoder, module_filter_fn=eligible)
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.encoder.modules())
    log.info("fp8: %d of the encoder's %d Linear layers train in float8 (torchao)", converted, before)
    return converted


def apply(model: RobertaPreTrainedModel, fp8: bool, activation_checkpointing: bool, compile: bool,
          compile_backend: str = "inductor") -> RobertaPreTrainedModel:
    """The options in their order: float8 layers, activation checkpointing, per-layer compile."""
    if fp8:
        to_float8(model)
    model.activation_checkpointing = activation_checkpointing
    if compile:
        for layer in model.encoder.layers:
            layer.compile(backend=compile_backend)
    return model


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
"""`system.sdpa_backends` names -> torch.nn.attention.SDPBackend members."""


def attention_backends(names: Sequence[str] | None) -> contextlib.AbstractContextManager:
    """A context in which SDPA tries the named backends in this order (and no others); None: PyTorch's."""
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[n]) for n in names], set_priority=True)


__all__ = ["SDPA_BACKENDS", "apply", "attention_backends", "fp8_available", "to_float8"]
