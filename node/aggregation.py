"""How the director turns the participants' messages into one averaged update.

The director drives exactly one `Aggregation` per round attempt, whatever the mode: it feeds
it the participants' messages (`receive`), tells it when the current stage's deadline has
passed (`close_stage`: whoever has not answered is a dropout), sends whatever it returns, logs
what it refused (`take_refusals`), and reads `result()` once `done`. `SecureAggregation` (the
default) runs the Bonawitz/SecAgg+ server of protocol.secagg and decodes the unmasked sum with
the update format of protocol.secagg.update, refusing a sum outside that format
(AggregateOutOfRange: logged, the round fails rather than apply it); `SecureEvaluation` does
the same for the validation histograms after a round (protocol.secagg.evaluation);
`PlainAggregation` only exists behind `insecure_plain_aggregation`. The envoy's counterpart is
node.contribution.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from node.config import SecAggConfig
from node.errors import ExitCode, FedbusError
from protocol.base import Message
from protocol.events import Outgoing, Refusal, RefusalLog, Refused
from protocol.messages import PlainUpdate
from protocol.secagg.common import EVALUATE, TRAIN
from protocol.secagg.evaluation import EvaluationLayout, EvaluationSum, decode_evaluation
from protocol.secagg.messages import SecAggParams
from protocol.secagg.params import Analysis, ParameterError, analyse, find_parameters
from protocol.secagg.server import SecAggServer
from protocol.secagg.transitions import State
from protocol.secagg.update import (
    AggregateOutOfRange,
    Layout,
    UpdateFormatError,
    decode_update,
    qrange_for,
)
from protocol.stages import Stage
from protocol.tensors import TensorError, state_to_numpy

__all__ = [
    "AggregateOutOfRange",
    "AggregateResult",
    "Aggregation",
    "AggregationError",
    "Driven",
    "PlainAggregation",
    "SecureAggregation",
    "SecureEvaluation",
    "analysis_of",
    "params_for",
]


class AggregationError(FedbusError, ValueError):
    """An aggregation asked for a result it does not have (the round fails)."""

    exit_code = ExitCode.ROUND_FAILED


class OutOfRangeAggregate(AggregationError):
    """The unmasked sum is outside the format (protocol AggregateOutOfRange): refused."""


class Driven(Protocol):
    """What the director's round driver feeds, stage by stage, until it is done: an
    Aggregation, or the SecureEvaluation after a round."""

    @property
    def stage(self) -> State: ...

    @property
    def done(self) -> bool: ...

    @property
    def failure(self) -> str | None: ...

    def receive(self, sender: str, body: Message) -> list[Outgoing]: ...

    def close_stage(self) -> list[Outgoing]: ...

    def awaiting(self) -> frozenset[str]: ...

    def short_of_threshold(self) -> bool: ...

    def take_refusals(self) -> list[Refusal]: ...


@dataclass
class AggregateResult:
    mean_delta: dict[str, np.ndarray]
    survivors: list[str]
    dropouts: list[str]
    train_loss: float | None
    # Audit: the unmasked sum in Z_2^32, exactly as recovered (secure mode only).
    unmasked_sum: np.ndarray | None = None


class Aggregation(RefusalLog, abc.ABC):
    """One round attempt's aggregation, driven by the director (see module docstring)."""

    secure: bool

    def __init__(self, participants: Sequence[str], layout: Layout, min_survivors: int) -> None:
        super().__init__("fedbus.aggregation", "aggregation_refused")
        self.participants = list(participants)
        self.layout = layout
        self.min_survivors = min_survivors

    @property
    def params(self) -> SecAggParams | None:
        """What RoundStart announces for this aggregation (None: plain updates)."""
        return None

    @property
    @abc.abstractmethod
    def stage(self) -> State:
        """The stage whose deadline runs now (the SecAgg server's state in secure mode)."""

    @property
    @abc.abstractmethod
    def done(self) -> bool: ...

    @property
    @abc.abstractmethod
    def failure(self) -> str | None:
        """Why the round must be aborted, once done without a result."""

    @abc.abstractmethod
    def awaiting(self) -> frozenset[str]:
        """The participants the current stage still waits for."""

    @abc.abstractmethod
    def short_of_threshold(self) -> bool:
        """Whether closing the current stage now would fail the attempt for lack of answers."""

    @abc.abstractmethod
    def stopped_at(self, participant: str) -> Stage | None:
        """The first stage `participant` has not answered (None: it answered every one)."""

    def start(self) -> list[Outgoing]:
        return []

    @abc.abstractmethod
    def receive(self, sender: str, body: Message) -> list[Outgoing]:
        """Take one participant's message; a refused one is recorded (take_refusals)."""

    @abc.abstractmethod
    def close_stage(self) -> list[Outgoing]: ...

    @abc.abstractmethod
    def result(self) -> AggregateResult: ...


@dataclass
class _Plain:
    delta: dict[str, np.ndarray]
    num_samples: int
    loss: float


class PlainAggregation(Aggregation):
    """Unmasked weighted FedAvg. The director sees every update: insecure by design."""

    secure = False

    def __init__(self, participants: Sequence[str], layout: Layout, min_survivors: int) -> None:
        super().__init__(participants, layout, min_survivors)
        self._updates: dict[str, _Plain] = {}
        self._closed = False

    @property
    def stage(self) -> Stage:
        return Stage.TRAINING

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

    def awaiting(self) -> frozenset[str]:
        if self._closed:
            return frozenset()
        return frozenset(self.participants) - self._updates.keys()

    def short_of_threshold(self) -> bool:
        return len(self._updates) < self.min_survivors

    def stopped_at(self, participant: str) -> Stage | None:
        return None if participant in self._updates else Stage.TRAINING

    def receive(self, sender: str, body: Message) -> list[Outgoing]:
        try:
            self._updates[sender] = self._accept(sender, body)
        except Refused as refusal:
            return self.refuse(sender, body, refusal.reason)
        return []

    def _accept(self, sender: str, body: Message) -> _Plain:
        """The participant's update, if it can be one of the averaged ones."""
        if not isinstance(body, PlainUpdate):
            raise Refused(f"expected PlainUpdate, got {type(body).__name__}")
        if sender not in self.participants:
            raise Refused(f"{sender} is not a participant")
        if sender in self._updates:
            raise Refused(f"second update from {sender}")
        if self._closed:
            raise Refused("update after the deadline")
        try:
            delta = state_to_numpy(body.delta)
        except TensorError as exc:
            raise Refused(f"bad tensor: {exc}") from None
        try:
            self.layout.flatten(delta)  # names and shapes
        except UpdateFormatError as exc:
            raise Refused(str(exc)) from None
        if not all(np.all(np.isfinite(v)) for v in delta.values()):
            raise Refused("update has non-finite values")
        if body.num_samples <= 0:
            raise Refused("update claims no samples")
        return _Plain(delta, body.num_samples, body.train_loss)

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


def params_for(cfg: SecAggConfig, n: int) -> SecAggParams:
    """SecAggParams for `n` participants: the cheapest (k, t) the parameter finder allows.

    Small rounds cannot always tolerate the configured dropout fraction (malicious mode needs
    n - dropouts > (n + corrupt) / 2): the tolerated fraction is then lowered one envoy at a
    time, which only means a round with more dropouts aborts (and is retried) instead of
    completing. The corrupt fraction is never lowered: the envoys would refuse the result.
    """
    fraction = cfg.dropout_fraction
    while True:
        try:
            params = find_parameters(
                n,
                dropout_fraction=fraction,
                corrupt_fraction=cfg.corrupt_fraction,
                malicious=cfg.malicious,
                clip=float(cfg.clip),
                graph="complete" if cfg.graph == "complete" else "auto",
            )
            break
        except ParameterError:
            dropouts = math.ceil(fraction * n - 1e-12)
            if dropouts <= 0:
                raise
            fraction = (dropouts - 1) / n
    return params


def analysis_of(cfg: SecAggConfig, params: SecAggParams, n: int) -> Analysis:
    """The failure probabilities of `params` under the configured fractions (for the log)."""
    k = params.k if params.graph == "harary" else n - 1
    return analyse(
        n,
        k,
        params.t,
        dropouts=math.ceil(cfg.dropout_fraction * n - 1e-12),
        corrupt=math.ceil(cfg.corrupt_fraction * n - 1e-12),
        malicious=params.malicious,
    )


class _SecAggDriver(RefusalLog):
    """The SecAgg+ server of one session behind the director's round driver."""

    def __init__(
        self,
        *,
        round: int,
        participants: Sequence[str],
        vector_length: int,
        params: SecAggParams,
        client_signing_keys: Mapping[str, bytes] | None,
        federation: str,
        purpose: str,
    ) -> None:
        # Not super(): in SecureAggregation the next class is Aggregation, initialised apart.
        RefusalLog.__init__(self, "fedbus.aggregation", "aggregation_refused")
        self._params = params
        self.session = round
        self.server = SecAggServer(
            round,
            params,
            list(participants),
            vector_length,
            dict(client_signing_keys or {}) if params.malicious else None,
            federation=federation,
            purpose=purpose,
        )

    @property
    def params(self) -> SecAggParams:
        return self._params

    @property
    def stage(self) -> State:
        return self.server.stage

    @property
    def done(self) -> bool:
        return self.server.done

    def start(self) -> list[Outgoing]:
        return []

    def awaiting(self) -> frozenset[str]:
        return self.server.awaiting

    def short_of_threshold(self) -> bool:
        return self.server.short_of_threshold()

    def stopped_at(self, participant: str) -> Stage | None:
        return self.server.stopped_at(participant)

    def receive(self, sender: str, body: Message) -> list[Outgoing]:
        out = self.server.receive(sender, body)
        self.refusals.extend(self.server.take_refusals())
        return out

    def close_stage(self) -> list[Outgoing]:
        return self.server.close_stage()

    def _aborted(self) -> str | None:
        if not self.server.done:
            return None
        if self.server.aborted:
            return f"secure aggregation aborted: {self.server.abort_reason}"
        return None


class SecureAggregation(_SecAggDriver, Aggregation):
    """The SecAgg+ server behind `Aggregation`: the director only ever holds the masked sum."""

    secure = True

    def __init__(
        self,
        *,
        round: int,
        participants: Sequence[str],
        layout: Layout,
        min_survivors: int,
        params: SecAggParams,
        client_signing_keys: Mapping[str, bytes] | None = None,
        federation: str = "",
        update_norm: float | None = None,
    ) -> None:
        Aggregation.__init__(self, participants, layout, min_survivors)
        _SecAggDriver.__init__(
            self,
            round=round,
            participants=participants,
            vector_length=layout.vector_length,
            params=params,
            client_signing_keys=client_signing_keys,
            federation=federation,
            purpose=TRAIN,
        )
        self.qrange = qrange_for(params, len(participants))
        self.update_norm = update_norm

    @classmethod
    def for_round(
        cls,
        *,
        round: int,
        participants: Sequence[str],
        layout: Layout,
        min_survivors: int,
        cfg: SecAggConfig,
        client_signing_keys: Mapping[str, bytes] | None,
        federation: str = "",
    ) -> SecureAggregation:
        return cls(
            round=round,
            participants=participants,
            layout=layout,
            min_survivors=min_survivors,
            params=params_for(cfg, len(participants)),
            client_signing_keys=client_signing_keys,
            federation=federation,
            update_norm=cfg.update_norm,
        )

    @property
    def failure(self) -> str | None:
        aborted = self._aborted()
        if aborted or not self.server.done:
            return aborted
        if len(self.server.survivors) < self.min_survivors:
            return (
                f"{len(self.server.survivors)} survivors, fewer than the minimum "
                f"{self.min_survivors}"
            )
        return None

    def result(self) -> AggregateResult:
        if self.failure or self.server.result is None:
            raise AggregationError(self.failure or "no aggregate")
        survivors = sorted(self.server.survivors)
        total = self.server.result
        try:
            mean, loss, _samples = decode_update(
                self.layout, total, self.qrange, len(survivors), norm_bound=self.update_norm
            )
        except AggregateOutOfRange as exc:
            raise OutOfRangeAggregate(f"aggregate out of range: {exc}") from None
        except UpdateFormatError as exc:
            raise AggregationError(f"aggregate does not decode: {exc}") from None
        return AggregateResult(
            mean_delta=mean,
            survivors=survivors,
            dropouts=sorted(set(self.participants) - set(survivors)),
            train_loss=loss,
            unmasked_sum=total.copy(),
        )


class SecureEvaluation(_SecAggDriver):
    """The second SecAgg session of a round: the sum of the envoys' validation histograms."""

    secure = True

    def __init__(
        self,
        *,
        round: int,
        participants: Sequence[str],
        num_classes: int,
        bins: int,
        params: SecAggParams,
        client_signing_keys: Mapping[str, bytes] | None = None,
        federation: str = "",
    ) -> None:
        self.layout = EvaluationLayout(num_classes, bins)
        self.participants = list(participants)
        super().__init__(
            round=round,
            participants=participants,
            vector_length=self.layout.vector_length,
            params=params,
            client_signing_keys=client_signing_keys,
            federation=federation,
            purpose=EVALUATE,
        )

    @property
    def failure(self) -> str | None:
        return self._aborted()

    def result(self) -> EvaluationSum:
        if self.failure or self.server.result is None:
            raise AggregationError(self.failure or "no evaluation sum")
        try:
            return decode_evaluation(
                self.layout,
                self.server.result,
                participants=len(self.participants),
                summands=len(self.server.survivors),
            )
        except AggregateOutOfRange as exc:
            raise OutOfRangeAggregate(f"evaluation sum out of range: {exc}") from None
        except UpdateFormatError as exc:
            raise AggregationError(f"evaluation sum does not decode: {exc}") from None
