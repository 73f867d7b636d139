"""A task's data, from files to model inputs and from model outputs to metrics, one class per kind.

    data = load_task_data(task_cfg)                         # read (files or HF datasets), labels, split, check
    task = make_task(task_cfg, data, tokenizer)             # SequenceTask, TokenTask or QATask
    items = task.train_items()                              # encoded training rows with their targets
    batch = task.collate(items[:32])                        # tensors: the model's forward keywords
    metrics = task.evaluate(model, "validation", device, batch_size=64)

The kinds (finetune/config.py KINDS):
  sequence_classification  `<s> a </s>` or `<s> a </s></s> b </s>` -> a label; accuracy, F1, MCC
  multi_label_classification  the same inputs -> a set of labels (a sigmoid each); subset accuracy, micro and
                           macro F1
  sequence_regression      the same inputs -> a number; Pearson, Spearman, MSE
  token_classification     words -> a tag on each word's first sub-token; entity F1 (seqeval), accuracy
  extractive_qa            question + context windows -> an answer span; SQuAD exact match and F1
"""
from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from core.tokenizer import special_ids
from finetune import data as data_io
from finetune import metrics as M
from finetune.config import SEQUENCE_KINDS, TaskConfig
from finetune.encode import Encoded, collate, encode_sequences, encode_words, word_predictions
from finetune.qa import QAFeature, qa_features, qa_predictions

log = logging.getLogger("finetune.tasks")

SPLITS = ("train", "validation", "test")


@dataclass
class TaskData:
    """The examples of each split (plain records, finetune/data.py; a multi-label record's "label" is a list),
    the label names in id order (None for regression and QA) and what reading each file (or dataset split)
    kept and dropped (by file, or `<dataset>:<split>`)."""

    splits: dict[str, list[dict]]
    labels: list[str] | None
    counts: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# reading


def _format(task: TaskConfig, path: str) -> str:
    if task.format is not None:
        return task.format
    return {"token_classification": "conll", "extractive_qa": "squad"}.get(task.kind, "auto")


def _read(task: TaskConfig, path: str) -> tuple[list[dict], dict[str, int]]:
    fmt = _format(task, path)
    if task.kind == "token_classification" or fmt == "conll":
        records, stats = data_io.read_conll(path)
    elif task.kind == "extractive_qa" or fmt == "squad":
        records, stats = data_io.read_squad(path)
    else:
        records, stats = data_io.read_sequence_file(path, task.text_field, task.label_field, task.pair_field,
                                                    fmt=None if fmt == "auto" else fmt,
                                                    column_names=task.column_names)
    counts = stats.as_dict()
    if task.kind in SEQUENCE_KINDS:
        records, dropped = _transform_labels(task, records, path)
        if dropped:
            counts["zero_rating"] = dropped
    return records, counts


def _read_dataset(task: TaskConfig) -> tuple[dict[str, list[dict]], dict[str, Any], list[str] | None]:
    """The splits `task.{train,validation,test}_split` of `task.dataset` (those not null) under their roles
    train / validation / test, the counts by `<dataset>:<split>`, and a ClassLabel's names (or None)."""
    assert task.dataset is not None
    wanted = {role: split for role, split in (("train", task.train_split), ("validation", task.validation_split),
                                              ("test", task.test_split)) if split is not None}
    records, stats, names = data_io.read_dataset(task.dataset, task.dataset_config, list(wanted.values()),
                                                 task.text_field, task.label_field, task.pair_field)
    splits, counts = {}, {}
    for role, split in wanted.items():
        where = f"{task.dataset}:{split}"
        splits[role], dropped = _transform_labels(task, records[split], where)
        counts[where] = stats[split].as_dict()
        if dropped:
            counts[where]["zero_rating"] = dropped
    return splits, counts, names


def _transform_labels(task: TaskConfig, records: list[dict], path: str) -> tuple[list[dict], int]:
    """Regression: labels as floats. `label_transform=sign`: a number's sign as negative / positive.
    Multi-label: each label a list of names (a JSON list, or a `task.label_delimiter`-separated text)."""
    out, dropped = [], 0
    for i, r in enumerate(records):
        label = r["label"]
        if task.kind == "multi_label_classification":
            out.append({**r, "label": data_io.label_list(label, task.label_delimiter, f"{path}: record {i}")})
        elif task.kind == "sequence_regression" or task.label_transform == "sign":
            try:
                value = float(label)
            except (TypeError, ValueError):
                raise data_io.DataError(f"{path}: record {i}: label {label!r} is not a number "
                                        f"(task.{task.label_field})") from None
            if task.kind == "sequence_regression":
                out.append({**r, "label": value})
                continue
            if value == 0:
                dropped += 1
                continue
            out.append({**r, "label": "positive" if value > 0 else "negative"})
        else:
            out.append({**r, "label": str(label)})
    return out, dropped


def _split_text(record: dict) -> str:
    """What the hash split keys on: the text (a pair's both texts, a sentence's words, a question)."""
    if "tokens" in record:
        return " ".join(record["tokens"])
    if "question" in record:
        return record["question"] + "\n" + record["context"]
    return record["text"] + ("\n" + record["pair"] if record.get("pair") else "")


def load_task_data(task: TaskConfig) -> TaskData:
    """Every split of the task: the named files (or the dataset's splits), else deterministic hash splits of
    train; labels checked."""
    names: list[str] | None = None
    if task.dataset is not None:
        given, counts, names = _read_dataset(task)
    else:
        given, counts = {}, {}
        for role in SPLITS:
            path = getattr(task, role)
            if path is not None:
                given[role], counts[path] = _read(task, path)
    train = given.pop("train")
    fractions = {k: f for k, f in (("validation", task.validation_fraction), ("test", task.test_fraction))
                 if k not in given and f > 0}
    splits = data_io.hash_split(train, _split_text, fractions) if fractions else {"train": train}
    splits.update(given)
    for name in SPLITS:
        if name in splits and not splits[name]:
            raise data_io.DataError(f"task {task.name}: the {name} split is empty")
    labels: list[str] | None = None
    if task.kind in ("sequence_classification", "multi_label_classification"):
        labels = list(task.labels) if task.labels is not None else names or data_io.label_set(splits["train"])
        if not labels:
            raise data_io.DataError(f"task {task.name}: no label in the train split (every label set is empty)")
        for name in ("train", "validation", "test"):
            if name in splits:
                data_io.check_labels(splits[name], labels, f"task {task.name} {name} split")
    elif task.kind == "token_classification":
        seen = sorted({t for r in splits["train"] for t in r["tags"]})
        labels = list(task.labels) if task.labels is not None else (["O"] if "O" in seen else []) + \
            [t for t in seen if t != "O"]
        for name in ("validation", "test"):
            for i, r in enumerate(splits.get(name, [])):
                unknown = [t for t in r["tags"] if t not in labels]
                if unknown:
                    raise data_io.DataError(f"task {task.name} {name} split: sentence {i} has tag {unknown[0]!r}, "
                                            f"not in the training tags {labels}")
    return TaskData(splits=splits, labels=labels, counts=counts)


# ---------------------------------------------------------------------------------------------------
# the kinds


@dataclass
class Item:
    """One training row: its ids and its target (a label id, a number, per-token ids, or (start, end))."""

    input_ids: list[int]
    target: Any


class Task:
    """What every kind provides to the loop (finetune/train.py). A split is encoded once (`encoded`), on
    first use, and kept: every epoch's evaluation reads the same rows."""

    def __init__(self, cfg: TaskConfig, data: TaskData, tokenizer: Tokenizer):
        self.cfg, self.data, self.tokenizer = cfg, data, tokenizer
        self.pad_id = special_ids(tokenizer)["pad"]
        self.truncated: dict[str, int] = {}
        self._encoded: dict[str, Any] = {}

    def encoded(self, split: str) -> Any:
        """The model inputs of `split` (the kind's `_encode`), computed once."""
        if split not in self._encoded:
            self._encoded[split] = self._encode(split)
        return self._encoded[split]

    def _encode(self, split: str) -> Any:
        raise NotImplementedError

    @property
    def num_labels(self) -> int:
        return len(self.data.labels or [None])

    def train_items(self) -> list[Item]:
        raise NotImplementedError

    def collate(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        batch = collate([it.input_ids for it in items], self.pad_id, [it.target for it in items])
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}

    def evaluate(self, model: nn.Module, split: str, device: torch.device, batch_size: int,
                 autocast: Callable[[], Any]) -> dict[str, float]:
        raise NotImplementedError

    def baselines(self, split: str) -> dict[str, float]:
        """What a trivial answer scores on `split` (e.g. the majority class), by name; {} for none."""
        return {}

    def _forward_all(self, model: nn.Module, rows: Sequence[list[int]], device: torch.device, batch_size: int,
                     autocast: Callable[[], Any]) -> Iterator[tuple[Any, torch.Tensor]]:
        """(the model's output, attention mask) for `rows` in batches, in order, without gradients."""
        model.eval()
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = collate(rows[start:start + batch_size], self.pad_id)
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                with autocast():
                    out = model(ids, attention_mask=mask)
                yield out, mask


class SequenceTask(Task):
    """A label (or a number, or a set of labels) per text or text pair, from the `<s>` token (HF's
    classification head; multi-label: a sigmoid per label, a label predicted when its logit is above 0)."""

    @property
    def multi_label(self) -> bool:
        return self.cfg.kind == "multi_label_classification"

    def _encode(self, split: str) -> list[list[int]]:
        records = self.data.splits[split]
        pairs = [r["pair"] for r in records] if self.cfg.pair_field else None
        rows, stats = encode_sequences(self.tokenizer, [r["text"] for r in records], pairs, self.cfg.max_length)
        if stats.truncated:
            self.truncated[split] = stats.truncated
            log.info("%s: %d of %d texts truncated to task.max_length=%d", split, stats.truncated, len(rows),
                     self.cfg.max_length)
        return rows

    def _targets(self, split: str) -> list[Any]:
        """A number (regression), a label id, or a 0/1 float per label (multi-label) for each record."""
        records = self.data.splits[split]
        if self.cfg.kind == "sequence_regression":
            return [float(r["label"]) for r in records]
        index = {name: i for i, name in enumerate(self.data.labels or [])}
        if self.multi_label:
            rows = []
            for r in records:
                row = [0.0] * self.num_labels
                for name in r["label"]:
                    row[index[name]] = 1.0
                rows.append(row)
            return rows
        return [index[str(r["label"])] for r in records]

    def train_items(self) -> list[Item]:
        return [Item(ids, t) for ids, t in zip(self.encoded("train"), self._targets("train"))]

    def baselines(self, split: str) -> dict[str, float]:
        """Classification: the accuracy of always answering the most frequent training label. Multi-label: the
        subset accuracy and micro F1 of always answering the most frequent training label set (the first
        seen of equals). Regression: none."""
        if self.cfg.kind == "sequence_regression":
            return {}
        if self.multi_label:
            sets = collections.Counter(tuple(row) for row in self._targets("train"))
            top = [int(x) for x in sets.most_common(1)[0][0]]
            truth = [[int(x) for x in row] for row in self._targets(split)]
            scores = M.multilabel_metrics(truth, [top] * len(truth))
            return {"majority_accuracy": scores["accuracy"], "majority_f1": scores["f1"]}
        train = np.bincount(self._targets("train"), minlength=self.num_labels)
        return {"majority_accuracy": float(np.mean(np.asarray(self._targets(split)) == int(train.argmax())))}

    def predictions(self, model: nn.Module, split: str, device: torch.device, batch_size: int,
                    autocast: Callable[[], Any]) -> np.ndarray:
        logits = [out.logits.float().cpu() for out, _ in
                  self._forward_all(model, self.encoded(split), device, batch_size, autocast)]
        return torch.cat(logits).numpy()

    def evaluate(self, model, split, device, batch_size, autocast) -> dict[str, float]:
        logits = self.predictions(model, split, device, batch_size, autocast)
        targets = self._targets(split)
        if self.cfg.kind == "sequence_regression":
            return M.regression_metrics(targets, logits[:, 0].tolist())
        if self.multi_label:  # sigmoid(logit) > 0.5, i.e. logit > 0
            truth = [[int(x) for x in row] for row in targets]
            return M.multilabel_metrics(truth, (logits > 0).astype(int).tolist())
        return M.classification_metrics(targets, logits.argmax(-1).tolist(), self.num_labels)


class TokenTask(Task):
    """A tag per word, predicted at the word's first sub-token (HF's run_ner alignment)."""

    def _encode(self, split: str) -> list[Encoded]:
        records = self.data.splits[split]
        index = {name: i for i, name in enumerate(self.data.labels or [])}
        tags = [[index[t] for t in r["tags"]] for r in records]
        encoded, stats = encode_words(self.tokenizer, [r["tokens"] for r in records], tags, self.cfg.max_length)
        if stats.truncated:
            self.truncated[split] = stats.truncated
            log.info("%s: %d of %d sentences truncated to task.max_length=%d (their cut words count as O)",
                     split, stats.truncated, len(records), self.cfg.max_length)
        return encoded

    def train_items(self) -> list[Item]:
        return [Item(e.input_ids, e.labels) for e in self.encoded("train")]

    def baselines(self, split: str) -> dict[str, float]:
        """Token accuracy of tagging every word with the most frequent training tag (O, in NER)."""
        counts: dict[str, int] = {}
        for r in self.data.splits["train"]:
            for t in r["tags"]:
                counts[t] = counts.get(t, 0) + 1
        top = max(counts, key=lambda t: counts[t])
        tags = [t for r in self.data.splits[split] for t in r["tags"]]
        return {"majority_accuracy": sum(t == top for t in tags) / len(tags)}

    def evaluate(self, model, split, device, batch_size, autocast) -> dict[str, float]:
        encoded = self.encoded(split)
        names = self.data.labels or []
        pred_tags = []
        outputs = self._forward_all(model, [e.input_ids for e in encoded], device, batch_size, autocast)
        i = 0
        for out, _ in outputs:
            for row in out.logits.float().argmax(-1).cpu().tolist():
                e = encoded[i]
                words = len(self.data.splits[split][i]["tokens"])
                per_word = word_predictions(row[:len(e.input_ids)], e.word_ids, words)
                pred_tags.append([names[p] if p is not None else "O" for p in per_word])
                i += 1
        true_tags = [r["tags"] for r in self.data.splits[split]]
        return M.token_metrics(true_tags, pred_tags)


class QATask(Task):
    """An answer span per question, over windows of a long context (HF's run_qa pre/post-processing)."""

    @property
    def num_labels(self) -> int:
        return 2

    def _encode(self, split: str) -> list[QAFeature]:
        c = self.cfg
        return qa_features(self.tokenizer, self.data.splits[split], max_length=c.max_length, stride=c.stride,
                           max_question_length=c.max_question_length)

    def train_items(self) -> list[Item]:
        return [Item(f.input_ids, (f.start_position, f.end_position)) for f in self.encoded("train")]

    def collate(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        batch = collate([it.input_ids for it in items], self.pad_id)
        targets = torch.tensor([it.target for it in items], dtype=torch.long)
        return {**batch, "start_positions": targets[:, 0], "end_positions": targets[:, 1]}

    def evaluate(self, model, split, device, batch_size, autocast) -> dict[str, float]:
        features = self.encoded(split)
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        for out, mask in self._forward_all(model, [f.input_ids for f in features], device, batch_size, autocast):
            lengths = mask.sum(-1).tolist()
            for s, e, n in zip(out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy(), lengths):
                starts.append(s[:n])
                ends.append(e[:n])
        examples = self.data.splits[split]
        c = self.cfg
        predicted = qa_predictions(examples, features, starts, ends, n_best=c.n_best,
                                   max_answer_length=c.max_answer_length, version_2=c.version_2)
        references = {ex["id"]: list(ex["answers"]["text"]) for ex in examples}
        return M.qa_metrics(predicted, references)


def make_task(cfg: TaskConfig, data: TaskData, tokenizer: Tokenizer) -> Task:
    cls = {"sequence_classification": SequenceTask, "multi_label_classification": SequenceTask,
           "sequence_regression": SequenceTask,
           "token_classification": TokenTask, "extractive_qa": QATask}[cfg.kind]
    return cls(cfg, data, tokenizer)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """median, mean, std (population, 0 for one seed), min and max over seeds."""
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "mean": float(a.mean()), "std": float(a.std()),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return not math.isnan(new)
    return new > old if M.HIGHER_IS_BETTER.get(metric, True) else new < old
