"""The loop's metrics component: records every log_every steps, and plain log lines (not a progress bar
redrawn per refresh) when stderr is not a terminal, as in SLURM's .out files."""
from __future__ import annotations

import json
import logging

from pretrain.metrics import MetricsWriter, StepMetrics


def test_records_and_plain_progress_lines_off_a_terminal(tmp_path, caplog):
    writer = MetricsWriter(tmp_path / "metrics.jsonl", None)
    metrics = StepMetrics(writer, name="t", log_every=3, tokens_per_step=100, max_steps=7, step=0,
                          flops_per_token=1.0, peak_flops=None, progress_bar=True)
    assert metrics._bar is None  # pytest's stderr is not a terminal
    with caplog.at_level(logging.INFO, logger="pretrain.train"):
        for step in range(1, 8):
            with metrics.waiting():
                pass
            metrics.advance()
            if metrics.should_log(step, end=7, stop=False):
                metrics.log(step, loss=1.0 / step, lr=0.1, skipped_steps=0, epoch=0, grad_norm=None)
        metrics.log_validation(7, {"valid/loss": 0.5})
    metrics.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 7, 7] and records[-1] == {"step": 7, "valid/loss": 0.5}
    assert all(r["tokens_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in records[:3])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines[:3]] == ["3/7", "6/7", "7/7"] and "loss=0.3333" in lines[0]


def test_other_ranks_keep_time_and_write_nothing(tmp_path, caplog):
    metrics = StepMetrics(None, name="t", log_every=1, tokens_per_step=1, max_steps=2, step=0,
                          flops_per_token=1.0, peak_flops=None, progress_bar=True)
    with caplog.at_level(logging.INFO, logger="pretrain.train"):
        metrics.advance()
        metrics.log(1, loss=1.0, lr=0.1, skipped_steps=0, epoch=0, grad_norm=None)
    metrics.close()
    assert not [r for r in caplog.records if r.getMessage().startswith("step 1/")]
    assert list(tmp_path.iterdir()) == []
