"""The GPU path (`pytest -m gpu`; skipped without CUDA): a bf16 step against the CPU's fp32, a training
step with no host synchronisation, and torch.compile (inductor, fullgraph) equal to eager.

Run on a GPU machine by bench/gpu_check.sh. Small models: these check behaviour, not speed.
"""
from __future__ import annotations

import pytest
import torch

from core.model import IGNORE_INDEX, RobertaConfig, RobertaForMaskedLM
from pretrain.config import OptimConfig
from pretrain.optim import build_optimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

OPTIM = OptimConfig(lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.01, grad_clip=0.0)
K = 12  # the static bound of predictions per sample: > 15% of 64


def config(**overrides) -> RobertaConfig:
    values = dict(vocab_size=1000, hidden_size=128, num_layers=2, num_heads=4, ffn_size=512, max_positions=130)
    values.update(overrides)
    return RobertaConfig(**values)


def batch(cfg: RobertaConfig, rows: int = 4, seq: int = 64, pad: bool = False, seed: int = 0):
    """Random ids, ~15% labelled (at most K per row); trailing padding on rows > 0 when `pad`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    if pad:
        for r in range(1, rows):
            ids[r, seq - 8 * r:], mask[r, seq - 8 * r:] = cfg.pad_token_id, 0
    chosen = (torch.rand(rows, seq, generator=g) < 0.15) & mask.bool()
    chosen &= chosen.cumsum(1) <= K
    labels = torch.where(chosen, ids, IGNORE_INDEX)
    return ids, mask, labels


def test_bf16_step_matches_cpu_fp32():
    """The loss of the CUDA bf16 model (autocast, static bound, with and without padding) within bf16's
    tolerance of the CPU fp32 model's, and a finite bf16 training step."""
    cfg = config()
    torch.manual_seed(0)
    model = RobertaForMaskedLM(cfg).eval()
    for pad in (False, True):
        ids, mask, labels = batch(cfg, pad=pad)
        with torch.no_grad():
            ref = model(ids, mask, labels).loss
            cuda = model.cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = cuda(ids.cuda(), mask.cuda() if pad else None, labels.cuda(), max_predictions=K).loss
            model.cpu()
        torch.testing.assert_close(low.cpu(), ref, rtol=0.01, atol=0.01)
    model = model.cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids.cuda(), mask.cuda(), labels.cuda(), max_predictions=K)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_training_step_has_no_host_sync():
    """forward (static bound, no mask) + backward + fused AdamW under sync debug mode "error": any host
    synchronisation (a .item(), nonzero, a blocking copy) raises."""
    cfg = config()
    torch.manual_seed(0)
    model = RobertaForMaskedLM(cfg).cuda().train()
    opt = build_optimizer(model, OPTIM)
    assert opt.defaults["fused"]
    ids, _, labels = (t.cuda() for t in batch(cfg))
    for _ in range(2):  # the first step creates the optimizer state; check both
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids, None, labels, reduction="sum", max_predictions=K)
            (out.loss / out.num_predictions.clamp(min=1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()


def test_whole_model_compiled_fullgraph_equals_eager():
    """torch.compile(fullgraph=True) with inductor on CUDA: loss and gradients of a step as eager's."""
    torch._dynamo.reset()
    cfg = config()
    torch.manual_seed(0)
    model = RobertaForMaskedLM(cfg).cuda().eval()  # no dropout: inductor draws random numbers otherwise
    compiled = torch.compile(model, fullgraph=True)
    ids, mask, labels = (t.cuda() for t in batch(cfg, pad=True))
    results = []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        out = m(ids, mask, labels, reduction="sum", max_predictions=K)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-3, atol=1e-4, msg=name)
