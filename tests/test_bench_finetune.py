"""A smoke run of `python -m bench.finetune` at a tiny size, so the benchmark cannot rot: both sides ran
on the same batches from the same start and the report has its figures (no timing is asserted)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_runs_both_sides_and_reports(jargon_tokenizer: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # bench/ is not an installed package
    argv = [sys.executable, "-m", "bench.finetune", f"tokenizer={jargon_tokenizer}", "steps=2", "warmup=1",
            "repeats=2", "batch_size=4", "max_length=32", "threads=1", "dropout=0.0", f"out={out}"]
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    for key, value in result.items():  # the stdout table is the same figures, one `key value` line each
        assert any(line.split()[:1] == [key] for line in r.stdout.splitlines()), key
    assert result["examples"] == 4 * 3
    assert result["threads"] == result["ours_threads_seen"] == result["hf_threads_seen"] == 1
    assert result["same_batches"] is True
    assert result["ours_mfu"] is None and result["hf_mfu"] is None  # a CPU: no known peak
    for side in ("ours", "hf"):
        runs = result[f"{side}_tokens_per_s_runs"]
        assert len(runs) == 2 and all(x > 0 for x in runs)
        assert len(result[f"{side}_steps_per_s_runs"]) == 2 and result[f"{side}_steps_per_s"] > 0
        assert math.isfinite(result[f"{side}_loss_first"]) and math.isfinite(result[f"{side}_loss_last"])
    assert math.isclose(result["ratio_tokens_per_s"], result["ours_tokens_per_s"] / result["hf_tokens_per_s"],
                        rel_tol=1e-2)
    # no dropout: the same weights on the same first batch give the same loss before any update
    assert abs(result["ours_loss_first"] - result["hf_loss_first"]) < 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # nothing else written where it ran
