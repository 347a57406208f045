"""Federated evaluation for any number of classes: the envoy's vector, the director's metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from node.training.histograms import (
    MAX_CLASS_CURVES,
    EvaluationError,
    check_vector,
    histogram_vector,
    metrics_from_vector,
    vector_length,
    vector_samples,
)
from node.training.metrics import (
    bin_edges,
    metrics_from_histograms,
    roc_auc,
    score_bins,
    score_histograms,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def scores(n: int, classes: int, seed: int, signal: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that favour the true class (noisily) and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += signal
    return softmax(logits), labels


def test_two_classes_are_the_binary_histograms_unchanged() -> None:
    probs, labels = scores(300, 2, seed=1)
    vector = histogram_vector(probs, labels, 50)
    neg, pos = score_histograms(probs[:, 1], labels, 50)
    assert vector.tolist() == [*neg.tolist(), *pos.tolist()]
    got = metrics_from_vector(vector, 2, 50)
    want = metrics_from_histograms(neg, pos)
    assert {k: got[k] for k in want} == want
    assert got["threshold"] == want["threshold"] and got["num_classes"] == 2


@pytest.mark.parametrize("classes", [3, 5])
def test_per_class_auc_is_the_exact_one_vs_rest_auc_of_the_binned_scores(classes) -> None:
    bins = 64
    probs, labels = scores(400, classes, seed=classes)
    m = metrics_from_vector(histogram_vector(probs, labels, bins), classes, bins)
    edges = bin_edges(bins)
    for c, entry in enumerate(m["per_class"]):
        # The histogram AUC is exact for scores rounded down to their bin's lower edge.
        binned = edges[score_bins(probs[:, c], bins)]
        assert entry["auc"] == pytest.approx(roc_auc(binned, (labels == c).astype(int)), abs=1e-12)
        # ... and within the binning of the raw scores' exact AUC.
        assert entry["auc"] == pytest.approx(
            roc_auc(probs[:, c], (labels == c).astype(int)), abs=0.02
        )
        assert entry["num_positive"] == int(np.sum(labels == c))
    assert m["auc"] == pytest.approx(np.mean([e["auc"] for e in m["per_class"]]))


def test_the_argmax_metrics_come_from_the_confusion_counts() -> None:
    classes, bins = 4, 20
    probs, labels = scores(500, classes, seed=3, signal=1.0)
    m = metrics_from_vector(histogram_vector(probs, labels, bins), classes, bins, list("wxyz"))
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((classes, classes), int)
    np.add.at(confusion, (labels, predicted), 1)
    assert m["confusion"] == confusion.tolist()
    assert m["accuracy"] == pytest.approx(np.mean(predicted == labels))
    recall = [np.mean(predicted[labels == c] == c) for c in range(classes)]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert [e["class"] for e in m["per_class"]] == list("wxyz")
    assert m["threshold"] is None and m["decision_rule"] == "argmax"
    precision = [np.mean(labels[predicted == c] == c) for c in range(classes)]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    assert m["f1"] == pytest.approx(np.mean(f1))
    # The micro-average ROC: every (image, class) pair one decision.
    assert m["num_positive"] == 500 and m["num_negative"] == 1500
    assert len(m["roc_fpr"]) == bins + 1 and m["roc_fpr"][0] == 1.0


def _splits(n: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, n), min_size=0, max_size=4).map(sorted)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 6),
    st.integers(2, 40),
    st.integers(0, 2**31 - 1),
    st.integers(0, 80),
    st.data(),
)
def test_summing_the_envoys_vectors_is_evaluating_all_their_images_at_once(
    classes, bins, seed, n, data
) -> None:
    """What secure aggregation computes (a sum) is exactly the whole federation's histograms."""
    probs, labels = scores(n, classes, seed)
    cuts = data.draw(_splits(n))
    parts = np.split(np.arange(n), cuts)
    total = sum(histogram_vector(probs[p], labels[p], bins) for p in parts)
    whole = histogram_vector(probs, labels, bins)
    assert np.array_equal(total, whole)
    assert whole.size == vector_length(classes, bins) and whole.dtype == np.int64
    assert check_vector(whole, classes, bins) == vector_samples(whole, classes, bins) == n


def test_an_evaluation_is_a_finite_dict_whatever_classes_are_missing() -> None:
    probs, labels = scores(60, 3, seed=0)
    only_two = labels != 2
    m = metrics_from_vector(histogram_vector(probs[only_two], labels[only_two], 10), 3, 10)
    assert np.isnan(m["per_class"][2]["auc"]) and m["per_class"][2]["num_positive"] == 0
    assert np.isfinite(m["auc"]) and np.isfinite(m["balanced_accuracy"])
    empty = metrics_from_vector(np.zeros(vector_length(3, 10), np.int64), 3, 10)
    assert np.isnan(empty["auc"]) and np.isnan(empty["accuracy"])


def test_many_classes_keep_aucs_but_not_every_curve() -> None:
    classes = MAX_CLASS_CURVES + 1
    probs, labels = scores(200, classes, seed=2)
    m = metrics_from_vector(histogram_vector(probs, labels, 10), classes, 10)
    assert all("auc" in e and "roc_fpr" not in e for e in m["per_class"])
    assert "roc_fpr" in m  # the micro-average curve is always there


@pytest.mark.parametrize(
    ("probs", "labels", "words"),
    [
        (np.array([0.2, 0.8]), [1], "N x num_classes"),
        (np.array([[2.0, -1.0]]), [0], "softmax outputs, not logits"),
        (np.array([[0.3, 0.3]]), [0], "must sum to 1"),
        (np.array([[np.nan, 1.0]]), [0], "NaN"),
        (np.array([[0.5, 0.5]]), [2], "class indices 0..1"),
        (np.array([[0.5, 0.5]]), [0.5], "integer class indices"),
        (np.array([[0.5, 0.5]]), [0, 1], "1 rows of probabilities but 2 labels"),
    ],
)
def test_scores_that_are_not_probabilities_and_labels_are_refused(probs, labels, words) -> None:
    with pytest.raises(EvaluationError, match=words):
        histogram_vector(probs, labels, 10)


def test_vectors_that_do_not_fit_are_refused() -> None:
    good = histogram_vector(*scores(30, 3, seed=0), 10)
    with pytest.raises(EvaluationError, match="has 69 entries"):
        check_vector(good[:-1], 3, 10)
    with pytest.raises(EvaluationError, match=">= 0"):
        check_vector(np.where(np.arange(good.size) == 0, -1, good), 3, 10)
    lying = good.copy()
    lying[-1] += 5  # more images in the confusion counts than in the histograms
    with pytest.raises(EvaluationError, match="disagree"):
        check_vector(lying, 3, 10)
    with pytest.raises(EvaluationError, match="disagree"):
        metrics_from_vector(lying, 3, 10)


@given(hnp.arrays(np.int64, st.integers(1, 90), elements=st.integers(-3, 50)))
def test_check_vector_never_crashes_on_a_hostile_vector(vector) -> None:
    try:
        n = check_vector(vector, 3, 10)
    except EvaluationError:
        return
    assert n == vector[-9:].sum()


@pytest.mark.parametrize("classes", [2, 3])
def test_the_metrics_are_plain_values_a_checkpoint_can_hold(classes) -> None:
    import msgspec

    probs, labels = scores(50, classes, seed=4)
    m = metrics_from_vector(histogram_vector(probs, labels, 10), classes, 10)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(m)).keys() == m.keys()
