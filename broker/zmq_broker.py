"""The embedded ZeroMQ broker: one ROUTER socket, CurveZMQ authentication, the fedbus ACL.

Design, and why:
* One thread runs a tight `zmq.Poller` loop over the ROUTER, the ZAP handler, a socket monitor
  and a control pipe. Everything lives in that thread, so there are no locks, and the ZAP
  handler answering inline means an unknown key is refused during the CurveZMQ handshake:
  it never gets as far as sending a frame.
* The identity of every frame comes from its "User-Id" metadata, which libzmq sets from the
  ZAP reply (the client's authenticated public key). A node id written in a HELLO is only
  trusted in `insecure_no_auth` mode.
* Payload frames are forwarded as the `zmq.Frame` they arrived in (`copy=False`): libzmq
  reference-counts the buffer, so one 4 MiB frame sent to five subscribers is never copied
  in user space.
* A slow subscriber must not stall the federation: the ROUTER is `ROUTER_MANDATORY` and sends
  are non-blocking, so a full pipe drops the frame for that subscriber only (and logs it),
  like an MQTT broker's per-client queue limit.
* One libzmq I/O thread by default, like zmq.proxy: a second one spends more CPU handing
  frames across threads than it saves (benchmarks/broker/bench_hop.py, hop CPU per GB).
* Retained frames and last wills emulate MQTT so nodes behave the same on both transports.
  A will fires when a session's heartbeats stop or its connection drops without a BYE.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog
import zmq
import zmq.utils.z85
from zmq.utils.monitor import parse_monitor_message

from broker import wire
from broker.topics import (
    ROLES,
    acl_allows,
    topic_matches,
    validate_filter,
    validate_id,
)

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_FILTERS_PER_SESSION = 1024
_ROUTE_CACHE_LIMIT = 10_000
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    role: str


@dataclass
class _Session:
    rid: bytes
    node_id: str
    role: str
    user_id: str | None  # the authenticated public key; None in insecure mode
    last_seen: float
    filters: set[str] = field(default_factory=set)
    will: tuple[bytes, zmq.Frame | bytes, bool] | None = None  # (topic, payload, retain)
    greeted: bool = False
    pub_acl: dict[bytes, bool] = field(default_factory=dict)  # topic -> allowed, memoised
    dropped: int = 0  # frames dropped because this subscriber's pipe was full
    refused: int = 0  # operations the ACL or the size limit refused


def parse_allow_list(entries: Mapping[str, object]) -> dict[str, NodeIdentity]:
    """{z85 public key: (node_id, role) | NodeIdentity} -> validated {key: NodeIdentity}."""
    out: dict[str, NodeIdentity] = {}
    for key, value in entries.items():
        if not isinstance(key, str) or len(key) != 40:
            raise ValueError(f"allow-list key {key!r} is not a 40-character Z85 public key")
        try:
            raw = zmq.utils.z85.decode(key.encode("ascii"))
        except (ValueError, KeyError, UnicodeEncodeError):
            raise ValueError(f"allow-list key {key!r} is not valid Z85") from None
        if len(raw) != 32:
            raise ValueError(f"allow-list key {key!r} does not decode to 32 bytes")
        if isinstance(value, NodeIdentity):
            ident = value
        else:
            try:
                node_id, role = value  # type: ignore[misc]
            except (TypeError, ValueError):
                raise ValueError(f"allow-list entry for {key} must be (node_id, role)") from None
            ident = NodeIdentity(str(node_id), str(role))
        validate_id(ident.node_id, field=f"allow-list node_id for key {key}")
        if ident.role not in ROLES:
            raise ValueError(f"allow-list role {ident.role!r} for {ident.node_id} not in {ROLES}")
        out[key] = ident
    return out


class ZmqBroker:
    """A fedbus broker for one federation. `start()` runs it in a thread, `run()` in this one."""

    def __init__(
        self,
        bind: str,
        *,
        federation: str,
        allow: Mapping[str, object] | None = None,
        secret_key: str | None = None,
        insecure_no_auth: bool = False,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        heartbeat_ivl_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        sndhwm: int = 1000,
        io_threads: int = 1,
    ) -> None:
        self.federation = validate_id(federation, field="federation")
        if not insecure_no_auth:
            if not secret_key:
                raise ValueError("secret_key is required unless insecure_no_auth=True")
            if allow is None:
                raise ValueError("an allow-list is required unless insecure_no_auth=True")
        if max_frame_bytes <= 0:
            raise ValueError("max_frame_bytes must be positive")
        if not (0 < heartbeat_ivl_s < heartbeat_timeout_s):
            raise ValueError("need 0 < heartbeat_ivl_s < heartbeat_timeout_s")
        self.bind = bind
        self.insecure = insecure_no_auth
        self.allow = parse_allow_list(allow or {})
        self._secret_key = secret_key
        self.public_key = (
            zmq.curve_public(secret_key.encode("ascii")).decode("ascii") if secret_key else None
        )
        self.max_frame_bytes = max_frame_bytes
        self.heartbeat_ivl_s = heartbeat_ivl_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.sndhwm = sndhwm
        self.log = structlog.get_logger("broker").bind(node="broker", federation=federation)

        self._ctx = zmq.Context(io_threads=io_threads)
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.endpoint: str | None = None
        self._ctl_endpoint = f"inproc://fedbus-broker-ctl-{id(self)}"

        self._sessions: dict[bytes, _Session] = {}
        self._retained: dict[bytes, zmq.Frame | bytes] = {}
        self._routes: dict[bytes, tuple[bytes, ...]] = {}  # topic -> subscriber rids (cache)
        self._probe_at: float | None = None
        self.stats = {"published": 0, "delivered": 0, "refused": 0, "dropped": 0, "wills": 0}

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> ZmqBroker:
        """Bind and serve in a background thread; returns once the socket is bound."""
        self._thread = threading.Thread(target=self._run_guarded, name="fedbus-broker", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def run(self) -> None:
        """Bind and serve in the calling thread until `stop()`."""
        self._run_guarded()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop serving (thread-safe); joins the thread when there is one."""
        if not self._ready.is_set():
            return
        sock = self._ctx.socket(zmq.PAIR)
        sock.linger = 1000
        try:
            sock.connect(self._ctl_endpoint)
            sock.send(b"stop")
        finally:
            sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the serving thread to end; True once it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """Why the serving thread ended, if it crashed."""
        return self._error

    @property
    def port(self) -> int:
        assert self.endpoint is not None, "broker not started"
        return int(self.endpoint.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        """The zmq+tcp:// URL clients pass to `broker.connect.connect`."""
        assert self.endpoint is not None, "broker not started"
        return "zmq+" + self.endpoint

    def _run_guarded(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            if not isinstance(exc, zmq.ContextTerminated):
                self.log.exception("broker_crashed")
        finally:
            self._ctx.destroy(linger=0)

    # -- the loop ---------------------------------------------------------------------------

    def _serve(self) -> None:
        ctx = self._ctx
        ctl = ctx.socket(zmq.PAIR)
        ctl.bind(self._ctl_endpoint)
        zap = None
        if not self.insecure:
            # Bound before the ROUTER exists, so no handshake can ever slip past it.
            zap = ctx.socket(zmq.REP)
            zap.bind(_ZAP_ENDPOINT)
        router = ctx.socket(zmq.ROUTER)
        router.router_mandatory = 1
        router.linger = 0
        router.sndhwm = self.sndhwm
        # A frame larger than the limit (plus room for the command frames) is not even read:
        # libzmq drops the connection. Frames just over the limit are refused politely below.
        router.maxmsgsize = self.max_frame_bytes + 65536
        router.heartbeat_ivl = int(self.heartbeat_ivl_s * 1000)
        router.heartbeat_timeout = int(self.heartbeat_timeout_s * 1000)
        if not self.insecure:
            router.curve_server = True
            router.curve_secretkey = self._secret_key.encode("ascii")  # type: ignore[union-attr]
            router.zap_domain = wire.ZAP_DOMAIN
        monitor = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            router.bind(self.bind)
            self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            raise OSError(f"cannot bind broker to {self.bind}: {exc}") from None
        self.log.info(
            "broker_listening",
            endpoint=self.endpoint,
            auth="insecure-no-auth" if self.insecure else "curve",
            allowed=len(self.allow),
            max_frame_bytes=self.max_frame_bytes,
        )
        self._ready.set()

        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(ctl, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        if zap is not None:
            poller.register(zap, zmq.POLLIN)

        next_sweep = time.monotonic() + self.heartbeat_ivl_s
        try:
            while True:
                now = time.monotonic()
                deadline = next_sweep if self._probe_at is None else min(next_sweep, self._probe_at)
                timeout_ms = max(0, int((deadline - now) * 1000) + 1)
                events = dict(poller.poll(timeout_ms))
                if ctl in events:
                    break
                if zap is not None and zap in events:
                    self._answer_zap(zap)
                if monitor in events:
                    # Disconnect events carry a file descriptor, not a routing id: probe every
                    # session shortly after, and let EHOSTUNREACH tell which one went away.
                    while monitor.poll(0):
                        parse_monitor_message(monitor.recv_multipart())
                    self._probe_at = time.monotonic() + 0.05
                if router in events:
                    # Drain a bounded batch so the timers and ZAP still get their turn.
                    for _ in range(256):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(router, frames)
                now = time.monotonic()
                if self._probe_at is not None and now >= self._probe_at:
                    self._probe_at = None
                    self._probe_sessions(router)
                if now >= next_sweep:
                    next_sweep = now + self.heartbeat_ivl_s
                    self._expire_sessions(router, now)
        finally:
            self.log.info("broker_stopped", **self.stats)
            router.disable_monitor()
            for sock in (router, monitor, ctl, zap):
                if sock is not None:
                    sock.close(linger=0)

    # -- authentication ---------------------------------------------------------------------

    def _answer_zap(self, zap: zmq.Socket) -> None:
        msg = zap.recv_multipart()
        # ZAP/1.0 (RFC 27): version, request id, domain, address, identity, mechanism, creds.
        version, request_id = msg[0], msg[1]
        mechanism = msg[5] if len(msg) > 5 else b""
        status, text, user_id = b"400", b"unknown key", b""
        if version != b"1.0":
            status, text = b"500", b"unsupported ZAP version"
        elif mechanism == b"CURVE" and len(msg) > 6 and len(msg[6]) == 32:
            key = zmq.utils.z85.encode(msg[6]).decode("ascii")
            ident = self.allow.get(key)
            if ident is not None:
                status, text, user_id = b"200", b"OK", key.encode("ascii")
            else:
                self.log.warning("auth_refused", public_key=key, address=msg[3].decode())
        else:
            self.log.warning("auth_refused", mechanism=mechanism.decode(errors="replace"))
        zap.send_multipart([b"1.0", request_id, status, text, user_id, b""])

    def _identify(self, frame: zmq.Frame) -> tuple[str, NodeIdentity] | None:
        try:
            user_id = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        ident = self.allow.get(user_id)
        return None if ident is None else (user_id, ident)

    # -- commands ---------------------------------------------------------------------------

    def _handle(self, router: zmq.Socket, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return
        rid = frames[0].bytes
        cmd = frames[1].bytes
        sess = self._sessions.get(rid)
        if not self.insecure:
            # Never trust the routing id alone: a reconnecting peer could be handed an old
            # one. The User-Id on the frame is what libzmq authenticated.
            found = self._identify(frames[1])
            if found is None:
                return
            user_id, ident = found
            if sess is not None and sess.user_id != user_id:
                self._drop_session(router, sess, fire_will=True, reason="identity changed")
                sess = None
            if sess is None:
                sess = self._new_session(rid, ident.node_id, ident.role, user_id)
                if cmd != wire.HELLO:
                    self._send(router, rid, [wire.RESYNC])
        elif sess is None and cmd != wire.HELLO:
            # Insecure mode knows nobody until HELLO: ask for it, drop this command.
            self._send(router, rid, [wire.RESYNC])
            return
        if sess is not None:
            sess.last_seen = time.monotonic()

        if cmd == wire.PUB and len(frames) == 5:
            self._on_publish(router, sess, frames)  # type: ignore[arg-type]
        elif cmd == wire.PING:
            self._send(router, rid, [wire.PONG])
        elif cmd == wire.SUB and len(frames) == 4:
            self._on_subscribe(router, sess, frames[2].bytes, frames[3].bytes)  # type: ignore[arg-type]
        elif cmd == wire.UNSUB and len(frames) == 4:
            self._on_unsubscribe(router, sess, frames[2].bytes, frames[3].bytes)  # type: ignore[arg-type]
        elif cmd == wire.HELLO and len(frames) == 7:
            self._on_hello(router, rid, sess, frames)
        elif cmd == wire.BYE:
            if sess is not None:
                self._drop_session(router, sess, fire_will=False, reason="bye")
        else:
            self.log.warning("bad_command", node=getattr(sess, "node_id", None), cmd=cmd[:16])
            self._send(router, rid, [wire.ERR, cmd[:16], b"", b"malformed command"])

    def _new_session(self, rid: bytes, node_id: str, role: str, user_id: str | None) -> _Session:
        sess = _Session(rid=rid, node_id=node_id, role=role, user_id=user_id, last_seen=0.0)
        self._sessions[rid] = sess
        return sess

    def _on_hello(
        self, router: zmq.Socket, rid: bytes, sess: _Session | None, frames: list[zmq.Frame]
    ) -> None:
        claimed_id = frames[2].bytes.decode("utf-8", "replace")
        claimed_role = frames[3].bytes.decode("utf-8", "replace")
        if sess is None:  # insecure mode: the claim is all there is
            try:
                validate_id(claimed_id, field="node_id")
            except ValueError as exc:
                self._send(router, rid, [wire.ERR, wire.HELLO, b"", str(exc).encode()])
                return
            if claimed_role not in ROLES:
                self._send(router, rid, [wire.ERR, wire.HELLO, b"", b"unknown role"])
                return
            sess = self._new_session(rid, claimed_id, claimed_role, None)
            sess.last_seen = time.monotonic()
        elif (claimed_id, claimed_role) != (sess.node_id, sess.role):
            reason = (
                f"key is registered as {sess.role} {sess.node_id}, not {claimed_role} {claimed_id}"
            )
            self.log.warning("hello_refused", node=sess.node_id, reason=reason)
            self._send(router, rid, [wire.ERR, wire.HELLO, b"", reason.encode()])
            return
        will_topic = frames[4].bytes
        if will_topic:
            topic = will_topic.decode("utf-8", "replace")
            if not self._may(sess, "publish", topic):
                reason = f"last will on {topic} refused by the ACL"
                self.log.warning("will_refused", node=sess.node_id, topic=topic)
                self._send(router, rid, [wire.ERR, wire.HELLO, will_topic, reason.encode()])
                return
            retain = bool(frames[5].bytes and frames[5].bytes[0] & wire.FLAG_RETAIN)
            sess.will = (will_topic, frames[6], retain)
        else:
            sess.will = None
        sess.greeted = True
        self.log.info("session_open", node=sess.node_id, role=sess.role)
        self._send(
            router,
            rid,
            [
                wire.WELCOME,
                sess.node_id.encode(),
                sess.role.encode(),
                str(int(self.heartbeat_ivl_s * 1000)).encode(),
                str(self.max_frame_bytes).encode(),
            ],
        )

    def _may(self, sess: _Session, action: str, topic: str) -> bool:
        return acl_allows(
            federation=self.federation,
            node_id=sess.node_id,
            role=sess.role,
            action=action,
            topic=topic,
        )

    def _on_publish(self, router: zmq.Socket, sess: _Session, frames: list[zmq.Frame]) -> None:
        topic_frame, flags_frame, payload = frames[2], frames[3], frames[4]
        topic = topic_frame.bytes
        allowed = sess.pub_acl.get(topic)
        if allowed is None:
            allowed = self._may(sess, "publish", topic.decode("utf-8", "replace"))
            if len(sess.pub_acl) < 4096:
                sess.pub_acl[topic] = allowed
        if not allowed:
            self._note_refusal(sess, "publish_refused", topic=topic.decode(errors="replace"))
            self._send(router, sess.rid, [wire.ERR, wire.PUB, topic, b"not allowed by the ACL"])
            return
        size = len(payload)
        if size > self.max_frame_bytes:
            self._note_refusal(
                sess,
                "publish_refused",
                topic=topic.decode(errors="replace"),
                size=size,
                max_frame_bytes=self.max_frame_bytes,
            )
            reason = f"frame of {size} bytes is over the limit of {self.max_frame_bytes}"
            self._send(router, sess.rid, [wire.ERR, wire.PUB, topic, reason.encode()])
            return
        flags = flags_frame.bytes
        if flags and flags[0] & wire.FLAG_RETAIN:
            if size == 0:
                self._retained.pop(topic, None)  # MQTT: an empty retained frame clears it
            else:
                self._retained[topic] = payload
        self._route(router, topic_frame, topic, payload)

    def _route(
        self,
        router: zmq.Socket,
        topic_frame: zmq.Frame | bytes,
        topic: bytes,
        payload: zmq.Frame | bytes,
    ) -> None:
        self.stats["published"] += 1
        targets = self._routes.get(topic)
        if targets is None:
            text = topic.decode("utf-8", "replace")
            targets = tuple(
                rid
                for rid, s in self._sessions.items()
                if any(topic_matches(f, text) for f in s.filters)
            )
            if len(self._routes) >= _ROUTE_CACHE_LIMIT:
                self._routes.clear()
            self._routes[topic] = targets
        for rid in targets:
            try:
                router.send_multipart(
                    [rid, wire.MSG, topic_frame, payload], flags=zmq.NOBLOCK, copy=False
                )
                self.stats["delivered"] += 1
            except zmq.Again:
                self._note_drop(rid)
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                self._probe_at = time.monotonic()

    def _note_drop(self, rid: bytes) -> None:
        self.stats["dropped"] += 1
        sess = self._sessions.get(rid)
        if sess is not None:
            sess.dropped += 1
            # Log the first and then every 100th, so a stuck subscriber cannot flood the log.
            if sess.dropped % 100 == 1:
                self.log.warning(
                    "subscriber_full_dropping", node=sess.node_id, dropped=sess.dropped
                )

    def _note_refusal(self, sess: _Session, what: str, **details: object) -> None:
        self.stats["refused"] += 1
        sess.refused += 1
        # Every refusal is answered, but a client hammering the ACL must not flood the log.
        if sess.refused <= 20 or sess.refused % 1000 == 0:
            self.log.warning(what, node=sess.node_id, role=sess.role, count=sess.refused, **details)

    def _on_subscribe(self, router: zmq.Socket, sess: _Session, req_id: bytes, raw: bytes) -> None:
        topic_filter = raw.decode("utf-8", "replace")
        try:
            validate_filter(topic_filter)
        except ValueError as exc:
            self._send(router, sess.rid, [wire.SUBACK, req_id, wire.REFUSED, str(exc).encode()])
            return
        if not self._may(sess, "subscribe", topic_filter):
            self._note_refusal(sess, "subscribe_refused", filter=topic_filter)
            reason = f"{sess.role} {sess.node_id} may not subscribe to {topic_filter}"
            self._send(router, sess.rid, [wire.SUBACK, req_id, wire.REFUSED, reason.encode()])
            return
        if topic_filter not in sess.filters:
            if len(sess.filters) >= MAX_FILTERS_PER_SESSION:
                reason = f"more than {MAX_FILTERS_PER_SESSION} subscriptions"
                self._note_refusal(sess, "subscribe_refused", filter=topic_filter, reason=reason)
                self._send(router, sess.rid, [wire.SUBACK, req_id, wire.REFUSED, reason.encode()])
                return
            sess.filters.add(topic_filter)
            self._routes.clear()
        self._send(router, sess.rid, [wire.SUBACK, req_id, wire.OK, b""])
        for topic, payload in self._retained.items():
            if topic_matches(topic_filter, topic.decode("utf-8", "replace")):
                self._send(router, sess.rid, [wire.MSG, topic, payload, req_id])

    def _on_unsubscribe(
        self, router: zmq.Socket, sess: _Session, req_id: bytes, raw: bytes
    ) -> None:
        sess.filters.discard(raw.decode("utf-8", "replace"))
        self._routes.clear()
        self._send(router, sess.rid, [wire.SUBACK, req_id, wire.OK, b""])

    # -- liveness ---------------------------------------------------------------------------

    def _send(self, router: zmq.Socket, rid: bytes, parts: list) -> bool:
        try:
            router.send_multipart([rid, *parts], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self._note_drop(rid)
            return True
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return False

    def _probe_sessions(self, router: zmq.Socket) -> None:
        for sess in list(self._sessions.values()):
            if not self._send(router, sess.rid, [wire.PONG]):
                self._drop_session(router, sess, fire_will=True, reason="disconnected")

    def _expire_sessions(self, router: zmq.Socket, now: float) -> None:
        for sess in list(self._sessions.values()):
            if now - sess.last_seen > self.heartbeat_timeout_s:
                self._drop_session(router, sess, fire_will=True, reason="heartbeat timeout")

    def _drop_session(
        self, router: zmq.Socket, sess: _Session, *, fire_will: bool, reason: str
    ) -> None:
        if self._sessions.pop(sess.rid, None) is None:
            return
        if sess.filters:
            self._routes.clear()
        self.log.info("session_closed", node=sess.node_id, reason=reason)
        if fire_will and sess.will is not None:
            topic, payload, retain = sess.will
            self.stats["wills"] += 1
            self.log.info("will_published", node=sess.node_id, topic=topic.decode(errors="replace"))
            if retain:
                if len(payload) == 0:
                    self._retained.pop(topic, None)
                else:
                    self._retained[topic] = payload
            self._route(router, topic, topic, payload)
