"""How the director turns the participants' messages into one averaged update.

The director drives exactly one `Aggregation` object per round attempt, whatever the mode:
it feeds it the participants' messages (`receive`), tells it when the current stage's deadline
has passed (`close_stage`: whoever has not answered is a dropout), sends whatever it returns,
and reads `result()` once `done`. `SecureAggregation` (the default) runs the Bonawitz/SecAgg+
server of protocol.secagg; `PlainFedAvg` only exists behind `insecure_plain_aggregation`.

Weighted FedAvg under masking: an envoy with n samples quantises, with
crypto.quantize.encode_weighted_update, the vector [delta..., train_loss] scaled by
w = n / SAMPLE_CAP, followed by the weight itself. The unmasked sum gives sum(w_i delta_i),
sum(w_i loss_i) and sum(w_i), so the director gets the sample-weighted mean update and loss
without ever learning any single n_i, delta_i or loss.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.messages import PlainUpdate
from protocol.tensors import TensorError, state_to_numpy

# Sample counts are divided by this public constant before masking: w in (0, 1] keeps every
# coordinate of w * delta inside the quantisation range whatever the local data size (an
# envoy holding more samples than this counts as holding exactly this many).
SAMPLE_CAP = 65536
EXTRA = 2  # w * loss, w * clip


MAX_ATTEMPTS = 64


def secagg_session(round: int, attempt: int) -> int:
    """The SecAgg `round` of one try of a training round: unique per (round, attempt).

    Every SecAgg message and every AEAD associated data carries it, so a late frame of an
    aborted try is refused by the next try's state machines instead of corrupting them.
    """
    if not 0 <= attempt < MAX_ATTEMPTS:
        raise ValueError(f"attempt {attempt} outside 0..{MAX_ATTEMPTS - 1}")
    return round * MAX_ATTEMPTS + attempt


class AggregationError(ValueError):
    """A participant's message that cannot be part of the aggregate (logged and dropped)."""


@dataclass(frozen=True)
class Outgoing:
    recipient: str  # node id, or "*" for every participant
    body: Any


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
        if tuple(weights) != self.names:
            raise AggregationError("update tensors do not match the model's tensor names")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            value = np.asarray(weights[name])
            if value.shape != shape:
                raise AggregationError(f"tensor {name} has shape {value.shape}, expected {shape}")
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
    qrange: Any,
    rng: np.random.Generator,
) -> np.ndarray:
    """The uint32 vector an envoy masks (see the module docstring)."""
    from crypto.quantize import encode_weighted_update

    loss = float(train_loss) if math.isfinite(train_loss) else 0.0
    payload = np.concatenate([layout.flatten(delta), [loss]])
    return encode_weighted_update(
        payload, min(int(num_samples), SAMPLE_CAP), sample_cap=SAMPLE_CAP, qrange=qrange, rng=rng
    )


def decode_update(
    layout: Layout, total: np.ndarray, qrange: Any, summands: int
) -> tuple[dict[str, np.ndarray], float, float]:
    """(mean delta, mean train loss, total samples) from the unmasked sum of survivors."""
    from crypto.quantize import decode_weighted_sum

    if total.shape != (layout.vector_length,):
        raise AggregationError(
            f"aggregate has {total.shape} elements, expected {layout.vector_length}"
        )
    try:
        mean, samples = decode_weighted_sum(
            total, sample_cap=SAMPLE_CAP, qrange=qrange, summands=summands
        )
    except ValueError as exc:
        raise AggregationError(str(exc)) from None
    return layout.unflatten(mean[: layout.size]), float(mean[-1]), samples


@dataclass
class AggregateResult:
    mean_delta: dict[str, np.ndarray]
    survivors: list[str]
    dropouts: list[str]
    train_loss: float | None
    # Audit: the unmasked sum in Z_2^32, exactly as recovered (secure mode only).
    unmasked_sum: np.ndarray | None = None


class Aggregation(abc.ABC):
    """One round attempt's aggregation, driven by the director (see module docstring)."""

    secure: bool

    def __init__(self, participants: Sequence[str], layout: Layout, min_survivors: int) -> None:
        self.participants = list(participants)
        self.layout = layout
        self.min_survivors = min_survivors

    @property
    @abc.abstractmethod
    def stage(self) -> str: ...

    @property
    @abc.abstractmethod
    def done(self) -> bool: ...

    @property
    @abc.abstractmethod
    def failure(self) -> str | None:
        """Why the round must be aborted, once done without a result."""

    def start(self) -> list[Outgoing]:
        return []

    @abc.abstractmethod
    def receive(self, sender: str, body: Any) -> list[Outgoing]: ...

    @abc.abstractmethod
    def close_stage(self) -> list[Outgoing]: ...

    @abc.abstractmethod
    def result(self) -> AggregateResult: ...


@dataclass
class _Plain:
    delta: dict[str, np.ndarray]
    num_samples: int
    loss: float


class PlainFedAvg(Aggregation):
    """Unmasked weighted FedAvg. The director sees every update: insecure by design."""

    secure = False

    def __init__(self, participants: Sequence[str], layout: Layout, min_survivors: int) -> None:
        super().__init__(participants, layout, min_survivors)
        self._updates: dict[str, _Plain] = {}
        self._closed = False

    @property
    def stage(self) -> str:
        return "training"

    @property
    def done(self) -> bool:
        return self._closed or len(self._updates) == len(self.participants)

    @property
    def failure(self) -> str | None:
        if not self.done:
            return None
        if len(self._updates) < self.min_survivors:
            return f"{len(self._updates)} updates, fewer than the minimum {self.min_survivors}"
        return None

    def receive(self, sender: str, body: Any) -> list[Outgoing]:
        if not isinstance(body, PlainUpdate):
            raise AggregationError(f"expected PlainUpdate, got {type(body).__name__}")
        if sender not in self.participants:
            raise AggregationError(f"{sender} is not a participant")
        if sender in self._updates:
            raise AggregationError(f"second update from {sender}")
        if self._closed:
            raise AggregationError("update after the deadline")
        try:
            delta = state_to_numpy(body.delta)
        except TensorError as exc:
            raise AggregationError(f"bad tensor: {exc}") from None
        self.layout.flatten(delta)  # shape/name check
        if not all(np.all(np.isfinite(v)) for v in delta.values()):
            raise AggregationError("update has non-finite values")
        if body.num_samples <= 0:
            raise AggregationError("update claims no samples")
        self._updates[sender] = _Plain(delta, body.num_samples, body.train_loss)
        return []

    def close_stage(self) -> list[Outgoing]:
        self._closed = True
        return []

    def result(self) -> AggregateResult:
        if not self.done or self.failure:
            raise AggregationError(self.failure or "aggregation is not done")
        survivors = sorted(self._updates)
        weights = np.array([self._updates[n].num_samples for n in survivors], dtype=np.float64)
        weights /= weights.sum()
        mean = {
            name: sum(
                w * self._updates[n].delta[name].astype(np.float64)
                for w, n in zip(weights, survivors, strict=True)
            ).astype(np.float32)
            for name in self.layout.names
        }
        losses = [self._updates[n].loss for n in survivors]
        loss = float(np.dot(weights, losses)) if all(map(math.isfinite, losses)) else float("nan")
        return AggregateResult(
            mean_delta=mean,
            survivors=survivors,
            dropouts=sorted(set(self.participants) - set(survivors)),
            train_loss=loss,
        )


def qrange_for(params: Any, participants: int) -> Any:
    """The quantisation range every party of a round derives from its SecAggParams."""
    from crypto.quantize import QuantizationRange

    return QuantizationRange(clip=float(params.clip), max_summands=max(int(participants), 1))
