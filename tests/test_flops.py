"""The FLOP counter against hand-derived figures for RoBERTa-large, the peak table, and MFU."""
from __future__ import annotations

import pytest
import torch

from core.model import RobertaConfig, RobertaForMaskedLM
from pretrain.flops import device_peak_flops, flops_per_token, matmul_params, mfu, peak_flops_for_name


def test_roberta_large_figures():
    large = RobertaConfig.from_preset("large")
    assert flops_per_token(large, 512) == pytest.approx(2.0102e9, rel=1e-4)
    assert flops_per_token(large, 512, head_fraction=1.0) == pytest.approx(2.2781e9, rel=1e-4)
    # 6 N for the 302M encoder matrices, plus attention 12 * 24 * 1024 * 512.
    assert flops_per_token(large, 512, head_fraction=0.0) == 6 * 24 * 12 * 1024**2 + 12 * 24 * 1024 * 512


def test_matmul_params_are_the_encoder_weight_matrices():
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, ffn_size=64,
                        max_positions=40)
    model = RobertaForMaskedLM(cfg)
    counted = sum(p.numel() for name, p in model.named_parameters()
                  if name.startswith("encoder.") and name.endswith("weight") and p.dim() == 2)
    assert matmul_params(cfg) == counted


def test_flops_grow_with_sequence_and_refuse_bad_input():
    cfg = RobertaConfig.from_preset("base")
    assert flops_per_token(cfg, 512) - flops_per_token(cfg, 128) == 12 * 12 * 768 * (512 - 128)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(cfg, 0)
    with pytest.raises(ValueError, match="head_fraction"):
        flops_per_token(cfg, 128, head_fraction=1.5)


def test_peak_and_mfu():
    assert device_peak_flops("cpu", torch.bfloat16) is None
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert peak_flops_for_name("NVIDIA H200", torch.bfloat16) == 989.4e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert peak_flops_for_name("NVIDIA H100 PCIe", torch.bfloat16) < 989.4e12
    assert peak_flops_for_name("NVIDIA GeForce RTX 4090", torch.bfloat16) is None
    assert mfu(1000.0, 2e9, 4e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak"):
        mfu(1.0, 1.0, 0.0)


def test_mfu_counts_only_the_real_tokens():
    """A step of 100 positions of which 60 are real (the rest padding): tokens_per_s counts every
    position, MFU the 60 real tokens only (within one record both use the same window)."""
    from pretrain.metrics import StepMetrics

    records = []

    class Writer:
        def write(self, record):
            records.append(record)

    for real in (None, 60.0):
        metrics = StepMetrics(Writer(), name="t", log_every=1, tokens_per_step=100, max_steps=1, step=0,
                              flops_per_token=1e9, peak_flops=1e12, progress_bar=False)
        metrics.advance(real)
        metrics.log(1, loss=1.0, lr=1e-3, skipped_steps=0, epoch=0, grad_norm=None)
    full, padded = records
    assert full["mfu"] == pytest.approx(full["tokens_per_s"] * 1e9 / 1e12, rel=1e-9)
    assert padded["mfu"] == pytest.approx(padded["tokens_per_s"] * 0.6 * 1e9 / 1e12, rel=1e-9)
