"""Model FLOPs of a training step, the peak of known accelerators, and MFU.

Per token of a training step (forward + backward = 3 x forward, 2 FLOPs per multiply-add):

    6 * N_matmul                         N_matmul = L * (4 d^2 + 2 d F), the encoder's weight matrices
    + 12 * L * d * s                     attention scores Q K^T and the weighted sum P V
    + 6 * (d^2 + d V) * head_fraction    the LM head (dense + tied decoder) on the predicted positions

Embedding look-ups, LayerNorms, softmax, GELU and biases are not counted (the usual convention:
PaLM appendix B, Megatron-LM). RoBERTa-large at s = 512: ~2.01 GFLOP/token with the head on 15% of
the tokens (sparse prediction), ~2.28 with the head on all tokens.
"""
from __future__ import annotations

import torch

from core.model import RobertaConfig

# Dense (no sparsity) peak FLOP/s by device-name substring, per dtype; first match wins, so the
# more specific names come first.
_PEAKS: list[tuple[str, dict[torch.dtype, float]]] = [
    ("H200", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 494.7e12}),
    ("H100 PCIe", {torch.bfloat16: 756.5e12, torch.float16: 756.5e12, torch.float32: 378.0e12}),
    ("H100", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 494.7e12}),
    ("A100", {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12}),
]
"""fp32 entries are the TF32 tensor-core peaks (what fp32 matmuls reach with TF32 enabled)."""


def matmul_params(cfg: RobertaConfig) -> int:
    """Weights of the encoder's matrices: per layer Q, K, V, output (4 d^2) and the FFN (2 d F)."""
    d = cfg.hidden_size
    return cfg.num_layers * (4 * d * d + 2 * d * cfg.ffn_size)


def flops_per_token(cfg: RobertaConfig, seq_len: int, head_fraction: float = 0.15) -> float:
    """Model FLOPs of one training step (forward + backward) per input token at sequence length
    `seq_len`, with the LM head run on `head_fraction` of the tokens (1.0 for a dense head)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not 0.0 <= head_fraction <= 1.0:
        raise ValueError(f"head_fraction must be in [0, 1], got {head_fraction}")
    d = cfg.hidden_size
    encoder = 6 * matmul_params(cfg)
    attention = 12 * cfg.num_layers * d * seq_len
    head = 6 * (d * d + d * cfg.vocab_size) * head_fraction
    return float(encoder + attention + head)


def device_peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of `device` for `dtype` (H100 SXM / H200: 989.4e12 bf16, A100: 312e12), or
    None for a CPU or an accelerator not in the table."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype)


def peak_flops_for_name(device_name: str, dtype: torch.dtype) -> float | None:
    """The table lookup behind `device_peak_flops`, by the name `torch.cuda.get_device_name` gives."""
    for key, peaks in _PEAKS:
        if key in device_name:
            return peaks.get(dtype)
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (a fraction, not a percentage)."""
    if peak <= 0:
        raise ValueError(f"peak must be positive, got {peak}")
    return tokens_per_s * flops_per_token / peak
