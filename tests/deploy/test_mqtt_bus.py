"""MqttBus against a real Mosquitto: delivery, presence, duplicates, limits, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.client.bus import BusError, Will
from broker.client.connect import connect
from broker.client.mqtt_bus import MqttBus, _Deduplicator, parse_url
from tests.deploy.conftest import Broker, BusFactory


async def test_round_trip_both_directions(bus: BusFactory, topics) -> None:
    director = await bus("director")
    e1 = await bus("e1")
    inbox = director.subscribe(topics.director)
    mine = e1.subscribe(topics.envoy("e1"))
    everyone = e1.subscribe(topics.broadcast)
    for sub in (inbox, mine, everyone):
        await sub.ready()
    await e1.publish(topics.director, b"update")
    await director.publish(topics.envoy("e1"), b"share")
    await director.publish(topics.broadcast, b"round start")
    assert await anext(inbox) == b"update"
    assert await anext(mine) == b"share"
    assert await anext(everyone) == b"round start"


async def test_connect_dispatches_mqtt_urls(mosquitto: Broker, topics) -> None:
    bus = await connect(
        mosquitto.url,
        node_id="e1",
        role="envoy",
        credentials=mosquitto.credentials("e1"),
        max_frame_bytes=1024 * 1024,
    )
    try:
        assert isinstance(bus, MqttBus)
        await bus.publish(topics.director, b"x")
    finally:
        await bus.close()


async def test_frames_arrive_in_order_and_intact(bus: BusFactory, topics) -> None:
    director = await bus("director")
    e1 = await bus("e1")
    inbox = director.subscribe(topics.director)
    await inbox.ready()
    frames = [os.urandom(n) for n in (0, 1, 1000, 200_000, 1024 * 1024)]
    frames[0] = b"\x00"  # an empty payload means "clear retained" in MQTT
    for frame in frames:
        await e1.publish(topics.director, frame)
    assert [await anext(inbox) for _ in frames] == frames


async def test_oversized_frame_is_refused_before_sending(bus: BusFactory, topics) -> None:
    e1 = await bus("e1")
    with pytest.raises(BusError, match="over the limit"):
        await e1.publish(topics.director, bytes(1024 * 1024 + 1))


async def test_broker_packet_limit_is_learned_from_connack(
    mosquitto: Broker, bus: BusFactory, topics
) -> None:
    # A client configured with a larger limit than the broker's max_packet_size.
    director = await bus("director")
    inbox = director.subscribe(topics.director)
    await inbox.ready()
    big = MqttBus(
        mosquitto.url,
        node_id="e2",
        role="envoy",
        credentials=mosquitto.credentials("e2"),
        max_frame_bytes=4 * 1024 * 1024,
    )
    await big.start(timeout_s=20)
    try:
        # The broker's CONNACK announced its limit: refused here, not by a dropped connection.
        with pytest.raises(BusError, match="broker's packet limit"):
            await big.publish(topics.director, bytes(2 * 1024 * 1024))
        await big.publish(topics.director, b"small frames still go")
        assert await anext(inbox) == b"small frames still go"
        assert big.reconnects == 0
    finally:
        await big.close()


async def test_client_side_acl_refuses_clearly(bus: BusFactory, topics) -> None:
    e1 = await bus("e1")
    with pytest.raises(BusError, match="may not publish"):
        await e1.publish(topics.broadcast, b"x")
    refused = e1.subscribe(topics.envoy("e2"))
    with pytest.raises(BusError, match="may not subscribe"):
        await refused.ready()
    with pytest.raises(BusError):
        e1.subscribe("fedbus/fl/envoy/#bad")


async def test_presence_retained_and_will_on_crash(bus: BusFactory, topics) -> None:
    e1 = await bus("e1", will=Will(topics.presence("e1"), b"e1 gone"))
    await e1.publish(topics.presence("e1"), b"e1 here", retain=True)
    director = await bus("director")
    presence = director.subscribe(topics.presence_filter)
    assert await anext(presence) == b"e1 here"  # retained: the director came later
    await e1.abort()
    assert await anext(presence) == b"e1 gone"
    late = director.subscribe(topics.presence_filter)
    assert await anext(late) == b"e1 gone"  # the will is retained too


async def test_clean_close_does_not_fire_the_will(bus: BusFactory, topics) -> None:
    director = await bus("director")
    presence = director.subscribe(topics.presence_filter)
    await presence.ready()
    e1 = await bus("e1", will=Will(topics.presence("e1"), b"e1 gone"))
    await e1.publish(topics.presence("e1"), b"e1 here", retain=True)
    assert await anext(presence) == b"e1 here"
    await e1.close()
    e2 = await bus("e2", will=Will(topics.presence("e2"), b"e2 gone"))
    await e2.abort()
    assert await anext(presence) == b"e2 gone"  # e1's will would have come first


async def test_duplicate_frames_are_delivered_once_but_state_every_time(
    bus: BusFactory, topics
) -> None:
    director = await bus("director")
    inbox = director.subscribe(topics.director)
    presence = director.subscribe(topics.presence_filter)
    for sub in (inbox, presence):
        await sub.ready()
    e1 = await bus("e1")
    await e1.publish(topics.director, b"frame A")
    await e1.publish(topics.director, b"frame A")  # a QoS 1 redelivery looks like this
    await e1.publish(topics.director, b"frame B")
    assert await anext(inbox) == b"frame A"
    assert await anext(inbox) == b"frame B"
    assert director.duplicates_dropped == 1
    for _ in range(2):  # the same state twice (offline, back online, same frame) is delivered
        await e1.publish(topics.presence("e1"), b"e1 here", retain=True)
        assert await anext(presence) == b"e1 here"


async def test_two_subscriptions_to_one_filter_both_get_retained_state(
    bus: BusFactory, topics
) -> None:
    e1 = await bus("e1")
    await e1.publish(topics.presence("e1"), b"e1 here", retain=True)
    director = await bus("director")
    first = director.subscribe(topics.presence_filter)
    assert await anext(first) == b"e1 here"
    second = director.subscribe(topics.presence_filter)
    assert await anext(second) == b"e1 here"
    await second.aclose()
    await e1.publish(topics.presence("e1"), b"e1 still here", retain=True)
    assert await anext(first) == b"e1 still here"


async def test_sessions_survive_a_broker_restart_at_least_once(
    mosquitto: Broker, bus: BusFactory, topics
) -> None:
    director = await bus("director")
    inbox = director.subscribe(topics.director)
    await inbox.ready()
    e1 = await bus("e1", will=Will(topics.presence("e1"), b"e1 gone"))
    await e1.publish(topics.director, b"before")
    assert await anext(inbox) == b"before"
    mosquitto.proc.stop()  # SIGTERM: Mosquitto saves sessions to its persistence file
    sending = asyncio.ensure_future(e1.publish(topics.director, b"while down"))
    mosquitto.proc.start()
    await sending  # returns only once the restarted broker acknowledged it
    # The director's subscription lived on in its persisted session: nothing was lost.
    assert await anext(inbox) == b"while down"
    assert e1.reconnects >= 1 and director.reconnects >= 1


async def test_reconnects_and_resubscribes_after_a_broker_crash(
    mosquitto: Broker, bus: BusFactory, topics
) -> None:
    director = await bus("director")
    inbox = director.subscribe(topics.director)
    presence = director.subscribe(topics.presence_filter)
    await inbox.ready()
    e1 = await bus("e1", will=Will(topics.presence("e1"), b"e1 gone"))
    await e1.publish(topics.presence("e1"), b"e1 here", retain=True)
    assert await anext(presence) == b"e1 here"
    mosquitto.proc.stop(kill=True)  # a crash: sessions since the last autosave are gone
    mosquitto.proc.start()
    while director.reconnects == 0 or e1.reconnects == 0:
        await asyncio.sleep(0.02)
    await director.wait_ready()
    await e1.wait_ready()
    await e1.publish(topics.director, b"after the crash")
    assert await anext(inbox) == b"after the crash"
    # The restarted broker lost e1's retained presence; e1 published it again on reconnect.
    assert await anext(presence) == b"e1 here"


async def test_persistent_session_keeps_frames_for_a_node_that_was_away(
    mosquitto: Broker, bus: BusFactory, topics
) -> None:
    e1 = await bus("e1")
    mine = e1.subscribe(topics.envoy("e1"))
    await mine.ready()
    await e1.abort()  # the envoy process dies; its session stays at the broker
    director = await bus("director")
    await director.publish(topics.envoy("e1"), b"queued while away")
    again = await bus("e1")  # the restarted envoy, same node id = same session
    resumed = again.subscribe(topics.envoy("e1"))
    assert await anext(resumed) == b"queued while away"


async def test_close_ends_iteration_and_refuses_use(bus: BusFactory, topics) -> None:
    e1 = await bus("e1")
    sub = e1.subscribe(topics.broadcast)
    await sub.ready()
    await e1.close()
    with pytest.raises(StopAsyncIteration):
        await anext(sub)
    with pytest.raises(BusError, match="closed"):
        await e1.publish(topics.director, b"x")


async def test_mosquitto_opens_only_the_configured_listeners(mosquitto: Broker) -> None:
    log = mosquitto.proc.log_tail(100)
    opened = {
        int(line.rsplit(" ", 1)[1].rstrip("."))
        for line in log.splitlines()
        if "listen socket on port" in line
    }
    assert opened == {mosquitto.plain_port, mosquitto.tls_port}


def test_url_parsing() -> None:
    assert parse_url("mqtt://broker.example:1884") == ("mqtt", "broker.example", 1884)
    assert parse_url("mqtts://10.0.0.2") == ("mqtts", "10.0.0.2", 8883)
    assert parse_url("mqtt://[::1]:1883") == ("mqtt", "::1", 1883)
    for bad in ("zmq+tcp://h:1", "mqtt://", "mqtt://u:p@h:1", "mqtt://h:1/x", "mqtt://h:99999"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_username_must_be_the_node_id() -> None:
    from broker.client.credentials import Credentials

    with pytest.raises(ValueError, match="must equal the node id"):
        MqttBus(
            "mqtt://127.0.0.1:1",
            node_id="e1",
            role="envoy",
            credentials=Credentials(username="e2", password="x"),
        )
    with pytest.raises(ValueError, match="refused by the ACL"):
        MqttBus(
            "mqtt://127.0.0.1:1",
            node_id="director",
            role="director",
            credentials=Credentials(password="x"),
            will=Will("fedbus/fl/presence/director", b"gone"),
        )
    with pytest.raises(ValueError, match="not mqtts"):
        MqttBus(
            "mqtt://127.0.0.1:1",
            node_id="e1",
            role="envoy",
            credentials=Credentials(password="x", tls_ca="/ca.crt"),
        )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=8), max_size=200), st.integers(1, 16))
def test_deduplicator_is_an_lru_set(frames: list[bytes], capacity: int) -> None:
    dedupe = _Deduplicator(capacity)
    model: list[bytes] = []  # most recent last
    for frame in frames:
        expected = frame in model
        assert dedupe.seen(frame) == expected
        if expected:
            model.remove(frame)
        model.append(frame)
        del model[:-capacity]


class StallingProxy:
    """A TCP proxy in front of Mosquitto. `stall()` keeps the connections open now open but
    drops everything the broker sends on them (the client's writes still go out), as a
    half-dead connection does; connections opened later pass normally."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._stalled: set[asyncio.StreamWriter] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stall(self) -> None:
        self._stalled |= self._open

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter):
        b_reader, b_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._open.add(c_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, to_client: bool):
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if to_client and c_writer in self._stalled:
                        continue
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pump(c_reader, b_writer, False), pump(b_reader, c_writer, True))
        self._open.discard(c_writer)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._open):
            w.close()


async def test_a_connection_that_reads_nothing_is_made_again(
    mosquitto: Broker, bus: BusFactory, topics
) -> None:
    """After a broker restart a connection once came up that sent but never read (so no
    PUBACK arrived) for a whole keepalive. The bus notices acknowledgements awaited with
    nothing coming in for stall_s, reconnects, and the publish completes."""
    from structlog.testing import capture_logs

    director = await bus("director")
    inbox = director.subscribe(topics.director)
    await inbox.ready()
    proxy = await StallingProxy(mosquitto.plain_port).start()
    e1 = MqttBus(
        f"mqtt://127.0.0.1:{proxy.port}",
        node_id="e1",
        role="envoy",
        credentials=mosquitto.credentials("e1"),
        max_frame_bytes=1024 * 1024,
        stall_s=1.0,
    )
    await e1.start(timeout_s=20)
    try:
        await e1.publish(topics.director, b"before")
        assert await anext(inbox) == b"before"
        assert e1.stalls == 0  # an idle healthy connection is never taken for a stalled one
        proxy.stall()
        with capture_logs() as logs:
            # Returns once the frame is acknowledged, which needs a new connection.
            await asyncio.wait_for(e1.publish(topics.director, b"during"), 120)
        assert e1.stalls == 1 and e1.reconnects == 1
        assert [e["event"] for e in logs if e["event"] == "bus_stalled"] == ["bus_stalled"]
        assert await anext(inbox) == b"during"  # delivered once (a resend is deduplicated)
        await e1.publish(topics.director, b"after")
        assert await anext(inbox) == b"after"
    finally:
        await e1.close()
        await proxy.close()


def test_stall_s_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stall_s"):
        MqttBus(
            "mqtt://127.0.0.1:1883",
            node_id="e1",
            role="envoy",
            credentials=None,
            insecure_no_auth=True,
            stall_s=0,
        )
