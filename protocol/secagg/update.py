"""The update format envoys and director agree on: what an envoy masks, and what the sum means.

Weighted FedAvg under masking: an envoy with n samples quantises, with
crypto.quantize.encode_weighted_update, the vector [delta..., train_loss] scaled by
w = n / SAMPLE_CAP, followed by the weight itself. The unmasked sum gives sum(w_i delta_i),
sum(w_i loss_i) and sum(w_i), so the director gets the sample-weighted mean update and loss
without ever learning any single n_i, delta_i or loss.

The model's tensors are laid out in one flat vector in the order of the global weights
(`Layout`); every party derives the quantisation range from the round's SecAggParams
(`qrange_for`) and the SecAgg session number from the round and its attempt
(`secagg_session`), so nothing of the format travels besides RoundStart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from crypto.quantize import QuantizationRange, decode_weighted_sum, encode_weighted_update
from protocol.errors import ProtocolError
from protocol.messages import MAX_ATTEMPTS
from protocol.secagg.messages import SecAggParams

__all__ = [
    "EXTRA",
    "MAX_ATTEMPTS",
    "SAMPLE_CAP",
    "Layout",
    "UpdateFormatError",
    "decode_update",
    "encode_update",
    "qrange_for",
    "secagg_session",
]

# Sample counts are divided by this public constant before masking: w in (0, 1] keeps every
# coordinate of w * delta inside the quantisation range whatever the local data size (an
# envoy holding more samples than this counts as holding exactly this many).
SAMPLE_CAP = 65536
EXTRA = 2  # w * loss, w * clip


class UpdateFormatError(ProtocolError):
    """An update or an aggregate that does not fit the round's update format."""


def secagg_session(round: int, attempt: int) -> int:
    """The SecAgg `round` of one try of a training round: unique per (round, attempt).

    Every SecAgg message and every AEAD associated data carries it, so a late frame of an
    aborted try is refused by the next try's state machines instead of corrupting them.
    """
    if not 0 <= attempt < MAX_ATTEMPTS:
        raise UpdateFormatError(f"attempt {attempt} outside 0..{MAX_ATTEMPTS - 1}")
    return round * MAX_ATTEMPTS + attempt


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
    payload = np.concatenate([layout.flatten(delta), [loss]])
    return encode_weighted_update(
        payload, min(int(num_samples), SAMPLE_CAP), sample_cap=SAMPLE_CAP, qrange=qrange, rng=rng
    )


def decode_update(
    layout: Layout, total: np.ndarray, qrange: QuantizationRange, summands: int
) -> tuple[dict[str, np.ndarray], float, float]:
    """(mean delta, mean train loss, total samples) from the unmasked sum of survivors."""
    if total.shape != (layout.vector_length,):
        raise UpdateFormatError(
            f"aggregate has {total.shape} elements, expected {layout.vector_length}"
        )
    try:
        mean, samples = decode_weighted_sum(
            total, sample_cap=SAMPLE_CAP, qrange=qrange, summands=summands
        )
    except ValueError as exc:
        raise UpdateFormatError(str(exc)) from None
    return layout.unflatten(mean[: layout.size]), float(mean[-1]), samples
