"""Metrics against brute force: pairwise AUC, every threshold, hand-counted confusions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from node.training.metrics import (
    bin_edges,
    binary_metrics,
    metrics_from_histograms,
    roc_auc,
    score_bins,
    score_histograms,
)


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = scores[labels == 1][:, None]
    neg = scores[labels == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


# Scores drawn to hit bin edges, ties and the ends exactly, not just generic floats.
score_values = st.one_of(
    st.floats(0.0, 1.0),
    st.integers(0, 100).map(lambda k: k / 100),
    st.sampled_from(bin_edges(100).tolist() + bin_edges(7).tolist()),
    st.sampled_from([0.0, 1.0, 0.5, 0.29, 0.57, 0.999999]),
)


@st.composite
def scored_labels(draw, min_size=2):
    n = draw(st.integers(min_size, 120))
    scores = np.array(draw(st.lists(score_values, min_size=n, max_size=n)), dtype=np.float64)
    labels = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.int64)
    return scores, labels


@settings(max_examples=200, deadline=None)
@given(scored_labels())
def test_exact_auc_equals_pairwise(data) -> None:
    scores, labels = data
    if labels.min() == labels.max():
        assert np.isnan(roc_auc(scores, labels))
        return
    assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(scored_labels(), st.sampled_from([2, 7, 10, 100]))
def test_histogram_auc_equals_pairwise_auc_of_binned_scores(data, bins: int) -> None:
    scores, labels = data
    neg, pos = score_histograms(scores, labels, bins)
    assert neg.sum() + pos.sum() == scores.size
    assert neg.sum() == np.sum(labels == 0)
    out = metrics_from_histograms(neg, pos)
    if labels.min() == labels.max():
        assert np.isnan(out["auc"])
        return
    binned = bin_edges(bins)[score_bins(scores, bins)]
    assert out["auc"] == pytest.approx(_pairwise_auc(binned, labels), abs=1e-12)
    # ... and the ROC's trapezoid area is the same number
    fpr, tpr = np.array(out["roc_fpr"]), np.array(out["roc_tpr"])
    trapezoid = float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2))
    assert out["auc"] == pytest.approx(trapezoid, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(scored_labels())
def test_chosen_threshold_maximises_youden_and_means_the_same_on_raw_scores(data) -> None:
    scores, labels = data
    if labels.min() == labels.max():
        return
    out = metrics_from_histograms(*score_histograms(scores, labels, 100))
    thresholds = [*bin_edges(100)[:-1], 1.01]  # 1.01: nobody is called positive
    best = max(binary_metrics(scores, labels, t)["balanced_accuracy"] for t in thresholds)
    raw = binary_metrics(scores, labels, out["threshold"])
    assert raw["balanced_accuracy"] == pytest.approx(best, abs=1e-12)
    for key in ("accuracy", "sensitivity", "specificity", "f1"):
        assert raw[key] == pytest.approx(out[key], abs=1e-12), key
    assert raw["confusion"] == out["confusion"]


def test_bin_edges_are_logit_spaced_and_cover_zero_to_one() -> None:
    edges = bin_edges(100)
    assert edges.size == 101 and edges[0] == 0.0 and edges[-1] == 1.0
    assert np.all(np.diff(edges) > 0)
    assert edges[50] == pytest.approx(0.5)
    logits = np.log(edges[1:-1] / (1 - edges[1:-1]))
    assert np.allclose(np.diff(logits), 20 / 98)
    assert bin_edges(2).tolist() == [0.0, 0.5, 1.0]
    # saturated scores stay apart: 0.991 and 0.9999 fall in different bins
    assert score_bins(np.array([0.991]))[0] < score_bins(np.array([0.9999]))[0]


def test_known_confusion_values() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.6])
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    m = binary_metrics(scores, labels, 0.5)
    # predicted positive: 0.8, 0.7, 0.9, 0.6 -> tp 3, fp 1; fn 1 (0.35); tn 3
    assert m["confusion"] == [[3, 1], [1, 3]]
    assert m["accuracy"] == 0.75
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.75
    assert m["f1"] == pytest.approx(0.75)
    # pairs (pos > neg): 0.35 beats 0.1, 0.2 (2); 0.8, 0.7, 0.9 beat all 4 (12) -> 14 / 16
    assert m["auc"] == pytest.approx(14 / 16)


def test_perfect_and_inverted_separation() -> None:
    labels = np.array([0] * 5 + [1] * 5)
    scores = np.linspace(0.05, 0.95, 10)
    assert roc_auc(scores, labels) == 1.0
    assert roc_auc(1 - scores, labels) == 0.0
    out = metrics_from_histograms(*score_histograms(scores, labels))
    assert out["auc"] == 1.0 and out["accuracy"] == 1.0 and out["youden"] == 1.0


def test_histograms_sum_across_envoys() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(300)
    labels = (rng.random(300) < scores).astype(int)
    whole = score_histograms(scores, labels)
    parts = [score_histograms(scores[i::3], labels[i::3]) for i in range(3)]
    assert np.array_equal(sum(p[0] for p in parts), whole[0])
    assert np.array_equal(sum(p[1] for p in parts), whole[1])


@given(hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(1.0001, 5.0)))
def test_out_of_range_scores_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score_histograms(bad, np.zeros(bad.size, int))


def test_malformed_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="labels"):
        binary_metrics(np.array([0.5]), np.array([2]))
    with pytest.raises(ValueError, match="same number"):
        metrics_from_histograms(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="scores but"):
        roc_auc(np.array([0.1, 0.2]), np.array([1]))
