"""The launch files without a cluster: the submitit presets compose, the scripts parse and refuse bad use."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO


@pytest.mark.parametrize("preset, nodes", [("slurm_1node", 1), ("slurm_multinode", 4)])
def test_submitit_presets_compose(preset: str, nodes: int) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pretrain.train", f"hydra/launcher={preset}", "experiment=roberta_large",
         "--cfg", "hydra"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    launcher = yaml.safe_load(r.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["nodes"] == nodes
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 8
    assert launcher["signal_delay_s"] > 0 and launcher["max_num_timeout"] > 0


@pytest.mark.parametrize("script", ["pretrain.sbatch", "prep.sbatch", "submit_prep.sh", "ci_slurm.sh"])
def test_scripts_parse(script: str) -> None:
    r = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args", [[], ["two", "input=x"], ["2", "input=x"]])
def test_submit_prep_refuses_bad_use(args: list[str]) -> None:
    r = subprocess.run([str(REPO / "launch" / "submit_prep.sh"), *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "usage" in r.stderr or "output_dir" in r.stderr
