"""The evaluation format: what an envoy masks after a round, and what the director reads back.

After each completed round the envoys score the round's new model on their validation splits
and the director learns the *sum* of their per-class score histograms and log losses through
a second, small SecAgg session (purpose "evaluate", protocol.secagg.common): the ROC, AUC and
threshold of the federation without any envoy's histogram, class balance or validation size.
(Carrying the histograms inside the round's own masked update is not an option: that vector
is built before the new model exists, so it could only score the model the round started
from.)

The vector is [histogram vector, loss]. The histogram vector is node.training.histograms'
layout for `num_classes` classes and `bins` bins (the same one a plain EvaluateResult carries):

* two classes: the histogram of P(class 1) over the class-0 images, then over the class-1
  images (2 bins entries);
* C > 2 classes: per class, its one-vs-rest pair of histograms (2 C bins entries), then the
  C x C confusion counts of the argmax decision.

In both, every pair of histograms and the confusion matrix count each image once; the first
pair's total is the number of images. Then:

* counts are plain integers: each envoy contributes at most `count_cap(n)` images (at most
  SAMPLE_CAP, and few enough that n envoys' counts never wrap mod 2^32), so the sum is exact;
* the loss sum, clipped to LOSS_CAP per sample, is quantised with crypto.quantize over
  [0, count_cap * LOSS_CAP] (unbiased stochastic rounding).

`decode_evaluation` refuses sums no n envoys of this format can produce (AggregateOutOfRange).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from crypto.quantize import QuantizationRange, dequantize_sum, quantize
from protocol.secagg.update import SAMPLE_CAP, AggregateOutOfRange, UpdateFormatError

__all__ = [
    "LOSS_CAP",
    "EvaluationLayout",
    "EvaluationSum",
    "count_cap",
    "decode_evaluation",
    "encode_evaluation",
]

# Cross-entropy of one validation image, in nats, counts at most this much (a probability of
# about 1e-7 on the true class): one confidently wrong image must not dominate the loss.
LOSS_CAP = 16.0
_U32 = 2**32 - 1


def count_cap(participants: int) -> int:
    """The most validation samples one envoy contributes among `participants` envoys."""
    if participants < 1:
        raise UpdateFormatError(f"participants: {participants} must be >= 1")
    return min(SAMPLE_CAP, _U32 // participants)


@dataclass(frozen=True)
class EvaluationLayout:
    num_classes: int
    bins: int

    def __post_init__(self) -> None:
        if self.num_classes < 2 or self.bins < 2:
            raise UpdateFormatError(
                f"need >= 2 classes and >= 2 bins, got {self.num_classes} and {self.bins}"
            )

    @property
    def histogram_length(self) -> int:
        """Entries of the histogram vector (node.training.histograms.vector_length)."""
        c, b = self.num_classes, self.bins
        return 2 * b if c == 2 else 2 * c * b + c * c

    @property
    def vector_length(self) -> int:
        return self.histogram_length + 1

    def images(self, histograms: np.ndarray) -> int:
        """The images a histogram vector counts, or UpdateFormatError if its parts disagree
        (a pair of histograms or the confusion matrix counting another number of images)."""
        h = np.asarray(histograms, dtype=np.int64)
        if h.shape != (self.histogram_length,):
            raise UpdateFormatError(
                f"histogram vector of shape {list(h.shape)}, expected [{self.histogram_length}]"
            )
        if (h < 0).any():
            raise UpdateFormatError("histogram counts must be non-negative")
        c, b = self.num_classes, self.bins
        pairs = 1 if c == 2 else c
        per_pair = h[: 2 * pairs * b].reshape(pairs, 2 * b).sum(axis=1)
        count = int(per_pair[0])
        if c > 2:
            confusion = h[2 * c * b :].reshape(c, c)
            positives = h[: 2 * c * b].reshape(c, 2, b)[:, 1, :].sum(axis=1)
            if (
                (per_pair != count).any()
                or int(confusion.sum()) != count
                or (confusion.sum(axis=1) != positives).any()
            ):
                raise UpdateFormatError(
                    "the per-class histograms and the confusion counts disagree"
                )
        return count


@dataclass(frozen=True)
class EvaluationSum:
    """The federation's histogram vector and summed log loss (no envoy's own)."""

    histograms: np.ndarray
    num_samples: int
    loss_sum: float


def _loss_range(participants: int) -> QuantizationRange:
    # quantize() maps [-c, c]; the loss sum lives in [0, 2c].
    half = count_cap(participants) * LOSS_CAP / 2
    return QuantizationRange(clip=half, max_summands=participants)


def encode_evaluation(
    layout: EvaluationLayout,
    histograms: np.ndarray,
    loss_sum: float,
    *,
    participants: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """The uint32 vector an envoy masks in the evaluation session."""
    hist = np.asarray(histograms, dtype=np.int64)
    count = layout.images(hist)
    cap = count_cap(participants)
    if count > cap:
        raise UpdateFormatError(
            f"{count} validation samples, above the {cap} one envoy may contribute"
        )
    if not math.isfinite(loss_sum):
        raise UpdateFormatError("the validation loss is not finite")
    qrange = _loss_range(participants)
    loss = min(max(float(loss_sum), 0.0), count * LOSS_CAP)
    loss_q = quantize(np.array([loss - qrange.clip]), qrange, rng=rng)
    return np.concatenate([hist, loss_q.astype(np.int64)]).astype(np.uint32)


def decode_evaluation(
    layout: EvaluationLayout, total: np.ndarray, *, participants: int, summands: int
) -> EvaluationSum:
    """The summed histograms and loss of `summands` envoys (AggregateOutOfRange if the sum
    cannot be one)."""
    arr = np.asarray(total)
    if arr.dtype != np.uint32 or arr.shape != (layout.vector_length,):
        raise UpdateFormatError(
            f"evaluation sum is {arr.dtype} {arr.shape}, expected uint32 ({layout.vector_length},)"
        )
    if not 1 <= summands <= participants:
        raise UpdateFormatError(f"summands: {summands} outside 1..{participants}")
    counts = arr[: layout.histogram_length].astype(np.int64)
    try:
        total_count = layout.images(counts)
    except UpdateFormatError as exc:
        raise AggregateOutOfRange(f"no sum of honest histograms: {exc}") from None
    if total_count > summands * count_cap(participants):
        raise AggregateOutOfRange(
            f"{total_count} validation samples from {summands} envoys: more than each may "
            "contribute"
        )
    qrange = _loss_range(participants)
    try:
        loss = float(dequantize_sum(arr[-1:], qrange, summands)[0]) + summands * qrange.clip
    except ValueError as exc:
        raise AggregateOutOfRange(f"the loss element is out of range: {exc}") from None
    slack = summands * qrange.max_error_per_summand
    if not -slack <= loss <= total_count * LOSS_CAP + slack:
        raise AggregateOutOfRange(
            f"loss sum {loss:.4g} outside [0, {LOSS_CAP:g} x {total_count} samples]"
        )
    return EvaluationSum(histograms=counts, num_samples=total_count, loss_sum=max(loss, 0.0))
