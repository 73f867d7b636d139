"""finetune.metrics: each task kind's metrics against scikit-learn, scipy and seqeval called directly, and
against values worked out by hand in the comments (confusion matrices, entity counts, SQuAD token overlap)."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import scipy.stats
import seqeval.metrics
import seqeval.scheme
import sklearn.metrics

from finetune.metrics import (
    HIGHER_IS_BETTER,
    METRICS,
    classification_metrics,
    multilabel_metrics,
    normalize_answer,
    qa_metrics,
    regression_metrics,
    token_metrics,
)


def _plain_floats(result: dict[str, float]) -> bool:
    json.dumps(result)
    return all(type(value) is float for value in result.values())


# ---------------------------------------------------------------- classification

def test_binary_classification_by_hand_and_against_sklearn():
    labels = [1, 1, 0, 0, 0, 0]
    preds = [1, 0, 0, 0, 0, 1]
    # class 1: TP=1 FN=1 FP=1 TN=3 -> F1 = 2/(2+1+1) = 0.5 (class 0's F1 is 0.75, so macro would be 0.625)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (3 - 1) / sqrt(2*2*4*4) = 0.25
    result = classification_metrics(labels, preds, num_labels=2)
    assert result == pytest.approx({"accuracy": 4 / 6, "f1": 0.5, "mcc": 0.25})
    assert result == pytest.approx({
        "accuracy": sklearn.metrics.accuracy_score(labels, preds),
        "f1": sklearn.metrics.f1_score(labels, preds),
        "mcc": sklearn.metrics.matthews_corrcoef(labels, preds),
    })
    assert tuple(result) == METRICS["sequence_classification"] and _plain_floats(result)


def test_multiclass_classification_is_macro_f1():
    labels = [0, 1, 2, 2]
    preds = [0, 2, 2, 2]
    # per-class F1: class 0 = 1, class 1 = 0, class 2 (TP=2 FP=1) = 0.8 -> macro 0.6
    # MCC (multiclass): c=3 correct of s=4, true counts t=[1,1,2], predicted p=[1,0,3]:
    #   (c*s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)) = (12 - 7) / sqrt((16 - 10)(16 - 6)) = 5 / sqrt(60)
    result = classification_metrics(labels, preds, num_labels=3)
    assert result == pytest.approx({"accuracy": 0.75, "f1": 0.6, "mcc": 5 / math.sqrt(60)})
    assert result["f1"] == pytest.approx(sklearn.metrics.f1_score(labels, preds, average="macro"))
    assert result["mcc"] == pytest.approx(sklearn.metrics.matthews_corrcoef(labels, preds))
    assert _plain_floats(result)


def test_classification_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        classification_metrics([0, 1], [0, 2], num_labels=2)
    with pytest.raises(ValueError, match="num_labels"):
        classification_metrics([0, 0], [0, 0], num_labels=1)
    with pytest.raises(ValueError, match="length"):
        classification_metrics([0, 1, 1], [0, 1], num_labels=2)


# ---------------------------------------------------------------- multi-label

def test_multilabel_subset_accuracy_micro_and_macro_f1():
    labels = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    preds = [[1, 0, 1], [0, 1, 1], [1, 0, 0]]
    # only row 0 matches exactly -> subset accuracy 1/3; over all cells TP=4 FP=1 FN=1 -> micro F1 8/10;
    # per label: col 0 TP=2 -> F1 1, col 1 TP=1 FN=1 -> 2/3, col 2 TP=1 FP=1 -> 2/3 -> macro F1 7/9
    result = multilabel_metrics(labels, preds)
    assert result == pytest.approx({"accuracy": 1 / 3, "f1": 0.8, "macro_f1": 7 / 9})
    assert result == pytest.approx({
        "accuracy": sklearn.metrics.accuracy_score(labels, preds),
        "f1": sklearn.metrics.f1_score(labels, preds, average="micro"),
        "macro_f1": sklearn.metrics.f1_score(labels, preds, average="macro"),
    })
    # a label never true nor predicted scores 0 in the macro mean (zero_division=0), not a warning or NaN
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse = multilabel_metrics([[1, 0], [1, 0]], [[1, 0], [0, 0]])
    assert sparse == pytest.approx({"accuracy": 0.5, "f1": 2 / 3, "macro_f1": 1 / 3})
    assert tuple(result) == METRICS["multi_label_classification"] and _plain_floats(result)
    with pytest.raises(ValueError, match="0 and 1"):
        multilabel_metrics([[0, 2]], [[0, 1]])
    with pytest.raises(ValueError, match="shape"):
        multilabel_metrics([[0, 1]], [[0, 1, 1]])


# ---------------------------------------------------------------- regression

def test_regression_by_hand_and_against_scipy():
    labels = [1.0, 2.0, 3.0, 4.0]
    preds = [1.0, 2.0, 3.0, 10.0]
    # monotonic, so spearman = 1; pearson: deviations [-1.5,-.5,.5,1.5] and [-3,-2,-1,6],
    # covariance sum 14, variance sums 5 and 50 -> 14/sqrt(250); mse = 6^2/4 = 9
    result = regression_metrics(labels, preds)
    assert result == pytest.approx({"pearson": 14 / math.sqrt(250), "spearman": 1.0, "mse": 9.0})
    assert result == pytest.approx({
        "pearson": scipy.stats.pearsonr(labels, preds).statistic,
        "spearman": scipy.stats.spearmanr(labels, preds).statistic,
        "mse": sklearn.metrics.mean_squared_error(labels, preds),
    })
    assert tuple(result) == METRICS["sequence_regression"] and _plain_floats(result)


def test_regression_constant_vector_gives_zero_correlation_not_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning would fail the test
        constant_preds = regression_metrics([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
        constant_labels = regression_metrics([5.0, 5.0], [1.0, 3.0])
    assert constant_preds == pytest.approx({"pearson": 0.0, "spearman": 0.0, "mse": 2 / 3})
    assert constant_labels == pytest.approx({"pearson": 0.0, "spearman": 0.0, "mse": 10.0})
    assert _plain_floats(constant_preds) and json.dumps(constant_labels)
    with pytest.raises(ValueError, match="finite"):
        regression_metrics([1.0, 2.0], [1.0, float("nan")])


# ---------------------------------------------------------------- token classification

def test_token_one_of_two_entities_wrong_gives_half():
    true_tags = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred_tags = [["B-PER", "I-PER", "O", "B-ORG"]]
    # gold {PER 0-1, LOC 3}, predicted {PER 0-1, ORG 3}: 1 of 2 right either way -> P = R = F1 = 0.5
    result = token_metrics(true_tags, pred_tags)
    assert result == pytest.approx({"f1": 0.5, "precision": 0.5, "recall": 0.5, "accuracy": 0.75})
    assert tuple(result) == METRICS["token_classification"] and _plain_floats(result)


def test_token_metrics_against_seqeval_over_sentences():
    true_tags = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-MISC"]]
    pred_tags = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "O"]]
    # 3 gold entities, 2 predicted, 1 right: P = 1/2, R = 1/3, F1 = 2PR/(P+R) = 0.4; tokens 4 of 6 right
    result = token_metrics(true_tags, pred_tags)
    assert result == pytest.approx({"f1": 0.4, "precision": 0.5, "recall": 1 / 3, "accuracy": 4 / 6})
    assert result == pytest.approx({
        "f1": seqeval.metrics.f1_score(true_tags, pred_tags),
        "precision": seqeval.metrics.precision_score(true_tags, pred_tags),
        "recall": seqeval.metrics.recall_score(true_tags, pred_tags),
        "accuracy": seqeval.metrics.accuracy_score(true_tags, pred_tags),
    })


def test_token_metrics_use_conlleval_mode_not_strict():
    # conlleval reads a leading I-PER as the start of a PER entity; strict IOB2 drops it as invalid
    true_tags = [["I-PER", "I-PER", "O"]]
    pred_tags = [["B-PER", "I-PER", "O"]]
    assert token_metrics(true_tags, pred_tags)["f1"] == 1.0
    strict = seqeval.metrics.f1_score(true_tags, pred_tags, mode="strict", scheme=seqeval.scheme.IOB2,
                                      zero_division=0)
    assert strict == 0.0


def test_token_metrics_length_mismatch_names_the_sentence():
    with pytest.raises(ValueError, match="sentence 1"):
        token_metrics([["O"], ["B-PER", "O"]], [["O"], ["B-PER"]])
    with pytest.raises(ValueError, match="number of sentences"):
        token_metrics([["O"], ["O"]], [["O"]])


# ---------------------------------------------------------------- extractive QA

@pytest.mark.parametrize("text, expected", [
    ("The  Cat!", "cat"),
    ("An apple, a day.", "apple day"),
    ("theatre Anthem", "theatre anthem"),  # articles only as whole words
    ("  Hello\tWorld\n", "hello world"),
    ("it's 3.5%", "its 35"),
    ("A", ""),
])
def test_normalize_answer_as_the_squad_script(text, expected):
    assert normalize_answer(text) == expected


def test_qa_token_overlap_f1_and_max_over_gold_answers():
    # "a cat" -> [cat], "the big cat" -> [big, cat]: overlap 1, P = 1, R = 1/2, F1 = 2/3
    result = qa_metrics({"q1": "a cat"}, {"q1": ["the big cat"]})
    assert result == pytest.approx({"exact_match": 0.0, "f1": 200 / 3})
    assert tuple(result) == METRICS["extractive_qa"] and _plain_floats(result)
    # the best of the gold answers counts: "Cat." normalises to "cat", an exact match
    assert qa_metrics({"q1": "a cat"}, {"q1": ["the big cat", "Cat."]}) == {"exact_match": 100.0, "f1": 100.0}
    # averaged over questions: (1 + 0) / 2 exact, (1 + 2/3) / 2 F1
    both = qa_metrics({"q1": "The cat", "q2": "a cat"}, {"q1": ["cat"], "q2": ["big cat"]})
    assert both == pytest.approx({"exact_match": 50.0, "f1": 100 * (1 + 2 / 3) / 2})


def test_qa_v2_unanswerable_questions_and_breakdown():
    references = {"q1": ["the big cat"], "q2": [], "q3": []}
    predictions = {"q1": "a cat", "q2": "", "q3": "dog", "extra": "ignored"}
    # q1: EM 0, F1 2/3; q2 (no answer, predicted none): 1, 1; q3 (no answer, predicted "dog"): 0, 0
    result = qa_metrics(predictions, references)
    assert result == pytest.approx({
        "exact_match": 100 / 3, "f1": 100 * (2 / 3 + 1) / 3,
        "has_answer_f1": 200 / 3, "has_answer_total": 1.0,
        "no_answer_f1": 50.0, "no_answer_total": 2.0,
    })
    assert _plain_floats(result)
    # gold answers that normalise to "" are dropped, as in the v2 script: "The" leaves gold [""] ...
    assert qa_metrics({"q": ""}, {"q": ["The"]}) == {"exact_match": 100.0, "f1": 100.0}
    # ... and beside a real answer it does not let the empty prediction score
    assert qa_metrics({"q": ""}, {"q": ["The", "cat"]}) == {"exact_match": 0.0, "f1": 0.0}
    only_unanswerable = qa_metrics({"q": "x"}, {"q": []})
    assert only_unanswerable == {"exact_match": 0.0, "f1": 0.0, "no_answer_f1": 0.0, "no_answer_total": 1.0}


def test_qa_missing_prediction_names_the_id():
    with pytest.raises(ValueError, match="'q2'"):
        qa_metrics({"q1": "cat"}, {"q1": ["cat"], "q2": ["dog"]})


# ---------------------------------------------------------------- tables

def test_metric_tables():
    assert METRICS == {
        "sequence_classification": ("accuracy", "f1", "mcc"),
        "multi_label_classification": ("accuracy", "f1", "macro_f1"),
        "sequence_regression": ("pearson", "spearman", "mse"),
        "token_classification": ("f1", "precision", "recall", "accuracy"),
        "extractive_qa": ("exact_match", "f1"),
    }
    assert set(HIGHER_IS_BETTER) == {name for names in METRICS.values() for name in names}
    assert HIGHER_IS_BETTER["mse"] is False
    assert all(HIGHER_IS_BETTER[name] for name in HIGHER_IS_BETTER if name != "mse")
