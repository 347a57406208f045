"""How an envoy takes part in one SecAgg session: the counterpart of the director's Aggregation.

The envoy's round code drives one `Contribution` per RoundStart (and one per EvaluateRequest),
whatever the mode: `start()` when the session begins, `submit(...)` once local training (or
scoring) ended, `receive()` for every director message of the session, sending whatever each
returns and logging what it refused (`take_refusals`). `entered_on` and `sent_in` name the
stage a message opens or ends, which is where a fault plan's `[[crash]]` stops the envoy.

`SecureContribution` runs the SecAgg client of protocol.secagg on the round's update (clipped
to the round's L2 bound, in the format of protocol.secagg.update); `SecureEvaluation` on the
validation histograms (protocol.secagg.evaluation). Both check the announced parameters
against the envoy's own policy before anything is generated, and a `SurvivorGuard` (the
envoy's node.ledger) decides which survivor set may be signed. `PlainContribution` sends the
update in the clear and only exists behind the envoy's own `insecure_plain_updates`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from node.errors import FedbusError
from node.retransmit import Answers
from protocol.base import Message
from protocol.errors import ProtocolError
from protocol.events import Outgoing, RefusalLog
from protocol.messages import PlainUpdate, RoundStart
from protocol.secagg.client import SecAggClient
from protocol.secagg.common import EVALUATE, TRAIN, survivors_digest
from protocol.secagg.evaluation import EvaluationLayout, encode_evaluation
from protocol.secagg.messages import (
    SecAggConsistencyRequest,
    SecAggConsistencySignature,
    SecAggParams,
    SecAggUnmaskRequest,
)
from protocol.secagg.policy import ClientPolicy, PolicyViolation
from protocol.secagg.transitions import CLIENT_ENTERS, CLIENT_SENDS
from protocol.secagg.update import (
    Layout,
    clip_to_norm,
    encode_update,
    qrange_for,
    secagg_session,
)
from protocol.stages import Stage
from protocol.tensors import state_from_numpy

__all__ = [
    "Contribution",
    "ContributionError",
    "LocalUpdate",
    "PlainContribution",
    "RoundRefused",
    "SecureContribution",
    "SecureEvaluation",
    "SurvivorGuard",
    "contribution_for",
]


class ContributionError(FedbusError, ValueError):
    """A contribution used out of order (a programming error in the round code)."""


class RoundRefused(FedbusError):
    """The envoy's policy refuses what the director asked for; the message says why. The
    envoy then sends nothing for that session."""


@dataclass(frozen=True)
class LocalUpdate:
    """What local training produced: the change of the weights, and how it was obtained.

    `rounding_seed` seeds the stochastic rounding of the quantisation, so the update of a
    round encodes to the same vector in every attempt with the same quantisation range
    (None: fresh rounding each time).
    """

    delta: dict[str, np.ndarray]
    num_samples: int
    train_loss: float
    rounding_seed: int | None = None


class SurvivorGuard(Protocol):
    """Who decides, across the attempts of a round, which survivor set may be signed."""

    def refuse_signing(self, round: int, survivors: str) -> str: ...

    def signed(self, round: int, survivors: str) -> None: ...


class Contribution(RefusalLog, abc.ABC):
    """One session of one envoy (see the module docstring)."""

    secure: bool
    session: int | None = None  # the SecAgg session number its messages carry
    round: int | None = None  # the training round it belongs to (SecAgg sessions only)

    def __init__(self, *, director_id: str) -> None:
        super().__init__("fedbus.contribution", "contribution_refused")
        self.director_id = director_id
        # What this session sent in answer to each director message, so a message the
        # director sends again gets the very same answer (node.retransmit). The envoy hands
        # in the one its opening message (RoundStart, EvaluateRequest) started.
        self.answers = Answers()

    @property
    @abc.abstractmethod
    def done(self) -> bool:
        """Nothing more to send in this session (completed or aborted)."""

    @property
    def aborted(self) -> bool:
        return False

    def start(self) -> list[Outgoing]:
        """What goes out as soon as the session starts, before training."""
        return []

    @abc.abstractmethod
    def receive(self, sender: str, body: Message) -> list[Outgoing]:
        """One director message of this session; a refused one is recorded (take_refusals)."""

    def entered_on(self, body: Message) -> Stage | None:
        """The stage the envoy enters when `body` arrives, if it opens one."""
        return None

    @abc.abstractmethod
    def sent_in(self, body: Message) -> Stage | None:
        """The stage an outgoing `body` belongs to."""


class _SecAggContribution(Contribution):
    """The SecAgg client of one session: the envoy only ever sends its vector masked."""

    secure = True

    def __init__(
        self,
        *,
        node_id: str,
        director_id: str,
        federation: str,
        round: int,
        attempt: int,
        purpose: str,
        params: SecAggParams,
        participants: Sequence[str],
        signing_key: bytes | None,
        peer_signing_keys: Mapping[str, bytes],
        policy: ClientPolicy,
        guard: SurvivorGuard | None = None,
    ) -> None:
        super().__init__(director_id=director_id)
        self.round = self._round = round
        self.session = secagg_session(round, attempt, purpose)
        self.participants = list(participants)
        self.guard = guard
        try:
            self.client = SecAggClient(
                node_id,
                self.session,
                params,
                self.participants,
                signing_key=signing_key,
                peer_signing_keys=peer_signing_keys or None,
                server_id=director_id,
                federation=federation,
                purpose=purpose,
                policy=policy,
            )
        except PolicyViolation as exc:
            raise RoundRefused(f"SecAgg parameters refused: {exc}") from None
        except ProtocolError as exc:
            raise RoundRefused(f"cannot take part: {exc}") from None
        self.verdict = self.client.verdict

    @property
    def done(self) -> bool:
        return self.client.done

    @property
    def aborted(self) -> bool:
        return self.client.aborted

    def start(self) -> list[Outgoing]:
        return self.client.start()  # AdvertiseKeys

    def _submit_vector(self, vector: np.ndarray) -> list[Outgoing]:
        return self.client.set_input(vector)  # MaskedInput, if the shares are already here

    def receive(self, sender: str, body: Message) -> list[Outgoing]:
        digest = ""
        if self.guard is not None and isinstance(
            body, SecAggConsistencyRequest | SecAggUnmaskRequest
        ):
            digest = survivors_digest(body.survivors).hex()
            reason = self.guard.refuse_signing(self._round, digest)
            if reason:
                return self.refuse(sender, body, reason)
        out = self.client.receive(sender, body)
        self.refusals.extend(self.client.take_refusals())
        if digest and any(isinstance(o.body, SecAggConsistencySignature) for o in out):
            # Recorded before the signature leaves the envoy (the caller sends `out`).
            assert self.guard is not None
            self.guard.signed(self._round, digest)
        return out

    def entered_on(self, body: Message) -> Stage | None:
        return CLIENT_ENTERS.get(type(body))

    def sent_in(self, body: Message) -> Stage | None:
        return CLIENT_SENDS.get(type(body))


class SecureContribution(_SecAggContribution):
    """The round's model update, clipped to the round's L2 bound, masked by SecAgg."""

    def __init__(
        self,
        *,
        node_id: str,
        director_id: str,
        round: int,
        attempt: int,
        params: SecAggParams,
        participants: Sequence[str],
        layout: Layout,
        signing_key: bytes | None,
        peer_signing_keys: Mapping[str, bytes],
        federation: str = "",
        update_norm: float | None = None,
        policy: ClientPolicy | None = None,
        guard: SurvivorGuard | None = None,
        audit: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        super().__init__(
            node_id=node_id,
            director_id=director_id,
            federation=federation,
            round=round,
            attempt=attempt,
            purpose=TRAIN,
            params=params,
            participants=participants,
            signing_key=signing_key,
            peer_signing_keys=peer_signing_keys,
            policy=policy if policy is not None else ClientPolicy(),
            guard=guard,
        )
        self.layout = layout
        self.update_norm = update_norm
        self.qrange = qrange_for(params, len(participants))
        self.audit = audit
        self.update_norm_before_clip: float | None = None

    def submit(self, update: LocalUpdate) -> list[Outgoing]:
        """Clip (UpdateNotFinite for NaN/inf), quantise and mask the update."""
        delta: Mapping[str, np.ndarray] = update.delta
        if self.update_norm is not None:
            delta, self.update_norm_before_clip = clip_to_norm(delta, self.update_norm)
        vector = encode_update(
            self.layout,
            delta,
            update.num_samples,
            update.train_loss,
            self.qrange,
            np.random.default_rng(update.rounding_seed),
        )
        if self.audit is not None:
            self.audit(vector)
        return self._submit_vector(vector)


class SecureEvaluation(_SecAggContribution):
    """The envoy's validation histograms and loss of the round's new model, masked by SecAgg."""

    def __init__(
        self,
        *,
        node_id: str,
        director_id: str,
        federation: str,
        round: int,
        attempt: int,
        params: SecAggParams,
        participants: Sequence[str],
        num_classes: int,
        bins: int,
        signing_key: bytes | None,
        peer_signing_keys: Mapping[str, bytes],
        policy: ClientPolicy,
    ) -> None:
        super().__init__(
            node_id=node_id,
            director_id=director_id,
            federation=federation,
            round=round,
            attempt=attempt,
            purpose=EVALUATE,
            params=params,
            participants=participants,
            signing_key=signing_key,
            peer_signing_keys=peer_signing_keys,
            policy=policy,
        )
        self.layout = EvaluationLayout(num_classes, bins)

    def submit(self, histograms: np.ndarray, loss_sum: float) -> list[Outgoing]:
        """Mask this envoy's histogram vector (node.training.histograms) and loss sum."""
        vector = encode_evaluation(
            self.layout,
            histograms,
            loss_sum,
            participants=len(self.participants),
            rng=np.random.default_rng(),
        )
        return self._submit_vector(vector)

    def entered_on(self, body: Message) -> Stage | None:
        return None  # fault plans stop an envoy in the training session's stages only

    def sent_in(self, body: Message) -> Stage | None:
        return None


class PlainContribution(Contribution):
    """The update in the clear: the director sees it. Insecure by design."""

    secure = False

    def __init__(self, *, director_id: str) -> None:
        super().__init__(director_id=director_id)
        self._sent = False

    @property
    def done(self) -> bool:
        return self._sent

    def submit(self, update: LocalUpdate) -> list[Outgoing]:
        if self._sent:
            raise ContributionError("the update of this round was already sent")
        self._sent = True
        loss = update.train_loss if math.isfinite(update.train_loss) else 0.0
        body = PlainUpdate(
            delta=state_from_numpy(update.delta),
            num_samples=update.num_samples,
            train_loss=loss,
        )
        return [Outgoing(self.director_id, body)]

    def receive(self, sender: str, body: Message) -> list[Outgoing]:
        return self.refuse(sender, body, "a plain round has no messages after RoundStart")

    def sent_in(self, body: Message) -> Stage | None:
        # The plain update stands where the masked input would be.
        return Stage.MASKED_INPUT if isinstance(body, PlainUpdate) else None


def contribution_for(
    start: RoundStart,
    *,
    round: int,
    node_id: str,
    director_id: str,
    layout: Layout,
    signing_key: bytes | None,
    peer_signing_keys: Mapping[str, bytes],
    federation: str = "",
    policy: ClientPolicy | None = None,
    max_update_norm: float | None = None,
    allow_plain: bool = False,
    guard: SurvivorGuard | None = None,
    audit: Callable[[np.ndarray], None] | None = None,
) -> SecureContribution | PlainContribution:
    """The contribution a RoundStart asks for, if the envoy's policy allows it (RoundRefused
    otherwise): secure aggregation unless the envoy itself opted into plain updates."""
    if start.secagg is None:
        if not allow_plain:
            raise RoundRefused(
                "the director asks for a plain update; this envoy's policy requires secure "
                "aggregation (policy.insecure_plain_updates is off)"
            )
        return PlainContribution(director_id=director_id)
    if max_update_norm is not None and start.update_norm > max_update_norm:
        raise RoundRefused(
            f"update norm bound {start.update_norm:g} above this envoy's policy "
            f"max_update_norm {max_update_norm:g}"
        )
    return SecureContribution(
        node_id=node_id,
        director_id=director_id,
        round=round,
        attempt=start.attempt,
        params=start.secagg,
        participants=start.selected,
        layout=layout,
        signing_key=signing_key,
        peer_signing_keys=peer_signing_keys,
        federation=federation,
        update_norm=start.update_norm,
        policy=policy,
        guard=guard,
        audit=audit,
    )
