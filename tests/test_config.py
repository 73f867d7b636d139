"""Every shipped config composes and validates; bad settings fail at start-up naming the key."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import pretrain.config  # noqa: F401  (registers the schema with Hydra's ConfigStore)
from pretrain.config import ConfigError, derive_grad_accum, to_run_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = ["model", "data", "optim", "schedule", "system", "deepspeed", "trainer"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("pretrain", overrides=list(overrides))


def test_every_group_has_options():
    for group in GROUPS + ["experiment"]:
        assert options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_validates(group):
    for option in options(group):
        cfg = composed(f"{group}={option}", "data.corpus=/nonexistent", "data.tokenizer=/t", "schedule.global_batch_size=256")
        run = to_run_config(cfg, world_size=1, check_corpus=False)
        assert run.system.grad_accum >= 1


@pytest.mark.parametrize("experiment", ["debug", "roberta_base", "roberta_large"])
def test_every_experiment_composes_and_validates(experiment):
    assert experiment in options("experiment")
    cfg = composed(f"experiment={experiment}", *([] if experiment == "debug" else ["data.corpus=/nonexistent",
                                                                                   "data.tokenizer=/t"]))
    run = to_run_config(cfg, world_size=8 if experiment != "debug" else 1, check_corpus=False)
    assert run.name == experiment


def test_roberta_large_is_the_paper():
    run = to_run_config(composed("experiment=roberta_large", "data.corpus=/c", "data.tokenizer=/t"), world_size=32, check_corpus=False)
    assert (run.schedule.max_steps, run.schedule.warmup_steps, run.schedule.final_lr) == (500_000, 30_000, 0.0)
    assert run.optim.lr == 4e-4 and (run.optim.beta1, run.optim.beta2, run.optim.eps) == (0.9, 0.98, 1e-6)
    assert run.optim.weight_decay == 0.01 and run.optim.grad_clip == 0.0
    assert run.schedule.global_batch_size == 8192 and run.data.seq_len == 512
    assert run.model.hidden_dropout == 0.1 and run.model.attention_dropout == 0.1
    assert (run.model.hidden_size, run.model.num_layers, run.model.num_heads) == (1024, 24, 16)
    assert run.data.packing == "full_sentences" and run.data.masking.mask_prob == 0.15
    assert run.system.precision == "bf16" and run.deepspeed.zero_stage in (1, 2)
    assert run.system.grad_accum == 8192 // (run.system.micro_batch_size * 32)


def test_roberta_base_differs_from_large_in_lr_warmup_and_model():
    run = to_run_config(composed("experiment=roberta_base", "data.corpus=/c", "data.tokenizer=/t"), world_size=8, check_corpus=False)
    assert run.optim.lr == 6e-4 and run.schedule.warmup_steps == 24_000 and run.model.hidden_size == 768
    assert run.schedule.max_steps == 500_000 and run.optim.beta2 == 0.98


def test_cli_prints_the_paper_numbers():
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "experiment=roberta_large", "--cfg", "job"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["optim"]["lr"] == 4e-4 and job["optim"]["beta2"] == 0.98 and job["optim"]["eps"] == 1e-6
    assert job["schedule"] == {"max_steps": 500000, "warmup_steps": 30000, "final_lr": 0.0, "global_batch_size": 8192}
    assert job["model"]["hidden_size"] == 1024 and job["data"]["seq_len"] == 512


def test_hydra_does_not_change_the_working_directory():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hcfg = compose("pretrain", overrides=["experiment=debug"], return_hydra_config=True)
    assert hcfg.hydra.job.chdir is False
    assert hcfg.hydra.run.dir == "outputs/debug"  # no timestamp: a requeued job finds its checkpoints
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        moved = compose("pretrain", overrides=["experiment=debug", "trainer.output_dir=/x/y"], return_hydra_config=True)
    assert moved.hydra.run.dir == "/x/y"  # Hydra's own files go to the run directory too


# ---------------------------------------------------------------------------------------------------
# failures at start-up


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        composed("data.corpus=/c", "data.tokenizer=/t", "optim.learning_rate=1")
    assert "learning_rate" in str(e.value.__cause__ or e.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        composed("data.corpus=/c", "data.tokenizer=/t", "schedule.max_steps=many")
    assert "max_steps" in str(e.value.__cause__ or e.value)


def test_unknown_model_key_fails():
    with pytest.raises(ConfigCompositionException) as e:
        composed("data.corpus=/c", "data.tokenizer=/t", "model.hidden=3")
    assert "hidden" in str(e.value.__cause__ or e.value)


def test_missing_corpus_fails_naming_it():
    with pytest.raises(ConfigError, match="corpus"):
        to_run_config(composed(), world_size=1, check_corpus=False)


def test_global_batch_must_factor():
    cfg = composed("data.corpus=/c", "data.tokenizer=/t", "schedule.global_batch_size=16", "system.micro_batch_size=4",
                   "system.grad_accum=3")
    with pytest.raises(ConfigError, match=r"global_batch_size=16 .*micro_batch_size=4 .*grad_accum=3 .*world_size=1"):
        to_run_config(cfg, world_size=1, check_corpus=False)
    with pytest.raises(ConfigError, match=r"global_batch_size=16 is not a multiple .*micro_batch_size=4 .*world_size=3"):
        to_run_config(composed("data.corpus=/c", "data.tokenizer=/t", "schedule.global_batch_size=16", "system.micro_batch_size=4"),
                      world_size=3, check_corpus=False)


def test_a_world_size_the_global_batch_does_not_fit_exits_2_naming_the_three_values(tmp_path):
    """Elastic resume: the global batch fixes the sample order; a world size W' it cannot be split over
    (G not a multiple of micro_batch x W') is refused at start-up, before any process group."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "5", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "experiment=debug", "data.corpus=/c",
                           "data.tokenizer=/t", "schedule.global_batch_size=12", "system.micro_batch_size=2",
                           f"trainer.output_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(r"global_batch_size=12 is not a multiple .*micro_batch_size=2 .*world_size=5",
                     proc.stdout + proc.stderr)


def test_grad_accum_is_derived():
    assert derive_grad_accum(8192, 32, None, 32) == 8
    assert derive_grad_accum(16, 2, 4, 2) == 4


def test_seq_len_above_max_positions_fails():
    with pytest.raises(ConfigError, match=r"data.seq_len=513 .*max_positions - 2 = 512"):
        to_run_config(composed("data.corpus=/c", "data.tokenizer=/t", "data.seq_len=513"), world_size=1, check_corpus=False)


@pytest.mark.parametrize("override,key", [
    ("trainer.backend=jax", "trainer.backend"), ("system.precision=fp16", "system.precision"),
    ("data.packing=none", "data.packing"), ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("system.compile_backend=cudagraphs", "system.compile_backend"),
    ("system.sdpa_backends=[flash,fast]", "system.sdpa_backends"), ("system.sdpa_backends=[]", "system.sdpa_backends"),
    ("optim.beta2=1.5", "optim.beta2"), ("schedule.warmup_steps=5000", "schedule.warmup_steps"),
    ("data.masking.mask_prob=2", "mask_prob"), ("model.num_heads=3", "num_heads"),
    ("deepspeed.offload_param=true", "deepspeed.offload_param"), ("trainer.resume=", "trainer.resume"),
])
def test_choices_and_ranges_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_run_config(composed("data.corpus=/c", "data.tokenizer=/t", override), world_size=1, check_corpus=False)


def test_torch_backend_refuses_several_ranks():
    with pytest.raises(ConfigError, match="trainer.backend=torch"):
        to_run_config(composed("data.corpus=/c", "data.tokenizer=/t", "trainer.backend=torch", "schedule.global_batch_size=32"),
                      world_size=2, check_corpus=False)


def test_model_vocab_must_match_the_corpus(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "tokenizer_hash": "x", "vocab_size": 50265, "dtype": "uint16", "splits": {}}))
    with pytest.raises(ConfigError, match=r"vocab_size=50265, but model.vocab_size=8192"):
        to_run_config(composed(f"data.corpus={tmp_path}", "data.tokenizer=/t"), world_size=1)


def test_cli_refuses_a_bad_setting_with_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "experiment=debug", "data.seq_len=600",
                           f"trainer.output_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "data.seq_len=600" in proc.stdout + proc.stderr


def test_a_plain_run_says_what_to_pass_and_a_run_needs_its_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match=r"data.corpus: required.*data.tokenizer=<tokenizer dir>.*make demo"):
        to_run_config(composed(), world_size=1, check_corpus=False)
    with pytest.raises(ConfigError, match="data.tokenizer is required"):
        to_run_config(composed("data.corpus=/c"), world_size=1, check_corpus=False)
    missing = tmp_path / "demo_out" / "corpus"  # not the repository's: `make demo` may have built that one
    with pytest.raises(ConfigError, match=r"demo_out/corpus: .*no manifest.*built by `make demo`"):
        to_run_config(composed("experiment=debug", f"data.corpus={missing}"), world_size=1)


def test_the_debug_experiment_uses_its_groups_as_they_are():
    """experiment/debug.yaml selects schedule=debug and system=cpu and overrides none of their values."""
    import yaml

    debug = yaml.safe_load((CONF / "experiment" / "debug.yaml").read_text())
    assert "schedule" not in debug and "system" not in debug
    run = to_run_config(composed("experiment=debug"), world_size=1, check_corpus=False)
    schedule = yaml.safe_load((CONF / "schedule" / "debug.yaml").read_text())
    assert (run.schedule.max_steps, run.schedule.warmup_steps, run.schedule.global_batch_size) == (
        schedule["max_steps"], schedule["warmup_steps"], schedule["global_batch_size"])


def test_keys_added_with_plus_are_refused_too():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) trainer.nonexistent, extra"):
        to_run_config(composed("data.corpus=/c", "data.tokenizer=/t", "+trainer.nonexistent=3", "+extra=1"),
                      world_size=1, check_corpus=False)


@pytest.mark.parametrize("override", ["optim.lr=abc", "foo.bar=1", "+trainer.nonexistent=3"])
def test_training_cli_exits_2_on_a_config_error(override, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "data.corpus=/c", "data.tokenizer=/t",
                           f"trainer.output_dir={tmp_path}", override], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert override.lstrip("+").split("=")[0].split(".")[-1] in proc.stdout + proc.stderr


def test_fp8_without_torchao_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # what find_spec reports for a package not installed
    with pytest.raises(ConfigError, match=r"system\.fp8=true needs torchao, which is not installed"):
        to_run_config(composed("data.corpus=/c", "data.tokenizer=/t", "system.fp8=true"), world_size=1,
                      check_corpus=False)
    monkeypatch.delitem(sys.modules, "torchao")
    assert to_run_config(composed("data.corpus=/c", "data.tokenizer=/t", "system.fp8=true"), world_size=1,
                         check_corpus=False).system.fp8
