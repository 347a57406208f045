"""A node's view of the bus: envelopes in and out, with every untrusted-input check in one place.

Frames from the bus are untrusted. `Endpoint.accept` turns a frame into an `Envelope` or into a
logged refusal, never an exception: oversized, undecodable, wrong federation, not addressed to
us, replayed (duplicate message id), unsigned or forged (when signing keys are configured),
or from a sender that does not own the topic it came on. Callers then only see envelopes
whose sender is who it claims to be.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import msgspec

from broker.client import Bus
from crypto import signing
from crypto.errors import CryptoError
from node.errors import FedbusError
from node.logs import get_logger
from protocol.codec import Codec, CodecError
from protocol.events import BROADCAST
from protocol.messages import Body, Envelope, envelope

# The envelope's recipient must be a NodeId, and "*" is not one: broadcasts are addressed to
# this reserved name instead (no node may be called that; see node.config).
WIRE_BROADCAST = "broadcast"


class FrameRefused(FedbusError):
    """A frame that is not accepted; the message says why (for the log). Never leaves
    `Endpoint.accept`, which logs and counts it."""


@dataclass
class Stats:
    accepted: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)


class Endpoint:
    """Encode/sign outgoing envelopes; decode/check incoming frames.

    `bus` may be None until the node is connected (the envoy seals its last will before it
    connects); sealing and checking frames need no bus.
    """

    def __init__(
        self,
        bus: Bus | None,
        *,
        node_id: str,
        federation: str,
        codec: Codec,
        signing_key: bytes | None = None,
        peer_keys: Mapping[str, bytes] | None = None,
        require_signatures: bool = False,
        dedupe_window: int = 65536,
    ) -> None:
        self.bus = bus
        self.node_id = node_id
        self.federation = federation
        self.codec = codec
        self.signing_key = signing_key
        self.peer_keys = dict(peer_keys or {})
        self.require_signatures = require_signatures
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._window = dedupe_window
        self.stats = Stats()
        self.log = get_logger()

    # -- outgoing -----------------------------------------------------------------------------

    def seal(self, *, round: int, recipient: str, body: Body) -> bytes:
        if recipient == BROADCAST:
            recipient = WIRE_BROADCAST
        env = envelope(
            federation=self.federation,
            round=round,
            sender=self.node_id,
            recipient=recipient,
            body=body,
        )
        if self.signing_key is not None:
            sig = signing.sign(self.signing_key, self.codec.signing_payload(env))
            env = msgspec.structs.replace(env, signature=sig)
        return self.codec.encode(env)

    async def send(
        self, topic: str, *, round: int, recipient: str, body: Body, retain: bool = False
    ) -> None:
        if self.bus is None:
            raise FedbusError("endpoint has no bus to send on (seal-only until one is attached)")
        await self.bus.publish(
            topic, self.seal(round=round, recipient=recipient, body=body), retain=retain
        )

    # -- incoming -----------------------------------------------------------------------------

    def check(self, frame: bytes, *, topic_owner: str | None = None) -> Envelope:
        """Decode and check a frame; raise FrameRefused with the reason otherwise.

        `topic_owner`: the node id the topic belongs to (presence/<id>): the envelope's
        sender must be that node, since the broker only lets <id> publish there.
        """
        try:
            env = self.codec.decode(frame)
        except CodecError as exc:
            raise FrameRefused(str(exc)[:300]) from None
        if env.federation != self.federation:
            raise FrameRefused(f"federation {env.federation!r} is not ours")
        if env.recipient not in (self.node_id, WIRE_BROADCAST):
            raise FrameRefused(f"addressed to {env.recipient!r}")
        if env.sender == self.node_id:
            raise FrameRefused("claims to come from this node")
        if topic_owner is not None and env.sender != topic_owner:
            raise FrameRefused(f"sender {env.sender!r} does not own the topic of {topic_owner!r}")
        key = self.peer_keys.get(env.sender)
        if key is not None:
            try:
                signing.verify(key, self.codec.signing_payload(env), env.signature)
            except CryptoError:
                raise FrameRefused(f"bad signature from {env.sender!r}") from None
        elif self.require_signatures:
            raise FrameRefused(f"sender {env.sender!r} has no known signing key")
        if env.msg_id in self._seen:
            raise FrameRefused("duplicate message id")
        self._seen[env.msg_id] = None
        if len(self._seen) > self._window:
            self._seen.popitem(last=False)
        return env

    def accept(self, frame: bytes, *, topic_owner: str | None = None) -> Envelope | None:
        try:
            env = self.check(frame, topic_owner=topic_owner)
        except FrameRefused as exc:
            reason = str(exc)
            self.stats.refused[reason.split(":")[0][:60]] += 1
            self.log.warning("frame_refused", reason=reason, size=len(frame))
            return None
        self.stats.accepted += 1
        return env


async def subscribe_ready(bus: Bus, topic_filter: str) -> AsyncIterator[bytes]:
    """Subscribe and wait until the broker confirmed it, so nothing sent later is missed."""
    sub = bus.subscribe(topic_filter)
    ready = getattr(sub, "ready", None)
    if ready is not None:
        await ready()
    return sub
