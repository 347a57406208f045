"""Federated evaluation for any number of classes: per-class score histograms as one vector.

Two pure functions, one per side, and nothing per image crosses between them:

* envoy: `histogram_vector(probabilities, labels, bins)` turns this envoy's validation scores
  into a flat vector of non-negative integer counts;
* director: sums the vectors of every envoy (element-wise, which is all secure aggregation
  can do) and `metrics_from_vector(total, num_classes, bins)` turns the sum into metrics.

Layout of the vector (`vector_length`):

* two classes: the histogram of P(class 1) over the class-0 images, then over the class-1
  images: exactly node.training.metrics' (negative, positive) pair, so the binary metrics,
  the ROC and the Youden threshold are the ones the binary federation always reported;
* C > 2 classes: for each class c, one-vs-rest, the histogram of P(class c) over the images
  that are not c, then over the images that are c (2 C bins in all); then the C x C confusion
  matrix of the argmax decision, row = true class, column = predicted class.

Multi-class metrics: per class, the one-vs-rest ROC and AUC from its histogram pair (exact
up to the bins, node.training.metrics); `auc` is their macro average (the mean over classes
that have images of both kinds, as sklearn's ``roc_auc_score(multi_class="ovr",
average="macro")``); accuracy, balanced accuracy, macro sensitivity/specificity/F1 and the
confusion matrix come from the argmax confusion counts. `roc_fpr`/`roc_tpr` hold the
micro-average ROC (every (image, class) pair one binary decision: the sum of the per-class
pairs), the curve pages and tracking draw. There is no decision threshold: the rule is argmax.

numpy only: the director computes metrics without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from node.training.metrics import metrics_from_histograms, score_bins, score_histograms
from node.training.operating_point import DEFAULT_TARGET_SENSITIVITY, validation_metrics_at

__all__ = [
    "MAX_CLASS_CURVES",
    "EvaluationError",
    "check_vector",
    "histogram_vector",
    "metrics_from_vector",
    "vector_length",
    "vector_samples",
]

# Per-class ROC points are kept in the metrics for this many classes at most (a round record
# with 1000 curves of `bins` points would dwarf everything else); AUCs are always kept.
MAX_CLASS_CURVES = 10
# Rows of `probabilities` must sum to 1 within this: logits passed by mistake are refused.
SUM_TOLERANCE = 1e-3


class EvaluationError(ValueError):
    """Scores or a histogram vector that do not have the expected shape or values."""


def vector_length(num_classes: int, bins: int) -> int:
    """Entries of the histogram vector for `num_classes` classes and `bins` bins."""
    if num_classes < 2 or bins < 2:
        raise EvaluationError(f"need >= 2 classes and >= 2 bins, got {num_classes} and {bins}")
    if num_classes == 2:
        return 2 * bins
    return 2 * num_classes * bins + num_classes * num_classes


def _check_inputs(probabilities: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probabilities, dtype=np.float64)
    labs = np.asarray(labels).reshape(-1)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise EvaluationError(
            f"probabilities must be N x num_classes (softmax outputs), got shape "
            f"{list(probs.shape)}"
        )
    n, c = probs.shape
    if labs.shape[0] != n:
        raise EvaluationError(f"{n} rows of probabilities but {labs.shape[0]} labels")
    if n and not np.all(np.isfinite(probs)):
        raise EvaluationError("probabilities contain NaN or infinity")
    if n and (probs.min() < 0 or probs.max() > 1):
        raise EvaluationError("probabilities must lie in [0, 1] (softmax outputs, not logits)")
    if n and np.max(np.abs(probs.sum(axis=1) - 1.0)) > SUM_TOLERANCE:
        raise EvaluationError("each row of probabilities must sum to 1 (softmax outputs)")
    integral = np.issubdtype(labs.dtype, np.integer) or np.all(np.equal(np.mod(labs, 1), 0))
    if labs.size and not integral:
        raise EvaluationError("labels must be integer class indices")
    labs = labs.astype(np.int64)
    if labs.size and (labs.min() < 0 or labs.max() >= c):
        raise EvaluationError(f"labels must be class indices 0..{c - 1}")
    return probs, labs


def histogram_vector(probabilities: Any, labels: Any, bins: int) -> np.ndarray:
    """The envoy's flat int64 vector of per-class histograms (see the module docstring)."""
    probs, labs = _check_inputs(probabilities, labels)
    c = probs.shape[1]
    if c == 2:
        neg, pos = score_histograms(probs[:, 1], labs, bins)
        return np.concatenate([neg, pos]).astype(np.int64)
    parts = []
    for cls in range(c):
        idx = score_bins(probs[:, cls], bins)
        is_c = labs == cls
        parts.append(np.bincount(idx[~is_c], minlength=bins))
        parts.append(np.bincount(idx[is_c], minlength=bins))
    predicted = np.argmax(probs, axis=1) if len(labs) else np.zeros(0, np.int64)
    confusion = np.bincount(labs * c + predicted, minlength=c * c)
    out = np.concatenate([*parts, confusion]).astype(np.int64)
    assert out.size == vector_length(c, bins)
    return out


def _split(vector: Any, num_classes: int, bins: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(per-class histograms C' x 2 x bins, confusion C x C or None for two classes)."""
    v = np.asarray(vector)
    expected = vector_length(num_classes, bins)
    if v.ndim != 1 or v.size != expected:
        raise EvaluationError(
            f"a histogram vector for {num_classes} classes and {bins} bins has {expected} "
            f"entries, got shape {list(v.shape)}"
        )
    if not np.issubdtype(v.dtype, np.integer) or (v < 0).any():
        raise EvaluationError("histogram counts must be integers >= 0")
    v = v.astype(np.int64)
    if num_classes == 2:
        return v.reshape(1, 2, bins), None
    hist = v[: 2 * num_classes * bins].reshape(num_classes, 2, bins)
    confusion = v[2 * num_classes * bins :].reshape(num_classes, num_classes)
    return hist, confusion


def vector_samples(vector: Any, num_classes: int, bins: int) -> int:
    """How many images a (summed) vector counts."""
    hist, confusion = _split(vector, num_classes, bins)
    if confusion is None:
        return int(hist.sum())
    return int(confusion.sum())


def _consistent(hist: np.ndarray, confusion: np.ndarray) -> bool:
    """Every class's histograms count every image once, as the confusion matrix does."""
    n = int(confusion.sum())
    per_class = confusion.sum(axis=1)
    return bool(
        np.all(hist.sum(axis=(1, 2)) == n) and np.all(hist[:, 1, :].sum(axis=1) == per_class)
    )


def check_vector(vector: Any, num_classes: int, bins: int) -> int:
    """The number of images a vector counts; EvaluationError when its parts disagree."""
    hist, confusion = _split(vector, num_classes, bins)
    if confusion is not None and not _consistent(hist, confusion):
        raise EvaluationError("the per-class histograms and the confusion counts disagree")
    return vector_samples(vector, num_classes, bins)


def _safe(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def metrics_from_vector(
    vector: Any,
    num_classes: int,
    bins: int,
    class_names: Sequence[str] | None = None,
    *,
    operating_point: str = "youden",
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
) -> dict[str, Any]:
    """The director's metrics of a summed vector (the binary ones for two classes, at the
    threshold `operating_point` picks: node.training.operating_point; more than two classes
    decide by argmax and have no threshold to pick)."""
    hist, confusion = _split(vector, num_classes, bins)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise EvaluationError(f"{len(names)} class names for {num_classes} classes")
    if confusion is None:
        params = {"target": target_sensitivity} if operating_point == "sensitivity" else {}
        out = validation_metrics_at(hist[0, 0], hist[0, 1], operating_point, **params)
        out["num_classes"] = 2
        out["classes"] = names
        return out
    if not _consistent(hist, confusion):
        raise EvaluationError("the per-class histograms and the confusion counts disagree")
    n = int(confusion.sum())
    tp = np.diag(confusion).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    per_class = []
    for cls in range(num_classes):
        m = metrics_from_histograms(hist[cls, 0], hist[cls, 1])
        fp = predicted[cls] - tp[cls]
        tn = n - actual[cls] - fp
        sens = _safe(tp[cls], actual[cls])
        # As for two classes (node.training.metrics): no image called c means precision 0.
        prec = float(tp[cls] / predicted[cls]) if predicted[cls] else 0.0
        entry: dict[str, Any] = {
            "class": names[cls],
            "num_positive": int(actual[cls]),
            "auc": m["auc"],
            "sensitivity": sens,
            "specificity": _safe(tn, tn + fp),
            "precision": prec,
            "f1": 2 * prec * sens / (prec + sens)
            if np.isfinite(prec) and np.isfinite(sens) and prec + sens
            else 0.0,
        }
        if num_classes <= MAX_CLASS_CURVES:
            entry["roc_fpr"], entry["roc_tpr"] = m["roc_fpr"], m["roc_tpr"]
        per_class.append(entry)
    micro = metrics_from_histograms(hist[:, 0, :].sum(axis=0), hist[:, 1, :].sum(axis=0))
    present = [e for e in per_class if e["num_positive"] > 0]
    return {
        "num_classes": num_classes,
        "classes": names,
        "bins": bins,
        "num_negative": micro["num_negative"],
        "num_positive": micro["num_positive"],
        "auc": _nanmean([e["auc"] for e in per_class]),
        "auc_micro": micro["auc"],
        "accuracy": _safe(float(tp.sum()), n),
        "balanced_accuracy": _nanmean([e["sensitivity"] for e in present]),
        "sensitivity": _nanmean([e["sensitivity"] for e in present]),
        "specificity": _nanmean([e["specificity"] for e in per_class]),
        "f1": _nanmean([e["f1"] for e in present]),
        "threshold": None,
        "decision_rule": "argmax",
        "confusion": confusion.tolist(),
        "per_class": per_class,
        "roc_fpr": micro["roc_fpr"],
        "roc_tpr": micro["roc_tpr"],
    }
