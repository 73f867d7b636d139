"""Fine-tune a pretrained RoBERTa on a downstream task over several seeds (settings of `python -m finetune`).

The dataclasses are the schema `finetune_schema` (core.cli.register), the first entry of the defaults of
conf/commands/finetune.yaml, whose group `task/` holds the shipped tasks: a key that is not here is
refused, a value of the wrong type names its key, and `__post_init__` checks the values (exit 2).

    task.*    what to learn: the kind, the files and their fields, the labels, the metric
    optim.*   the recipe: fairseq's RoBERTa GLUE settings (Adam (0.9, 0.98), eps 1e-6, weight decay 0.1,
              6% warm-up then linear decay, lr 1e-5), each overridable
    train.*   how: batch sizes, epochs, precision, device, progress
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

KINDS = ("sequence_classification", "multi_label_classification", "sequence_regression", "token_classification",
         "extractive_qa")
"""What a task is: a label per text (or text pair), a set of labels per text, a number per text, a tag per
word, an answer span."""
SEQUENCE_KINDS = ("sequence_classification", "multi_label_classification", "sequence_regression")
"""The kinds of one input per text (or pair): the ones whose data may come from `task.dataset`."""
FORMATS = ("json", "jsonl", "csv", "tsv", "conll", "squad")
LABEL_TRANSFORMS = ("sign",)
"""`sign`: a number becomes "negative" (< 0) or "positive" (> 0); exactly 0 is dropped (counted)."""
DEFAULT_METRIC = {"sequence_classification": "accuracy", "multi_label_classification": "f1",
                  "sequence_regression": "pearson", "token_classification": "f1", "extractive_qa": "f1"}
"""The metric that picks the best epoch and the best seed when the task names none."""


@dataclass
class TaskConfig:
    """One downstream task (a file of conf/commands/task/, or `task.*=` overrides)."""

    name: str = MISSING
    """The task's name (the output directory's default name)."""
    kind: str = MISSING
    """sequence_classification, multi_label_classification (a set of labels per text: one sigmoid each),
    sequence_regression, token_classification or extractive_qa."""
    train: Optional[str] = None
    """The training file (.json/.jsonl/.csv/.tsv for sequence tasks, CoNLL for tokens, SQuAD JSON for QA);
    null when the data comes from `dataset`. One of the two is needed."""
    validation: Optional[str] = None
    """The validation file; null: `validation_fraction` of train, split by a hash of the text."""
    test: Optional[str] = None
    """A test file, scored with each seed's best epoch; null: `test_fraction` of train (0: no test)."""
    dataset: Optional[str] = None
    """Sequence kinds: the data through HF `datasets`, instead of `train`/`validation`/`test` files: a hub name
    (`datasets.load_dataset(dataset, dataset_config)`: the network or the hub cache), a local directory of
    data files (`train.jsonl`, `validation.csv`, ...: a split per file name) or a `save_to_disk` directory
    (`datasets.load_from_disk`). A ClassLabel label column gives the label names. Null: the files."""
    dataset_config: Optional[str] = None
    """The dataset's configuration (the second argument of `load_dataset`, e.g. `sst2` of `nyu-mll/glue`)."""
    train_split: str = "train"
    """The dataset's split to train on."""
    validation_split: Optional[str] = "validation"
    """The dataset's validation split; null: `validation_fraction` of the train split, by a hash of the text."""
    test_split: Optional[str] = None
    """The dataset's split scored with each seed's best epoch (its labels are needed); null: `test_fraction`
    of the train split (0: no test)."""
    format: Optional[str] = None
    """json, jsonl, csv, tsv, conll or squad; null: from the file's suffix (.txt: tsv) and the kind."""
    column_names: Optional[List[str]] = None
    """The columns of a delimited file without a header row."""
    text_field: str = "text"
    """The field holding the text (sequence tasks)."""
    pair_field: Optional[str] = None
    """The field holding the second text of a pair (`<s> a </s></s> b </s>`), or null."""
    label_field: str = "label"
    """The field holding the label (the number, for regression; the labels, for multi-label)."""
    label_delimiter: str = ","
    """Multi-label: what separates the labels of a text cell (`sports,politics`); a JSON list (a list field
    of JSON/JSONL, or a cell `["sports", "politics"]`) is read as it is. `[]` is the empty set."""
    label_transform: Optional[str] = None
    """`sign`: a number's sign as the label (negative / positive; 0 dropped), or null."""
    labels: Optional[List[str]] = None
    """The label set in id order; null: a ClassLabel's names, or the sorted labels of train. Validation
    (and test) labels must be in it."""
    metric: Optional[str] = None
    """The metric that picks the best epoch and seed; null: accuracy (classification), f1 (multi-label: micro
    F1), pearson (regression), f1 (entities), f1 (SQuAD)."""
    validation_fraction: float = 0.1
    """Of train, for validation when `validation` is null."""
    test_fraction: float = 0.0
    """Of train, for test when `test` is null."""
    max_length: int = 128
    """Most tokens of an input with its special tokens; longer texts are truncated and counted."""
    version_2: bool = False
    """Extractive QA: SQuAD v2, where a question may have no answer."""
    stride: int = 128
    """Extractive QA: tokens of overlap between the windows of a long context."""
    max_question_length: int = 64
    """Extractive QA: tokens of the question kept."""
    n_best: int = 20
    """Extractive QA: start and end candidates per window."""
    max_answer_length: int = 30
    """Extractive QA: most tokens of an answer."""

    def __post_init__(self) -> None:
        if self.kind == MISSING:  # the schema's own default (Hydra builds it before the task file is merged)
            return
        if self.kind not in KINDS:
            raise ValueError(f"task.kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.dataset is None and self.train is None:
            raise ValueError("task.train (a file) or task.dataset (a hub name or a directory) is required")
        if self.dataset is not None:
            if self.kind not in SEQUENCE_KINDS:
                raise ValueError(f"task.dataset={self.dataset!r}: HF datasets are read for the sequence kinds "
                                 f"({', '.join(SEQUENCE_KINDS)}) only; a {self.kind} task reads its files "
                                 f"(task.train, task.validation: " +
                                 ("CoNLL" if self.kind == "token_classification" else "SQuAD JSON") + ")")
            files = [f"task.{k}={getattr(self, k)!r}" for k in ("train", "validation", "test")
                     if getattr(self, k) is not None]
            if files:
                raise ValueError(f"task.dataset={self.dataset!r} and {', '.join(files)}: give the dataset (its "
                                 "splits: task.train_split, task.validation_split, task.test_split) "
                                 "or the files")
            splits = [s for s in (self.train_split, self.validation_split, self.test_split) if s is not None]
            if not all(splits):
                raise ValueError("task.train_split, task.validation_split and task.test_split must be split "
                                 "names (or null, the last two)")
            if len(set(splits)) != len(splits):
                raise ValueError(f"task.train_split={self.train_split!r}, task.validation_split="
                                 f"{self.validation_split!r}, task.test_split={self.test_split!r} "
                                 "repeat a split")
        elif self.dataset_config is not None:
            raise ValueError(f"task.dataset_config={self.dataset_config!r} needs task.dataset")
        if not self.label_delimiter:
            raise ValueError("task.label_delimiter must not be empty")
        if self.kind == "multi_label_classification" and self.label_transform is not None:
            raise ValueError(f"task.label_transform={self.label_transform!r} is for single labels, not "
                             "multi_label_classification")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"task.format={self.format!r} is not one of {', '.join(FORMATS)}")
        if self.label_transform is not None and self.label_transform not in LABEL_TRANSFORMS:
            raise ValueError(f"task.label_transform={self.label_transform!r} is not one of {LABEL_TRANSFORMS}")
        for key in ("validation_fraction", "test_fraction"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"task.{key}={getattr(self, key)} must be in [0, 1)")
        if not self.has_validation and self.validation_fraction == 0:
            given = "task.validation_split" if self.dataset is not None else "task.validation"
            raise ValueError(f"{given} is null and task.validation_fraction=0: no validation set")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("task.validation_fraction + task.test_fraction must be below 1")
        for key in ("max_length", "stride", "max_question_length", "n_best", "max_answer_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"task.{key}={getattr(self, key)} must be >= 1")
        if self.kind == "extractive_qa" and self.stride >= self.max_length:
            raise ValueError(f"task.stride={self.stride} must be below task.max_length={self.max_length}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task.labels={self.labels} repeats a label")

    @property
    def has_validation(self) -> bool:
        """Whether validation comes as its own file or split (else: `validation_fraction` of train)."""
        return (self.validation_split if self.dataset is not None else self.validation) is not None

    @property
    def has_test(self) -> bool:
        """Whether test comes as its own file or split (else: `test_fraction` of train, when above 0)."""
        return (self.test_split if self.dataset is not None else self.test) is not None

    @property
    def selection_metric(self) -> str:
        return self.metric or DEFAULT_METRIC[self.kind]


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and decay: fairseq's RoBERTa GLUE recipe."""

    lr: float = 1e-5
    """Peak learning rate (the paper: 1e-5, 2e-5 or 3e-5 by task)."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    """Adam's beta1, beta2."""
    eps: float = 1e-6
    """Adam's epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not on biases and LayerNorm weights)."""
    warmup_ratio: float = 0.06
    """Of the total steps, warm-up from 0 to `lr`; then linear decay to 0."""
    clip_grad_norm: float = 0.0
    """Clip the gradient norm to this (0: no clipping, as fairseq's GLUE recipe)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if not self.eps > 0 or self.weight_decay < 0 or self.clip_grad_norm < 0:
            raise ValueError("optim.eps must be > 0, optim.weight_decay and optim.clip_grad_norm >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)")


@dataclass
class TrainConfig:
    """How the task model trains: batches, epochs, dropout, precision, device."""

    batch_size: int = 32
    """Examples per optimizer step (over all ranks)."""
    eval_batch_size: int = 64
    """Examples per forward when evaluating."""
    epochs: int = 10
    """Passes over the training set; the best epoch on validation is kept."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps in all (null: epochs x steps per epoch)."""
    dropout: Optional[float] = 0.1
    """Hidden, attention and classifier dropout (null: the pretrained model's own)."""
    precision: str = "fp32"
    """fp32 or bf16 (torch: autocast; deepspeed: its bf16 mode; on a GPU)."""
    backend: str = "torch"
    """torch (one process, or DDP under torchrun / srun) or deepspeed (the pretraining engine, ZeRO 0-2)."""
    zero_stage: int = 0
    """DeepSpeed's ZeRO stage (0, 1 or 2; 3 partitions the weights the evaluation reads whole)."""
    device: str = "auto"
    """cpu, cuda or auto (cuda when there is one)."""
    log_every: int = 50
    """Log the training loss every this many steps (and at each epoch's end)."""
    progress_bar: bool = True
    """A tqdm bar per epoch (on rank 0)."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "eval_batch_size", "epochs", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps={self.max_steps} must be >= 1 (or null)")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"train.dropout={self.dropout} must be in [0, 1)")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision={self.precision!r} is not fp32 or bf16")
        if self.backend not in ("torch", "deepspeed"):
            raise ValueError(f"train.backend={self.backend!r} is not torch or deepspeed")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"train.zero_stage={self.zero_stage} is not 0, 1 or 2")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"train.device={self.device!r} is not one of cpu, cuda, auto")


@dataclass
class FinetuneConfig:
    """`python -m finetune task=<name> model=<dir> [seeds=[1,2,3]] [optim.lr=2e-5] ...`"""

    model: str = MISSING
    """A pretraining run dir, a checkpoint (step_* dir, checkpoints/ or latest), or an HF RoBERTa dir."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; null: the HF dir's own, or the run's data.tokenizer."""
    from_scratch: bool = False
    """Random weights in the architecture of `model` (a baseline for what pretraining brings)."""
    output_dir: Optional[str] = None
    """Where results.json and best/ go; null: outputs/finetune/<task.name>."""
    seeds: List[int] = field(default_factory=lambda: [1])
    """One fine-tuning run per seed (head init, dropout, data order); the summary is over them."""
    verify: bool = True
    """Check a checkpoint's sha256 against its checkpoint.json before reading (false: sizes only)."""
    save_best: bool = True
    """Write `<output_dir>/best/`: the best seed's best epoch as an HF directory with the tokenizer."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """What to learn: task=<a file of conf/commands/task/>, and task.* keys (TaskConfig)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """optim.* (OptimConfig): lr, betas, eps, weight_decay, warmup_ratio, clip_grad_norm."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """train.* (TrainConfig): batch_size, epochs, max_steps, dropout, precision, backend, device, ..."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds=[] is empty: give at least one seed, e.g. seeds=[1,2,3]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} repeats a seed")

    @property
    def out_dir(self) -> str:
        return self.output_dir or f"outputs/finetune/{self.task.name}"
