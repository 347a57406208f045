"""Typed messages and the frame envelope.

Every frame on the bus is one `Envelope`, MessagePack-encoded. Its `body` is a tagged union: the
tag field `type` names the message, so one validating decode yields a typed struct or an error.
"""

from __future__ import annotations

import os
from typing import Annotated, get_args

import msgspec

from protocol.base import Message
from protocol.secagg.messages import SecAggMessage, SecAggParams
from protocol.tensors import MAX_DIMS, Tensor
from protocol.types import Count, FederationId, MessageId, NodeId, Round, ShortText

PROTOCOL_VERSION = 1
# Tries of one training round: a round aborted below the threshold is retried under the same
# round number, at most this many times (RoundStart.attempt and RoundEnd.attempt are below it).
MAX_ATTEMPTS = 64
Attempt = Annotated[int, msgspec.Meta(ge=0, le=MAX_ATTEMPTS - 1)]

LayerName = Annotated[str, msgspec.Meta(max_length=256)]
Weights = dict[LayerName, Tensor]
# A model fingerprint: 32 hex digits of SHA-256 over a ModelSummary (node.modelcheck).
Fingerprint = Annotated[str, msgspec.Meta(pattern="^([0-9a-f]{32})?$")]
MAX_LAYERS = 100_000


class Presence(Message, frozen=True):
    """Heartbeat of a node: who is online, and what it is doing."""

    online: bool
    role: Annotated[str, msgspec.Meta(pattern="^(envoy|director)$")]
    heartbeat_s: float
    stage: ShortText = ""
    # The fingerprint of the model this node builds from its config ("" = not declared), so
    # a director and an envoy configured with different models find out when the envoy joins.
    model: Fingerprint = ""


class ModelSummary(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What makes two nodes' models the same network: the [model] settings that shape it
    (as canonical JSON text) and the name and shape of every weight."""

    settings: dict[ShortText, ShortText]
    layers: Annotated[
        list[tuple[LayerName, Annotated[list[Count], msgspec.Meta(max_length=MAX_DIMS)]]],
        msgspec.Meta(max_length=MAX_LAYERS),
    ]


class ModelMismatch(Message, frozen=True):
    """Director -> envoy: your model's fingerprint is not the federation's; this is its model
    (the envoy names the differences and stops: a config error, not something to retry)."""

    fingerprint: Fingerprint
    model: ModelSummary


class TrainPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    local_epochs: Annotated[int, msgspec.Meta(ge=1, le=1000)]
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=65536)]
    lr: Annotated[float, msgspec.Meta(gt=0, le=10)]
    momentum: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    kl_beta: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    augment: bool = True


class RoundStart(Message, frozen=True):
    weights: Weights
    selected: list[NodeId]
    plan: TrainPlan
    deadlines: dict[ShortText, Annotated[float, msgspec.Meta(gt=0)]]
    secagg: SecAggParams | None = None
    # A round aborted below the threshold is retried under the same round number; the attempt
    # tells the tries apart (late frames of an aborted try must not touch the next one).
    attempt: Attempt = 0


class PlainUpdate(Message, frozen=True):
    """An unmasked update: only sent when secure aggregation is explicitly switched off."""

    delta: Weights
    num_samples: Count
    train_loss: float


class EvaluateRequest(Message, frozen=True):
    weights: Weights
    bins: Annotated[int, msgspec.Meta(ge=2, le=10000)] = 100


class EvaluateResult(Message, frozen=True):
    """Per-class score histograms of the envoy's validation split, as one flat vector.

    Histograms, not per-image scores, so the director learns the ROC and nothing per patient.
    The layout (node.training.histograms) depends on the number of classes and bins: for two
    classes it is the negative then the positive histogram of P(class 1).
    """

    num_samples: Count
    loss_sum: float
    histograms: list[Count]


class RoundEnd(Message, frozen=True):
    status: Annotated[str, msgspec.Meta(pattern="^(completed|aborted)$")]
    reason: ShortText = ""
    attempt: Attempt = 0


class Shutdown(Message, frozen=True):
    reason: ShortText = ""


class StatusRequest(Message, frozen=True):
    reply_to: NodeId


class EnvoyStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    online: bool
    last_seen_s: float
    stage: ShortText = ""


class StatusReply(Message, frozen=True):
    round: Round
    stage: ShortText
    rounds_total: Round
    envoys: dict[NodeId, EnvoyStatus]


CoreMessage = (
    Presence
    | ModelMismatch
    | RoundStart
    | PlainUpdate
    | EvaluateRequest
    | EvaluateResult
    | RoundEnd
    | Shutdown
    | StatusRequest
    | StatusReply
)
# Every message body a frame may carry: one tagged union, decoded in one validating pass.
Body = CoreMessage | SecAggMessage
CORE_MESSAGES: tuple[type[Message], ...] = get_args(CoreMessage)
ALL_MESSAGES: tuple[type[Message], ...] = get_args(Body)


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    federation: FederationId
    round: Round
    sender: NodeId
    recipient: NodeId
    msg_id: MessageId
    body: Body
    signature: Annotated[bytes, msgspec.Meta(max_length=128)] = b""

    @property
    def type(self) -> str:
        return type(self.body).__name__


def new_message_id() -> bytes:
    return os.urandom(16)


def envelope(*, federation: str, round: int, sender: str, recipient: str, body: Body) -> Envelope:
    return Envelope(
        version=PROTOCOL_VERSION,
        federation=federation,
        round=round,
        sender=sender,
        recipient=recipient,
        msg_id=new_message_id(),
        body=body,
    )
