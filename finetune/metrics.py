"""Downstream evaluation metrics, one function per task kind, each returning plain floats (JSON-ready).

    classification_metrics(labels, preds, num_labels)  accuracy, f1 (binary of class 1, or macro), mcc
    multilabel_metrics(labels, preds)                   subset accuracy, micro and macro f1 (0/1 indicator rows)
    regression_metrics(labels, preds)                   pearson, spearman, mse
    token_metrics(true_tags, pred_tags)                 entity f1/precision/recall (seqeval), token accuracy
    qa_metrics(predictions, references)                 SQuAD v1.1/v2.0 exact_match and f1, in percent

`METRICS` names what each task kind reports and `HIGHER_IS_BETTER` which way each metric improves, for
picking the best checkpoint. The numbers come from scikit-learn, scipy.stats and seqeval; only the SQuAD
scoring, which no installed library provides offline, follows the official evaluation script
(https://rajpurkar.github.io/SQuAD-explorer/, `evaluate-v2.0.py`) line for line.
"""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats
import seqeval.metrics
import sklearn.metrics

METRICS: dict[str, tuple[str, ...]] = {
    "sequence_classification": ("accuracy", "f1", "mcc"),
    "multi_label_classification": ("accuracy", "f1", "macro_f1"),
    "sequence_regression": ("pearson", "spearman", "mse"),
    "token_classification": ("f1", "precision", "recall", "accuracy"),
    "extractive_qa": ("exact_match", "f1"),
}
"""Task kind -> the metric names its metrics function reports (in that order)."""

HIGHER_IS_BETTER: dict[str, bool] = {
    name: name != "mse" for names in METRICS.values() for name in names
}
"""Metric name -> whether a larger value is better (False only for mse)."""


def _check_same_length(labels: Sequence, preds: Sequence) -> None:
    if len(labels) != len(preds):
        raise ValueError(f"labels and preds differ in length: {len(labels)} != {len(preds)}")
    if len(labels) == 0:
        raise ValueError("no examples to score: labels and preds are empty")


def classification_metrics(labels: Sequence[int], preds: Sequence[int], num_labels: int) -> dict[str, float]:
    """Single-label classification: {"accuracy", "f1", "mcc"}.

    `f1` is the binary F1 of class 1 when `num_labels == 2` (GLUE's MRPC/QQP convention), otherwise the
    macro F1 over the classes present in `labels` or `preds` (scikit-learn's default). `mcc` is the
    Matthews correlation (0.0 where undefined). Labels and predictions must lie in [0, num_labels).
    """
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2 for classification, got {num_labels}")
    _check_same_length(labels, preds)
    y_true = np.asarray(labels, dtype=np.int64)
    y_pred = np.asarray(preds, dtype=np.int64)
    for name, values in (("labels", y_true), ("preds", y_pred)):
        if values.ndim != 1:
            raise ValueError(f"{name} must be a flat sequence of class ids, got shape {values.shape}")
        if values.min() < 0 or values.max() >= num_labels:
            raise ValueError(f"{name} must lie in [0, {num_labels}), got {values.min()}..{values.max()}")
    if num_labels == 2:
        f1 = sklearn.metrics.f1_score(y_true, y_pred, average="binary", pos_label=1, zero_division=0.0)
    else:
        f1 = sklearn.metrics.f1_score(y_true, y_pred, average="macro", zero_division=0.0)
    return {
        "accuracy": float(sklearn.metrics.accuracy_score(y_true, y_pred)),
        "f1": float(f1),
        "mcc": float(sklearn.metrics.matthews_corrcoef(y_true, y_pred)),
    }


def multilabel_metrics(labels: Sequence[Sequence[int]], preds: Sequence[Sequence[int]]) -> dict[str, float]:
    """Multi-label classification over 0/1 indicator rows (one row per example, one column per label):
    {"accuracy": subset accuracy (a row counts only if every label matches), "f1": micro F1 (over every
    cell), "macro_f1": the mean of the labels' F1 (a label never true nor predicted counts 0, scikit-learn's
    zero_division=0)}.
    """
    _check_same_length(labels, preds)
    y_true = np.asarray(labels, dtype=np.int64)
    y_pred = np.asarray(preds, dtype=np.int64)
    if y_true.ndim != 2 or y_true.shape != y_pred.shape:
        raise ValueError(f"labels and preds must be indicator matrices of one shape, got "
                         f"{y_true.shape} and {y_pred.shape}")
    for name, values in (("labels", y_true), ("preds", y_pred)):
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0 and 1")
    return {
        "accuracy": float(sklearn.metrics.accuracy_score(y_true, y_pred)),
        "f1": float(sklearn.metrics.f1_score(y_true, y_pred, average="micro", zero_division=0.0)),
        "macro_f1": float(sklearn.metrics.f1_score(y_true, y_pred, average="macro", zero_division=0.0)),
    }


def regression_metrics(labels: Sequence[float], preds: Sequence[float]) -> dict[str, float]:
    """Regression (e.g. STS-B): {"pearson", "spearman", "mse"}.

    A correlation is undefined when either vector is constant (scipy returns NaN and warns); here a
    constant prediction or label vector gives pearson and spearman 0.0 instead, so a collapsed model
    scores as uncorrelated and the result stays valid JSON. Non-finite values are a ValueError.
    """
    _check_same_length(labels, preds)
    y_true = np.asarray(labels, dtype=np.float64)
    y_pred = np.asarray(preds, dtype=np.float64)
    if y_true.ndim != 1 or y_pred.ndim != 1:
        raise ValueError(f"labels and preds must be flat, got shapes {y_true.shape} and {y_pred.shape}")
    if not (np.isfinite(y_true).all() and np.isfinite(y_pred).all()):
        raise ValueError("labels and preds must be finite (no NaN or inf)")
    constant = bool((y_true == y_true[0]).all() or (y_pred == y_pred[0]).all())
    pearson = 0.0 if constant else float(scipy.stats.pearsonr(y_true, y_pred).statistic)
    spearman = 0.0 if constant else float(scipy.stats.spearmanr(y_true, y_pred).statistic)
    return {
        "pearson": pearson,
        "spearman": spearman,
        "mse": float(sklearn.metrics.mean_squared_error(y_true, y_pred)),
    }


def token_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Token classification (NER) on IOB2 tags ("B-PER", "I-PER", "O"), one tag list per sentence.

    Entity-level micro {"f1", "precision", "recall"} from seqeval in its default conlleval-compatible
    mode (as Hugging Face's `run_ner.py`), plus "accuracy": the share of tokens whose tag is right. The
    number of sentences, and each sentence's length, must match (a ValueError names the sentence index).
    """
    if len(true_tags) != len(pred_tags):
        raise ValueError(f"true_tags and pred_tags differ in number of sentences: "
                         f"{len(true_tags)} != {len(pred_tags)}")
    y_true = [list(sentence) for sentence in true_tags]
    y_pred = [list(sentence) for sentence in pred_tags]
    for index, (gold, pred) in enumerate(zip(y_true, y_pred)):
        if len(gold) != len(pred):
            raise ValueError(f"sentence {index}: {len(gold)} true tags but {len(pred)} predicted tags")
    if not any(y_true):
        raise ValueError("no tokens to score: every sentence is empty")
    return {
        "f1": float(seqeval.metrics.f1_score(y_true, y_pred, zero_division=0)),
        "precision": float(seqeval.metrics.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(seqeval.metrics.recall_score(y_true, y_pred, zero_division=0)),
        "accuracy": float(seqeval.metrics.accuracy_score(y_true, y_pred)),
    }


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1/v2.0 evaluation script's answer normalisation: lower case, remove
    punctuation, remove the articles a/an/the, and collapse white space ("The  Cat!" -> "cat")."""
    text = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _exact(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def _f1(gold: str, pred: str) -> float:
    """The SQuAD script's token-overlap F1 of one gold answer and one prediction."""
    gold_tokens = normalize_answer(gold).split()
    pred_tokens = normalize_answer(pred).split()
    if not gold_tokens or not pred_tokens:  # either is no-answer: 1 if both are, else 0
        return float(gold_tokens == pred_tokens)
    same = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Extractive QA (SQuAD v1.1/v2.0): {"exact_match", "f1"} in percent (0..100), as the official script.

    `predictions` maps a question id to the predicted answer text ("" for no answer), `references` maps
    each question id to its gold answer texts. A question scores the max over its gold answers; gold
    answers that normalise to "" are dropped and a question left with none (an unanswerable SQuAD v2
    question) has gold [""], so only the empty prediction scores. When any question has no gold answers,
    the v2 script's breakdown is added: "no_answer_f1"/"no_answer_total" and, when answerable questions
    are present too, "has_answer_f1"/"has_answer_total" (f1 in percent, totals as counts). Every id of
    `references` needs a prediction (a ValueError names a missing one); extra predictions are ignored.
    """
    if not references:
        raise ValueError("no references to score")
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    has_answer: dict[str, bool] = {}
    for qid, answers in references.items():
        if qid not in predictions:
            raise ValueError(f"missing prediction for question id {qid!r}")
        if isinstance(answers, str):
            raise ValueError(f"references[{qid!r}] must be a sequence of answer texts, not a string")
        has_answer[qid] = bool(answers)
        gold = [answer for answer in answers if normalize_answer(answer)] or [""]
        pred = predictions[qid]
        exact[qid] = max(_exact(answer, pred) for answer in gold)
        f1[qid] = max(_f1(answer, pred) for answer in gold)
    result = {
        "exact_match": 100.0 * sum(exact.values()) / len(exact),
        "f1": 100.0 * sum(f1.values()) / len(f1),
    }
    if not all(has_answer.values()):
        for prefix, wanted in (("has_answer", True), ("no_answer", False)):
            qids = [qid for qid, answerable in has_answer.items() if answerable == wanted]
            if qids:
                result[f"{prefix}_f1"] = 100.0 * sum(f1[qid] for qid in qids) / len(qids)
                result[f"{prefix}_total"] = float(len(qids))
    return result
