"""ZmqBus <-> ZmqBroker over real CurveZMQ sockets on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from broker import zmq_commands as commands
from broker.client.bus import BusError, Will
from broker.client.connect import connect, zmq_endpoint
from broker.keys import generate_curve_keypair
from broker.server.zmq_broker import ZmqBroker
from broker.topics import Topics
from tests.broker.broker_testkit import FEDERATION, Keys

ROOT = Path(__file__).resolve().parents[2]


async def test_routing_director_envoys_and_wildcards(client, topics: Topics) -> None:
    director = await client("director")
    a = await client("envoy-a")
    b = await client("envoy-b")
    inbox = director.subscribe(topics.director)
    presence = director.subscribe(topics.presence_filter)
    a_box, b_box = a.subscribe(topics.envoy("envoy-a")), b.subscribe(topics.envoy("envoy-b"))
    a_bc, b_bc = a.subscribe(topics.broadcast), b.subscribe(topics.broadcast)
    for sub in (inbox, presence, a_box, b_box, a_bc, b_bc):
        await sub.ready()

    await a.publish(topics.director, b"from-a")
    await b.publish(topics.director, b"from-b")
    assert sorted([await anext(inbox), await anext(inbox)]) == [b"from-a", b"from-b"]

    await a.publish(topics.presence("envoy-a"), b"a-up")
    await b.publish(topics.presence("envoy-b"), b"b-up")
    assert sorted([await anext(presence), await anext(presence)]) == [b"a-up", b"b-up"]

    # Mailboxes are private: the frame for b reaches b only (a's next frame is its own).
    await director.publish(topics.envoy("envoy-b"), b"for-b")
    await director.publish(topics.envoy("envoy-a"), b"for-a")
    assert await anext(b_box) == b"for-b"
    assert await anext(a_box) == b"for-a"

    big = os.urandom(4 << 20)
    await director.publish(topics.broadcast, big)
    assert await anext(a_bc) == big
    assert await anext(b_bc) == big


async def test_overlapping_subscriptions_each_get_the_frame(client, topics: Topics) -> None:
    director = await client("director")
    a = await client("envoy-a")
    one = director.subscribe(topics.presence_filter)
    two = director.subscribe(topics.presence("envoy-a"))
    await one.ready()
    await two.ready()
    await a.publish(topics.presence("envoy-a"), b"p")
    assert await anext(one) == b"p"
    assert await anext(two) == b"p"
    await two.aclose()
    await a.publish(topics.presence("envoy-a"), b"q")
    assert await anext(one) == b"q"
    assert two.get_nowait() is None


async def test_envoy_cannot_subscribe_to_other_mailboxes(client, topics: Topics) -> None:
    a = await client("envoy-a")
    for forbidden in (
        topics.envoy("envoy-b"),
        topics.director,
        topics.presence_filter,
        "fedbus/" + FEDERATION + "/#",
        "#",
    ):
        sub = a.subscribe(forbidden)
        with pytest.raises(BusError, match="refused"):
            await sub.ready()
        with pytest.raises(BusError):
            await anext(sub)
    assert len(a.refusals) == 5
    ok = a.subscribe(topics.envoy("envoy-a"))
    await ok.ready()


async def test_client_refuses_forbidden_publish_before_sending(client, topics: Topics) -> None:
    a = await client("envoy-a")
    with pytest.raises(BusError, match="may not publish"):
        await a.publish(topics.broadcast, b"x")
    with pytest.raises(BusError, match="may not publish"):
        await a.publish(topics.presence("envoy-b"), b"x")
    with pytest.raises(BusError):
        await a.publish("fedbus/fedtest/+", b"x")


async def test_broker_enforces_publish_acl_on_raw_clients(client, raw, topics: Topics) -> None:
    # A malicious envoy skips the client library: the broker must still refuse.
    b = await client("envoy-b")
    director = await client("director")
    bcast = b.subscribe(topics.broadcast)
    await bcast.ready()
    evil = raw("envoy-a")
    assert evil.hello("envoy-a", "envoy")[0] == commands.WELCOME
    for topic in (topics.broadcast, topics.envoy("envoy-b"), topics.presence("envoy-b")):
        evil.send(commands.PUB, topic.encode(), commands.NO_FLAGS, b"forged")
        err = evil.recv_until(commands.ERR)
        assert err[1] == commands.PUB and err[2] == topic.encode()
    # The broker processed and refused all three; the next broadcast b sees is the real one.
    await director.publish(topics.broadcast, b"genuine")
    assert await anext(bcast) == b"genuine"


async def test_identity_comes_from_the_key_not_the_claim(raw, zbroker: ZmqBroker) -> None:
    evil = raw("envoy-a")
    reply = evil.hello("director", "director")
    assert reply[0] == commands.ERR and b"registered as envoy envoy-a" in reply[3]
    # A will on someone else's presence topic is refused too.
    reply = evil.hello("envoy-a", "envoy", will=("fedbus/fedtest/presence/envoy-b", b"x"))
    assert reply[0] == commands.ERR and b"will" in reply[3]
    # Subscribing without any HELLO still runs as the authenticated envoy-a.
    evil.send(commands.SUB, b"r1", b"fedbus/fedtest/director")
    ack = evil.recv_until(commands.SUBACK)
    assert ack[2] == commands.REFUSED


async def test_unknown_curve_key_cannot_connect(zbroker: ZmqBroker, keys: Keys) -> None:
    stranger = generate_curve_keypair()
    from broker.client.credentials import Credentials

    creds = Credentials.for_curve(secret_key=stranger.secret, broker_public_key=keys.broker.public)
    with pytest.raises(BusError, match="refused our CurveZMQ key"):
        await connect(zbroker.url, node_id="envoy-a", role="envoy", credentials=creds)
    # Pinning the wrong broker key fails as well (the handshake cannot complete).
    wrong = Credentials.for_curve(
        secret_key=keys.nodes["envoy-a"].secret, broker_public_key=stranger.public
    )
    with pytest.raises(BusError):
        await connect(zbroker.url, node_id="envoy-a", role="envoy", credentials=wrong, timeout_s=2)


async def test_retained_frames_reach_late_subscribers(client, topics: Topics) -> None:
    a = await client("envoy-a")
    b = await client("envoy-b")
    await a.publish(topics.presence("envoy-a"), b"a-old", retain=True)
    await a.publish(topics.presence("envoy-a"), b"a-online", retain=True)
    await b.publish(topics.presence("envoy-b"), b"b-online", retain=True)
    await b.publish(topics.presence("envoy-b"), b"", retain=True)  # clears b's retained frame
    director = await client("director")
    presence = director.subscribe(topics.presence_filter)
    assert await anext(presence) == b"a-online"
    # Live traffic follows; the cleared retained frame never shows up.
    await a.publish(topics.presence("envoy-a"), b"live")
    assert await anext(presence) == b"live"


async def test_will_fires_on_abort_but_not_on_clean_close(client, topics: Topics) -> None:
    director = await client("director")
    presence = director.subscribe(topics.presence_filter)
    await presence.ready()
    a = await client("envoy-a", will=Will(topics.presence("envoy-a"), b"a-gone"))
    b = await client("envoy-b", will=Will(topics.presence("envoy-b"), b"b-gone"))
    await b.close()
    await a.abort()
    assert await anext(presence) == b"a-gone"
    # The will was retained: a director that starts later still learns a is gone.
    late = await client("director")
    again = late.subscribe(topics.presence_filter)
    assert await anext(again) == b"a-gone"
    assert again.get_nowait() is None


async def test_will_fires_when_a_process_is_killed(
    client, zbroker: ZmqBroker, keys: Keys, topics: Topics, tmp_path: Path
) -> None:
    director = await client("director")
    presence = director.subscribe(topics.presence_filter)
    await presence.ready()
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys
        from broker.client.bus import Will
        from broker.client.connect import connect
        from broker.client.credentials import Credentials
        async def main():
            creds = Credentials.for_curve(secret_key={keys.nodes["envoy-c"].secret!r},
                                          broker_public_key={keys.broker.public!r})
            bus = await connect({zbroker.url!r}, node_id="envoy-c", role="envoy",
                                credentials=creds,
                                will=Will("fedbus/{FEDERATION}/presence/envoy-c", b"c-died"))
            await bus.publish("fedbus/{FEDERATION}/presence/envoy-c", b"c-up")
            await asyncio.sleep(0.2)
            os.kill(os.getpid(), 9)
        asyncio.run(main())
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert await anext(presence) == b"c-up"
    assert await anext(presence) == b"c-died"


async def test_silent_session_expires_and_fires_its_will(client, raw, topics: Topics) -> None:
    # Connected at the TCP level but no application heartbeats: a hung process.
    director = await client("director")
    presence = director.subscribe(topics.presence_filter)
    await presence.ready()
    hung = raw("envoy-b")
    assert (
        hung.hello("envoy-b", "envoy", will=(topics.presence("envoy-b"), b"b-hung"))[0]
        == commands.WELCOME
    )
    assert await anext(presence) == b"b-hung"


async def test_oversized_frames_are_refused(
    broker_factory, client, raw, keys: Keys, topics: Topics
) -> None:
    small = broker_factory(max_frame_bytes=1024)
    director = await client("director", broker=small)
    inbox = director.subscribe(topics.director)
    await inbox.ready()
    a = await client("envoy-a", broker=small, max_frame_bytes=1 << 20)
    await a.publish(topics.director, b"x" * 1024)  # exactly the limit passes
    assert await anext(inbox) == b"x" * 1024
    await a.publish(topics.director, b"y" * 1025)
    await a.publish(topics.director, b"after")
    assert await anext(inbox) == b"after"
    # The client library refuses before sending when it knows the limit.
    strict = await client("envoy-b", broker=small, max_frame_bytes=1024)
    with pytest.raises(BusError, match="over the limit"):
        await strict.publish(topics.director, b"z" * 1025)
    # And the broker told the sender why its frame vanished.
    while not a.refusals:
        await asyncio.sleep(0.01)
    assert a.refusals[0][0] == "pub" and "over the limit" in a.refusals[0][2]


async def test_insecure_mode_trusts_hello(broker_factory, topics: Topics) -> None:
    b = broker_factory(insecure_no_auth=True)
    director = await connect(
        b.url, node_id="director", role="director", credentials=None, insecure_no_auth=True
    )
    env = await connect(
        b.url, node_id="envoy-9", role="envoy", credentials=None, insecure_no_auth=True
    )
    try:
        sub = env.subscribe(topics.envoy("envoy-9"))
        await sub.ready()
        await director.publish(topics.envoy("envoy-9"), b"hi")
        assert await anext(sub) == b"hi"
        refused = env.subscribe(topics.director)
        with pytest.raises(BusError):
            await refused.ready()
    finally:
        await director.close()
        await env.close()


async def test_connect_validates_arguments() -> None:
    with pytest.raises(ValueError, match="unknown scheme"):
        await connect("http://x:1", node_id="a", role="envoy", credentials=None)
    with pytest.raises(ValueError, match="needs Credentials"):
        await connect("zmq+tcp://127.0.0.1:1", node_id="a", role="envoy", credentials=None)
    with pytest.raises(ValueError, match="node_id"):
        await connect(
            "zmq+tcp://127.0.0.1:1",
            node_id="a/b",
            role="envoy",
            credentials=None,
            insecure_no_auth=True,
        )
    assert zmq_endpoint("zmq+tcp://[::1]:5555") == "tcp://[::1]:5555"
    with pytest.raises(ValueError):
        zmq_endpoint("zmq+tcp://host")


async def test_closed_bus_ends_iteration_and_refuses_work(client, topics: Topics) -> None:
    a = await client("envoy-a")
    sub = a.subscribe(topics.broadcast)
    await sub.ready()
    await a.close()
    with pytest.raises(StopAsyncIteration):
        await anext(sub)
    with pytest.raises(BusError):
        await a.publish(topics.director, b"x")
    with pytest.raises(BusError):
        a.subscribe(topics.broadcast)


async def test_a_stuck_subscriber_does_not_stall_the_others(
    broker_factory, client, raw, keys: Keys, topics: Topics
) -> None:
    small = broker_factory(sndhwm=4, max_queued_bytes=4 << 20)
    director = await client("director", broker=small)
    reader = await client("envoy-a", broker=small)
    bcast = reader.subscribe(topics.broadcast)
    await bcast.ready()
    stuck = raw("envoy-b", broker=small)
    stuck.sock.rcvhwm = 1
    stuck.hello("envoy-b", "envoy")
    stuck.send(commands.SUB, b"s", topics.broadcast.encode())
    stuck.recv_until(commands.SUBACK)  # ...and never reads again
    frame = os.urandom(256 << 10)
    for i in range(300):  # 75 MiB: far more than loopback buffers and its 4 MiB backlog hold
        await director.publish(topics.broadcast, frame + i.to_bytes(4, "big"))
        assert await anext(bcast) == frame + i.to_bytes(4, "big")
    # envoy-b's backlog filled up to its bound, then its frames were dropped (and counted).
    assert small.stats["dropped"] > 0
    frames, size = small.core.queued()["envoy-b"]
    assert size <= 4 << 20 and frames == size // (len(frame) + 4 + 3 + len(topics.broadcast))


async def test_a_lagging_subscriber_gets_every_frame_in_order_from_its_backlog(
    broker_factory, client, raw, keys: Keys, topics: Topics
) -> None:
    small = broker_factory(sndhwm=4)
    director = await client("director", broker=small)
    slow = raw("envoy-b", broker=small)
    slow.sock.rcvhwm = 1
    slow.hello("envoy-b", "envoy")
    slow.send(commands.SUB, b"s", topics.broadcast.encode())
    slow.recv_until(commands.SUBACK)
    frame = os.urandom(256 << 10)
    for i in range(200):  # 50 MiB while envoy-b reads nothing: most of it waits in its backlog
        await director.publish(topics.broadcast, frame + i.to_bytes(4, "big"))
    got = []
    while len(got) < 200:  # ...then it catches up
        msg = slow.recv_until(commands.MSG)
        got.append(int.from_bytes(msg[2][-4:], "big"))
    assert got == list(range(200))
    assert small.stats["dropped"] == 0 and small.stats["backlogged"] > 0
    assert small.core.queued() == {}


async def test_publish_accepts_buffers(client, topics: Topics) -> None:
    import array

    director = await client("director")
    a = await client("envoy-a")
    inbox = director.subscribe(topics.director)
    await inbox.ready()
    data = array.array("d", [1.5, 2.5, 3.5])
    await a.publish(topics.director, memoryview(data))
    assert await anext(inbox) == data.tobytes()
    await a.publish(topics.director, bytearray(b"ba"))
    assert await anext(inbox) == b"ba"


async def test_a_broken_receive_loop_fails_readers_instead_of_hanging(
    client, topics: Topics
) -> None:
    a = await client("envoy-a")
    director = await client("director")
    sub = a.subscribe(topics.broadcast)
    await sub.ready()

    def explode(frames: object) -> None:
        raise RuntimeError("dispatch bug")

    a._deliver = explode  # a bug (or a dead socket) inside the receive loop
    await director.publish(topics.broadcast, b"x")
    with pytest.raises(BusError, match="receive loop failed"):
        await anext(sub)
