"""Operating points from histograms: against brute force over raw scores, and their invariances."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import OperatingPointMethod
from node.training.histograms import histogram_vector, metrics_from_vector
from node.training.metrics import (
    bin_thresholds,
    binary_metrics,
    metrics_from_histograms,
    roc_from_histograms,
    score_histograms,
)
from node.training.operating_point import (
    METHODS,
    choose_bin,
    choose_operating_point,
    held_out_confusion,
    leave_one_out,
    metrics_at,
    validation_metrics_at,
    wilson_interval,
)

BINS = 100


def _logit_scores(rng: np.random.Generator, n_neg: int, n_pos: int, gap: float, sd: float = 1.5):
    logits = np.concatenate([rng.normal(-gap / 2, sd, n_neg), rng.normal(gap / 2, sd, n_pos)])
    labels = np.concatenate([np.zeros(n_neg, np.int64), np.ones(n_pos, np.int64)])
    return 1 / (1 + np.exp(-logits)), labels


@st.composite
def two_class_scores(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    n_neg = draw(st.integers(1, 200))
    n_pos = draw(st.integers(1, 400))
    gap = draw(st.floats(0.0, 12.0))
    sd = draw(st.floats(0.2, 4.0))
    return _logit_scores(np.random.default_rng(seed), n_neg, n_pos, gap, sd)


# Wilson intervals: reference values computed by hand from the closed form (z = 1.959964).
@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (0, 10, 0.0, 0.277533),
        (10, 10, 0.722467, 1.0),
        (5, 10, 0.236593, 0.763407),
        (81, 100, 0.722212, 0.874852),
    ],
)
def test_wilson_interval_reference_values(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-6)
    assert hi == pytest.approx(high, abs=1e-6)


@given(st.integers(1, 5000), st.data())
def test_wilson_interval_contains_the_estimate_and_narrows(n: int, data) -> None:
    k = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo4, hi4 = wilson_interval(4 * k, 4 * n)
    assert hi4 - lo4 < hi - lo
    assert wilson_interval(k, n, 0.99)[0] <= lo


def test_wilson_interval_refuses_nonsense() -> None:
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


@settings(max_examples=60, deadline=None)
@given(two_class_scores(), st.sampled_from(METHODS))
def test_histogram_point_matches_raw_scores_at_its_threshold(data, method: str) -> None:
    """What the director reports from histograms is what the raw scores give at the threshold."""
    scores, labels = data
    neg, pos = score_histograms(scores, labels, BINS)
    op = choose_operating_point(neg, pos, method)
    raw = binary_metrics(scores, labels, op.threshold)
    assert op.threshold == bin_thresholds(BINS)[op.bin]
    assert op.sensitivity == pytest.approx(raw["sensitivity"], abs=1e-12)
    assert op.specificity == pytest.approx(raw["specificity"], abs=1e-12)
    (tn, fp), (fn, tp) = raw["confusion"]
    assert op.sensitivity_ci == wilson_interval(tp, tp + fn)
    assert op.specificity_ci == wilson_interval(tn, tn + fp)
    assert op.num_positive == int(labels.sum()) and op.num_negative == int((1 - labels).sum())


@settings(max_examples=60, deadline=None)
@given(two_class_scores(), st.floats(0.5, 1.0))
def test_sensitivity_target_is_the_highest_threshold_meeting_it(data, target: float) -> None:
    scores, labels = data
    neg, pos = score_histograms(scores, labels, BINS)
    k = choose_bin(neg, pos, "sensitivity", target=target)
    thresholds = bin_thresholds(BINS)
    sens = [binary_metrics(scores, labels, t)["sensitivity"] for t in thresholds]
    meeting = [i for i, s in enumerate(sens) if s >= target - 1e-12]
    assert k == max(meeting)


@settings(max_examples=40, deadline=None)
@given(two_class_scores())
def test_youden_method_is_the_federations_existing_rule(data) -> None:
    scores, labels = data
    neg, pos = score_histograms(scores, labels, BINS)
    op = choose_operating_point(neg, pos, "youden")
    assert op.threshold == metrics_from_histograms(neg, pos)["threshold"]
    fpr, tpr = roc_from_histograms(neg, pos)
    assert op.sensitivity - (1 - op.specificity) == pytest.approx(np.max(tpr - fpr), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(two_class_scores(), st.integers(2, 5), st.sampled_from(["sensitivity", "binormal"]))
def test_prevalence_free_methods_ignore_class_balance(data, factor: int, method: str) -> None:
    """Replicating every pneumonia image (a prevalence shift) moves neither threshold.

    Youden's tie-break on accuracy depends on the class balance (one reason for the
    others), and the smoothed ROC's bandwidth on the class counts, so they are left out.
    """
    scores, labels = data
    neg, pos = score_histograms(scores, labels, BINS)
    assert choose_bin(neg, pos, method) == choose_bin(neg, pos * factor, method)


def test_binormal_threshold_sits_midway_between_equal_variance_classes() -> None:
    rng = np.random.default_rng(3)
    scores, labels = _logit_scores(rng, 20000, 60000, gap=4.0, sd=1.0)
    # Shift the classes to centre +1 instead of 0: the midpoint moves with them.
    logits = np.log(scores / (1 - scores)) + 1.0
    scores = 1 / (1 + np.exp(-logits))
    neg, pos = score_histograms(scores, labels, BINS)
    for method in ("binormal", "smoothed"):
        t = choose_operating_point(neg, pos, method).threshold
        assert math.log(t / (1 - t)) == pytest.approx(1.0, abs=0.25), method


def test_methods_on_a_separable_split_choose_inside_the_gap() -> None:
    scores = np.array([0.01, 0.02, 0.03, 0.05, 0.95, 0.97, 0.98, 0.99, 0.995])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    neg, pos = score_histograms(scores, labels, BINS)
    for method in ("youden", "binormal", "smoothed"):
        op = choose_operating_point(neg, pos, method)
        assert 0.05 < op.threshold <= 0.95, method
        assert op.sensitivity == 1.0 and op.specificity == 1.0
    # 0.95 of 5 positives is 4.75: all five must stay positive.
    assert choose_operating_point(neg, pos, "sensitivity", target=0.95).sensitivity == 1.0


def test_bad_histograms_and_methods_are_refused() -> None:
    neg, pos = np.ones(BINS, np.int64), np.ones(BINS, np.int64)
    with pytest.raises(ValueError, match="one of"):
        choose_bin(neg, pos, "accuracy")
    with pytest.raises(ValueError, match="both classes"):
        choose_bin(np.zeros(BINS), pos)
    with pytest.raises(ValueError, match="same number"):
        choose_bin(neg, pos[:-1])
    with pytest.raises(ValueError, match=">= 0"):
        choose_bin(-neg, pos)
    with pytest.raises(ValueError, match="target"):
        choose_bin(neg, pos, "sensitivity", target=1.5)


def test_metrics_at_adds_wilson_intervals() -> None:
    rng = np.random.default_rng(0)
    scores, labels = _logit_scores(rng, 50, 80, gap=3.0)
    m = metrics_at(scores, labels, 0.5)
    (tn, fp), (fn, tp) = m["confusion"]
    assert m["sensitivity_ci"] == list(wilson_interval(tp, tp + fn))
    assert m["specificity_ci"] == list(wilson_interval(tn, tn + fp))
    assert m["sensitivity_ci"][0] <= m["sensitivity"] <= m["sensitivity_ci"][1]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 6), st.sampled_from(METHODS))
def test_leave_one_out_against_recomputing_without_each_envoy(
    seed: int, envoys: int, method: str
) -> None:
    rng = np.random.default_rng(seed)
    per_envoy = []
    for _ in range(envoys):
        scores, labels = _logit_scores(rng, int(rng.integers(3, 40)), int(rng.integers(3, 90)), 3.0)
        per_envoy.append(score_histograms(scores, labels, BINS))
    ks = leave_one_out(per_envoy, method)
    for e, k in enumerate(ks):
        others = [h for i, h in enumerate(per_envoy) if i != e]
        neg = np.sum([h[0] for h in others], axis=0)
        pos = np.sum([h[1] for h in others], axis=0)
        assert k == choose_bin(neg, pos, method)
    held = held_out_confusion(per_envoy, method)
    (tn, fp), (fn, tp) = held["confusion"]
    assert tn + fp == sum(int(h[0].sum()) for h in per_envoy)
    assert fn + tp == sum(int(h[1].sum()) for h in per_envoy)
    assert held["bins"] == ks
    assert held["sensitivity"] == pytest.approx(tp / (tp + fn))


def test_leave_one_out_skips_an_envoy_whose_absence_leaves_one_class() -> None:
    only_pos = (np.zeros(BINS, np.int64), np.eye(BINS, dtype=np.int64)[80] * 5)
    mixed = (np.eye(BINS, dtype=np.int64)[20] * 4, np.eye(BINS, dtype=np.int64)[70] * 3)
    ks = leave_one_out([only_pos, mixed])
    assert ks[1] is None and ks[0] is not None
    with pytest.raises(ValueError, match="two envoys"):
        leave_one_out([mixed])


@settings(max_examples=40, deadline=None)
@given(two_class_scores(), st.sampled_from(METHODS), st.floats(0.6, 0.99))
def test_director_vector_metrics_are_those_at_the_configured_point(
    data, method: str, target: float
) -> None:
    """The two-class metrics the director records sit at the method's threshold: the same
    confusion, accuracy and intervals as the raw scores give there; AUC and ROC unchanged."""
    scores, labels = data
    neg, pos = score_histograms(scores, labels, BINS)
    vector = histogram_vector(np.stack([1 - scores, scores], axis=1), labels, BINS)
    m = metrics_from_vector(vector, 2, BINS, operating_point=method, target_sensitivity=target)
    params = {"target": target} if method == "sensitivity" else {}
    op = choose_operating_point(neg, pos, method, **params)
    raw = binary_metrics(scores, labels, op.threshold)
    youden = metrics_from_histograms(neg, pos)
    assert m["operating_point"] == method and m["operating_point_params"] == params
    assert m["threshold"] == op.threshold
    assert m["confusion"] == raw["confusion"]
    assert m["accuracy"] == pytest.approx(raw["accuracy"], abs=1e-12)
    assert m["sensitivity_ci"] == list(op.sensitivity_ci)
    assert m["specificity_ci"] == list(op.specificity_ci)
    assert m["auc"] == youden["auc"] and m["roc_tpr"] == youden["roc_tpr"]
    if method == "youden":
        assert m["threshold"] == youden["threshold"] and m["confusion"] == youden["confusion"]


def test_one_class_validation_keeps_the_fallback_and_names_the_method() -> None:
    neg = np.zeros(BINS, np.int64)
    pos = np.zeros(BINS, np.int64)
    pos[70] = 12
    m = validation_metrics_at(neg, pos, "binormal")
    assert m["operating_point"] == "binormal"
    assert m["threshold"] == 0.5 and math.isnan(m["auc"])


def test_unknown_method_is_refused_by_the_director_metrics() -> None:
    vector = histogram_vector(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), BINS)
    with pytest.raises(ValueError, match="operating-point method"):
        metrics_from_vector(vector, 2, BINS, operating_point="argmax")


def test_config_methods_are_the_modules_methods() -> None:
    assert set(typing.get_args(OperatingPointMethod)) == set(METHODS)
