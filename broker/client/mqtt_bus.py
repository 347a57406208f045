"""The MQTT transport: a `Bus` over a real MQTT 5 broker (Mosquitto), built on aiomqtt.

Delivery guarantees, and how they are kept:

* At least once. Every frame goes out with QoS 1 in a persistent session (clean start off,
  a session expiry interval), so the broker keeps our subscriptions and queues frames while
  we are away; paho keeps our unacknowledged frames and sends them again on reconnect.
  `publish` returns once the broker acknowledged the frame (PUBACK), across reconnects.
* Duplicates are dropped. QoS 1 may deliver a frame twice (a lost PUBACK, a resend after a
  reconnect). Frames are opaque here, but every fedbus envelope carries a random message id,
  so two equal frames are the same message: a bounded LRU of SHA-256 digests drops repeats.
  Retained frames (presence) are state, not events, and are always delivered: a node that
  goes offline and comes back may legitimately publish the same state twice.
* Presence: the node's `Will` is registered with the broker (published if we vanish), and
  the retained frames the node published are published again after every reconnect, since
  the broker may have replaced them with our will meanwhile.
* A connection the broker stops answering on is made again: when acknowledgements are
  awaited and nothing (no PUBACK, SUBACK or message) has come in for `stall_s`, the bus
  disconnects and reconnects (`bus_stalled`), rather than waiting out the keepalive. Seen
  after a Mosquitto restart: a connection that came up while the client's earlier attempts
  were being refused read nothing for a whole keepalive (30 s) while its writes went out.
* Reconnects use exponential backoff with jitter, forever, until `close()`; a broker that
  refuses our credentials (bad password, not authorised, TLS certificate refused) is fatal:
  retrying cannot help and would hide the error.
* Access rules are checked here too (`broker.topics.acl_allows`), so a node learns at once
  that an operation is refused, as on the ZeroMQ transport. Mosquitto enforces the same rules
  from the acl_file that `broker.server.mosquitto_files` generates; it does not check SUBSCRIBE, only what
  it delivers, so a refused subscription would otherwise just stay silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import random
import socket
import ssl
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker.client.bus import Bus, BusError, Will
from broker.client.credentials import Credentials
from broker.client.subscription import DEFAULT_MAX_QUEUED_BYTES
from broker.client.subscription import Subscription as BaseSubscription
from broker.mqtt_packets import PACKET_OVERHEAD_BYTES, publish_packet_size
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

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

# CONNACK reason codes after which retrying is pointless (MQTT 5 section 3.2.2.2, and the
# 3.1.1 return codes 1-5 that paho maps to them).
_FATAL_CONNACK = {
    0x84,  # unsupported protocol version
    0x85,  # client identifier not valid
    0x86,  # bad user name or password
    0x87,  # not authorized
    0x8A,  # banned
    0x8C,  # bad authentication method
    1,
    2,
    4,
    5,
}


class _Client(aiomqtt.Client):
    """aiomqtt's client, keeping the reason code of each PUBACK and the CONNACK flags."""

    def __init__(self, *args: Any, on_refused: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_refused = on_refused
        self.session_present = False
        self.broker_max_packet: int | None = None
        self.last_paho_error: str | None = None
        self._client.on_log = self._on_paho_log

    def _on_paho_log(self, client: Any, userdata: Any, level: int, buf: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self.last_paho_error = buf

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None
    ) -> None:
        # aiomqtt ignores a connection that ends before CONNACK and waits for its timeout.
        # Under TLS 1.3 that is how a refused client certificate shows (the server's alert
        # comes after our side of the handshake): fail the attempt at once, with the reason.
        if not self._connected.done():
            detail = self.last_paho_error or str(reason_code)
            self._connected.set_exception(
                aiomqtt.MqttError(f"connection closed before CONNACK: {detail}")
            )
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        if isinstance(reason_code, ReasonCode) and reason_code.is_failure:
            self._on_refused(mid, reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        # aiomqtt registers the writer from paho's connect thread via call_soon_threadsafe;
        # if the connection failed meanwhile the fd is gone and asyncio logs a traceback.
        # Same callback, registered only while the socket is still open.
        def callback() -> None:
            try:
                client.loop_write()
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            if sock.fileno() != -1:
                self._loop.add_writer(sock.fileno(), callback)

        self._loop.call_soon_threadsafe(register)

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None
    ) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        # MQTT 5: the broker announces the largest packet it accepts; a bigger one would make
        # it drop the connection, and paho would resend it after every reconnect, forever.
        self.broker_max_packet = getattr(properties, "MaximumPacketSize", None)
        super()._on_connect(client, userdata, flags, reason_code, properties)


class Subscription(BaseSubscription):
    """A subscription on an `MqttBus`."""


class _Deduplicator:
    """Remembers the SHA-256 of the last `capacity` frames: a bounded LRU set."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("dedupe capacity must be >= 1")
        self.capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def seen(self, frame: bytes) -> bool:
        """True if `frame` was seen before (and refresh it); else remember it."""
        digest = hashlib.sha256(frame).digest()
        if digest in self._seen:
            self._seen.move_to_end(digest)
            return True
        self._seen[digest] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return False


def parse_url(url: str) -> tuple[str, str, int]:
    """mqtt[s]://host[:port] -> (scheme, host, port)."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"bus url {url!r}: expected mqtt://host:port or mqtts://host:port")
    if not parts.hostname:
        raise ValueError(f"bus url {url!r}: needs a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"bus url {url!r}: unexpected path or query")
    if parts.username or parts.password:
        raise ValueError(f"bus url {url!r}: put credentials in the credentials files, not the URL")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"bus url {url!r}: {exc}") from None
    return parts.scheme, unquote(parts.hostname), port


def tls_context(credentials: Credentials) -> ssl.SSLContext:
    """A client TLS context: the federation CA only, our certificate, TLS 1.2 at least."""
    if not credentials.tls_ca:
        raise ValueError("mqtts:// needs credentials.tls_ca (the federation CA certificate)")
    if bool(credentials.tls_cert) != bool(credentials.tls_key):
        raise ValueError("credentials.tls_cert and credentials.tls_key go together")
    try:
        # Only the federation's CA: a certificate from any public CA must not be accepted.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cafile=credentials.tls_ca)
        if credentials.tls_cert:
            context.load_cert_chain(credentials.tls_cert, credentials.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"TLS files: {exc}") from None
    return context


def _check_will(will: Will, *, node_id: str, role: str, max_frame_bytes: int) -> None:
    """Refuse now a will the broker would drop: Mosquitto silently when it fires, the ZeroMQ
    broker by refusing the session."""
    validate_topic(will.topic)
    if len(will.frame) > max_frame_bytes:
        raise ValueError("the will frame is over max_frame_bytes")
    federation = federation_of(will.topic)
    if federation is None or not acl_allows(
        federation=federation, node_id=node_id, role=role, action="publish", topic=will.topic
    ):
        raise ValueError(f"last will on {will.topic} refused by the ACL for {role} {node_id}")


def _login(credentials: Credentials | None, node_id: str) -> tuple[str, str]:
    """(username, password) for `node_id`; the username must be the node id."""
    if credentials is None or not credentials.password:
        raise ValueError(
            "mqtt transport needs Credentials with a password (username defaults to "
            "the node id), or insecure_no_auth=True for local experiments"
        )
    username = credentials.username or node_id
    if username != node_id:
        # The ACL's %u is the username: any other name would get another node's rights.
        raise ValueError(f"MQTT username {username!r} must equal the node id {node_id!r}")
    return username, credentials.password


def _tls_for(scheme: str, url: str, credentials: Credentials | None) -> ssl.SSLContext | None:
    """The TLS context mqtts:// needs; TLS files for a plain mqtt:// URL are a mistake."""
    if scheme == "mqtts":
        if credentials is None:
            raise ValueError("mqtts:// needs credentials with the TLS files")
        return tls_context(credentials)
    if credentials is not None and (credentials.tls_cert or credentials.tls_ca):
        raise ValueError(f"TLS files given but {url!r} is not mqtts://")
    return None


class MqttBus(Bus):
    """A node's connection to an MQTT 5 broker. Create it with `broker.client.connect(...)`.

    The MQTT client id and username are the node id (the ACL's `%u`); the session persists
    for `session_expiry_s` after a disconnect.
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        role: str,
        credentials: Credentials | None,
        will: Will | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        insecure_no_auth: bool = False,
        keepalive_s: int = 30,
        stall_s: float = 10.0,
        session_expiry_s: int = 3600,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        dedupe_capacity: int = 65536,
        rng: random.Random | None = None,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    ) -> None:
        self.node_id = validate_id(node_id, field="node_id")
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        if max_frame_bytes <= 0:
            raise ValueError("max_frame_bytes must be positive")
        self.scheme, self.host, self.port = parse_url(url)
        self.url = url
        self.role = role
        self.max_frame_bytes = max_frame_bytes
        self.max_queued_bytes = max_queued_bytes  # per subscription (broker.client.subscription)
        if will is not None:
            _check_will(will, node_id=node_id, role=role, max_frame_bytes=max_frame_bytes)
        self.will = will
        login: tuple[str | None, str | None] = (
            (None, None) if insecure_no_auth else _login(credentials, node_id)
        )
        self._username, self._password = login
        self._tls = _tls_for(self.scheme, url, credentials)
        self._keepalive_s = keepalive_s
        if stall_s <= 0:
            raise ValueError("stall_s must be positive")
        self._stall_s = stall_s
        # Acknowledgements (PUBACK, SUBACK) awaited now, and when anything last came in.
        self._awaiting_acks = 0
        self._last_inbound = time.monotonic()
        self._session_expiry_s = session_expiry_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._rng = rng or random.Random()
        self._dedupe = _Deduplicator(dedupe_capacity)
        self.log = structlog.get_logger("broker.mqtt").bind(node=node_id)

        self._client: _Client | None = None
        self._subs: list[Subscription] = []
        self._filters: dict[str, int] = {}
        self._suback: dict[str, asyncio.Future[None]] = {}
        self._own_retained: dict[str, bytes] = {}
        self._retained_seen: dict[str, bytes] = {}
        self._connected = asyncio.Event()
        self._closed_event = asyncio.Event()
        # One future every in-flight publish waits on besides its PUBACK (set by close/fail).
        self._closed_future: asyncio.Future[None] | None = None  # made in start()
        self._may_publish: dict[str, bool] = {}
        self._connection_lost = asyncio.Event()  # a fresh one per connection
        self._first: asyncio.Future[None] | None = None
        self._closed = False
        self._fatal: BusError | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        # Observability for tests and status: what the broker refused, how often we came back.
        self.refusals: list[tuple[str, str, str]] = []
        self.reconnects = 0
        self.stalls = 0
        self.duplicates_dropped = 0
        self.oversized_dropped = 0

    # -- lifecycle --------------------------------------------------------------------------

    def _make_client(self) -> _Client:
        connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_props.SessionExpiryInterval = self._session_expiry_s
        # The broker must not send us a packet we would refuse anyway.
        connect_props.MaximumPacketSize = self.max_frame_bytes + PACKET_OVERHEAD_BYTES
        will = None
        if self.will is not None:
            will = aiomqtt.Will(
                topic=self.will.topic, payload=self.will.frame, qos=1, retain=self.will.retain
            )
        return _Client(
            self.host,
            self.port,
            username=self._username,
            password=self._password,
            identifier=self.node_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            clean_start=False,
            keepalive=self._keepalive_s,
            properties=connect_props,
            tls_context=self._tls,
            timeout=30.0,  # for CONNACK; SUBACK/PUBACK waits below have no timeout
            on_refused=self._on_refused,
        )

    async def start(self, *, timeout_s: float = 30.0) -> MqttBus:
        """Connect (retrying while the broker is unreachable, up to `timeout_s`)."""
        if self._supervisor is not None:
            return self
        self._client = self._make_client()
        loop = asyncio.get_running_loop()
        self._closed_future = loop.create_future()
        self._first = loop.create_future()
        self._supervisor = asyncio.create_task(self._run(), name=f"mqttbus-{self.node_id}")
        try:
            await asyncio.wait_for(asyncio.shield(self._first), timeout_s)
        except TimeoutError:
            await self.abort()
            raise BusError(
                f"no MQTT session with {self.host}:{self.port} within {timeout_s} s"
                + (f" (last error: {self._last_error})" if self._last_error else "")
            ) from None
        except BusError:
            await self.abort()
            raise
        self.log.info("bus_connected", url=self.url, role=self.role)
        return self

    _last_error: str | None = None

    async def _run(self) -> None:
        """Keep one MQTT connection alive: connect, serve it, back off, reconnect."""
        assert self._client is not None
        client = self._client
        delay = self._backoff[0]
        attempt = 0
        while not self._closed:
            up_since: float | None = None
            try:
                async with client:
                    if attempt:
                        self.reconnects += 1
                        self.log.info("bus_reconnected", session_present=client.session_present)
                    attempt += 1
                    up_since = time.monotonic()
                    await self._on_connected(client)
                    async for message in client.messages:
                        self._deliver(message)
            except aiomqtt.MqttCodeError as exc:
                self._connected.clear()
                if isinstance(exc, MqttConnectError) and _code(exc.rc) in _FATAL_CONNACK:
                    self._fail(BusError(f"{self.host}:{self.port} refused {self.node_id}: {exc}"))
                    return
                self._last_error = str(exc)
            except aiomqtt.MqttError as exc:
                self._connected.clear()
                text = str(exc)
                self._last_error = text
                if _is_tls_refusal(text):
                    self._fail(BusError(f"TLS with {self.host}:{self.port} failed: {text}"))
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A bug or an unexpected library error: fail loudly, never hang the node.
                self._fail(BusError(f"MQTT connection failed: {type(exc).__name__}: {exc}"))
                return
            finally:
                self._connected.clear()
                self._connection_lost.set()
            if up_since is not None and time.monotonic() - up_since > self._backoff[1]:
                # Only a connection that lasted resets the backoff: one the broker drops at
                # once (a poison frame, a flapping link) must not turn into a reconnect storm.
                delay = self._backoff[0]
            if self._closed:
                return
            self.log.info("bus_disconnected", error=self._last_error, retry_in_s=round(delay, 3))
            # "Equal jitter": never a stampede of nodes at the same instant after a broker restart.
            await asyncio.sleep(delay / 2 + self._rng.uniform(0, delay / 2))
            delay = min(delay * 2, self._backoff[1])

    async def _on_connected(self, client: _Client) -> None:
        """Restore what the broker may have lost, then let publishers through."""
        self._connection_lost = asyncio.Event()
        for topic_filter in list(self._filters):
            fut = self._suback.get(topic_filter)
            settled = (
                fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None
            )
            if not (client.session_present and settled):
                self._start_subscribe(topic_filter)
        for topic, frame in self._own_retained.items():
            # Our will may have replaced our retained state while we were away.
            self._spawn(self._publish_raw(topic, frame, retain=True))
        self._last_inbound = time.monotonic()  # the CONNACK
        self._spawn(self._watch_connection(client, self._connection_lost))
        self._connected.set()
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    async def _watch_connection(self, client: _Client, lost: asyncio.Event) -> None:
        """Drop a connection that reads nothing while acknowledgements are awaited (see the
        module docstring); the supervisor then reconnects, and paho sends the frames still
        unacknowledged again."""
        while not lost.is_set() and not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), min(1.0, self._stall_s / 2))
            silent = time.monotonic() - self._last_inbound
            if lost.is_set() or not self._awaiting_acks or silent <= self._stall_s:
                continue
            self.stalls += 1
            self.log.warning(
                "bus_stalled", awaiting_acks=self._awaiting_acks, silent_s=round(silent, 3)
            )
            client._client.disconnect()  # paho: on_disconnect ends the connection's loop
            return

    def _fail(self, error: BusError) -> None:
        self.log.error("bus_failed", error=str(error))
        self._fatal = error
        self._closed_event.set()
        if self._closed_future is not None and not self._closed_future.done():
            self._closed_future.set_result(None)
        if self._first is not None and not self._first.done():
            self._first.set_exception(error)
            self._first.exception()
        for sub in list(self._subs):
            sub._finish(error)
        self._connected.set()  # wake publishers so they see the error

    async def close(self) -> None:
        """Leave cleanly: DISCONNECT, so the broker discards our last will (as on ZeroMQ)."""
        await self._shutdown(clean=True)

    async def abort(self) -> None:
        """Vanish as a crashed node would: drop the socket, so the broker publishes the will."""
        await self._shutdown(clean=False)

    async def _shutdown(self, *, clean: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        if self._closed_future is not None and not self._closed_future.done():
            self._closed_future.set_result(None)
        client = self._client
        if not clean and client is not None:
            # Close the TCP connection under paho's feet: no DISCONNECT packet is sent.
            sock = client._client.socket()
            if isinstance(sock, socket.socket):  # plain TCP or an ssl.SSLSocket
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for task in list(self._inflight):
            task.cancel()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
        for sub in list(self._subs):
            sub._finish(BusError("bus closed"))
        self._subs.clear()
        if self._first is not None and not self._first.done():
            self._first.set_exception(BusError("bus closed"))
            self._first.exception()
        self._connected.set()
        self.log.info("bus_closed", clean=clean)

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_ready(self) -> None:
        """Wait until connected and every subscription is acknowledged by the broker.

        After a broker crash that lost our session, frames published before we subscribed
        again are lost (the protocol sees a timeout); this is how to know we are back.
        """
        while True:
            self._check_open()
            await self._connected.wait()
            self._check_open()
            pending = [f for f in self._suback.values() if not f.done()]
            if not pending:
                return
            await asyncio.wait(pending)

    # -- Bus --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise BusError("bus closed")

    async def publish(self, topic: str, frame: bytes, *, retain: bool = False) -> None:
        """Send `frame` with QoS 1; returns when the broker has it (PUBACK), even across
        reconnects. BusError if refused here (ACL, size) or the bus is closed/failed."""
        self._check_open()
        try:
            validate_topic(topic)
        except ValueError as exc:
            raise BusError(str(exc)) from None
        size = len(frame)
        if size > self.max_frame_bytes:
            raise BusError(
                f"frame of {size} bytes for {topic} is over the limit of {self.max_frame_bytes}"
            )
        broker_max = self._client.broker_max_packet if self._client is not None else None
        if broker_max is not None and publish_packet_size(topic, size) > broker_max:
            raise BusError(
                f"frame of {size} bytes for {topic} is over the broker's packet limit of "
                f"{broker_max} bytes"
            )
        allowed = self._may_publish.get(topic)
        if allowed is None:
            federation = federation_of(topic)
            allowed = federation is not None and acl_allows(
                federation=federation,
                node_id=self.node_id,
                role=self.role,
                action="publish",
                topic=topic,
            )
            if len(self._may_publish) < 4096:
                self._may_publish[topic] = allowed
        if not allowed:
            raise BusError(f"{self.role} {self.node_id} may not publish on {topic}")
        frame = bytes(frame)
        if retain:
            if size:
                self._own_retained[topic] = frame
            else:
                self._own_retained.pop(topic, None)
        # "from now on": a subscription made before this publish is in place before it goes.
        pending = [f for f in self._suback.values() if not f.done()]
        if pending:
            await asyncio.wait(pending)
        await self._publish_raw(topic, frame, retain=retain)

    async def _publish_raw(self, topic: str, frame: bytes, *, retain: bool) -> None:
        while True:
            await self._connected.wait()
            self._check_open()
            client = self._client
            assert client is not None
            if not client._client.is_connected():
                # Lost just now; the supervisor has not noticed yet.
                await asyncio.sleep(self._backoff[0])
                continue
            # No timeout: paho resends an unacknowledged QoS 1 frame after a reconnect, and
            # the PUBACK of the resend completes this call. Only close() interrupts it.
            sending = asyncio.ensure_future(
                client.publish(topic, frame, qos=1, retain=retain, timeout=math.inf)
            )
            assert self._closed_future is not None
            self._awaiting_acks += 1
            try:
                await asyncio.wait(
                    {sending, self._closed_future}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                self._awaiting_acks -= 1
                if not sending.done():
                    sending.cancel()
                elif not sending.cancelled() and sending.exception() is None:
                    self._last_inbound = time.monotonic()  # the PUBACK
            if not sending.done() or sending.cancelled():
                self._check_open()
                raise BusError("bus closed")
            try:
                sending.result()
                return
            except aiomqtt.MqttCodeError as exc:
                if exc.rc in (paho.MQTT_ERR_NO_CONN, paho.MQTT_ERR_CONN_LOST):
                    # paho queued the QoS 1 frame and sends it once reconnected.
                    return
                raise BusError(f"publish on {topic} failed: {exc}") from None
            except aiomqtt.MqttError as exc:
                raise BusError(f"publish on {topic} failed: {exc}") from None

    def subscribe(self, topic_filter: str) -> Subscription:
        self._check_open()
        try:
            validate_filter(topic_filter)
        except ValueError as exc:
            raise BusError(str(exc)) from None
        sub = Subscription(self, topic_filter, max_queued_bytes=self.max_queued_bytes)
        federation = federation_of(topic_filter)
        if federation is None or not acl_allows(
            federation=federation,
            node_id=self.node_id,
            role=self.role,
            action="subscribe",
            topic=topic_filter,
        ):
            # Mosquitto would accept it and deliver nothing: refuse it visibly instead.
            reason = f"{self.role} {self.node_id} may not subscribe to {topic_filter}"
            self.refusals.append(("subscribe", topic_filter, reason))
            sub._finish(BusError(reason))
            return sub
        self._subs.append(sub)
        count = self._filters.get(topic_filter, 0)
        self._filters[topic_filter] = count + 1
        if count == 0:
            if self._connected.is_set() and self._fatal is None:
                self._start_subscribe(topic_filter)
            else:
                # Subscribed on (re)connect; publishers wait for it like for any other.
                self._suback[topic_filter] = asyncio.get_running_loop().create_future()
        fut = self._suback.get(topic_filter)
        if fut is not None:
            fut.add_done_callback(functools.partial(_settle, sub))
        else:
            sub._acked.set_result(None)
        if count:
            # The broker sends retained frames only for a new subscription: replay ours.
            for topic, frame in self._retained_seen.items():
                if topic_matches(topic_filter, topic):
                    sub._offer(frame)
        return sub

    def _start_subscribe(self, topic_filter: str) -> None:
        fut = self._suback.get(topic_filter)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._suback[topic_filter] = fut
        self._spawn(self._subscribe_raw(topic_filter, fut))

    async def _subscribe_raw(self, topic_filter: str, fut: asyncio.Future[None]) -> None:
        assert self._client is not None
        options = SubscribeOptions(
            qos=1,
            # Keep the retain flag on live frames: retained frames are state, never deduplicated.
            retainAsPublished=True,
            # After a reconnect with our session intact, do not replay retained state again.
            retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB,
        )
        # A SUBACK comes, or the connection ends (then _on_connected subscribes again): a
        # timeout here would only leave the filter unsubscribed on a slow broker.
        lost = self._connection_lost
        subscribing = asyncio.ensure_future(
            self._client.subscribe(topic_filter, options=options, timeout=math.inf)
        )
        ending = asyncio.ensure_future(lost.wait())
        self._awaiting_acks += 1
        try:
            await asyncio.wait({subscribing, ending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._awaiting_acks -= 1
            ending.cancel()
            if not subscribing.done():
                subscribing.cancel()
            elif not subscribing.cancelled() and subscribing.exception() is None:
                self._last_inbound = time.monotonic()  # the SUBACK
        if subscribing.cancelled() or subscribing.exception() is not None:
            error = None if subscribing.cancelled() else subscribing.exception()
            self.log.info("subscribe_interrupted", filter=topic_filter, error=str(error))
            return
        codes = subscribing.result()
        code = codes[0] if codes else None
        if isinstance(code, ReasonCode) and code.is_failure:
            text = str(code)
            self.refusals.append(("subscribe", topic_filter, text))
            error = BusError(f"subscribe to {topic_filter} refused by the broker: {text}")
            if not fut.done():
                fut.set_exception(error)
                fut.exception()
            # Forget the filter: its subscriptions are finished with the error (see _settle),
            # and a reconnect must not ask for it again.
            self._filters.pop(topic_filter, None)
            self._suback.pop(topic_filter, None)
            self._subs = [sub for sub in self._subs if sub.topic_filter != topic_filter]
            return
        if not fut.done():
            fut.set_result(None)

    async def _unsubscribe(self, sub: Subscription) -> None:
        if sub not in self._subs:
            return
        self._subs.remove(sub)
        left = self._filters.get(sub.topic_filter, 1) - 1
        if left:
            self._filters[sub.topic_filter] = left
            return
        self._filters.pop(sub.topic_filter, None)
        self._suback.pop(sub.topic_filter, None)
        if self._connected.is_set() and not self._closed and self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.unsubscribe(sub.topic_filter)

    # -- plumbing ---------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._inflight.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("bus_task_failed", error=str(task.exception()))

    def _on_refused(self, mid: int, reason: ReasonCode) -> None:
        # Mosquitto answers a publish outside our ACL with PUBACK "Not authorized".
        text = str(reason)
        self.refusals.append(("publish", str(mid), text))
        self.log.warning("publish_refused", mid=mid, reason=text)

    def _deliver(self, message: aiomqtt.Message) -> None:
        self._last_inbound = time.monotonic()
        topic = message.topic.value
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            return
        payload = bytes(payload)
        if len(payload) > self.max_frame_bytes:
            self.oversized_dropped += 1
            self.log.warning("oversized_frame_dropped", topic=topic, size=len(payload))
            return
        if message.retain:
            if payload:
                self._retained_seen[topic] = payload
            else:
                self._retained_seen.pop(topic, None)
                return  # a cleared retained topic carries no frame
        elif self._dedupe.seen(payload):
            self.duplicates_dropped += 1
            return
        for sub in self._subs:
            if not sub.closed and topic_matches(sub.topic_filter, topic):
                sub._offer(payload)


def _settle(sub: Subscription, fut: asyncio.Future[None]) -> None:
    if sub._acked.done():
        return
    if fut.cancelled():
        sub._finish(BusError("subscription cancelled"))
    elif fut.exception() is not None:
        sub._finish(fut.exception())
    else:
        sub._acked.set_result(None)


def _code(rc: Any) -> int | None:
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    if isinstance(rc, int):
        return rc
    return None


def _is_tls_refusal(text: str) -> bool:
    lowered = text.lower()
    return any(
        marker in lowered
        for marker in (
            "certificate verify failed",
            "certificate_verify_failed",
            "unknown ca",
            "bad certificate",
            "certificate required",
            "certificate revoked",
            "certificate expired",
            "certificate unknown",
            "unsupported certificate",
            "hostname mismatch",
            "wrong version number",
        )
    )
