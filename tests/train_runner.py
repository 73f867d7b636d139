"""Run several trainings in one process (group): start-up, not training, dominates tiny test runs.

    torchrun --nproc_per_node 2 tests/train_runner.py spec.json      # or plain `python` for one process

`spec.json`: {"runs": [{"name": str, "overrides": [Hydra overrides...]}, ...], "result": path}. Each run
is composed from conf/pretrain.yaml and trained by `pretrain.train.run` in this process, one after the
other; rank 0 writes {name: exit code} to `result`. An exception on any rank ends the process at once
with exit code 1 (so that torchrun stops the other ranks instead of letting them wait).

Also makes the golden-loss file (see tests/golden/debug_losses.txt for the exact command):

    python tests/train_runner.py --golden tests/golden/debug_losses.txt <corpus dir> <tokenizer dir>
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
GOLDEN_STEPS = 30


def golden_overrides(corpus: str, tokenizer: str, output_dir: str) -> list[str]:
    """The debug experiment on the bundled corpus, first GOLDEN_STEPS steps, every loss logged."""
    return [
        "experiment=debug", f"data.corpus={corpus}", f"data.tokenizer={tokenizer}",
        f"trainer.output_dir={output_dir}", "trainer.resume=none", f"trainer.stop_at_step={GOLDEN_STEPS}",
        "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress_bar=false",
        "wandb.enabled=false",
    ]


def run_all(runs: list[dict]) -> dict[str, int]:
    from pretrain.train import run

    results = {}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for spec in runs:
            results[spec["name"]] = run(compose("pretrain", overrides=spec["overrides"]))
    return results


def losses(metrics_path: Path) -> list[float]:
    """The training losses of metrics.jsonl, in step order (records with a "loss" key)."""
    out = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out.append(record["loss"])
    return out


def make_golden(path: str, corpus: str, tokenizer: str) -> None:
    import torch

    torch.set_num_threads(1)  # as the test's launch (OMP_NUM_THREADS=1): the reduction order depends on it
    with tempfile.TemporaryDirectory() as tmp:
        run_all([{"name": "golden", "overrides": golden_overrides(corpus, tokenizer, tmp)}])
        values = losses(Path(tmp) / "metrics.jsonl")
    header = [
        f"# The first {GOLDEN_STEPS} training losses of `experiment=debug` on the bundled corpus",
        "# (data/jargon.txt.gz -> tokenizer vocab 8192 -> corpus valid_fraction 0.02, as tests/conftest.py builds).",
        f"# torch {torch.__version__}, 1 thread. Made by (from the repository root, the venv active):",
        "#   python tests/train_runner.py --golden tests/golden/debug_losses.txt <corpus dir> <tokenizer dir>",
        "# which runs `python -m pretrain.train` with these overrides:",
        "#   " + " ".join(golden_overrides("<corpus dir>", "<tokenizer dir>", "<tmp dir>")),
    ]
    Path(path).write_text("\n".join(header) + "\n" + "\n".join(repr(v) for v in values) + "\n")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--golden"]:
        make_golden(*argv[1:4])
        return 0
    spec = json.loads(Path(argv[0]).read_text())
    try:
        results = run_all(spec["runs"])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["result"]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
