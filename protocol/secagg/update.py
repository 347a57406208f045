"""The update format envoys and director agree on: what an envoy masks, and what the sum means.

Weighted FedAvg under masking: an envoy with n samples quantises, with
crypto.quantize.encode_weighted_update, the vector [delta..., train_loss] scaled by
w = n / SAMPLE_CAP, followed by the weight itself. The unmasked sum gives sum(w_i delta_i),
sum(w_i loss_i) and sum(w_i), so the director gets the sample-weighted mean update and loss
without ever learning any single n_i, delta_i or loss.

The model's tensors are laid out in one flat vector in the order of the global weights
(`Layout`); every party derives the quantisation range from the round's SecAggParams
(`qrange_for`) and the SecAgg session number from the round, its attempt and what the session
aggregates (`secagg_session`), so nothing of the format travels besides RoundStart.

Robustness. An envoy clips its update to the L2 bound the round announces (`clip_to_norm`,
the bound pinned by the envoy's policy) before weighting and quantising, and a non-finite
update is a named error (`UpdateNotFinite`), never a silent zero. The weighted mean of updates
of norm <= B has norm <= B, and each survivor holds at least one sample, so the director
refuses an aggregate whose mean norm exceeds B (plus the quantisation's error) or whose total
weight is below one sample per survivor (`AggregateOutOfRange`): one envoy that masks a vector
outside the format (e.g. a tiny weight, to blow up the mean) can bias the mean at most within
that ball, or make the round fail, and cannot make it non-finite. (Secure aggregation hides
which envoy it was; bounding each input exactly would need zero-knowledge range proofs.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from crypto.quantize import QuantizationRange, decode_weighted_sum, encode_weighted_update
from protocol.errors import ProtocolError
from protocol.messages import MAX_ATTEMPTS
from protocol.secagg.common import EVALUATE, PURPOSES, TRAIN
from protocol.secagg.messages import SecAggParams

__all__ = [
    "EXTRA",
    "MAX_ATTEMPTS",
    "SAMPLE_CAP",
    "AggregateOutOfRange",
    "Layout",
    "UpdateFormatError",
    "UpdateNotFinite",
    "clip_to_norm",
    "decode_update",
    "encode_update",
    "qrange_for",
    "secagg_session",
    "update_norm",
]

# Sample counts are divided by this public constant before masking: w in (0, 1] keeps every
# coordinate of w * delta inside the quantisation range whatever the local data size (an
# envoy holding more samples than this counts as holding exactly this many).
SAMPLE_CAP = 65536
EXTRA = 2  # w * loss, w * clip


class UpdateFormatError(ProtocolError):
    """An update or an aggregate that does not fit the round's update format."""


class UpdateNotFinite(UpdateFormatError):
    """A local update with NaN or infinite values: the envoy's training broke."""


class AggregateOutOfRange(UpdateFormatError):
    """An unmasked sum that no set of updates of this format can add up to (some envoy masked
    a vector outside the format); the director refuses it rather than apply it."""


def secagg_session(round: int, attempt: int, purpose: str = TRAIN) -> int:
    """The SecAgg `round` of one try of a training round (or of the evaluation after it):
    unique per (round, attempt, purpose).

    Every SecAgg message carries it and every signature and AEAD associated data binds it, so
    a late frame of an aborted try is refused by the next try's state machines instead of
    corrupting them, and the evaluation session of a round never mixes with its training.
    """
    if not 0 <= attempt < MAX_ATTEMPTS:
        raise UpdateFormatError(f"attempt {attempt} outside 0..{MAX_ATTEMPTS - 1}")
    if purpose not in PURPOSES:
        raise UpdateFormatError(f"purpose {purpose!r} is not one of {PURPOSES}")
    return (round * MAX_ATTEMPTS + attempt) * 2 + (purpose == EVALUATE)


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of an update over all its tensors; UpdateNotFinite if any value is NaN or
    infinite (or the norm overflows)."""
    squares = []
    for name, value in delta.items():
        flat = np.asarray(value, dtype=np.float64).ravel()
        if not np.isfinite(flat).all():
            raise UpdateNotFinite(f"the local update has non-finite values in {name!r}")
        squares.append(float(np.dot(flat, flat)))
    norm = math.sqrt(math.fsum(squares))
    if not math.isfinite(norm):
        raise UpdateNotFinite("the local update's norm overflows")
    return norm


def clip_to_norm(
    delta: Mapping[str, np.ndarray], bound: float
) -> tuple[dict[str, np.ndarray], float]:
    """(delta scaled to L2 norm <= bound, its norm before clipping); UpdateNotFinite if any
    value is NaN or infinite."""
    if not (math.isfinite(bound) and bound > 0):
        raise UpdateFormatError(f"norm bound {bound} must be finite and > 0")
    norm = update_norm(delta)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in delta.items()}, norm


def qrange_for(params: SecAggParams, participants: int) -> QuantizationRange:
    """The quantisation range every party of a round derives from its SecAggParams."""
    return QuantizationRange(clip=float(params.clip), max_summands=max(int(participants), 1))


@dataclass(frozen=True)
class Layout:
    """Names, shapes and offsets of the model tensors inside the flat update vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray]) -> Layout:
        return cls(tuple(weights), tuple(tuple(np.shape(v)) for v in weights.values()))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def vector_length(self) -> int:
        return self.size + EXTRA

    def flatten(self, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        """The tensors as one float64 vector; UpdateFormatError if names or shapes differ."""
        if tuple(weights) != self.names:
            raise UpdateFormatError("update tensors do not match the model's tensor names")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            value = np.asarray(weights[name])
            if value.shape != shape:
                raise UpdateFormatError(f"tensor {name} has shape {value.shape}, expected {shape}")
            parts.append(value.reshape(-1).astype(np.float64))
        return np.concatenate(parts) if parts else np.zeros(0)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = math.prod(shape)
            out[name] = vector[offset : offset + n].reshape(shape).astype(np.float32)
            offset += n
        return out


def encode_update(
    layout: Layout,
    delta: Mapping[str, np.ndarray],
    num_samples: int,
    train_loss: float,
    qrange: QuantizationRange,
    rng: np.random.Generator,
) -> np.ndarray:
    """The uint32 vector an envoy masks (see the module docstring)."""
    loss = float(train_loss) if math.isfinite(train_loss) else 0.0
    flat = layout.flatten(delta)
    if not np.isfinite(flat).all():
        raise UpdateNotFinite("the local update has non-finite values")
    payload = np.concatenate([flat, [loss]])
    return encode_weighted_update(
        payload, min(int(num_samples), SAMPLE_CAP), sample_cap=SAMPLE_CAP, qrange=qrange, rng=rng
    )


def decode_update(
    layout: Layout,
    total: np.ndarray,
    qrange: QuantizationRange,
    summands: int,
    *,
    norm_bound: float | None = None,
) -> tuple[dict[str, np.ndarray], float, float]:
    """(mean delta, mean train loss, total samples) from the unmasked sum of survivors.

    AggregateOutOfRange when the sum cannot come from `summands` honest updates: an element
    above what that many encodings add up to, a total weight below one sample per summand,
    or (with `norm_bound`) a mean update longer than the bound allows.
    """
    if total.shape != (layout.vector_length,):
        raise UpdateFormatError(
            f"aggregate has {total.shape} elements, expected {layout.vector_length}"
        )
    if (np.asarray(total) > summands * qrange.max_level).any():
        raise AggregateOutOfRange(
            f"an element of the sum exceeds {summands} x the largest encoding: some envoy "
            "masked a vector outside the update format"
        )
    try:
        mean, samples = decode_weighted_sum(
            total, sample_cap=SAMPLE_CAP, qrange=qrange, summands=summands
        )
    except ValueError as exc:
        raise UpdateFormatError(str(exc)) from None
    if samples < summands - summands * qrange.max_error_per_summand * SAMPLE_CAP / qrange.clip:
        raise AggregateOutOfRange(
            f"the claimed total weight ({samples:.3g} samples) is below one sample for each of "
            f"the {summands} survivors"
        )
    if not np.isfinite(mean).all():
        raise AggregateOutOfRange("the mean update is not finite")
    if norm_bound is not None:
        norm = float(np.linalg.norm(mean[: layout.size]))
        weight = samples / SAMPLE_CAP
        # Every element of the sum is off by < one level per summand; divided by the weight.
        slack = math.sqrt(layout.size) * summands * qrange.max_error_per_summand / weight
        if norm > norm_bound + slack:
            raise AggregateOutOfRange(
                f"the mean update has norm {norm:.4g}, above the round's bound {norm_bound:g} "
                "(the weighted mean of updates within the bound stays within it)"
            )
    return layout.unflatten(mean[: layout.size]), float(mean[-1]), samples
