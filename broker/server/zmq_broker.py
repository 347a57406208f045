"""The embedded ZeroMQ broker: one ROUTER socket, CurveZMQ authentication, the fedbus ACL.

This module only moves bytes: every session rule (HELLO, ACL, retained frames, wills,
heartbeats, queue accounting) lives in the sans-IO `broker.server.core.BrokerCore`; here
frames go from the ROUTER socket into the machine and its actions back out.

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
  are non-blocking. When a subscriber's pipe is full (`sndhwm` frames), its frames wait in a
  backlog of the core, bounded in bytes and frames (`max_queued_bytes`, `max_queued_frames`),
  and go out in order as the pipe drains (the loop retries every few milliseconds while any
  backlog waits). Past the bounds a frame is dropped for that subscriber only, counted and
  logged, like an MQTT broker's per-client queue limit; the others never wait for it.
* Every `stats_every_s` the broker logs `broker_stats` (sessions, frames published,
  delivered, backlogged, dropped) when anything changed, so an operator sees drops as they
  happen, not only in the `broker_stopped` line.
* One libzmq I/O thread by default, like zmq.proxy: a second one spends more CPU handing
  frames across threads than it saves (benchmarks/broker/bench_hop.py, hop CPU per GB).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import structlog
import zmq
import zmq.utils.z85
from zmq.utils.monitor import parse_monitor_message

from broker import zmq_commands as commands
from broker.keys import curve_public_key
from broker.server.core import (
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_FRAMES,
    Action,
    BrokerCore,
    Log,
    NodeIdentity,
    Send,
    parse_allow_list,
)
from broker.topics import validate_id
from protocol.codec import DEFAULT_MAX_FRAME_BYTES

__all__ = ["NodeIdentity", "ZmqBroker"]

_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
# Receive a bounded batch per poll, so timers and ZAP requests still get their turn.
_RECV_BATCH = 256
# A disconnect notice names a file descriptor, not a peer: probe every session this soon after.
_PROBE_DELAY_S = 0.05
# Room for the command parts on top of the payload in libzmq's own size limit.
_COMMAND_PARTS_BYTES = 65536
# While a backlog waits, how often the loop tries to hand it to the transport again.
_DRAIN_RETRY_S = 0.002


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
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        max_queued_frames: int = DEFAULT_MAX_QUEUED_FRAMES,
        stats_every_s: float = 60.0,
    ) -> None:
        validate_id(federation, field="federation")
        if not insecure_no_auth:
            if not secret_key:
                raise ValueError("secret_key is required unless insecure_no_auth=True")
            if allow is None:
                raise ValueError("an allow-list is required unless insecure_no_auth=True")
        self.core = BrokerCore(
            federation=federation,
            allow=None if insecure_no_auth else parse_allow_list(allow or {}),
            max_frame_bytes=max_frame_bytes,
            heartbeat_ivl_s=heartbeat_ivl_s,
            heartbeat_timeout_s=heartbeat_timeout_s,
            max_queued_bytes=max_queued_bytes,
            max_queued_frames=max_queued_frames,
        )
        self.stats_every_s = stats_every_s
        self._stats_logged: dict[str, int] = {}
        self.federation = federation
        self.bind = bind
        self.insecure = insecure_no_auth
        self._secret_key = secret_key
        self.public_key = curve_public_key(secret_key) if secret_key else None
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
        self._probe_at: float | None = None

    @property
    def allow(self) -> Mapping[str, NodeIdentity]:
        return self.core.allow

    @property
    def stats(self) -> dict[str, int]:
        return self.core.stats

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
        """The zmq+tcp:// URL clients pass to `broker.client.connect`."""
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

    # -- sockets ----------------------------------------------------------------------------

    def _router(self) -> zmq.Socket[Any]:
        router = self._ctx.socket(zmq.ROUTER)
        router.router_mandatory = 1
        router.linger = 0
        router.sndhwm = self.sndhwm
        # A frame larger than the limit (plus room for the command frames) is not even read:
        # libzmq drops the connection. Frames just over the limit are refused politely.
        router.maxmsgsize = self.max_frame_bytes + _COMMAND_PARTS_BYTES
        router.heartbeat_ivl = int(self.heartbeat_ivl_s * 1000)
        router.heartbeat_timeout = int(self.heartbeat_timeout_s * 1000)
        if not self.insecure:
            assert self._secret_key is not None
            router.curve_server = True
            router.curve_secretkey = self._secret_key.encode("ascii")
            router.zap_domain = commands.ZAP_DOMAIN
        return router

    def _serve(self) -> None:
        ctl = self._ctx.socket(zmq.PAIR)
        ctl.bind(self._ctl_endpoint)
        zap = None
        if not self.insecure:
            # Bound before the ROUTER exists, so no handshake can ever slip past it.
            zap = self._ctx.socket(zmq.REP)
            zap.bind(_ZAP_ENDPOINT)
        router = self._router()
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
        try:
            self._loop(router, ctl, monitor, zap)
        finally:
            self.log.info("broker_stopped", **self.stats)
            router.disable_monitor()
            for sock in (router, monitor, ctl, zap):
                if sock is not None:
                    sock.close(linger=0)

    def _loop(
        self,
        router: zmq.Socket[Any],
        ctl: zmq.Socket[Any],
        monitor: zmq.Socket[Any],
        zap: zmq.Socket[Any] | None,
    ) -> None:
        poller = zmq.Poller()
        for sock in (router, ctl, monitor, zap):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        next_sweep = time.monotonic() + self.heartbeat_ivl_s
        next_stats = time.monotonic() + self.stats_every_s
        while True:
            deadline = next_sweep if self._probe_at is None else min(next_sweep, self._probe_at)
            if self.core.backlogged:
                deadline = min(deadline, time.monotonic() + _DRAIN_RETRY_S)
            timeout_ms = max(0, int((deadline - time.monotonic()) * 1000) + 1)
            events = dict(poller.poll(timeout_ms))
            if ctl in events:
                return
            if zap is not None and zap in events:
                self._answer_zap(zap)
            if monitor in events:
                while monitor.poll(0):
                    parse_monitor_message(monitor.recv_multipart())
                self._probe_at = time.monotonic() + _PROBE_DELAY_S
            if self.core.backlogged:
                self._drain(router)
            if router in events:
                self._receive_batch(router)
            now = time.monotonic()
            if self._probe_at is not None and now >= self._probe_at:
                self._probe_at = None
                self._execute(router, self.core.probe())
            if now >= next_sweep:
                next_sweep = now + self.heartbeat_ivl_s
                self._execute(router, self.core.expire(now))
            if now >= next_stats:
                next_stats = now + self.stats_every_s
                self._log_stats()

    def _log_stats(self) -> None:
        if self.stats == self._stats_logged:
            return
        self._stats_logged = dict(self.stats)
        queued = self.core.queued()
        self.log.info(
            "broker_stats",
            sessions=len(self.core.peers),
            lagging=sorted(queued),
            queued_frames=sum(f for f, _ in queued.values()),
            queued_bytes=sum(b for _, b in queued.values()),
            **self.stats,
        )

    def _receive_batch(self, router: zmq.Socket[Any]) -> None:
        for _ in range(_RECV_BATCH):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            user_id: str | None = None
            if not self.insecure:
                try:
                    user_id = str(frames[1].get("User-Id"))
                except zmq.ZMQError:
                    continue  # not authenticated: nothing this broker will act on
            actions = self.core.receive(
                frames[0].bytes, frames[1:], user_id=user_id, now=time.monotonic()
            )
            if actions:
                self._execute(router, actions)

    # -- carrying out the machine's actions ---------------------------------------------------

    def _execute(self, router: zmq.Socket[Any], actions: Iterable[Action]) -> None:
        # Sends can fail into new events (a vanished peer's will is routed), which bring new
        # actions: one work list, in order.
        pending = deque(actions)
        while pending:
            action = pending.popleft()
            if isinstance(action, Log):
                self._emit(action)
            else:
                pending.extend(self._send(router, action))

    def _emit(self, entry: Log) -> None:
        # `node` in a log line is the process that wrote it (the broker); the session an
        # event is about is its `peer`.
        fields = {("peer" if key == "node" else key): value for key, value in entry.fields.items()}
        if entry.level == "warning":
            self.log.warning(entry.event, **fields)
        else:
            self.log.info(entry.event, **fields)

    def _send(self, router: zmq.Socket[Any], send: Send) -> list[Action]:
        follow: list[Action] = []
        sent = 0
        for peer in send.peers:
            try:
                router.send_multipart([peer, *send.parts], flags=zmq.NOBLOCK, copy=False)
                sent += 1
            except zmq.Again:
                follow += self.core.queue_full(peer, send.parts)
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                follow += self.core.unreachable(peer)
        if send.routed:
            self.core.delivered(sent)
        return follow

    def _drain(self, router: zmq.Socket[Any]) -> None:
        """Hand every backlog to the transport, in order, until its pipe is full again."""
        follow: list[Action] = []
        for peer in self.core.backlogged:
            while (parts := self.core.backlog_head(peer)) is not None:
                try:
                    router.send_multipart([peer, *parts], flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EHOSTUNREACH:
                        raise
                    follow += self.core.unreachable(peer)
                    break
                self.core.backlog_sent(peer)
        if follow:
            self._execute(router, follow)

    # -- authentication ---------------------------------------------------------------------

    def _answer_zap(self, zap: zmq.Socket[Any]) -> None:
        msg = zap.recv_multipart()
        # ZAP/1.0 (RFC 27): version, request id, domain, address, identity, mechanism, creds.
        version, request_id = msg[0], msg[1]
        mechanism = msg[5] if len(msg) > 5 else b""
        status, text, user_id = b"400", b"unknown key", b""
        if version != b"1.0":
            status, text = b"500", b"unsupported ZAP version"
        elif mechanism == b"CURVE" and len(msg) > 6 and len(msg[6]) == 32:
            key = zmq.utils.z85.encode(msg[6]).decode("ascii")
            if self.core.identity(key) is not None:
                status, text, user_id = b"200", b"OK", key.encode("ascii")
            else:
                self.log.warning("auth_refused", public_key=key, address=msg[3].decode())
        else:
            self.log.warning("auth_refused", mechanism=mechanism.decode(errors="replace"))
        zap.send_multipart([b"1.0", request_id, status, text, user_id, b""])
