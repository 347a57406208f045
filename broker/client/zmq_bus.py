"""The asyncio ZeroMQ client of the fedbus broker: a DEALER socket speaking `broker.zmq_commands`.

The client survives broker restarts on its own: libzmq reconnects the DEALER, the new broker
answers the first heartbeat with RESYNC (it has no session for us), and the client replays
its HELLO (identity + last will), every live subscription, and the retained frames it
published itself, so retained state such as presence comes back with the nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from broker import zmq_commands as commands
from broker.client.bus import Bus, BusError, Will
from broker.client.credentials import Credentials
from broker.client.subscription import DEFAULT_MAX_QUEUED_BYTES
from broker.client.subscription import Subscription as BaseSubscription
from broker.topics import (
    ROLES,
    acl_allows,
    federation_of,
    topic_matches,
    validate_filter,
    validate_id,
    validate_topic,
)
from protocol.codec import DEFAULT_MAX_FRAME_BYTES

_AUTH_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Subscription(BaseSubscription):
    """A subscription on a `ZmqBus`; `req_id` pairs it with the broker's acknowledgement."""

    def __init__(self, bus: ZmqBus, topic_filter: str, req_id: bytes) -> None:
        super().__init__(bus, topic_filter, max_queued_bytes=bus.max_queued_bytes)
        self.req_id = req_id


class ZmqBus(Bus):
    """A connection to a `ZmqBroker`. Create it with `broker.client.connect(...)`."""

    def __init__(
        self,
        endpoint: str,
        *,
        node_id: str,
        role: str,
        credentials: Credentials | None,
        will: Will | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        insecure_no_auth: bool = False,
        heartbeat_ivl_s: float = 1.0,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        """`context`: a libzmq context to share (many buses in one process, each with its own
        socket and connection, need not each start libzmq's threads); it stays open."""
        self.node_id = validate_id(node_id, field="node_id")
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        if not insecure_no_auth and (credentials is None or not credentials.has_curve):
            raise ValueError(
                "zmq transport needs Credentials with curve_secret_key, curve_public_key and "
                "broker_public_key (or insecure_no_auth=True for local experiments)"
            )
        if will is not None:
            validate_topic(will.topic)
        self.endpoint = endpoint
        self.role = role
        self.will = will
        self.max_frame_bytes = max_frame_bytes
        self.max_queued_bytes = max_queued_bytes  # per subscription (broker.client.subscription)
        self.insecure = insecure_no_auth
        self._credentials = credentials
        self._hb_ivl = heartbeat_ivl_s
        self.log = structlog.get_logger("broker.client").bind(node=node_id)

        self._own_ctx = context is None
        self._ctx = context if context is not None else zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._subs: dict[bytes, Subscription] = {}
        self._by_filter: dict[str, int] = {}
        self._routes: dict[str, tuple[Subscription, ...]] = {}
        self._own_retained: dict[str, bytes] = {}
        self._req_ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._welcome: asyncio.Future[None] | None = None
        self._resyncing = False
        self._closed = False
        self.last_heard = 0.0
        self.refusals: list[tuple[str, str, str]] = []  # (operation, topic, reason) from broker
        self.resyncs = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, *, timeout_s: float = 30.0) -> ZmqBus:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.reconnect_ivl = 100
        sock.reconnect_ivl_max = 2000
        sock.heartbeat_ivl = int(self._hb_ivl * 1000)
        sock.heartbeat_timeout = int(self._hb_ivl * 5000)
        # libzmq would drop an oversized frame by killing the connection; we refuse earlier.
        sock.maxmsgsize = self.max_frame_bytes + 65536
        if not self.insecure:
            creds = self._credentials
            assert creds is not None
            sock.curve_secretkey = creds.curve_secret_key.encode("ascii")  # type: ignore[union-attr]
            sock.curve_publickey = creds.curve_public_key.encode("ascii")  # type: ignore[union-attr]
            sock.curve_serverkey = creds.broker_public_key.encode("ascii")  # type: ignore[union-attr]
        monitor = sock.get_monitor_socket(_AUTH_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._sock = sock
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise BusError(f"cannot connect to {self.endpoint}: {exc}") from None
        loop = asyncio.get_running_loop()
        self._welcome = loop.create_future()
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name=f"zmqbus-recv-{self.node_id}"),
            asyncio.create_task(self._monitor_loop(monitor), name=f"zmqbus-mon-{self.node_id}"),
        ]
        await self._send([*self._hello()])
        try:
            await asyncio.wait_for(asyncio.shield(self._welcome), timeout_s)
        except TimeoutError:
            await self.close()
            raise BusError(
                f"no answer from the broker at {self.endpoint} in {timeout_s} s"
            ) from None
        except BusError:
            await self.close()
            raise
        self._tasks.append(
            asyncio.create_task(self._heartbeat_loop(), name=f"zmqbus-hb-{self.node_id}")
        )
        self.log.info("bus_connected", endpoint=self.endpoint, role=self.role)
        return self

    async def close(self) -> None:
        """Leave cleanly: the broker drops the session without publishing the last will."""
        await self._shutdown(clean=True)

    async def abort(self) -> None:
        """Vanish as a crashed node would: no BYE, so the broker publishes the last will."""
        await self._shutdown(clean=False)

    async def _shutdown(self, *, clean: bool) -> None:
        if self._closed:
            return
        self._closed = True
        sock = self._sock
        if clean and sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                # A plain (non-asyncio) view of the socket, so a full pipe raises here
                # instead of leaving a failed future behind.
                zmq.Socket.shadow(sock.underlying).send(commands.BYE, zmq.NOBLOCK)
                # Give libzmq a moment to flush BYE before the socket goes.
                sock.linger = 200
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sub in list(self._subs.values()):
            sub._finish(BusError("bus closed"))
        self._subs.clear()
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(BusError("bus closed"))
            self._welcome.exception()
        if sock is not None:
            sock.disable_monitor()
            sock.close()
        if self._own_ctx:
            self._ctx.term()
        self.log.info("bus_closed", clean=clean)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- Bus --------------------------------------------------------------------------------

    async def publish(self, topic: str, frame: bytes, *, retain: bool = False) -> None:
        if self._closed:
            raise BusError("bus closed")
        try:
            validate_topic(topic)
        except ValueError as exc:
            raise BusError(str(exc)) from None
        size = memoryview(frame).nbytes  # bytes, also for a multi-byte-item memoryview
        if size > self.max_frame_bytes:
            raise BusError(
                f"frame of {size} bytes for {topic} is over the limit of {self.max_frame_bytes}"
            )
        federation = federation_of(topic)
        if federation is None or not acl_allows(
            federation=federation,
            node_id=self.node_id,
            role=self.role,
            action="publish",
            topic=topic,
        ):
            raise BusError(f"{self.role} {self.node_id} may not publish on {topic}")
        topic_b = topic.encode()
        if retain:
            if size:
                self._own_retained[topic] = bytes(frame)
            else:
                self._own_retained.pop(topic, None)
        await self._send(
            [commands.PUB, topic_b, commands.RETAIN_FLAGS if retain else commands.NO_FLAGS, frame]
        )

    def subscribe(self, topic_filter: str) -> Subscription:
        if self._closed:
            raise BusError("bus closed")
        try:
            validate_filter(topic_filter)
        except ValueError as exc:
            raise BusError(str(exc)) from None
        req_id = next(self._req_ids).to_bytes(8, "big")
        sub = Subscription(self, topic_filter, req_id)
        self._subs[req_id] = sub
        self._by_filter[topic_filter] = self._by_filter.get(topic_filter, 0) + 1
        self._routes.clear()
        self._send_soon([commands.SUB, req_id, topic_filter.encode()])
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.req_id, None) is None:
            return
        self._routes.clear()
        left = self._by_filter[sub.topic_filter] - 1
        if left:
            self._by_filter[sub.topic_filter] = left
            return
        del self._by_filter[sub.topic_filter]
        if not self._closed:
            await self._send([commands.UNSUB, sub.req_id, sub.topic_filter.encode()])

    # -- plumbing ---------------------------------------------------------------------------

    def _hello(self) -> list[bytes]:
        will = self.will
        return [
            commands.HELLO,
            self.node_id.encode(),
            self.role.encode(),
            will.topic.encode() if will else b"",
            (commands.RETAIN_FLAGS if will.retain else commands.NO_FLAGS)
            if will
            else commands.NO_FLAGS,
            bytes(will.frame) if will else b"",
        ]

    async def _send(self, parts: list[Any]) -> None:
        assert self._sock is not None
        try:
            await self._sock.send_multipart(parts, copy=False)
        except zmq.ZMQError as exc:
            raise BusError(f"send failed: {exc}") from None

    def _send_soon(self, parts: list[Any]) -> None:
        task = asyncio.ensure_future(self._send(parts))
        task.add_done_callback(self._log_send_failure)

    def _log_send_failure(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self.log.warning("send_failed", error=str(fut.exception()))

    async def _recv_loop(self) -> None:
        try:
            await self._receive_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Without this loop nothing arrives any more: fail loudly, do not hang readers.
            self.log.error("bus_receive_failed", error=repr(exc))
            error = BusError(f"bus receive loop failed: {exc!r}")
            for sub in list(self._subs.values()):
                sub._finish(error, broken=True)
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(error)
            raise

    async def _receive_forever(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            frames = await sock.recv_multipart(copy=False)
            self.last_heard = time.monotonic()
            cmd = frames[0].bytes
            if cmd == commands.MSG and len(frames) >= 3:
                self._deliver(frames)
            elif cmd == commands.PONG:
                pass
            elif cmd == commands.SUBACK and len(frames) == 4:
                self._on_suback(frames[1].bytes, frames[2].bytes, frames[3].bytes)
            elif cmd == commands.WELCOME:
                self._resyncing = False
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_result(None)
            elif cmd == commands.RESYNC:
                if not self._resyncing:
                    self._resync()
            elif cmd == commands.ERR and len(frames) == 4:
                self._on_error(frames[1].bytes, frames[2].bytes, frames[3].bytes)
            else:
                self.log.warning("unknown_broker_command", cmd=cmd[:16])

    def _deliver(self, frames: list[zmq.Frame]) -> None:
        topic = frames[1].bytes.decode("utf-8", "replace")
        payload = frames[2].bytes
        if len(frames) == 4:  # a retained frame for one new subscription only
            sub = self._subs.get(frames[3].bytes)
            if sub is not None and not sub.closed:
                sub._offer(payload)
            return
        targets = self._routes.get(topic)
        if targets is None:
            targets = tuple(s for s in self._subs.values() if topic_matches(s.topic_filter, topic))
            self._routes[topic] = targets
        for sub in targets:
            if not sub.closed:
                sub._offer(payload)

    def _on_suback(self, req_id: bytes, status: bytes, reason: bytes) -> None:
        sub = self._subs.get(req_id)
        if sub is None or sub._acked.done():
            return
        if status == commands.OK:
            sub._acked.set_result(None)
            return
        text = reason.decode("utf-8", "replace")
        self.log.warning("subscribe_refused", filter=sub.topic_filter, reason=text)
        self.refusals.append(("subscribe", sub.topic_filter, text))
        self._subs.pop(req_id, None)
        self._by_filter[sub.topic_filter] -= 1
        if not self._by_filter[sub.topic_filter]:
            del self._by_filter[sub.topic_filter]
        self._routes.clear()
        sub._finish(BusError(f"subscribe to {sub.topic_filter} refused by the broker: {text}"))

    def _on_error(self, op: bytes, topic: bytes, reason: bytes) -> None:
        text = reason.decode("utf-8", "replace")
        topic_s = topic.decode("utf-8", "replace")
        self.refusals.append((op.decode("ascii", "replace").lower(), topic_s, text))
        self.log.warning(
            "broker_refused", op=op.decode("ascii", "replace"), topic=topic_s, reason=text
        )
        if op == commands.HELLO and self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(BusError(f"broker refused the session: {text}"))

    def _resync(self) -> None:
        """Replay the session onto a broker that does not know us (it restarted)."""
        self._resyncing = True
        self.resyncs += 1
        self.log.info("bus_resync", subscriptions=len(self._by_filter))
        self._send_soon(self._hello())
        for sub in list(self._subs.values()):
            if not sub.closed:
                self._send_soon([commands.SUB, sub.req_id, sub.topic_filter.encode()])
        for topic, frame in self._own_retained.items():
            self._send_soon([commands.PUB, topic.encode(), commands.RETAIN_FLAGS, frame])

    async def _heartbeat_loop(self) -> None:
        warned = False
        while True:
            await asyncio.sleep(self._hb_ivl)
            await self._send([commands.PING])
            silent = time.monotonic() - self.last_heard
            if silent > 5 * self._hb_ivl and not warned:
                self.log.warning("broker_silent", seconds=round(silent, 1))
                warned = True
            elif silent <= 5 * self._hb_ivl and warned:
                self.log.info("broker_back")
                warned = False

    async def _monitor_loop(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = await recv_monitor_message(monitor)
                kind = event["event"]
                if kind & _AUTH_FAILED:
                    reason = "the broker refused our CurveZMQ key or the broker key is wrong"
                    self.log.warning(
                        "handshake_failed", zmq_event=int(kind), value=int(event["value"])
                    )
                    if self._welcome is not None and not self._welcome.done():
                        self._welcome.set_exception(BusError(f"{self.endpoint}: {reason}"))
        finally:
            monitor.close(linger=0)
