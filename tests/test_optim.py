"""AdamW parameter groups, the skippable step, and the learning-rate schedule."""
from __future__ import annotations

import pytest
import torch

from core.model import RobertaConfig, RobertaForMaskedLM
from pretrain.config import OptimConfig, ScheduleConfig
from pretrain.optim import build_optimizer, build_scheduler, lr_at, param_groups

OPTIM = OptimConfig(lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.01, grad_clip=0.0)


def tiny_model() -> RobertaForMaskedLM:
    torch.manual_seed(0)
    return RobertaForMaskedLM(RobertaConfig(vocab_size=128, hidden_size=16, num_layers=1, num_heads=2, ffn_size=32,
                                            max_positions=40))


def test_lr_schedule_is_linear_warmup_then_linear_decay_to_zero():
    peak, warm, total = 4e-4, 30_000, 500_000
    assert lr_at(0, peak, warm, total) == pytest.approx(peak / warm)
    assert lr_at(warm // 2 - 1, peak, warm, total) == pytest.approx(peak / 2)
    assert lr_at(warm - 1, peak, warm, total) == pytest.approx(peak)
    assert lr_at(warm, peak, warm, total) == pytest.approx(peak)
    assert lr_at((warm + total) // 2, peak, warm, total) == pytest.approx(peak / 2)
    assert lr_at(total - 1, peak, warm, total) == pytest.approx(peak / (total - warm))
    assert lr_at(total, peak, warm, total) == 0.0


def test_no_weight_decay_on_biases_and_layernorm_only():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("bias") or "norm" in n.lower() or "ln" in n.lower() for n in exempt)
    assert all(not n.endswith("bias") for n in decayed)
    assert any("embeddings.word" in n for n in decayed)  # embeddings are decayed (HF / fairseq)
    assert len(decayed) + len(exempt) == len(list(model.parameters()))
    layer_norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(names[id(m.weight)] in exempt for m in layer_norms)


def test_scheduler_applies_lr_at_each_step():
    model = tiny_model()
    opt = build_optimizer(model, OPTIM)
    sched = build_scheduler(opt, OPTIM.lr, ScheduleConfig(max_steps=10, warmup_steps=4, global_batch_size=1))
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(k, 1e-3, 4, 10) for k in range(10)])
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]


def test_skipped_step_leaves_parameters_and_moments_untouched():
    model = tiny_model()
    opt = build_optimizer(model, OPTIM)
    model(torch.randint(4, 120, (2, 8)), labels=torch.randint(4, 120, (2, 8))).loss.backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters() if p in opt.state]
    opt.skip_next = True
    opt.step()
    assert opt.skip_next is False
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, [p for p in model.parameters() if p in opt.state]))
    opt.step()
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_adamw_is_foreach_on_the_cpu_and_fused_on_cuda():
    opt = build_optimizer(tiny_model(), OPTIM)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    if torch.cuda.is_available():
        cuda = build_optimizer(tiny_model().cuda(), OPTIM)
        assert cuda.defaults["fused"] is True and not cuda.defaults["foreach"]
