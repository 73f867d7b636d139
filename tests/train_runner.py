"""Run several trainings in one process (group): start-up, not training, dominates tiny test runs.

    torchrun --nproc_per_node 2 tests/train_runner.py spec.json      # or plain `python` for one process

`spec.json`: {"runs": [{"name": str, "overrides": [Hydra overrides...], "inject_nan": [step, rank]
(optional)}, ...], "result": path}. Each run
is composed from conf/pretrain.yaml and trained by `pretrain.train.run` in this process, one after the
other; rank 0 writes {name: exit code} to `result`, and for a run that compiled,
{name:compiled_graphs: graphs torch.compile traced, name:graph_breaks: its graph breaks}. An exception on any rank ends the process at once
with exit code 1 (so that torchrun stops the other ranks instead of letting them wait).

Also makes the golden-loss file from nothing but the repository (its header lists every command run):

    python tests/train_runner.py --golden tests/golden/debug_losses.txt
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
GOLDEN_STEPS = 30
# Golden losses hold across machines only within a tolerance: float32 reductions take other kernels on
# other CPUs (an AMD EPYC with AVX-512 differed from the maker's Intel Xeon by up to 1e-7 relative, at 5
# of 30 steps, same pinned torch). 1e-5 relative is 100x that, and 16x below the smallest step-to-step
# change of the file (1.6e-4), so a real change of the recipe, the model or the data still fails.
# Bit-exact comparisons stay where they hold: resume vs uninterrupted, 1 vs 2 ranks, on one machine.
GOLDEN_RTOL = 1e-5
# The data the golden run trains on: the bundled Jargon File, as tests/conftest.py builds it.
GOLDEN_PREP = [
    ["-m", "data_prep.build_tokenizer", "input=data/jargon.txt.gz", "output_dir={tokenizer}", "vocab_size=8192",
     "progress=false"],
    ["-m", "data_prep.build_corpus", "input=data/jargon.txt.gz", "tokenizer={tokenizer}", "output_dir={corpus}",
     "valid_fraction=0.02", "progress=false"],
]


def golden_overrides(corpus: str, tokenizer: str, output_dir: str) -> list[str]:
    """The debug experiment on the bundled corpus, first GOLDEN_STEPS steps, every loss logged."""
    return [
        "experiment=debug", f"data.corpus={corpus}", f"data.tokenizer={tokenizer}",
        f"trainer.output_dir={output_dir}", "trainer.resume=none", f"trainer.stop_at_step={GOLDEN_STEPS}",
        "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress_bar=false",
        "wandb.enabled=false",
    ]


def nan_injecting_trainer(step: int, rank: int) -> type:
    """A Trainer whose loss of `step` (1-based, as logged) is NaN on `rank` (-1: every rank): the fault
    injection of the non-finite tests, kept out of the shipped config."""
    from pretrain.train import Trainer

    class NaNAtStep(Trainer):
        def micro_batch_loss(self, batch, max_predictions=None):
            loss = super().micro_batch_loss(batch, max_predictions)
            if self.step + 1 == step and rank in (-1, self.env.rank):
                loss = loss * float("nan")
            return loss

    return NaNAtStep


def run_all(runs: list[dict]) -> dict[str, int]:
    """Each spec: {"name", "overrides", optional "inject_nan": [step, rank]}."""
    from torch._dynamo.utils import counters

    from pretrain.train import run

    results = {}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for spec in runs:
            trainer_cls = nan_injecting_trainer(*spec["inject_nan"]) if "inject_nan" in spec else None
            graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
            results[spec["name"]] = run(compose("pretrain", overrides=spec["overrides"]), trainer_cls)
            if counters["stats"]["unique_graphs"] > graphs:  # what torch.compile traced during the run
                results[f"{spec['name']}:compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs
                results[f"{spec['name']}:graph_breaks"] = sum(counters["graph_break"].values()) - breaks
    return results


def losses(metrics_path: Path) -> list[float]:
    """The training losses of metrics.jsonl, in step order (records with a "loss" key)."""
    out = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out.append(record["loss"])
    return out


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "an unknown CPU"


def make_golden(path: str) -> None:
    """Build the tokenizer and corpus (GOLDEN_PREP) and train GOLDEN_STEPS steps, each a subprocess
    with OMP_NUM_THREADS=1 (as the test's launch: the reduction order depends on the thread count)."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"tokenizer": f"{tmp}/tokenizer", "corpus": f"{tmp}/corpus"}
        train = ["-m", "pretrain.train", *golden_overrides(dirs["corpus"], dirs["tokenizer"], f"{tmp}/run")]
        for argv in [*[[a.format(**dirs) for a in cmd] for cmd in GOLDEN_PREP], train]:
            subprocess.run([sys.executable, *argv], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        values = losses(Path(tmp) / "run" / "metrics.jsonl")
    shown = {"tokenizer": "<tokenizer>", "corpus": "<corpus>"}
    header = [
        f"# The first {GOLDEN_STEPS} training losses of `experiment=debug` on the bundled corpus.",
        f"# torch {torch.__version__}, on {_cpu_name()}. Made from the repository root, the venv active, by",
        "#   python tests/train_runner.py --golden tests/golden/debug_losses.txt",
        "# which runs, with OMP_NUM_THREADS=1 and <tokenizer>, <corpus>, <run> in a temporary directory:",
        *[f"#   python {' '.join(a.format(**shown) for a in cmd)}" for cmd in GOLDEN_PREP],
        "#   python -m pretrain.train " + " ".join(golden_overrides("<corpus>", "<tokenizer>", "<run>")),
        f"# Compared with a relative tolerance of {GOLDEN_RTOL:g} (GOLDEN_RTOL in tests/train_runner.py, which",
        "# says why): float32 results differ between CPUs in the 7th digit.",
    ]
    Path(path).write_text("\n".join(header) + "\n" + "\n".join(repr(v) for v in values) + "\n")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--golden"]:
        make_golden(argv[1])
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
    from pretrain import distributed

    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
