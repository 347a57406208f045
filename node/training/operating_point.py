"""Decision thresholds chosen from federated validation histograms, with confidence intervals.

The director only ever sees the summed per-class score histograms of the envoys'
validation splits (node/training/metrics.py: logit-spaced bins, "positive iff bin >= k").
This module turns them into an operating point: a threshold on P(pneumonia) plus the
validation sensitivity and specificity it gives, each with a Wilson score interval.

Why more than Youden's J: on PneumoniaMNIST the validation split is nearly separable
(AUC 0.99) and holds few normal images (135; one image is 0.74 points of specificity), so
J has a wide plateau of near-equal thresholds and which one wins is decided by a couple
of images; the test split is shifted (its normal images score higher than the validation
normals do, and its prevalence is 62.5 % against 74 %). Methods:

* ``youden``: max J, ties to the higher validation accuracy then to the threshold nearest
  0.5: exactly `metrics_from_histograms`, the federation's rule so far (the baseline).
* ``sensitivity``: a pre-registered sensitivity target: the highest threshold whose
  validation sensitivity is still >= `target` (default 0.95, the clinical target of
  issue #15). Decided by the positives (389 on validation), so a few normal images do not
  move it.
* ``binormal``: fit one normal distribution per class to the logits of the binned scores
  and take the threshold that maximises J on the fitted (smooth) ROC: a parametric
  smoothed ROC. It lands between the two classes' bulk instead of at the edge of a plateau.
* ``smoothed``: Gaussian-kernel smoothed class CDFs in logit space (Silverman's bandwidth),
  max J on that curve: the non-parametric smoothed ROC (Zou, Hall and Shapiro 1997).

`leave_one_out` (per-envoy histograms needed) gives the threshold each method picks with
one envoy held out, and `held_out_confusion` scores a method by applying those thresholds
to the held-out envoys: a validation-only measure of how well a method's threshold
transfers to a hospital it has not seen, which is how a method can be chosen without the
test split. Per-envoy histograms exist only where evaluation is not secure-aggregated, so
the leave-one-out tools are for choosing a method in simulation, not a runtime method.

All thresholds are bin edges of `bin_edges(bins)`, so validation counts at the chosen point
are exact, and "score >= threshold" applied to raw test scores means the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from node.training.metrics import (
    LOGIT_RANGE,
    bin_thresholds,
    binary_metrics,
    check_histograms,
    confusion_metrics,
    metrics_from_histograms,
    roc_from_histograms,
)

METHODS = ("youden", "sensitivity", "binormal", "smoothed")
DEFAULT_METHOD = "youden"
DEFAULT_TARGET_SENSITIVITY = 0.95
CONFIDENCE = 0.95


def wilson_interval(
    successes: float, n: float, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (nan, nan when n == 0).

    Unlike the normal-approximation interval it stays inside [0, 1] and keeps its coverage
    near 0 and 1, where sensitivities and specificities of a good classifier live.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (math.nan, math.nan)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1); say so instead of rounding near it.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and what it gives on the histograms it was chosen on."""

    method: str
    threshold: float  # predict pneumonia iff P(pneumonia) >= threshold
    bin: int  # the same rule in bins: positive iff bin index >= bin
    sensitivity: float
    specificity: float
    sensitivity_ci: tuple[float, float]
    specificity_ci: tuple[float, float]
    num_positive: int
    num_negative: int
    params: Mapping[str, float]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["params"] = dict(self.params)
        out["sensitivity_ci"] = list(self.sensitivity_ci)
        out["specificity_ci"] = list(self.specificity_ci)
        return out


def _check(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    neg, pos = check_histograms(neg, pos)
    if neg.sum() == 0 or pos.sum() == 0:
        raise ValueError("an operating point needs both classes in the histograms")
    return neg, pos


def bin_logits(bins: int) -> np.ndarray:
    """A logit standing for each bin: the midpoint of its logit interval.

    The two open-ended bins (below sigmoid(-10), above sigmoid(10)) are placed half a bin
    width beyond the last edge: the histograms do not say more about the scores there.
    """
    if bins < 3:
        raise ValueError(f"logit bins need bins >= 3, got {bins}")
    inner = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, bins - 1)
    step = inner[1] - inner[0]
    return np.concatenate(
        [[inner[0] - step / 2], (inner[:-1] + inner[1:]) / 2, [inner[-1] + step / 2]]
    )


def edge_logits(bins: int) -> np.ndarray:
    """Logit of threshold k = 0..bins (k = 0 is -inf: everyone positive; k = bins is +inf)."""
    inner = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, bins - 1)
    return np.concatenate([[-np.inf], inner, [np.inf]])


def _argmax_nearest_half(values: np.ndarray, bins: int) -> int:
    """Index k of the largest value, ties to the threshold nearest 0.5 (logit 0)."""
    distance = np.abs(edge_logits(bins))
    order = np.lexsort((distance, -np.round(values, 12)))
    return int(order[0])


def _youden_bin(neg: np.ndarray, pos: np.ndarray, **_: float) -> int:
    threshold = metrics_from_histograms(neg, pos)["threshold"]
    return int(np.flatnonzero(bin_thresholds(neg.size) == threshold)[0])


def _sensitivity_bin(
    neg: np.ndarray, pos: np.ndarray, *, target: float = DEFAULT_TARGET_SENSITIVITY, **_: float
) -> int:
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    _, tpr = roc_from_histograms(neg, pos)
    # tpr is non-increasing in k and tpr[0] == 1, so the set is never empty.
    return int(np.flatnonzero(tpr >= target - 1e-12).max())


def _class_moments(hist: np.ndarray, centres: np.ndarray, floor: float) -> tuple[float, float]:
    w = hist.astype(np.float64)
    mean = float(np.sum(w * centres) / w.sum())
    var = float(np.sum(w * (centres - mean) ** 2) / w.sum())
    return mean, max(math.sqrt(var), floor)


def _binormal_bin(neg: np.ndarray, pos: np.ndarray, **_: float) -> int:
    bins = neg.size
    centres = bin_logits(bins)
    floor = (centres[2] - centres[1]) / 2
    mu_n, sd_n = _class_moments(neg, centres, floor)
    mu_p, sd_p = _class_moments(pos, centres, floor)
    t = edge_logits(bins)
    norm = NormalDist()
    cdf = np.vectorize(norm.cdf)
    with np.errstate(invalid="ignore"):
        fpr = 1 - cdf((t - mu_n) / sd_n)
        tpr = 1 - cdf((t - mu_p) / sd_p)
    return _argmax_nearest_half(np.nan_to_num(tpr - fpr), bins)


def _smoothed_cdf(hist: np.ndarray, centres: np.ndarray, t: np.ndarray, floor: float) -> np.ndarray:
    """P(logit < t) under a Gaussian-kernel estimate of the class's logit density."""
    n = float(hist.sum())
    _, sd = _class_moments(hist, centres, floor)
    h = max(1.06 * sd * n ** (-0.2), floor)  # Silverman's rule of thumb
    z = (t[:, None] - centres[None, :]) / h
    phi = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    return (phi * hist[None, :]).sum(axis=1) / n


def _smoothed_bin(neg: np.ndarray, pos: np.ndarray, **_: float) -> int:
    bins = neg.size
    centres = bin_logits(bins)
    floor = (centres[2] - centres[1]) / 2
    t = np.clip(edge_logits(bins), -1e6, 1e6)
    j = _smoothed_cdf(neg, centres, t, floor) - _smoothed_cdf(pos, centres, t, floor)
    return _argmax_nearest_half(j, bins)


_CHOOSERS: dict[str, Callable[..., int]] = {
    "youden": _youden_bin,
    "sensitivity": _sensitivity_bin,
    "binormal": _binormal_bin,
    "smoothed": _smoothed_bin,
}


def choose_bin(
    neg: np.ndarray, pos: np.ndarray, method: str = DEFAULT_METHOD, **params: float
) -> int:
    """The threshold index k (positive iff bin >= k) that `method` picks on (neg, pos)."""
    if method not in _CHOOSERS:
        raise ValueError(f"operating-point method must be one of {METHODS}, got {method!r}")
    neg, pos = _check(neg, pos)
    return _CHOOSERS[method](neg, pos, **params)


def confusion_at(neg: np.ndarray, pos: np.ndarray, k: int) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp) of the rule "positive iff bin >= k" on the histograms."""
    neg = np.asarray(neg, np.int64)
    pos = np.asarray(pos, np.int64)
    fp, tp = int(neg[k:].sum()), int(pos[k:].sum())
    return int(neg.sum()) - fp, fp, int(pos.sum()) - tp, tp


def choose_operating_point(
    neg: np.ndarray,
    pos: np.ndarray,
    method: str = DEFAULT_METHOD,
    *,
    confidence: float = CONFIDENCE,
    **params: float,
) -> OperatingPoint:
    """The operating point `method` picks on the summed validation histograms."""
    k = choose_bin(neg, pos, method, **params)
    return _point(neg, pos, k, method, confidence, params)


def _point(
    neg: np.ndarray,
    pos: np.ndarray,
    k: int,
    method: str,
    confidence: float,
    params: Mapping[str, float],
) -> OperatingPoint:
    tn, fp, fn, tp = confusion_at(neg, pos, k)
    return OperatingPoint(
        method=method,
        threshold=float(bin_thresholds(np.asarray(neg).size)[k]),
        bin=k,
        sensitivity=tp / (tp + fn),
        specificity=tn / (tn + fp),
        sensitivity_ci=wilson_interval(tp, tp + fn, confidence),
        specificity_ci=wilson_interval(tn, tn + fp, confidence),
        num_positive=tp + fn,
        num_negative=tn + fp,
        params=dict(params),
    )


def validation_metrics_at(
    neg: np.ndarray,
    pos: np.ndarray,
    method: str = DEFAULT_METHOD,
    *,
    confidence: float = CONFIDENCE,
    **params: float,
) -> dict[str, Any]:
    """`metrics_from_histograms` with the threshold and its confusion metrics taken from
    the operating point `method` picks, plus the method, its parameters and Wilson
    intervals: what the director records for a round's summed validation histograms.
    Without both classes there is no point to choose and Youden's fallback stands."""
    out = metrics_from_histograms(neg, pos)
    if not out["num_negative"] or not out["num_positive"]:
        out["operating_point"] = method
        return out
    point = choose_operating_point(neg, pos, method, confidence=confidence, **params)
    out.update(confusion_metrics(*confusion_at(neg, pos, point.bin)))
    out.update(
        threshold=point.threshold,
        operating_point=method,
        operating_point_params=dict(point.params),
        sensitivity_ci=list(point.sensitivity_ci),
        specificity_ci=list(point.specificity_ci),
    )
    return out


def metrics_at(
    scores: np.ndarray, labels: np.ndarray, threshold: float, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """`binary_metrics` at `threshold` plus Wilson intervals for sensitivity and specificity."""
    out = binary_metrics(scores, labels, threshold)
    (tn, fp), (fn, tp) = out["confusion"]
    out["sensitivity_ci"] = list(wilson_interval(tp, tp + fn, confidence))
    out["specificity_ci"] = list(wilson_interval(tn, tn + fp, confidence))
    return out


def leave_one_out(
    per_envoy: Sequence[tuple[np.ndarray, np.ndarray]],
    method: str = DEFAULT_METHOD,
    **params: float,
) -> list[int | None]:
    """Per envoy e: the bin `method` picks on the sum of every other envoy's histograms.

    None where the others lack a class (no threshold can be chosen from them).
    """
    if len(per_envoy) < 2:
        raise ValueError("leave-one-out needs at least two envoys")
    negs = np.stack([np.asarray(n, np.int64) for n, _ in per_envoy])
    poss = np.stack([np.asarray(p, np.int64) for _, p in per_envoy])
    out: list[int | None] = []
    for e in range(len(per_envoy)):
        neg = negs.sum(0) - negs[e]
        pos = poss.sum(0) - poss[e]
        out.append(choose_bin(neg, pos, method, **params) if neg.sum() and pos.sum() else None)
    return out


def held_out_confusion(
    per_envoy: Sequence[tuple[np.ndarray, np.ndarray]],
    method: str = DEFAULT_METHOD,
    **params: float,
) -> dict[str, Any]:
    """Each envoy judged at the threshold chosen without it, confusions summed over envoys.

    A validation-only estimate of how a method's threshold transfers to an unseen site
    with another class balance: sensitivity, specificity (with Wilson intervals), balanced
    accuracy, and the spread (SD, in logits) of the thresholds picked across hold-outs.
    """
    bins = np.asarray(per_envoy[0][0]).size
    ks = leave_one_out(per_envoy, method, **params)
    tn = fp = fn = tp = 0
    for (neg, pos), k in zip(per_envoy, ks, strict=True):
        if k is None:
            continue
        a, b, c, d = confusion_at(neg, pos, k)
        tn, fp, fn, tp = tn + a, fp + b, fn + c, tp + d
    logits = np.clip(edge_logits(bins)[[k for k in ks if k is not None]], -LOGIT_RANGE, LOGIT_RANGE)
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    return {
        "method": method,
        "params": dict(params),
        "bins": list(ks),
        "threshold_logit_sd": float(np.std(logits)) if logits.size else math.nan,
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2,
        "sensitivity_ci": list(wilson_interval(tp, tp + fn)) if tp + fn else [math.nan, math.nan],
        "specificity_ci": list(wilson_interval(tn, tn + fp)) if tn + fp else [math.nan, math.nan],
        "confusion": [[tn, fp], [fn, tp]],
    }
