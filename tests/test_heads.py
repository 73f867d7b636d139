"""Task heads (sequence / token classification, extractive QA) and their HF interchange, against real
transformers: parity of logits and loss both ways on the same weights (padded batches, eval mode, fp32),
an MLM export or an MLM state dict loads into every head with exactly the head keys missing, a wrong
encoder shape is refused by name, and the exported config.json carries the labels for pipelines."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers  # a dev dependency (make install): a missing one must fail, not skip

from core.hf import (
    HEAD_KEYS,
    HFCheckpointError,
    load_hf_task,
    read_hf_config,
    read_hf_encoder_and_head,
    save_hf,
    save_hf_task,
    task_model_from_state,
)
from core.model import (
    IGNORE_INDEX,
    TASK_MODELS,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    new_task_model,
)

SEQ, TOKEN, QA = "sequence_classification", "token_classification", "extractive_qa"
AUTO = {SEQ: transformers.AutoModelForSequenceClassification,
        TOKEN: transformers.AutoModelForTokenClassification,
        QA: transformers.AutoModelForQuestionAnswering}
HF_CLASS = {SEQ: transformers.RobertaForSequenceClassification,
            TOKEN: transformers.RobertaForTokenClassification,
            QA: transformers.RobertaForQuestionAnswering}
BATCH, SEQ_LEN = 3, 12
ROW_LENGTHS = ((1, 9), (2, 5))  # rows 1 and 2 end early: padding, attention_mask 0

# name: (kind, num_labels, problem_type) -- the heads and losses that HF's classes implement
CASES = {
    "single_label": (SEQ, 3, "single_label_classification"),
    "single_label_inferred": (SEQ, 3, None),  # long labels -> cross entropy
    "multi_label": (SEQ, 4, "multi_label_classification"),
    "multi_label_inferred": (SEQ, 4, None),  # float labels -> BCE with logits
    "regression": (SEQ, 1, "regression"),
    "regression_inferred": (SEQ, 1, None),  # one label -> MSE
    "token": (TOKEN, 5, None),
    "qa": (QA, 2, None),
}


def tiny_config(vocab_size: int = 100) -> RobertaConfig:
    return RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64,
                         max_positions=66)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (biases and LayerNorms too), so a mis-mapped one cannot go unnoticed."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() == 1 else 0.1)
    return model


def our_model(name: str, vocab_size: int = 100, seed: int = 0):
    kind, num_labels, problem_type = CASES[name]
    model = new_task_model(kind, tiny_config(vocab_size), None if kind == QA else num_labels, problem_type)
    randomize(model, seed)
    with torch.no_grad():
        model.embeddings.word.weight[model.config.vocab_size:].zero_()  # the padded rows stay zero
    return model


def inputs(vocab_size: int, seed: int = 0):
    """<s> ... </s> ids with trailing padding on two rows, and the attention mask."""
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(3, vocab_size, (BATCH, SEQ_LEN), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    for row, length in ROW_LENGTHS:
        ids[row, length - 1] = 2
        ids[row, length:] = 1
        mask[row, length:] = 0
    return ids, mask


def targets(name: str, mask: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The label arguments of the case, in the dtype HF infers the problem type from."""
    kind, num_labels, _ = CASES[name]
    g = torch.Generator().manual_seed(200 + seed)
    if kind == QA:
        start = torch.tensor([2, 1, SEQ_LEN + 7])  # the last answer lies beyond the input: ignored
        return {"start_positions": start, "end_positions": torch.tensor([4, 3, SEQ_LEN + 9])}
    if kind == TOKEN:
        labels = torch.randint(0, num_labels, (BATCH, SEQ_LEN), generator=g)
        labels[mask == 0] = IGNORE_INDEX
        labels[0, 0] = labels[0, 5] = IGNORE_INDEX  # <s> and a continuation sub-word
        return {"labels": labels}
    if num_labels == 1:
        return {"labels": torch.randn(BATCH, generator=g)}
    if "multi" in name:
        return {"labels": (torch.rand(BATCH, num_labels, generator=g) < 0.5).float()}
    return {"labels": torch.randint(0, num_labels, (BATCH,), generator=g)}


def logits_of(out) -> torch.Tensor:
    return torch.stack([out.start_logits, out.end_logits], -1) if hasattr(out, "start_logits") else out.logits


def assert_same_outputs(ours, hf, name: str, vocab_size: int, seed: int = 0) -> None:
    ids, mask = inputs(vocab_size, seed)
    labels = targets(name, mask, seed)
    ours.eval()
    hf.eval()
    with torch.no_grad():
        mine, ref = ours(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask)
        assert mine.loss is None
        mine_loss = ours(ids, attention_mask=mask, **labels).loss
        ref_loss = hf(input_ids=ids, attention_mask=mask, **labels).loss
    assert logits_of(mine).shape == logits_of(ref).shape
    assert (logits_of(mine) - logits_of(ref)).abs().max().item() < 1e-5
    assert mine_loss.dtype == torch.float32 and torch.isfinite(mine_loss)
    assert abs(mine_loss.item() - ref_loss.item()) < 1e-6, (mine_loss.item(), ref_loss.item())


def hf_task_model(name: str, seed: int, vocab_size: int = 100):
    kind, num_labels, problem_type = CASES[name]
    config = transformers.RobertaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5, num_labels=num_labels, problem_type=problem_type,
        id2label={i: f"tag{i}" for i in range(num_labels)},
    )
    model = randomize(HF_CLASS[kind](config), seed)
    with torch.no_grad():
        model.roberta.embeddings.word_embeddings.weight[1].zero_()
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Parity with transformers, both ways
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab_size", [100, 128])  # 100 is padded to 128 inside our model; 128 is not
@pytest.mark.parametrize("name", list(CASES))
def test_our_task_export_loads_into_transformers_with_equal_outputs(tmp_path, name, vocab_size):
    kind, num_labels, _ = CASES[name]
    ours = our_model(name, vocab_size)
    labels = {i: f"label-{i}" for i in range(num_labels)}
    save_hf_task(ours, tmp_path, id2label=labels)
    hf, info = AUTO[kind].from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf) is HF_CLASS[kind]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.id2label == labels and hf.num_labels == num_labels
    assert_same_outputs(ours, hf, name, vocab_size)


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_task_checkpoint_loads_into_ours_with_equal_outputs(tmp_path, name):
    kind, num_labels, problem_type = CASES[name]
    hf = hf_task_model(name, seed=1)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours, missing = load_hf_task(tmp_path)  # kind, labels and problem type from config.json
    assert missing == [] and type(ours) is TASK_MODELS[kind] and ours.num_labels == num_labels
    if kind == SEQ:
        assert ours.problem_type == ("regression" if num_labels == 1 else problem_type)
    cfg, task = read_hf_config(tmp_path)
    assert task.kind == kind and task.id2label == {i: f"tag{i}" for i in range(num_labels)}
    assert_same_outputs(ours, hf, name, 100, seed=1)


def test_qa_ignores_answers_beyond_the_input_and_clamps_as_hf():
    model = our_model("qa").eval()
    ids, mask = inputs(100)
    with torch.no_grad():
        out = model(ids, mask)
        loss = model(ids, mask, **targets("qa", mask)).loss
        clamped = model(ids, mask, start_positions=torch.tensor([2, 1, SEQ_LEN]),
                        end_positions=torch.tensor([4, 3, 10 ** 6])).loss
    assert out.start_logits.shape == out.end_logits.shape == (BATCH, SEQ_LEN)
    start, end = out.start_logits[:2], out.end_logits[:2]  # the third answer is ignored
    manual = (F.cross_entropy(start, torch.tensor([2, 1])) + F.cross_entropy(end, torch.tensor([4, 3]))) / 2
    assert abs(loss.item() - manual.item()) < 1e-6 and abs(clamped.item() - manual.item()) < 1e-6
    with pytest.raises(ValueError, match="both"):
        model(ids, mask, start_positions=torch.tensor([1, 1, 1]))


# --------------------------------------------------------------------------------------------------
# An MLM (export or state dict) into every head: exactly the head keys missing
# --------------------------------------------------------------------------------------------------
def mlm_model(vocab_size: int = 100) -> RobertaForMaskedLM:
    model = randomize(RobertaForMaskedLM(tiny_config(vocab_size)), seed=2)
    with torch.no_grad():
        model.embeddings.word.weight[vocab_size:].zero_()
        model.lm_head.bias[vocab_size:].zero_()
    return model


def assert_same_encoder(model, source) -> None:
    """`model` has the embeddings and encoder of `source` (an MLM or a task model), key for key."""
    def encoder(state):
        return {k: v for k, v in state.items() if k.startswith(("embeddings.", "encoder."))}

    ours, theirs = encoder(model.state_dict()), encoder(source.state_dict())
    assert list(ours) == list(theirs) and len(ours) == 5 + 12 * model.config.num_layers
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("kind", [SEQ, TOKEN, QA])
def test_mlm_export_loads_into_our_heads_and_transformers_heads(tmp_path, kind):
    mlm = mlm_model()
    save_hf(mlm, tmp_path)
    ours, missing = load_hf_task(tmp_path, kind, num_labels=None if kind == QA else 3)
    assert missing == list(HEAD_KEYS[kind])
    assert_same_encoder(ours, mlm)
    state, ignored = read_hf_encoder_and_head(tmp_path, mlm.config)
    assert ignored and all(k.startswith("lm_head.") for k in ignored)
    assert not any(k.startswith(("classifier", "qa_outputs")) for k in state)

    extra = {} if kind == QA else {"num_labels": 3}
    hf, info = AUTO[kind].from_pretrained(tmp_path, output_loading_info=True, **extra)
    assert set(info["missing_keys"]) == set(HEAD_KEYS[kind]), info
    assert info["unexpected_keys"] and all(k.startswith("lm_head.") for k in info["unexpected_keys"]), info
    assert not info["mismatched_keys"], info
    ids, mask = inputs(100)
    ours.eval()
    with torch.no_grad():  # the same encoder: the same hidden states
        ref = hf.eval().roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (ours.encode(ids, mask) - ref).abs().max().item() < 1e-5


def test_published_mlm_checkpoint_quirks_are_ignored_by_name(tmp_path):
    """A roberta-base-style pytorch_model.bin: pooler, position_ids buffer and tied decoder copies."""
    mlm = mlm_model()
    hf = transformers.RobertaForMaskedLM.from_pretrained(save_hf(mlm, tmp_path / "mlm"))
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["lm_head.decoder.weight"] = sd["roberta.embeddings.word_embeddings.weight"].clone()
    sd["roberta.embeddings.position_ids"] = torch.arange(66)[None]
    sd["roberta.pooler.dense.weight"], sd["roberta.pooler.dense.bias"] = torch.randn(32, 32), torch.randn(32)
    (tmp_path / "pub").mkdir()
    torch.save(sd, tmp_path / "pub" / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path / "pub")
    state, ignored = read_hf_encoder_and_head(tmp_path / "pub", mlm.config)
    assert {"roberta.pooler.dense.weight", "roberta.embeddings.position_ids", "lm_head.decoder.weight",
            "lm_head.dense.weight"} <= set(ignored)
    model, missing = load_hf_task(tmp_path / "pub", TOKEN, num_labels=4)
    assert missing == ["classifier.weight", "classifier.bias"]
    assert_same_encoder(model, mlm)
    hf.roberta.save_pretrained(tmp_path / "bare")  # a bare RobertaModel: embeddings.*, encoder.*
    model, missing = load_hf_task(tmp_path / "bare", QA)
    assert missing == ["qa_outputs.weight", "qa_outputs.bias"]
    assert_same_encoder(model, mlm)


@pytest.mark.parametrize("kind", [SEQ, TOKEN, QA])
def test_mlm_state_dict_into_each_task_model(kind):
    mlm = mlm_model()
    num_labels = None if kind == QA else 3
    # Same encoder names: a plain load_state_dict misses only the head, and only lm_head.* is unexpected.
    fresh = new_task_model(kind, mlm.config, num_labels)
    result = fresh.load_state_dict(mlm.state_dict(), strict=False)
    assert result.missing_keys == list(HEAD_KEYS[kind])
    assert result.unexpected_keys and all(k.startswith("lm_head.") for k in result.unexpected_keys)

    model, missing = task_model_from_state(kind, mlm.config, mlm.state_dict(), num_labels)
    assert missing == list(HEAD_KEYS[kind]) and model.kind == kind and model.training
    assert_same_encoder(model, mlm)
    # A task state of the same kind carries its head: nothing missing, the head kept.
    again, missing = task_model_from_state(kind, mlm.config, model.state_dict(), num_labels)
    assert missing == []
    for key in HEAD_KEYS[kind]:
        assert torch.equal(again.state_dict()[key], model.state_dict()[key])

    wrong = dict(mlm.state_dict(), **{"encoder.layers.1.ffn.up.weight": torch.zeros(64, 31)})
    with pytest.raises(HFCheckpointError, match=r"encoder.layers.1.ffn.up.weight: shape \(64, 31\)"):
        task_model_from_state(kind, mlm.config, wrong, num_labels)
    lacking = {k: v for k, v in mlm.state_dict().items() if k != "embeddings.norm.bias"}
    with pytest.raises(HFCheckpointError, match="embeddings.norm.bias"):
        task_model_from_state(kind, mlm.config, lacking, num_labels)
    unknown = dict(mlm.state_dict(), **{"module.pooler.weight": torch.ones(1)})
    with pytest.raises(HFCheckpointError, match="module.pooler.weight"):
        task_model_from_state(kind, mlm.config, unknown, num_labels)


def test_a_head_that_does_not_fit_is_replaced_and_reported(tmp_path):
    source = our_model("single_label")
    save_hf_task(source, tmp_path)
    model, missing = load_hf_task(tmp_path)  # the config's kind and 3 labels: the head fits and is kept
    assert missing == [] and torch.equal(model.classifier.out_proj.weight, source.classifier.out_proj.weight)
    model, missing = load_hf_task(tmp_path, num_labels=5)  # another label count: a new head
    assert missing == list(HEAD_KEYS[SEQ]) and model.classifier.out_proj.weight.shape == (5, 32)
    assert torch.all(model.classifier.out_proj.bias == 0)  # freshly initialised, not the source's
    model, missing = load_hf_task(tmp_path, TOKEN)  # another kind (as transformers: dropped)
    assert missing == ["classifier.weight", "classifier.bias"] and model.num_labels == 3
    assert_same_encoder(model, source)
    model, missing = task_model_from_state(QA, source.config, source.state_dict())
    assert missing == ["qa_outputs.weight", "qa_outputs.bias"]
    partial = {k: v for k, v in source.state_dict().items() if k != "classifier.out_proj.bias"}
    with pytest.raises(HFCheckpointError, match="incomplete"):
        task_model_from_state(SEQ, source.config, partial, 3)


# --------------------------------------------------------------------------------------------------
# config.json, init, dropout
# --------------------------------------------------------------------------------------------------
def test_task_config_json_has_labels_for_pipelines(tmp_path):
    names = {0: "negative", 1: "neutral", 2: "positive"}
    save_hf_task(our_model("single_label"), tmp_path / "seq", id2label=names)
    config = json.loads((tmp_path / "seq" / "config.json").read_text())
    assert config["architectures"] == ["RobertaForSequenceClassification"]
    assert config["model_type"] == "roberta"
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert config["num_labels"] == 3 and config["problem_type"] == "single_label_classification"
    assert config["vocab_size"] == 100 and config["hidden_act"] == "gelu"
    cfg, task = read_hf_config(tmp_path / "seq")
    assert task.kind == SEQ and task.id2label == names and task.label2id == {v: k for k, v in names.items()}
    assert cfg == tiny_config()

    topics = {0: "sports", 1: "politics", 2: "science", 3: "art"}
    save_hf_task(our_model("multi_label"), tmp_path / "multi", id2label=topics)
    config = json.loads((tmp_path / "multi" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and config["num_labels"] == 4
    assert config["id2label"] == {str(i): n for i, n in topics.items()}
    assert read_hf_config(tmp_path / "multi")[1].problem_type == "multi_label_classification"

    save_hf_task(our_model("regression"), tmp_path / "reg")
    config = json.loads((tmp_path / "reg" / "config.json").read_text())
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "LABEL_0"}
    for name, arch in (("token", "RobertaForTokenClassification"), ("qa", "RobertaForQuestionAnswering")):
        save_hf_task(our_model(name), tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["architectures"] == [arch] and "problem_type" not in config
    assert json.loads((tmp_path / "qa" / "config.json").read_text())["num_labels"] == 2

    with pytest.raises(ValueError, match="id2label"):
        save_hf_task(our_model("single_label"), tmp_path / "bad", id2label={0: "a", 1: "b"})
    with pytest.raises(TypeError, match="save_hf"):
        save_hf_task(mlm_model(), tmp_path / "bad")


def test_heads_init_and_dropout_follow_hf():
    cfg = RobertaConfig(vocab_size=100, hidden_size=256, num_layers=1, num_heads=2, ffn_size=64,
                        max_positions=66, hidden_dropout=0.1)
    seq = RobertaForSequenceClassification(cfg, num_labels=3)
    token = RobertaForTokenClassification(cfg, num_labels=3, classifier_dropout=0.25)
    qa = RobertaForQuestionAnswering(cfg)
    assert (seq.kind, token.kind, qa.kind) == (SEQ, TOKEN, QA)
    assert seq.classifier.dropout.p == 0.1 and token.dropout.p == 0.25
    for model in (seq, token, qa):
        for name in HEAD_KEYS[model.kind]:
            p = model.state_dict()[name]
            if name.endswith("bias"):
                assert torch.all(p == 0), name
            else:
                assert abs(p.std().item() - cfg.init_std) < 0.003, name
    assert RobertaForSequenceClassification(cfg, num_labels=1).problem_type == "regression"
    with pytest.raises(ValueError, match="problem_type"):
        RobertaForSequenceClassification(cfg, num_labels=3, problem_type="ranking")
    with pytest.raises(ValueError, match="num_labels"):
        RobertaForTokenClassification(cfg, num_labels=0)
