"""How an envoy takes part in one round attempt: the counterpart of the director's Aggregation.

The envoy's round code drives exactly one `Contribution` per RoundStart, whatever the mode:
`start()` when the round begins, `submit(update)` once local training ended, `receive()` for
every director message of the round, sending whatever each returns and logging what it refused
(`take_refusals`). `entered_on` and `sent_in` name the stage a message opens or ends, which is
where a fault plan's `[[crash]]` stops the envoy.

`SecureContribution` (whenever RoundStart carries SecAgg parameters) runs the SecAgg client of
protocol.secagg: it advertises its keys at once, so key exchange overlaps training, and masks
the update in the format of protocol.secagg.update. `PlainContribution` sends the plain update
and only exists behind the director's `insecure_plain_aggregation`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from node.errors import FedbusError
from protocol.base import Message
from protocol.events import Outgoing, RefusalLog
from protocol.messages import PlainUpdate, RoundStart
from protocol.secagg.client import SecAggClient
from protocol.secagg.messages import SecAggParams
from protocol.secagg.transitions import CLIENT_ENTERS, CLIENT_SENDS
from protocol.secagg.update import Layout, encode_update, qrange_for, secagg_session
from protocol.stages import Stage
from protocol.tensors import state_from_numpy

__all__ = [
    "Contribution",
    "ContributionError",
    "LocalUpdate",
    "PlainContribution",
    "SecureContribution",
    "contribution_for",
]


class ContributionError(FedbusError, ValueError):
    """A contribution used out of order (a programming error in the round code)."""


@dataclass(frozen=True)
class LocalUpdate:
    """What local training produced: the change of the weights, and how it was obtained."""

    delta: dict[str, np.ndarray]
    num_samples: int
    train_loss: float


class Contribution(RefusalLog, abc.ABC):
    """One round attempt of one envoy (see the module docstring)."""

    secure: bool

    def __init__(self, *, director_id: str) -> None:
        super().__init__("fedbus.contribution", "contribution_refused")
        self.director_id = director_id

    @property
    @abc.abstractmethod
    def done(self) -> bool:
        """Nothing more to send in this round (completed or aborted)."""

    @property
    def aborted(self) -> bool:
        return False

    def start(self) -> list[Outgoing]:
        """What goes out as soon as the round starts, before training."""
        return []

    @abc.abstractmethod
    def submit(self, update: LocalUpdate) -> list[Outgoing]:
        """Hand over the trained update; returns what to send now (maybe nothing yet)."""

    @abc.abstractmethod
    def receive(self, sender: str, body: Message) -> list[Outgoing]:
        """One director message of this round; a refused one is recorded (take_refusals)."""

    def entered_on(self, body: Message) -> Stage | None:
        """The stage the envoy enters when `body` arrives, if it opens one."""
        return None

    @abc.abstractmethod
    def sent_in(self, body: Message) -> Stage | None:
        """The stage an outgoing `body` belongs to."""


class SecureContribution(Contribution):
    """The SecAgg client: the envoy only ever sends its update masked."""

    secure = True

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
        audit: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        super().__init__(director_id=director_id)
        self.layout = layout
        self.qrange = qrange_for(params, len(participants))
        self.audit = audit
        self.client = SecAggClient(
            node_id,
            secagg_session(round, attempt),
            params,
            list(participants),
            signing_key=signing_key if params.malicious else None,
            peer_signing_keys=(peer_signing_keys or None) if params.malicious else None,
            server_id=director_id,
        )

    @property
    def done(self) -> bool:
        return self.client.done

    @property
    def aborted(self) -> bool:
        return self.client.aborted

    def start(self) -> list[Outgoing]:
        return self.client.start()  # AdvertiseKeys

    def submit(self, update: LocalUpdate) -> list[Outgoing]:
        vector = encode_update(
            self.layout,
            update.delta,
            update.num_samples,
            update.train_loss,
            self.qrange,
            np.random.default_rng(),
        )
        if self.audit is not None:
            self.audit(vector)
        return self.client.set_input(vector)  # MaskedInput, if the shares are already here

    def receive(self, sender: str, body: Message) -> list[Outgoing]:
        out = self.client.receive(sender, body)
        self.refusals.extend(self.client.take_refusals())
        return out

    def entered_on(self, body: Message) -> Stage | None:
        return CLIENT_ENTERS.get(type(body))

    def sent_in(self, body: Message) -> Stage | None:
        return CLIENT_SENDS.get(type(body))


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
    audit: Callable[[np.ndarray], None] | None = None,
) -> Contribution:
    """The contribution a RoundStart asks for: secure whenever it carries SecAgg parameters."""
    if start.secagg is None:
        return PlainContribution(director_id=director_id)
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
        audit=audit,
    )
