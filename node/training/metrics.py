"""Binary classification metrics, exact and from per-class score histograms.

Federated evaluation never ships per-image scores: each envoy returns two histograms of
P(pneumonia) on its validation split (normal images, pneumonia images) and the director
sums them. The `bins` bins are equal in logit space, not in probability: edges
0, sigmoid(-10 ... 10), 1. A trained network puts most scores within 0.01 of 0 or 1, where
equal-width bins would lump everything into one bin and leave the validation threshold
only the choice 0.99; logit bins keep both the ROC and the threshold resolved there. The histograms are all a ROC curve needs: the
thresholds are the bin edges, and within a bin scores count as tied, so the histogram AUC
equals the exact pairwise (Mann-Whitney) AUC of the scores rounded down to their bin edge.

Binning uses `np.searchsorted` on the very edges that become thresholds, so "score >=
threshold" (how `binary_metrics` predicts) and "bin index >= k" agree bit for bit: a
threshold chosen on validation histograms means the same thing applied to raw test scores.

The decision threshold is chosen on validation by Youden's J = sensitivity + specificity
- 1 (equivalently the balanced accuracy), which, unlike plain accuracy, does not simply
follow the class prior of the validation split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_BINS = 100
# The one-number summaries `metrics_from_histograms` reports (what curves and pages show).
SUMMARY_METRICS = (
    "auc",
    "accuracy",
    "sensitivity",
    "specificity",
    "balanced_accuracy",
    "f1",
    "threshold",
)


LOGIT_RANGE = 10.0


def bin_edges(bins: int = DEFAULT_BINS) -> np.ndarray:
    """bins + 1 increasing edges: 0, sigmoid of bins - 1 equally spaced logits in +-10, 1."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    logits = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, bins - 1) if bins > 2 else np.zeros(1)
    return np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-logits)), [1.0]])


def bin_thresholds(bins: int = DEFAULT_BINS) -> np.ndarray:
    """Threshold k = 0..bins of the rule "positive iff bin >= k", as a score threshold.

    edge[k] for k < bins; k = bins (nobody positive) is 1 + 1/bins, above every score, 1.0
    included, so raw scores compared with ">=" read it the same way.
    """
    return np.concatenate([bin_edges(bins)[:-1], [1.0 + 1.0 / bins]])


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if scores.size and (not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1):
        raise ValueError("scores must be finite probabilities in [0, 1]")
    if labels.size and not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 (normal) or 1 (pneumonia)")
    return scores, labels.astype(np.int64)


def score_bins(scores: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Bin index of each score: k such that edge[k] <= score < edge[k+1] (1.0 -> last bin)."""
    edges = bin_edges(bins)
    return np.searchsorted(edges[1:-1], np.asarray(scores, np.float64), side="right")


def score_histograms(
    scores: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """(negative, positive) int64 histograms of the scores over `bin_edges(bins)`."""
    scores, labels = _check_scores(scores, labels)
    idx = score_bins(scores, bins)
    neg = np.bincount(idx[labels == 0], minlength=bins).astype(np.int64)
    pos = np.bincount(idx[labels == 1], minlength=bins).astype(np.int64)
    return neg, pos


def roc_from_histograms(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at thresholds edge[0..bins] ("positive iff bin >= k"), from (1,1) to (0,0)."""
    neg = np.asarray(neg, np.float64)
    pos = np.asarray(pos, np.float64)
    # tail[k] = count of bins >= k, for k = 0..bins
    neg_tail = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])
    pos_tail = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])
    fpr = neg_tail / neg.sum() if neg.sum() else np.full_like(neg_tail, np.nan)
    tpr = pos_tail / pos.sum() if pos.sum() else np.full_like(pos_tail, np.nan)
    return fpr, tpr


def confusion_metrics(tn: float, fp: float, fn: float, tp: float) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, precision, F1 and the 2x2 confusion of counts."""
    total = tn + fp + fn + tp
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * prec * sens / (prec + sens) if prec + sens and not np.isnan(sens) else 0.0
    return {
        "accuracy": (tp + tn) / total if total else float("nan"),
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2,
        "precision": prec,
        "f1": f1,
        "confusion": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def check_histograms(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(neg, pos) as flat int64 arrays; ValueError unless same length >= 2 and counts >= 0."""
    neg = np.asarray(neg, np.int64).reshape(-1)
    pos = np.asarray(pos, np.int64).reshape(-1)
    if neg.shape != pos.shape or neg.size < 2:
        raise ValueError(
            f"histograms must have the same number (>= 2) of bins: {neg.size}, {pos.size}"
        )
    if (neg < 0).any() or (pos < 0).any():
        raise ValueError("histogram counts must be >= 0")
    return neg, pos


def metrics_from_histograms(neg: np.ndarray, pos: np.ndarray) -> dict[str, Any]:
    """AUC, ROC and the Youden-optimal threshold with the metrics it gives on this data.

    The threshold maximises sensitivity + specificity; ties go to the higher accuracy, then
    to the threshold nearest 0.5 (the least extreme of equally good choices). The
    threshold is a bin edge; k = bins (nobody positive) is reported as 1 + 1/bins.
    """
    neg, pos = check_histograms(neg, pos)
    n_neg, n_pos = int(neg.sum()), int(pos.sum())
    bins = neg.size
    edges = bin_edges(bins)
    fpr, tpr = roc_from_histograms(neg, pos)
    out: dict[str, Any] = {"num_negative": n_neg, "num_positive": n_pos, "bins": bins}
    if n_neg == 0 or n_pos == 0:
        out.update(auc=float("nan"), threshold=0.5, roc_fpr=fpr.tolist(), roc_tpr=tpr.tolist())
        return out
    below = np.concatenate([[0], np.cumsum(neg)[:-1]])  # negatives in lower bins
    auc = float(np.sum(pos * (below + 0.5 * neg)) / (n_neg * n_pos))
    youden = tpr - fpr
    accuracy = (tpr * n_pos + (1 - fpr) * n_neg) / (n_pos + n_neg)
    order = np.lexsort((np.abs(edges - 0.5), -accuracy, -np.round(youden, 12)))
    k = int(order[0])
    tp = float(tpr[k] * n_pos)
    fp = float(fpr[k] * n_neg)
    out.update(confusion_metrics(n_neg - round(fp), round(fp), n_pos - round(tp), round(tp)))
    thresholds = bin_thresholds(bins)
    out.update(
        auc=auc,
        threshold=float(thresholds[k]),
        youden=float(youden[k]),
        roc_fpr=fpr.tolist(),
        roc_tpr=tpr.tolist(),
    )
    return out


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC = P(s+ > s-) + P(s+ = s-) / 2 over all (positive, negative) pairs."""
    scores, labels = _check_scores(scores, labels)
    neg = np.sort(scores[labels == 0])
    pos = scores[labels == 1]
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    lo = np.searchsorted(neg, pos, side="left")
    hi = np.searchsorted(neg, pos, side="right")
    return float(np.sum(lo + 0.5 * (hi - lo)) / (neg.size * pos.size))


def binary_metrics(
    scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """Accuracy, exact AUC, sensitivity, specificity, F1, confusion [[tn, fp], [fn, tp]].

    An image is called pneumonia iff its score >= threshold.
    """
    scores, labels = _check_scores(scores, labels)
    pred = scores >= threshold
    tp = float(np.sum(pred & (labels == 1)))
    fp = float(np.sum(pred & (labels == 0)))
    fn = float(np.sum(~pred & (labels == 1)))
    tn = float(np.sum(~pred & (labels == 0)))
    out = confusion_metrics(tn, fp, fn, tp)
    out.update(auc=roc_auc(scores, labels), threshold=float(threshold))
    return out
