"""The hand-written RoBERTa: presets, shapes, sparse prediction, positions, padding, init, and the speed
options (padded vocabulary, activation checkpointing, bf16 autocast, torch.compile) giving equal results."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from core.model import (
    IGNORE_INDEX,
    PRESET_DIR,
    Layer,
    RobertaConfig,
    RobertaForMaskedLM,
    position_ids_from_input_ids,
)


def tiny_config(**overrides) -> RobertaConfig:
    """A small model that runs in milliseconds; vocab 100 is padded internally to 128."""
    values = dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=66)
    values.update(overrides)
    return RobertaConfig(**values)


def make_batch(cfg: RobertaConfig, batch: int = 3, seq: int = 16, seed: int = 0):
    """Random ids with trailing padding on all but the first row, and ~30% of real tokens labelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        length = seq - 2 * row
        ids[row, length:] = cfg.pad_token_id
        mask[row, length:] = 0
    labels = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    predicted = (torch.rand(batch, seq, generator=g) < 0.3) & mask.bool()
    predicted[0, 0] = True
    labels[~predicted] = IGNORE_INDEX
    return ids, mask, labels


def build(cfg: RobertaConfig, seed: int = 0) -> RobertaForMaskedLM:
    torch.manual_seed(seed)
    return RobertaForMaskedLM(cfg)


# --------------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_preset_yaml_equals_config(name):
    """A preset holds only what differs from RobertaConfig's defaults (one place per default)."""
    raw = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
    cfg = RobertaConfig.from_preset(name)
    defaults = RobertaConfig().to_dict()
    assert raw == {k: v for k, v in cfg.to_dict().items() if v != defaults[k]}
    assert RobertaConfig(**raw) == cfg


def test_presets_have_the_papers_sizes():
    large, base, tiny = (RobertaConfig.from_preset(n) for n in ("large", "base", "tiny"))
    assert large == RobertaConfig()  # the dataclass defaults are RoBERTa-large
    assert (base.num_layers, base.hidden_size, base.num_heads, base.ffn_size) == (12, 768, 12, 3072)
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.ffn_size) == (
        8192, 128, 2, 4, 512)
    assert large.max_seq_len == 512
    # Parameter count of HF's roberta-base RobertaForMaskedLM (tied decoder counted once).
    assert RobertaForMaskedLM(base).num_parameters() == 124_697_433


def test_unknown_preset_and_unknown_key_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model preset 'huge'"):
        RobertaConfig.from_preset("huge")
    with pytest.raises(ValueError, match="hiden_size"):
        RobertaConfig.from_dict({"hiden_size": 3}, source="x.yaml")


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", 30), ("num_layers", 0), ("vocab_size", -1), ("hidden_dropout", 1.0),
     ("attention_dropout", -0.1), ("pad_token_id", 100), ("max_positions", 2), ("layer_norm_eps", 0.0),
     ("pad_vocab_multiple", 0), ("ffn_size", 2.5)],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


# --------------------------------------------------------------------------------------------------
# Forward: shapes, sparse prediction, loss
# --------------------------------------------------------------------------------------------------
def test_shapes_and_sparse_prediction_match_the_dense_head():
    cfg = tiny_config()
    model = build(cfg).eval()
    ids, mask, labels = make_batch(cfg)
    dense = model(ids, attention_mask=mask)
    assert dense.loss is None and dense.num_predictions is None
    assert dense.logits.shape == (3, 16, cfg.vocab_size)

    out = model(ids, attention_mask=mask, labels=labels)
    n = int((labels != IGNORE_INDEX).sum())
    assert out.num_predictions.item() == n
    assert out.logits.shape == (n, cfg.vocab_size)
    torch.testing.assert_close(out.logits, dense.logits[labels != IGNORE_INDEX], rtol=0, atol=1e-5)
    expected = F.cross_entropy(dense.logits.reshape(-1, cfg.vocab_size), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-6)

    total = model(ids, attention_mask=mask, labels=labels, reduction="sum").loss
    torch.testing.assert_close(total, expected * n, rtol=1e-6, atol=1e-5)


def test_no_predictions_gives_zero_loss_and_bad_inputs_are_refused():
    cfg = tiny_config()
    model = build(cfg)
    ids, mask, _ = make_batch(cfg)
    out = model(ids, labels=torch.full_like(ids, IGNORE_INDEX))
    assert out.num_predictions.item() == 0 and out.loss.item() == 0.0 and out.logits.shape == (0, 100)
    with pytest.raises(ValueError, match="exceeds the model's maximum 64"):
        model(torch.full((1, 65), 5))
    with pytest.raises(ValueError, match="reduction"):
        model(ids, labels=ids, reduction="max")
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, attention_mask=mask[:, :4])


def test_positions_follow_roberta():
    ids = torch.tensor([[0, 7, 8, 2, 1, 1], [0, 9, 2, 1, 1, 1]])
    assert position_ids_from_input_ids(ids, 1).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]]


def test_padding_does_not_change_real_tokens():
    cfg = tiny_config()
    model = build(cfg).eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 10))
    padded = torch.cat([ids, torch.full((2, 5), cfg.pad_token_id)], dim=1)
    mask = (padded != cfg.pad_token_id).long()
    short = model(ids).logits
    long = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(long[:, :10], short, rtol=0, atol=1e-5)
    # An all-ones mask is the same as no mask (the model then passes no mask to SDPA).
    torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)).logits, short, rtol=0, atol=0)


def test_init_follows_roberta():
    cfg = tiny_config(hidden_size=64, ffn_size=256, vocab_size=1000, init_std=0.02)
    model = build(cfg)
    word = model.embeddings.word.weight
    assert word.shape == (cfg.padded_vocab_size, 64) == (1024, 64)
    assert torch.all(word[cfg.pad_token_id] == 0) and torch.all(word[cfg.vocab_size:] == 0)
    assert torch.all(model.embeddings.position.weight[cfg.pad_token_id] == 0)
    real_rows = torch.cat([word[: cfg.pad_token_id], word[cfg.pad_token_id + 1: cfg.vocab_size]])
    assert abs(real_rows.std().item() - 0.02) < 0.001
    assert abs(model.encoder.layers[0].ffn.up.weight.std().item() - 0.02) < 0.001
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        if "norm.weight" in name:
            assert torch.all(p == 1), name


# --------------------------------------------------------------------------------------------------
# Speed options give the same results
# --------------------------------------------------------------------------------------------------
def test_padded_vocabulary_is_invisible():
    padded_cfg = tiny_config(pad_vocab_multiple=64)
    plain_cfg = tiny_config(pad_vocab_multiple=1)
    assert padded_cfg.padded_vocab_size == 128 and plain_cfg.padded_vocab_size == 100
    padded, plain = build(padded_cfg), build(plain_cfg)
    with torch.no_grad():
        for (name, p), (_, q) in zip(padded.named_parameters(), plain.named_parameters()):
            p[: q.shape[0]].copy_(q)
    assert padded.num_parameters() == plain.num_parameters()
    assert padded.num_parameters(exclude_embeddings=True) == plain.num_parameters(exclude_embeddings=True)
    ids, mask, labels = make_batch(plain_cfg)
    for m in (padded, plain):
        m.eval()
    torch.testing.assert_close(padded(ids, mask).logits, plain(ids, mask).logits, rtol=0, atol=1e-5)
    a, b = padded(ids, mask, labels), plain(ids, mask, labels)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-6)
    a.loss.backward()
    # The padded rows get no gradient, so AdamW (with weight decay) keeps them at zero.
    assert torch.all(padded.embeddings.word.weight.grad[100:] == 0)
    assert torch.all(padded.lm_head.bias.grad[100:] == 0)


def test_activation_checkpointing_gives_identical_grads():
    cfg = tiny_config()
    ids, mask, labels = make_batch(cfg)
    grads = []
    for checkpointing in (False, True):
        model = build(cfg).train()  # dropout on: the RNG state must be replayed in the recompute
        model.activation_checkpointing = checkpointing
        assert model.activation_checkpointing is checkpointing
        torch.manual_seed(123)
        model(ids, mask, labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def test_bf16_autocast_matches_fp32_loosely():
    cfg = tiny_config()
    model = build(cfg).eval()
    ids, mask, labels = make_batch(cfg)
    ref = model(ids, mask, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids, mask, labels)
    assert low.logits.dtype == torch.bfloat16 and low.loss.dtype == torch.float32
    torch.testing.assert_close(low.logits.float(), ref.logits, rtol=0, atol=0.05)
    torch.testing.assert_close(low.loss, ref.loss, rtol=0.01, atol=0.01)
    # bf16 weights (as DeepSpeed's bf16 mode holds them): the loss is still computed in fp32.
    half = model.to(torch.bfloat16)(ids, mask, labels)
    assert half.loss.dtype == torch.float32
    torch.testing.assert_close(half.loss, ref.loss, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("with_mask", [False, True])
def test_layer_compiles_without_graph_breaks(with_mask):
    torch._dynamo.reset()
    cfg = tiny_config()
    layer = Layer(cfg).eval()
    x = torch.randn(2, 8, cfg.hidden_size, requires_grad=True)
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])[:, None, None, :] if with_mask else None
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    out = compiled(x, mask)
    ref = layer(x, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_whole_model_breaks_only_at_exact_sparse_prediction():
    torch._dynamo.reset()
    cfg = tiny_config()
    model = build(cfg)
    ids, mask, labels = make_batch(cfg)
    assert torch._dynamo.explain(model)(ids, mask).graph_break_count == 0
    with_labels = torch._dynamo.explain(model)(ids, mask, labels)
    assert with_labels.graph_break_count == 1
    assert "nonzero" in with_labels.break_reasons[0].reason
    # With a static bound of predictions per sample: no break, no data-dependent shape.
    assert torch._dynamo.explain(model)(ids, mask, labels, max_predictions=8).graph_break_count == 0


def test_static_prediction_bound_gives_the_exact_results():
    """The gathered head (K positions per sample, padding rows labelled -100) equals the exact one: loss,
    count, the logits of the predicted rows and every gradient, for K = the largest count, more, and S."""
    cfg = tiny_config()
    ids, mask, labels = make_batch(cfg)
    counts = (labels != IGNORE_INDEX).sum(1)
    model = build(cfg).eval()
    exact = model(ids, mask, labels, reduction="sum")
    exact.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    for k in (int(counts.max()), int(counts.max()) + 3, ids.shape[1], 1000):
        model.zero_grad(set_to_none=True)
        out = model(ids, mask, labels, reduction="sum", max_predictions=k)
        rows = min(k, ids.shape[1])
        assert out.logits.shape == (ids.shape[0] * rows, cfg.vocab_size) and out.targets.shape == (ids.shape[0] * rows,)
        assert out.num_predictions.item() == int(counts.sum())
        torch.testing.assert_close(out.loss, exact.loss, rtol=1e-6, atol=1e-5)
        real = out.targets != IGNORE_INDEX
        assert torch.equal(out.targets[real], exact.targets)  # the same positions, in the same order
        torch.testing.assert_close(out.logits[real], exact.logits, rtol=1e-6, atol=1e-6)
        out.loss.backward()
        for name, grad in want.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6,
                                       msg=name)
    mean = model(ids, mask, labels, max_predictions=int(counts.max())).loss
    torch.testing.assert_close(mean, model(ids, mask, labels).loss, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="max_predictions"):
        model(ids, mask, labels, max_predictions=0)
    # A bound below a sample's count drops its labels beyond the bound (the trainer checks before).
    assert model(ids, mask, labels, max_predictions=1).num_predictions.item() == int(counts.sum())


def test_the_output_is_a_tuple_deepspeed_hooks_can_walk():
    """DeepSpeed ZeRO-3 applies its backward hooks to the tensors of tuples, lists and dicts only."""
    from deepspeed.runtime.zero.utils import apply_to_tensors_only

    cfg = tiny_config()
    model = build(cfg)
    ids, mask, labels = make_batch(cfg)
    out = model(ids, mask, labels)
    seen = []
    touched = apply_to_tensors_only(lambda t: seen.append(t) or t * 1, out)
    assert type(touched) is type(out) and touched.loss is not out.loss
    assert [t is u for t, u in zip(seen, (out.logits, out.loss, out.num_predictions, out.targets))] == [True] * 4


def test_whole_model_compiles_fullgraph_and_trains_the_same():
    """torch.compile(fullgraph=True) of the whole model with the static bound, forward and backward traced
    (aot_eager: inductor's code generation takes ~55 s on this CPU, so it is left to tests/test_gpu.py):
    a training step gives the eager loss and gradients."""
    torch._dynamo.reset()
    cfg = tiny_config()
    ids, mask, labels = make_batch(cfg)
    model = build(cfg).eval()  # no dropout: inductor draws its random numbers otherwise than eager
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    results = []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        out = m(ids, mask, labels, reduction="sum", max_predictions=8)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
