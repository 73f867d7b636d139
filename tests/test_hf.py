"""Weight interchange with HF transformers: parity of logits and loss both ways, HF loads our export
with no missing or unexpected keys, and published-checkpoint quirks (pooler, position_ids buffer,
tied decoder copies, pytorch_model.bin) are handled; broken checkpoints are refused by name."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers  # a dev dependency (make install): a missing one must fail, not skip  # noqa: E402

from core.hf import (  # noqa: E402
    HFCheckpointError,
    hf_to_state_dict,
    load_hf,
    save_hf,
    state_dict_to_hf,
)
from core.model import IGNORE_INDEX, RobertaConfig, RobertaForMaskedLM  # noqa: E402

VOCAB = 99  # not a multiple of 64: our model pads to 128 internally


def hf_config(attn: str = "sdpa"):
    config = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        layer_norm_eps=1e-5,
    )
    config._attn_implementation = attn
    return config


def random_hf_model(seed: int) -> "transformers.RobertaForMaskedLM":
    """An HF model whose every parameter (biases and LayerNorms too) is random, so all are checked."""
    torch.manual_seed(seed)
    model = transformers.RobertaForMaskedLM(hf_config())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() == 1 else 0.1)
        model.roberta.embeddings.word_embeddings.weight[1].zero_()
    return model.eval()


def batch(seed: int):
    """Ids with <s> ... </s> and trailing padding on two of three rows, labels on ~25% of real tokens."""
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(3, VOCAB, (3, 20), generator=g)
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    for row, length in ((1, 13), (2, 7)):
        ids[row, length - 1] = 2
        ids[row, length:] = 1
        mask[row, length:] = 0
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.25, ids, IGNORE_INDEX)
    labels[mask == 0] = IGNORE_INDEX
    labels[0, 3] = 5
    return ids, mask, labels


def assert_same_outputs(ours: RobertaForMaskedLM, hf, seed: int) -> None:
    ids, mask, labels = batch(seed)
    ours.eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
        mine = ours(ids, attention_mask=mask)
        real = mask.bool()
        assert (mine.logits[real] - ref.logits[real]).abs().max().item() < 1e-5
        ref_loss = F.cross_entropy(ref.logits.reshape(-1, VOCAB), labels.reshape(-1))
        hf_loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        my_loss = ours(ids, attention_mask=mask, labels=labels).loss
    assert abs(hf_loss.item() - ref_loss.item()) < 1e-6  # HF's loss is the dense CE we compare with
    assert abs(my_loss.item() - hf_loss.item()) < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hf_checkpoint_loads_into_ours_with_equal_outputs(tmp_path, seed):
    hf = random_hf_model(seed)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.config.vocab_size == VOCAB and ours.config.padded_vocab_size == 128
    assert ours.num_parameters() == hf.num_parameters()
    assert_same_outputs(ours, hf, seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_our_export_loads_into_hf_with_no_missing_keys_and_equal_outputs(tmp_path, seed):
    torch.manual_seed(seed)
    ours = RobertaForMaskedLM(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                            ffn_size=64, max_positions=40))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.normal_(0.0, 0.5 if p.dim() == 1 else 0.1)
    save_hf(ours, tmp_path)
    hf, info = transformers.RobertaForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.lm_head.decoder.weight.data_ptr() == hf.roberta.embeddings.word_embeddings.weight.data_ptr()
    assert_same_outputs(ours, hf.eval(), seed)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["RobertaForMaskedLM"] and config["model_type"] == "roberta"
    assert (config["bos_token_id"], config["pad_token_id"], config["eos_token_id"]) == (0, 1, 2)
    assert config["hidden_act"] == "gelu" and config["type_vocab_size"] == 1


def test_export_has_the_keys_hf_itself_writes(tmp_path):
    from safetensors import safe_open

    random_hf_model(0).save_pretrained(tmp_path / "hf")
    save_hf(load_hf(tmp_path / "hf"), tmp_path / "ours")
    keys = {}
    for name in ("hf", "ours"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            keys[name] = set(f.keys())
    assert keys["ours"] == keys["hf"]


def test_state_dict_round_trip_is_exact():
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, ffn_size=64,
                        max_positions=40)
    model = RobertaForMaskedLM(cfg)
    sd = model.state_dict()
    hf_sd = state_dict_to_hf(sd, cfg)
    assert hf_sd["roberta.embeddings.word_embeddings.weight"].shape == (VOCAB, 32)
    back = hf_to_state_dict(hf_sd, cfg)
    assert back.keys() == sd.keys()
    for name in sd:
        assert torch.equal(back[name], sd[name]), name


def test_published_checkpoint_quirks_are_accepted(tmp_path):
    """A pytorch_model.bin with a pooler, a position_ids buffer and the tied decoder copies written out."""
    hf = random_hf_model(3)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["lm_head.decoder.weight"] = sd["roberta.embeddings.word_embeddings.weight"].clone()
    sd["lm_head.decoder.bias"] = sd["lm_head.bias"].clone()
    sd["roberta.embeddings.position_ids"] = torch.arange(40)[None]
    sd["roberta.pooler.dense.weight"] = torch.randn(32, 32)
    sd["roberta.pooler.dense.bias"] = torch.randn(32)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path)
    assert_same_outputs(load_hf(tmp_path), hf, 3)


def test_broken_checkpoints_are_refused_by_name(tmp_path):
    hf = random_hf_model(0)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
                        max_positions=40)
    sd = dict(hf.state_dict())
    missing = {k: v for k, v in sd.items() if k != "roberta.encoder.layer.1.output.dense.weight"}
    with pytest.raises(HFCheckpointError, match="layer.1.output.dense.weight"):
        hf_to_state_dict(missing, cfg)
    wrong = dict(sd, **{"lm_head.dense.bias": torch.zeros(31)})
    with pytest.raises(HFCheckpointError, match=r"lm_head.dense.bias: shape \(31,\)"):
        hf_to_state_dict(wrong, cfg)
    extra = dict(sd, **{"classifier.dense.weight": torch.zeros(2, 32)})
    with pytest.raises(HFCheckpointError, match="classifier.dense.weight"):
        hf_to_state_dict(extra, cfg)
    untied = dict(sd, **{"lm_head.decoder.bias": torch.ones(VOCAB)})
    with pytest.raises(HFCheckpointError, match="untied"):
        hf_to_state_dict(untied, cfg)
    with pytest.raises(HFCheckpointError, match="config.json: not found"):
        load_hf(tmp_path)
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(HFCheckpointError, match="no model.safetensors"):
        load_hf(tmp_path)


def test_package_does_not_import_transformers():
    code = "import sys, core.model, core.hf, pretrain.flops; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sharded_safetensors_checkpoint_loads(tmp_path):
    hf = random_hf_model(4)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert_same_outputs(load_hf(tmp_path), hf, 4)


def test_benchmark_runs_and_prints_the_comparison(capsys):
    """A smoke run of `python -m bench.model` (eager only, one short round), so the benchmark cannot rot."""
    from bench.model import main

    main(["--config", "tiny", "--seq", "16", "--batch", "2", "--rounds", "1", "--steps", "1", "--warmup", "0",
          "--compile", "off"])
    out = capsys.readouterr().out
    assert "|loss ours - HF| = " in out
    assert "| eager | ours |" in out and "| eager | HF |" in out and "| eager | **ours/HF** |" in out
