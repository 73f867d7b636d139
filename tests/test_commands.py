"""Every command is a Hydra app over conf/ with one exit-code convention (core/cli.py): `--cfg job`, lists,
`--help`, typed values, exit 2 naming the key for a bad one, and nothing written where it is run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.cli import compose_args, field_docs

REPO = Path(__file__).resolve().parents[1]

# (module, config name, required settings, a list-valued or typed setting to check)
COMMANDS = [
    ("data_prep.build_tokenizer", "build_tokenizer", ["output_dir=o", "input=[a.txt,'b/*.gz']"], ("input", ["a.txt", "b/*.gz"])),
    ("data_prep.build_corpus", "build_corpus", ["output_dir=o", "input=[a.txt,b.txt]", "tokenizer=t"],
     ("input", ["a.txt", "b.txt"])),
    ("data_prep.verify_corpus", "verify_corpus", ["path=c"], ("path", "c")),
    ("pretrain.evaluate", "evaluate", ["checkpoint=c", "+data.valid_max_batches=0"], ("data", {"valid_max_batches": 0})),
    ("serving.export", "export", ["checkpoint=c", "output_dir=o"], ("dtype", "fp32")),
    ("serving.fill_mask", "fill_mask", ["model=m", "request=-"], ("top_k", 5)),
    ("bench.data_prep", "bench_data_prep", ["workers=[1,4]"], ("workers", [1, 4])),
    ("finetune", "finetune", ["task=movie_sentiment", "model=m", "seeds=[1,2]"], ("seeds", [1, 2])),
    ("pretrain.train", "pretrain", ["experiment=debug", "data.corpus=c"], ("name", "debug")),
]


def run(module: str, *argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # bench/ is not an installed package
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("module, name, required, check", COMMANDS, ids=[c[1] for c in COMMANDS])
def test_cfg_job_prints_the_composed_config(module, name, required, check, tmp_path):
    r = run(module, "--cfg", "job", *required, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    key, value = check
    assert yaml.safe_load(r.stdout)[key] == value
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


@pytest.mark.parametrize("module, name, required, check", COMMANDS, ids=[c[1] for c in COMMANDS])
def test_an_unknown_key_exits_2_naming_it(module, name, required, check, tmp_path):
    r = run(module, *required, "no_such_setting=1", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "no_such_setting" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("module, name, required, check", COMMANDS[:-1], ids=[c[1] for c in COMMANDS[:-1]])
def test_help_documents_every_setting(module, name, required, check):
    r = run(module, "--help")
    assert r.returncode == 0, r.stderr
    schema = type(compose_args(name, _schema(module), required))
    docs = field_docs(schema)
    for field in schema.__dataclass_fields__:
        assert docs.get(field), f"{schema.__name__}.{field} has no docstring"
        assert f"  {field}: {docs[field]}" in r.stdout


def _schema(module: str) -> type:
    import importlib

    if module == "finetune":  # python -m finetune: its schema is finetune.config's
        from finetune.config import FinetuneConfig

        return FinetuneConfig
    mod = importlib.import_module(module)
    (schema,) = [v for k, v in vars(mod).items() if k.endswith("Args") and isinstance(v, type)
                 and v.__module__ == mod.__name__]
    return schema
