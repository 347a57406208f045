"""Typed messages and the frame envelope.

Every frame on the bus is one `Envelope`, MessagePack-encoded. Its `body` is a tagged union: the
tag field `type` names the message, so one validating decode yields a typed struct or an error.
"""

from __future__ import annotations

import os
from typing import Annotated, get_args

import msgspec

from protocol.base import Message
from protocol.secagg.messages import MAX_PARTICIPANTS, SecAggMessage, SecAggParams
from protocol.tensors import MAX_DIMS, Tensor
from protocol.types import Count, FederationId, MessageId, NodeId, Round, ShortText

PROTOCOL_VERSION = 2
# Tries of one training round: a round aborted below the threshold is retried under the same
# round number, at most this many times (RoundStart.attempt and RoundEnd.attempt are below it).
MAX_ATTEMPTS = 64
Attempt = Annotated[int, msgspec.Meta(ge=0, le=MAX_ATTEMPTS - 1)]

# Every container a frame may carry is bounded in its type, so the validating decode refuses
# an oversized one before building it (memory stays proportional to the frame's real content).
MAX_TENSORS = 4096  # a ResNet-18 has ~120
MAX_BINS = 10000
# A histogram vector (node.training.histograms) has 2 C bins + C^2 entries for C > 2 classes:
# 1.2 million for 1000 classes and 100 bins. A longer one is refused before it is built.
MAX_HISTOGRAM = 2**21
LayerName = Annotated[str, msgspec.Meta(max_length=256)]
Weights = Annotated[dict[LayerName, Tensor], msgspec.Meta(max_length=MAX_TENSORS)]
NodeIds = Annotated[list[NodeId], msgspec.Meta(max_length=MAX_PARTICIPANTS)]
Histograms = Annotated[list[Count], msgspec.Meta(max_length=MAX_HISTOGRAM)]
# The L2 bound of an envoy's update when the director's config names none.
DEFAULT_UPDATE_NORM = 100.0
UpdateNorm = Annotated[float, msgspec.Meta(gt=0, le=1e9)]
# FedProx's proximal coefficient mu (0 = none). Steps of lr * mu > 2 would overshoot the
# global model; 100 is far past any useful value (Li et al. 2020 try 0.001 to 1).
ProxMu = Annotated[float, msgspec.Meta(ge=0, le=100)]
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
    # FedProx: local training adds mu/2 ||w - w_global||^2 to its loss. A default, so frames
    # of directors that predate it decode (as mu = 0, which is what they meant).
    prox_mu: ProxMu = 0.0


class RoundStart(Message, frozen=True):
    weights: Weights
    selected: NodeIds
    plan: TrainPlan
    deadlines: Annotated[
        dict[Annotated[str, msgspec.Meta(max_length=32)], Annotated[float, msgspec.Meta(gt=0)]],
        msgspec.Meta(max_length=16),
    ]
    secagg: SecAggParams | None = None
    # A round aborted below the threshold is retried under the same round number; the attempt
    # tells the tries apart (late frames of an aborted try must not touch the next one).
    attempt: Attempt = 0
    # Every envoy clips its update to this L2 norm (at most its policy's bound) before masking.
    update_norm: UpdateNorm = DEFAULT_UPDATE_NORM


class PlainUpdate(Message, frozen=True):
    """An unmasked update: only sent when secure aggregation is explicitly switched off."""

    delta: Weights
    num_samples: Count
    train_loss: float


class EvaluateRequest(Message, frozen=True):
    """Score the model the round (of the envelope) produced on the validation splits.

    With `secagg` (the default), the envoys in `selected` run a SecAgg session of purpose
    "evaluate" (protocol.secagg.evaluation) and the director learns only the summed
    histograms; without, each envoy answers an EvaluateResult in the clear, which an envoy
    only does under its own insecure opt-in.
    """

    weights: Weights
    bins: Annotated[int, msgspec.Meta(ge=2, le=MAX_BINS)] = 100
    secagg: SecAggParams | None = None
    selected: NodeIds = msgspec.field(default_factory=list)
    # The attempt of the round that produced the model (it numbers the evaluation session).
    attempt: Attempt = 0


class EvaluateResult(Message, frozen=True):
    """Per-class score histograms of the envoy's validation split, as one flat vector, in the
    clear: only sent under the envoy's insecure plain-update opt-in (otherwise the same vector
    goes through the evaluation SecAgg session, protocol.secagg.evaluation).

    Histograms, not per-image scores, so the director learns the ROC and nothing per patient.
    The layout (node.training.histograms) depends on the number of classes and bins: for two
    classes it is the negative then the positive histogram of P(class 1).
    """

    num_samples: Count
    loss_sum: float
    histograms: Histograms


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
    envoys: Annotated[dict[NodeId, EnvoyStatus], msgspec.Meta(max_length=MAX_PARTICIPANTS)]


class RoundDeclined(Message, frozen=True):
    """Envoy -> director: this envoy takes no part in the session named by the envelope's
    round, `attempt` and `purpose` ("train": a RoundStart, "evaluate": an EvaluateRequest),
    because its own policy or ledger refused it; `reason` says which rule. The director stops
    waiting for it at once instead of at the stage deadline."""

    attempt: Attempt = 0
    purpose: Annotated[str, msgspec.Meta(pattern="^(train|evaluate)$")] = "train"
    reason: ShortText = ""


CoreMessage = (
    Presence
    | ModelMismatch
    | RoundStart
    | RoundDeclined
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
