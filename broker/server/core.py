"""The ZeroMQ broker's session logic as a sans-IO state machine (the style of h11 and the
SecAgg machines in protocol/secagg).

`BrokerCore` holds every session (the HELLO/authentication binding of a routing id to a node
identity), its subscriptions, the ACL checks, retained frames, last wills, heartbeat expiry
and the per-subscriber accounting of dropped frames. It never touches a socket or a clock:
the I/O layer (`broker.server.zmq_broker.ZmqBroker`) feeds it events

    receive(peer, parts, user_id=..., now=...)    a multipart message from a peer
    expire(now)                                   the heartbeat sweep
    probe()                                       "which peers are still there?"
    unreachable(peer) / queue_full(peer, parts)   what happened to a send
    delivered(count) / backlog_sent(peer)         how many routed copies went out

and carries out the actions they return: `Send` (parts to one or more peers) and `Log` (a
structlog event). So every session rule is testable in memory, event by event.

A subscriber whose transport queue is full (it reads slower than frames arrive) gets a
backlog here, bounded in bytes and frames: every frame for it waits there, in order, until
the I/O layer can hand it over (`backlog_head` / `backlog_sent`). Past the bounds a new frame
for it is dropped, counted (`stats["dropped"]`, per session) and logged sparingly; the other
subscribers never wait for it. The drop policy is Mosquitto's: the newest frame goes.

Payload parts are opaque: the machine reads only the command, topic, flags and ids (small
parts, via ``bytes(part)``) and hands payloads back untouched, so the I/O layer can forward
the `zmq.Frame` it received without a copy (one 4 MiB frame to five subscribers is never
copied in user space).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from broker import zmq_commands as commands
from broker.keys import check_z85_key
from broker.topics import ROLES, acl_allows, topic_matches, validate_filter, validate_id

__all__ = [
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_QUEUED_FRAMES",
    "MAX_FILTERS_PER_SESSION",
    "Action",
    "BrokerCore",
    "Log",
    "NodeIdentity",
    "Send",
    "parse_allow_list",
]

MAX_FILTERS_PER_SESSION = 1024
# A lagging subscriber's backlog (on top of the transport's own queue): 4 frames of the
# largest size the codec allows, or a day of heartbeats.
DEFAULT_MAX_QUEUED_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_QUEUED_FRAMES = 100_000
# Bounds on the memo tables: a client inventing topics must not grow them without limit.
_ROUTE_CACHE_LIMIT = 10_000
_PUBLISH_ACL_MEMO_LIMIT = 4096
# Refusals and drops are all answered or counted, but logged only now and then, so a client
# hammering the ACL or a stuck subscriber cannot flood the log.
_REFUSALS_LOGGED_IN_FULL = 20
_REFUSAL_LOG_EVERY = 1000
_DROP_LOG_EVERY = 100

# A part of a multipart message: bytes, or the transport's frame object (len() + buffer).
Part = Any


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    role: str


@dataclass(frozen=True, slots=True)
class Send:
    """Send `parts` to every peer in `peers` (non-blocking; report failures back).

    `routed`: a published frame fanned out to subscribers (report `delivered(count)`);
    otherwise an answer or notice to one peer.
    """

    peers: tuple[bytes, ...]
    parts: tuple[Part, ...]
    routed: bool = False


@dataclass(frozen=True, slots=True)
class Log:
    level: Literal["info", "warning"]
    event: str
    fields: Mapping[str, object]


Action = Send | Log


@dataclass(slots=True)
class _Session:
    peer: bytes
    node_id: str
    role: str
    user_id: str | None  # the authenticated public key; None in insecure mode
    last_seen: float
    filters: set[str] = field(default_factory=set)
    will: tuple[bytes, Part, bool] | None = None  # (topic, payload, retain)
    pub_acl: dict[bytes, bool] = field(default_factory=dict)  # topic -> allowed, memoised
    backlog: deque[tuple[Part, ...]] = field(default_factory=deque)  # waiting, in order
    backlog_bytes: int = 0
    dropped: int = 0  # frames dropped because this subscriber's backlog was full
    refused: int = 0  # operations the ACL or the size limit refused


def parse_allow_list(entries: Mapping[str, object]) -> dict[str, NodeIdentity]:
    """{z85 public key: (node_id, role) | NodeIdentity} -> validated {key: NodeIdentity}."""
    out: dict[str, NodeIdentity] = {}
    for key, value in entries.items():
        check_z85_key(key, f"allow-list key {key!r}")
        if isinstance(value, NodeIdentity):
            ident = value
        elif isinstance(value, tuple | list) and len(value) == 2:
            ident = NodeIdentity(str(value[0]), str(value[1]))
        else:
            raise ValueError(f"allow-list entry for {key} must be (node_id, role)")
        validate_id(ident.node_id, field=f"allow-list node_id for key {key}")
        if ident.role not in ROLES:
            raise ValueError(f"allow-list role {ident.role!r} for {ident.node_id} not in {ROLES}")
        out[key] = ident
    return out


def _text(part: bytes) -> str:
    return part.decode("utf-8", "replace")


def _size(parts: tuple[Part, ...]) -> int:
    return sum(len(part) for part in parts)


def _reply(peer: bytes, *parts: Part) -> Send:
    return Send((peer,), parts)


class BrokerCore:
    """Sessions, routing and the ACL of one federation's ZeroMQ broker, without I/O.

    `allow` maps authenticated public keys (Z85 text) to identities; None means
    insecure_no_auth: nobody is authenticated and a HELLO's claimed identity is believed.
    """

    def __init__(
        self,
        *,
        federation: str,
        allow: Mapping[str, NodeIdentity] | None,
        max_frame_bytes: int,
        heartbeat_ivl_s: float,
        heartbeat_timeout_s: float,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        max_queued_frames: int = DEFAULT_MAX_QUEUED_FRAMES,
    ) -> None:
        self.federation = validate_id(federation, field="federation")
        if max_frame_bytes <= 0:
            raise ValueError("max_frame_bytes must be positive")
        if max_queued_bytes <= 0 or max_queued_frames <= 0:
            raise ValueError("max_queued_bytes and max_queued_frames must be positive")
        if not (0 < heartbeat_ivl_s < heartbeat_timeout_s):
            raise ValueError("need 0 < heartbeat_ivl_s < heartbeat_timeout_s")
        self.insecure = allow is None
        self.allow: Mapping[str, NodeIdentity] = allow or {}
        self.max_frame_bytes = max_frame_bytes
        self.max_queued_bytes = max_queued_bytes
        self.max_queued_frames = max_queued_frames
        self.heartbeat_ivl_s = heartbeat_ivl_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._sessions: dict[bytes, _Session] = {}
        self._retained: dict[bytes, Part] = {}
        self._routes: dict[bytes, tuple[bytes, ...]] = {}  # topic -> subscriber peers (cache)
        self._backlogged: set[bytes] = set()  # peers whose backlog is not empty
        self.stats = {
            "published": 0,
            "delivered": 0,
            "refused": 0,
            "dropped": 0,
            "wills": 0,
            "backlogged": 0,  # frames that waited in a backlog before going out
        }

    # -- queries ----------------------------------------------------------------------------

    def identity(self, public_key: str) -> NodeIdentity | None:
        """Who may connect with this CurveZMQ public key (Z85); None: refuse the handshake."""
        return self.allow.get(public_key)

    def session_of(self, peer: bytes) -> tuple[str, str] | None:
        """(node_id, role) of the session at `peer`, if there is one."""
        sess = self._sessions.get(peer)
        return None if sess is None else (sess.node_id, sess.role)

    @property
    def peers(self) -> tuple[bytes, ...]:
        return tuple(self._sessions)

    def subscriptions(self, peer: bytes) -> frozenset[str]:
        sess = self._sessions.get(peer)
        return frozenset() if sess is None else frozenset(sess.filters)

    def retained(self) -> dict[str, Part]:
        return {_text(topic): payload for topic, payload in self._retained.items()}

    @property
    def backlogged(self) -> frozenset[bytes]:
        """The peers with frames waiting in their backlog."""
        return frozenset(self._backlogged)

    def backlog_head(self, peer: bytes) -> tuple[Part, ...] | None:
        """The parts of the next frame waiting for `peer`, if any."""
        sess = self._sessions.get(peer)
        if sess is None or not sess.backlog:
            return None
        return sess.backlog[0]

    def queued(self) -> dict[str, tuple[int, int]]:
        """{node_id: (frames, bytes)} of every non-empty backlog."""
        out: dict[str, tuple[int, int]] = {}
        for peer in self._backlogged:
            sess = self._sessions[peer]
            out[sess.node_id] = (len(sess.backlog), sess.backlog_bytes)
        return out

    # -- events -----------------------------------------------------------------------------

    def receive(
        self, peer: bytes, parts: Sequence[Part], *, user_id: str | None, now: float
    ) -> list[Action]:
        """A multipart message [command, args...] from `peer`.

        `user_id` is the public key the transport authenticated for this message (None when
        it authenticated nothing); never trusted alone is the routing id `peer`, which a
        reconnecting client may be handed again.
        """
        if not parts:
            return []
        cmd = bytes(parts[0])
        out: list[Action] = []
        sess = self._bind(peer, cmd, user_id, now, out)
        if sess is None and (not self.insecure or cmd != commands.HELLO):
            return out
        if sess is not None:
            sess.last_seen = now
        n = len(parts)
        if sess is not None and cmd == commands.PUB and n == 4:
            self._on_publish(sess, parts, out)
        elif cmd == commands.PING:
            out.append(_reply(peer, commands.PONG))
        elif sess is not None and cmd == commands.SUB and n == 3:
            self._on_subscribe(sess, bytes(parts[1]), _text(bytes(parts[2])), out)
        elif sess is not None and cmd == commands.UNSUB and n == 3:
            self._on_unsubscribe(sess, bytes(parts[1]), _text(bytes(parts[2])), out)
        elif cmd == commands.HELLO and n == 6:
            self._on_hello(peer, sess, parts, now, out)
        elif cmd == commands.BYE:
            if sess is not None:
                out += self._drop(sess, fire_will=False, reason="bye")
        else:
            node = sess.node_id if sess is not None else None
            out.append(Log("warning", "bad_command", {"node": node, "cmd": cmd[:16]}))
            out.append(_reply(peer, commands.ERR, cmd[:16], b"", b"malformed command"))
        return out

    def expire(self, now: float) -> list[Action]:
        """Close every session silent for longer than the heartbeat timeout (wills fire)."""
        out: list[Action] = []
        for sess in list(self._sessions.values()):
            if now - sess.last_seen > self.heartbeat_timeout_s:
                out += self._drop(sess, fire_will=True, reason="heartbeat timeout")
        return out

    def probe(self) -> list[Action]:
        """A PONG to every session: the peers the transport cannot reach have gone (report
        them with `unreachable`). A disconnect notice names no peer, so all are asked."""
        return [_reply(peer, commands.PONG) for peer in self._sessions]

    def unreachable(self, peer: bytes) -> list[Action]:
        """The transport has no connection to `peer` any more: close it, its will fires."""
        sess = self._sessions.get(peer)
        if sess is None:
            return []
        return self._drop(sess, fire_will=True, reason="disconnected")

    def queue_full(self, peer: bytes, parts: tuple[Part, ...]) -> list[Action]:
        """A send of `parts` to `peer` would block (its transport queue is full): the frame
        waits in the peer's backlog, or is dropped when the backlog is full."""
        sess = self._sessions.get(peer)
        if sess is None:
            self.stats["dropped"] += 1
            return []
        return self._enqueue(sess, parts)

    def backlog_sent(self, peer: bytes) -> None:
        """The head of `peer`'s backlog went out."""
        sess = self._sessions.get(peer)
        if sess is None or not sess.backlog:
            return
        parts = sess.backlog.popleft()
        sess.backlog_bytes -= _size(parts)
        if not sess.backlog:
            self._backlogged.discard(peer)
        self.stats["delivered"] += 1

    def delivered(self, count: int) -> None:
        """`count` routed copies went out."""
        self.stats["delivered"] += count

    def _enqueue(self, sess: _Session, parts: tuple[Part, ...]) -> list[Action]:
        size = _size(parts)
        if sess.backlog and (
            sess.backlog_bytes + size > self.max_queued_bytes
            or len(sess.backlog) >= self.max_queued_frames
        ):
            self.stats["dropped"] += 1
            sess.dropped += 1
            if sess.dropped % _DROP_LOG_EVERY == 1:
                fields = {
                    "node": sess.node_id,
                    "dropped": sess.dropped,
                    "queued_frames": len(sess.backlog),
                    "queued_bytes": sess.backlog_bytes,
                }
                return [Log("warning", "subscriber_full_dropping", fields)]
            return []
        if not sess.backlog:
            self._backlogged.add(sess.peer)
        sess.backlog.append(parts)
        sess.backlog_bytes += size
        self.stats["backlogged"] += 1
        return []

    # -- sessions ---------------------------------------------------------------------------

    def _bind(
        self, peer: bytes, cmd: bytes, user_id: str | None, now: float, out: list[Action]
    ) -> _Session | None:
        """The session `peer` speaks for, opened from the authenticated key if need be."""
        sess = self._sessions.get(peer)
        if self.insecure:
            if sess is None and cmd != commands.HELLO:
                # Insecure mode knows nobody until HELLO: ask for it, drop this command.
                out.append(_reply(peer, commands.RESYNC))
            return sess
        ident = self.allow.get(user_id) if user_id is not None else None
        if ident is None:
            return None
        if sess is not None and sess.user_id != user_id:
            out += self._drop(sess, fire_will=True, reason="identity changed")
            sess = None
        if sess is None:
            sess = self._open(peer, ident.node_id, ident.role, user_id, now)
            if cmd != commands.HELLO:
                # A session we do not know (we restarted, or it timed out): replay it.
                out.append(_reply(peer, commands.RESYNC))
        return sess

    def _open(
        self, peer: bytes, node_id: str, role: str, user_id: str | None, now: float
    ) -> _Session:
        sess = _Session(peer=peer, node_id=node_id, role=role, user_id=user_id, last_seen=now)
        self._sessions[peer] = sess
        return sess

    def _drop(self, sess: _Session, *, fire_will: bool, reason: str) -> list[Action]:
        if self._sessions.pop(sess.peer, None) is None:
            return []
        self._backlogged.discard(sess.peer)
        if sess.filters:
            self._routes.clear()
        out: list[Action] = [
            Log("info", "session_closed", {"node": sess.node_id, "reason": reason})
        ]
        if fire_will and sess.will is not None:
            topic, payload, retain = sess.will
            self.stats["wills"] += 1
            out.append(Log("info", "will_published", {"node": sess.node_id, "topic": _text(topic)}))
            if retain:
                self._retain(topic, payload)
            out += self._route(topic, payload)
        return out

    def _on_hello(
        self,
        peer: bytes,
        sess: _Session | None,
        parts: Sequence[Part],
        now: float,
        out: list[Action],
    ) -> None:
        claimed_id = _text(bytes(parts[1]))
        claimed_role = _text(bytes(parts[2]))
        if sess is None:  # insecure mode: the claim is all there is
            try:
                validate_id(claimed_id, field="node_id")
            except ValueError as exc:
                out.append(_reply(peer, commands.ERR, commands.HELLO, b"", str(exc).encode()))
                return
            if claimed_role not in ROLES:
                out.append(_reply(peer, commands.ERR, commands.HELLO, b"", b"unknown role"))
                return
            sess = self._open(peer, claimed_id, claimed_role, None, now)
        elif (claimed_id, claimed_role) != (sess.node_id, sess.role):
            reason = (
                f"key is registered as {sess.role} {sess.node_id}, not {claimed_role} {claimed_id}"
            )
            out.append(Log("warning", "hello_refused", {"node": sess.node_id, "reason": reason}))
            out.append(_reply(peer, commands.ERR, commands.HELLO, b"", reason.encode()))
            return
        will_topic = bytes(parts[3])
        if will_topic:
            topic = _text(will_topic)
            if not self._may(sess, "publish", topic):
                reason = f"last will on {topic} refused by the ACL"
                out.append(Log("warning", "will_refused", {"node": sess.node_id, "topic": topic}))
                out.append(_reply(peer, commands.ERR, commands.HELLO, will_topic, reason.encode()))
                return
            flags = bytes(parts[4])
            sess.will = (will_topic, parts[5], bool(flags and flags[0] & commands.FLAG_RETAIN))
        else:
            sess.will = None
        out.append(Log("info", "session_open", {"node": sess.node_id, "role": sess.role}))
        out.append(
            _reply(
                peer,
                commands.WELCOME,
                sess.node_id.encode(),
                sess.role.encode(),
                str(int(self.heartbeat_ivl_s * 1000)).encode(),
                str(self.max_frame_bytes).encode(),
            )
        )

    # -- publish and subscribe --------------------------------------------------------------

    def _may(self, sess: _Session, action: str, topic: str) -> bool:
        return acl_allows(
            federation=self.federation,
            node_id=sess.node_id,
            role=sess.role,
            action=action,
            topic=topic,
        )

    def _on_publish(self, sess: _Session, parts: Sequence[Part], out: list[Action]) -> None:
        topic = bytes(parts[1])
        payload = parts[3]
        allowed = sess.pub_acl.get(topic)
        if allowed is None:
            allowed = self._may(sess, "publish", _text(topic))
            if len(sess.pub_acl) < _PUBLISH_ACL_MEMO_LIMIT:
                sess.pub_acl[topic] = allowed
        if not allowed:
            out += self._refusal(sess, "publish_refused", topic=_text(topic))
            out.append(
                _reply(sess.peer, commands.ERR, commands.PUB, topic, b"not allowed by the ACL")
            )
            return
        size = len(payload)
        if size > self.max_frame_bytes:
            out += self._refusal(
                sess,
                "publish_refused",
                topic=_text(topic),
                size=size,
                max_frame_bytes=self.max_frame_bytes,
            )
            reason = f"frame of {size} bytes is over the limit of {self.max_frame_bytes}"
            out.append(_reply(sess.peer, commands.ERR, commands.PUB, topic, reason.encode()))
            return
        flags = bytes(parts[2])
        if flags and flags[0] & commands.FLAG_RETAIN:
            self._retain(topic, payload)
        out += self._route(topic, payload)

    def _retain(self, topic: bytes, payload: Part) -> None:
        if len(payload) == 0:
            self._retained.pop(topic, None)  # MQTT: an empty retained frame clears it
        else:
            self._retained[topic] = payload

    def _route(self, topic: bytes, payload: Part) -> list[Action]:
        self.stats["published"] += 1
        targets = self._routes.get(topic)
        if targets is None:
            text = _text(topic)
            targets = tuple(
                peer
                for peer, s in self._sessions.items()
                if any(topic_matches(f, text) for f in s.filters)
            )
            if len(self._routes) >= _ROUTE_CACHE_LIMIT:
                self._routes.clear()
            self._routes[topic] = targets
        if not targets:
            return []
        parts = (commands.MSG, topic, payload)
        if self._backlogged:
            # A lagging subscriber's frames keep their order: behind its backlog.
            out: list[Action] = []
            for peer in (p for p in targets if p in self._backlogged):
                out += self._enqueue(self._sessions[peer], parts)
            targets = tuple(p for p in targets if p not in self._backlogged)
            if targets:
                out.append(Send(targets, parts, routed=True))
            return out
        return [Send(targets, parts, routed=True)]

    def _refusal(self, sess: _Session, what: str, **details: object) -> list[Action]:
        self.stats["refused"] += 1
        sess.refused += 1
        if sess.refused <= _REFUSALS_LOGGED_IN_FULL or sess.refused % _REFUSAL_LOG_EVERY == 0:
            fields = {"node": sess.node_id, "role": sess.role, "count": sess.refused, **details}
            return [Log("warning", what, fields)]
        return []

    def _on_subscribe(
        self, sess: _Session, req_id: bytes, topic_filter: str, out: list[Action]
    ) -> None:
        def refuse(reason: str) -> None:
            out.append(
                _reply(sess.peer, commands.SUBACK, req_id, commands.REFUSED, reason.encode())
            )

        try:
            validate_filter(topic_filter)
        except ValueError as exc:
            refuse(str(exc))
            return
        if not self._may(sess, "subscribe", topic_filter):
            out += self._refusal(sess, "subscribe_refused", filter=topic_filter)
            refuse(f"{sess.role} {sess.node_id} may not subscribe to {topic_filter}")
            return
        if topic_filter not in sess.filters:
            if len(sess.filters) >= MAX_FILTERS_PER_SESSION:
                reason = f"more than {MAX_FILTERS_PER_SESSION} subscriptions"
                out += self._refusal(sess, "subscribe_refused", filter=topic_filter, reason=reason)
                refuse(reason)
                return
            sess.filters.add(topic_filter)
            self._routes.clear()
        out.append(_reply(sess.peer, commands.SUBACK, req_id, commands.OK, b""))
        # Retained frames for this subscription only: tagged with its request id.
        out.extend(
            _reply(sess.peer, commands.MSG, topic, payload, req_id)
            for topic, payload in self._retained_matching(topic_filter)
        )

    def _retained_matching(self, topic_filter: str) -> Iterable[tuple[bytes, Part]]:
        return (
            (topic, payload)
            for topic, payload in self._retained.items()
            if topic_matches(topic_filter, _text(topic))
        )

    def _on_unsubscribe(
        self, sess: _Session, req_id: bytes, topic_filter: str, out: list[Action]
    ) -> None:
        sess.filters.discard(topic_filter)
        self._routes.clear()
        out.append(_reply(sess.peer, commands.SUBACK, req_id, commands.OK, b""))
