"""Benchmark of our fine-tuning loop against HF's `Trainer` (a benchmark, not a test).

    python -m bench.finetune [steps=30] [warmup=5] [batch_size=16] [repeats=3] [threads=0] [model=<HF dir>]
    python -m bench.finetune device=cuda precision=bf16 preset=base          # on a GPU

Both sides train the same model from the same start on the same token ids, in the same batches, with the
same recipe (fairseq's GLUE settings, finetune/config.py: AdamW (0.9, 0.98), eps 1e-6, weight decay 0.1 off
biases and LayerNorms, linear warm-up over 6% of the steps then decay, no clipping) and the same torch
threads, in one process, alternating ours, HF, ours, HF, ... `repeats` times:

  ours  `Finetuner.one_seed` (finetune/train.py), the command's own loop with its own optimizer and schedule,
        on our RobertaForSequenceClassification (finetune.model.build_task_model of load_pretrained), with
        `train.max_steps = warmup + steps`, `train.epochs=1`, no progress bar; its `train_step` is wrapped
        (an instance attribute) to stamp the time and count the tokens after each step: so the real loop
        runs, not a copy of it. The evaluation `one_seed` runs after training is not timed (its splits are
        cut to 64 examples to keep it short), nor is anything before the first step.
        As `python -m finetune` does, deterministic algorithms are on for ours on CPU (HF: off, its default).
  HF    `transformers.Trainer` on `AutoModelForSequenceClassification.from_pretrained(<the same dir>)`,
        loaded with ours' freshly initialised weights (the same head), TrainingArguments with the same batch,
        lr, betas, eps, weight decay, warm-up steps, linear schedule, max_steps, max_grad_norm and seed;
        logging, saving, evaluation, tqdm and reporting off, dataloader_num_workers=0, HF's default
        optimizer (`adamw_torch_fused` with torch >= 2.8) and attention (SDPA); a TrainerCallback stamps
        the time at each `on_step_end`.

The data: the first batch_size x (warmup + steps) training examples of `task` (movie_sentiment: the
bundled movie-review sentences), encoded once with our encoder (finetune/encode.py encode_sequences, via
the task's `train_items`), at `max_length`. Ours takes them in its own seeded order; HF gets the same ids
in the order ours trained on them (a sequential sampler) and pads each batch to its longest row with
`DataCollatorWithPadding` (right padding with `<pad>`, as ours): both see the same batches, checked
(`same_batches`: every step's token count and padded width equal).

Figures (medians over the repeats, each repeat's in `*_runs`): tokens/s = the non-padding tokens of the
timed steps over their seconds, from the end of the last warm-up step to the end of the last step (each
interval holds one whole iteration of the loop: batch collation, forward, backward, optimizer, schedule);
steps/s; the ratio ours / HF (goal >= 1.0); each side's spread (fastest / slowest repeat: far above 1 means
the machine was busy during some runs, and then the ratio means little: run it again; with `threads` = every
core, another process on the machine slows a run many times over); MFU against the device's peak
(pretrain/flops.py: per sequence of n tokens, n x flops_per_token(n) with no LM head; the classification
head is not counted), null where the peak is unknown (every CPU); the first and last training loss of each
side (the same start, data and recipe, but different dropout draws, and HF's schedule gives step 0 lr 0
where ours gives lr/warmup: close, not equal; with dropout=0 the first losses agree: a sanity check, not an
assertion). The threads torch used during the steps (`*_threads_seen`) and OMP_NUM_THREADS are reported.

Without `model=` it builds one: a tokenizer trained on the bundled Jargon File (vocab 8192; or the
`tokenizer=` directory) and a RoBERTa of the `preset` (conf/model/<preset>.yaml, the tokenizer's vocab
size) with seed 0, saved as an HF directory (core.hf.save_hf) with the tokenizer files.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from bench.report import report
from core.cli import command
from finetune.config import FinetuneConfig, OptimConfig, TaskConfig, TrainConfig
from finetune.model import Pretrained
from finetune.tasks import Item
from finetune.train import REFUSED, Finetuner
from pretrain import distributed
from pretrain.flops import device_peak_flops, flops_per_token, mfu

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "conf" / "commands" / "task"
JARGON = REPO / "data" / "jargon.txt.gz"
EVAL_EXAMPLES = 64
"""Validation and test examples kept for the (untimed) evaluation that ends each of ours' runs."""


@dataclass
class BenchFinetuneArgs:
    """The settings of `python -m bench.finetune` (conf/commands/bench_finetune.yaml)."""

    model: str = ""
    """HF RoBERTa directory (e.g. demo_out/hf); empty: a random `preset` model built here, seed 0."""
    tokenizer: str = ""
    """Tokenizer directory for the built model; empty: one trained on the Jargon File (vocab 8192)."""
    preset: str = "tiny"
    """Model preset of the built model (conf/model/<preset>.yaml), with the tokenizer's vocab size."""
    task: str = "movie_sentiment"
    """A sequence_classification task of conf/commands/task/ (its training file, labels, fields)."""
    max_length: int = 128
    """Most tokens of an example with its special tokens (task.max_length)."""
    batch_size: int = 16
    """Examples per step, on both sides."""
    steps: int = 30
    """Timed steps per run."""
    warmup: int = 5
    """Steps per run before the timing starts (the learning-rate schedule spans warmup + steps)."""
    repeats: int = 3
    """Runs of each side, alternating ours and HF (medians are reported)."""
    threads: int = 0
    """torch.set_num_threads for both sides; 0: the machine's cores."""
    device: str = "cpu"
    """cpu, cuda or auto (cuda when there is one)."""
    precision: str = "fp32"
    """fp32 or bf16 (autocast on ours, TrainingArguments.bf16 on HF)."""
    dropout: float = 0.1
    """Hidden, attention and classifier dropout on both sides (train.dropout)."""
    seed: int = 1
    """Both sides' seed (head initialisation, dropout; ours' data order, which HF then follows)."""
    out: str = ""
    """Also write the figures to this JSON file."""

    def __post_init__(self) -> None:
        for key in ("max_length", "batch_size", "steps", "warmup", "repeats"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0: the machine's cores)")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device={self.device!r} is not one of cpu, cuda, auto")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r} is not fp32 or bf16")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


@dataclass
class Run:
    """One side's run: the time after each step, its tokens and padded width, its loss, the threads."""

    ends: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    widths: list[int] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    threads: int = 0

    def figures(self, warmup: int) -> dict[str, float]:
        seconds = self.ends[-1] - self.ends[warmup - 1]
        timed = len(self.ends) - warmup
        return {"tokens_per_s": sum(self.tokens[warmup:]) / seconds, "steps_per_s": timed / seconds}


# ---------------------------------------------------------------------------------------------------
# the model and the data


def build_model(directory: Path, preset: str, tokenizer: str) -> Path:
    """An HF directory: a random RoBERTa of `preset` (seed 0) and the tokenizer files."""
    from core.hf import save_hf
    from core.model import RobertaConfig, RobertaForMaskedLM
    from core.tokenizer import copy_tokenizer_files, load_tokenizer
    from data_prep.build_tokenizer import BuildTokenizerArgs, build_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        copy_tokenizer_files(tokenizer, directory)
    else:
        build_tokenizer(BuildTokenizerArgs(output_dir=str(directory), input=str(JARGON), vocab_size=8192,
                                           progress=False))
    cfg = RobertaConfig.from_preset(preset)
    cfg = dataclasses.replace(cfg, vocab_size=load_tokenizer(directory).get_vocab_size())
    torch.manual_seed(0)
    save_hf(RobertaForMaskedLM(cfg).eval(), directory)
    return directory


def task_config(name: str, max_length: int) -> TaskConfig:
    """conf/commands/task/<name>.yaml as a TaskConfig (its relative files read from the repository)."""
    path = TASK_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
        raise ValueError(f"task={name!r}: no {path} (tasks: {names})")
    merged = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(path),
                             {"max_length": max_length})
    task = OmegaConf.to_object(merged)
    assert isinstance(task, TaskConfig)
    if task.kind != "sequence_classification":
        raise ValueError(f"task={name!r} is {task.kind}: the benchmark takes a sequence_classification task")
    for key in ("train", "validation", "test"):
        value = getattr(task, key)
        if value is not None and not Path(value).is_absolute():
            setattr(task, key, str(REPO / value))
    return task


def finetune_config(args: BenchFinetuneArgs, model: str) -> FinetuneConfig:
    """What `python -m finetune task=<task> model=<model> seeds=[seed] train.max_steps=...` composes:
    the recipe is OptimConfig's defaults (conf/commands/finetune.yaml overrides none of them)."""
    train = TrainConfig(batch_size=args.batch_size, epochs=1, max_steps=args.warmup + args.steps,
                        dropout=args.dropout, precision=args.precision, device=args.device,
                        progress_bar=False)
    return FinetuneConfig(model=model, seeds=[args.seed], save_best=False,
                          task=task_config(args.task, args.max_length), optim=OptimConfig(), train=train)


# ---------------------------------------------------------------------------------------------------
# the two sides


def _stamp(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_ours(finetuner: Finetuner, seed: int) -> tuple[Run, list[list[Item]], dict[str, torch.Tensor]]:
    """One `one_seed` run, timed after each `train_step`: (the run, each step's items, the initial
    weights)."""
    run, batches = Run(), []
    inner: Callable[..., float] = finetuner.train_step

    def timed_step(model, optimizer, items, mine, total) -> float:
        loss = inner(model, optimizer, items, mine, total)
        run.ends.append(_stamp(finetuner.device))
        run.tokens.append(sum(len(it.input_ids) for it in items))
        run.widths.append(max(len(it.input_ids) for it in items))
        run.losses.append(loss)
        run.threads = torch.get_num_threads()
        batches.append(list(items))
        return loss

    initial = {k: v.detach().clone() for k, v in finetuner.new_model(seed).state_dict().items()}
    finetuner.train_step = timed_step  # type: ignore[method-assign]
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(finetuner.device.type == "cpu", warn_only=True)  # as finetune() does
    try:
        finetuner.one_seed(seed)
    finally:
        del finetuner.train_step
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    return run, batches, initial


def run_hf(model_dir: str, pre: Pretrained, order: list[Item], initial: dict[str, torch.Tensor],
           cfg: FinetuneConfig, device: torch.device, work: Path) -> tuple[Run, dict[str, str]]:
    """One `Trainer.train()` over `order` (a sequential sampler), timed at each `on_step_end`."""
    import transformers
    from transformers.trainer_callback import PrinterCallback

    from core.hf import task_state_dict_to_hf

    run = Run()
    t, o = cfg.train, cfg.optim
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, hidden_dropout_prob=t.dropout, attention_probs_dropout_prob=t.dropout)
    missing, unexpected = model.load_state_dict(
        task_state_dict_to_hf(initial, pre.config, "sequence_classification"), strict=False)
    if [k for k in missing if not k.endswith("position_ids")] or unexpected:
        raise RuntimeError(f"HF's model did not take ours' weights: missing {missing}, "
                           f"unexpected {unexpected}")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(pre.tokenizer_dir))
    if hf_tokenizer.pad_token_id != pre.config.pad_token_id or hf_tokenizer.padding_side != "right":
        raise RuntimeError(f"HF's tokenizer pads with id {hf_tokenizer.pad_token_id} on the "
                           f"{hf_tokenizer.padding_side}, ours with {pre.config.pad_token_id} on the right")
    pad = transformers.DataCollatorWithPadding(hf_tokenizer)

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad(features)
        run.tokens.append(int(batch["attention_mask"].sum()))
        run.widths.append(int(batch["input_ids"].shape[1]))
        return batch

    class Timer(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            run.ends.append(_stamp(device))
            run.threads = torch.get_num_threads()

    class BenchTrainer(transformers.Trainer):
        """The Trainer, keeping each step's loss (a tensor: no extra synchronisation)."""

        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            losses.append(loss.detach())
            return loss

    losses: list[torch.Tensor] = []
    steps = t.max_steps or 0
    args = transformers.TrainingArguments(
        output_dir=str(work / "hf_trainer"), per_device_train_batch_size=t.batch_size, max_steps=steps,
        learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
        adam_epsilon=o.eps, warmup_steps=int(o.warmup_ratio * steps), lr_scheduler_type="linear",
        max_grad_norm=o.clip_grad_norm, bf16=t.precision == "bf16", seed=cfg.seeds[0],
        train_sampling_strategy="sequential", dataloader_num_workers=0, use_cpu=device.type == "cpu",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True)
    dataset = [{"input_ids": it.input_ids, "attention_mask": [1] * len(it.input_ids),
                "labels": int(it.target)} for it in order]
    trainer = BenchTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                           callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics to stdout
    trainer.train()
    run.losses = [float(x) for x in losses]
    run.tokens, run.widths = run.tokens[:len(run.ends)], run.widths[:len(run.ends)]  # a prefetched batch
    info = {"hf_optim": str(getattr(args.optim, "value", args.optim)),
            "hf_attention": str(model.config._attn_implementation)}
    return run, info


# ---------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_flops(batches: list[list[Item]], cfg, warmup: int) -> float:
    """Model FLOPs of the timed steps: n x flops_per_token(n) per sequence of n tokens, no LM head."""
    return sum(len(it.input_ids) * flops_per_token(cfg, len(it.input_ids), head_fraction=0.0)
               for items in batches[warmup:] for it in items)


def bench(args: BenchFinetuneArgs) -> dict[str, Any]:
    """Alternating runs of ours and HF's on one model, one data set and one thread count."""
    import transformers

    transformers.logging.set_verbosity_error()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    env = distributed.detect()
    if env.world_size > 1:
        raise ValueError("the benchmark runs in one process: start it without torchrun/srun")
    device = distributed.select_device(env, args.device)
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        work = Path(tmp)
        model_dir = args.model or str(build_model(work / "hf", args.preset, args.tokenizer))
        cfg = finetune_config(args, model_dir)
        finetuner = Finetuner(cfg, env, device)
        examples = args.batch_size * (args.warmup + args.steps)
        if len(finetuner.items) < examples:
            raise ValueError(f"task {args.task} has {len(finetuner.items)} training examples; "
                             f"batch_size x (warmup + steps) = {examples} are needed")
        finetuner.items = finetuner.items[:examples]
        for split in ("validation", "test"):
            if split in finetuner.data.splits:
                finetuner.data.splits[split] = finetuner.data.splits[split][:EVAL_EXAMPLES]
        ours_runs: list[Run] = []
        hf_runs: list[Run] = []
        batches: list[list[Item]] = []
        info: dict[str, str] = {}
        for _ in range(args.repeats):
            run, batches, initial = run_ours(finetuner, args.seed)
            ours_runs.append(run)
            order = [it for items in batches for it in items]
            run, info = run_hf(model_dir, finetuner.pretrained, order, initial, cfg, device, work)
            hf_runs.append(run)
    return summary(args, device, threads, examples, finetuner.pretrained, batches, ours_runs, hf_runs, info)


def summary(args: BenchFinetuneArgs, device: torch.device, threads: int, examples: int, pre: Pretrained,
            batches: list[list[Item]], ours_runs: list[Run], hf_runs: list[Run], info: dict[str, str]
            ) -> dict[str, Any]:
    """The settings, the machine, each repeat's figures, the medians, their ratio, MFU and the losses."""
    import transformers

    w = args.warmup
    timed_tokens = sum(ours_runs[0].tokens[w:])
    padded = args.batch_size * sum(ours_runs[0].widths[w:])
    per_token = model_flops(batches, pre.config, w) / timed_tokens
    peak = device_peak_flops(device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    result: dict[str, Any] = {
        "model": args.model or f"built: preset {args.preset}, seed 0", "task": args.task,
        "examples": examples, "batch_size": args.batch_size, "max_length": args.max_length,
        "steps": args.steps, "warmup": w, "repeats": args.repeats, "device": str(device),
        "precision": args.precision, "dropout": args.dropout,
        "seed": args.seed, "threads": threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": cpu_name(), "cpus": os.cpu_count(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "transformers": transformers.__version__, **info,
        "ours_threads_seen": ours_runs[0].threads, "hf_threads_seen": hf_runs[0].threads,
        "same_batches": all(o.tokens == h.tokens and o.widths == h.widths
                            for o, h in zip(ours_runs, hf_runs)),
        "tokens_per_step": round(timed_tokens / args.steps, 1),
        "padded_fraction": round(1 - timed_tokens / padded, 3),
        "model_gflop_per_token": round(per_token / 1e9, 6),
        "peak_tflops": None if peak is None else peak / 1e12,
    }
    medians: dict[tuple[str, str], float] = {}
    for side, runs in (("ours", ours_runs), ("hf", hf_runs)):
        figures = [r.figures(w) for r in runs]
        for key in ("tokens_per_s", "steps_per_s"):
            result[f"{side}_{key}_runs"] = [round(f[key], 2) for f in figures]
            medians[side, key] = statistics.median(f[key] for f in figures)
        rates = [f["tokens_per_s"] for f in figures]
        result[f"{side}_spread"] = round(max(rates) / min(rates), 3)  # a busy machine shows here
    for side, runs in (("ours", ours_runs), ("hf", hf_runs)):
        result[f"{side}_tokens_per_s"] = round(medians[side, "tokens_per_s"], 1)
        result[f"{side}_steps_per_s"] = round(medians[side, "steps_per_s"], 2)
        tokens_per_s = medians[side, "tokens_per_s"]
        result[f"{side}_mfu"] = None if peak is None else round(mfu(tokens_per_s, per_token, peak), 5)
        result[f"{side}_loss_first"] = round(runs[-1].losses[0], 4)
        result[f"{side}_loss_last"] = round(runs[-1].losses[-1], 4)
    for key in ("tokens_per_s", "steps_per_s"):
        result[f"ratio_{key}"] = round(medians["ours", key] / medians["hf", key], 3)
    return result


@command("bench_finetune", BenchFinetuneArgs, refused=(*REFUSED, RuntimeError, OSError))
def main(args: BenchFinetuneArgs) -> int:
    report(bench(args), args.out)
    return 0


if __name__ == "__main__":
    main()
