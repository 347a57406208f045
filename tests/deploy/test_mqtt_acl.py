"""Authentication and access control on MQTT, enforced by a real Mosquitto.

Attackers here are raw aiomqtt clients, not MqttBus: MqttBus checks the rules itself, and an
attacker would not. Mosquitto does not refuse a SUBSCRIBE outside the ACL and silently drops
a PUBLISH outside it (MQTT 5: PUBACK "Not authorized"), so what is tested is what matters:
the frame never reaches anyone. "Never" is made observable with a sentinel sent after the
forbidden frame on the same path: Mosquitto handles a connection's packets in order, so a
frame it had routed would be queued before the sentinel.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker.client.bus import BusError
from broker.client.credentials import Credentials
from broker.client.mqtt_bus import MqttBus
from broker.topics import Topics
from tests.deploy.conftest import FEDERATION, Broker, BusFactory


def raw_client(
    broker: Broker, username: str, password: str, *, tls: ssl.SSLContext | None = None
) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        broker.tls_port if tls else broker.plain_port,
        username=username,
        password=password,
        identifier=f"raw-{username}",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=tls,
        timeout=30,
    )


def record_refusals(client: aiomqtt.Client) -> list[int]:
    """The reason codes of the client's refused publishes (PUBACK failures), as they come."""
    refusals: list[int] = []
    original = client._client.on_publish

    def on_publish(client, userdata, mid, reason_code, properties):  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            refusals.append(reason_code.value)
        original(client, userdata, mid, reason_code, properties)

    client._client.on_publish = on_publish
    return refusals


async def first_message(client: aiomqtt.Client) -> aiomqtt.Message:
    async for message in client.messages:
        return message
    raise AssertionError("connection ended")


async def test_unknown_user_cannot_connect(bus: BusFactory, mosquitto: Broker) -> None:
    stranger = MqttBus(
        mosquitto.url,
        node_id="e9",
        role="envoy",
        credentials=Credentials(username="e9", password="guess"),
    )
    with pytest.raises(BusError, match=r"Not authorized|Bad user"):
        await stranger.start(timeout_s=20)


async def test_wrong_password_cannot_connect(bus: BusFactory, mosquitto: Broker) -> None:
    with pytest.raises(BusError, match="refused e1"):
        await bus("e1", credentials=Credentials(username="e1", password=mosquitto.passwords["e2"]))


async def test_anonymous_cannot_connect(mosquitto: Broker) -> None:
    client = aiomqtt.Client(
        "127.0.0.1", mosquitto.plain_port, protocol=aiomqtt.ProtocolVersion.V5, timeout=30
    )
    with pytest.raises(MqttConnectError):
        async with client:
            pass


async def test_envoy_cannot_read_another_envoys_topic(
    mosquitto: Broker, bus: BusFactory, topics
) -> None:
    director = await bus("director")
    victim = await bus("e2")
    victim_inbox = victim.subscribe(topics.envoy("e2"))
    await victim_inbox.ready()
    async with raw_client(mosquitto, "e1", mosquitto.passwords["e1"]) as spy:
        # Mosquitto grants the SUBSCRIBEs (it checks reads on delivery, not on subscribe).
        await spy.subscribe(topics.envoy("e2"), qos=1)
        await spy.subscribe(topics.director, qos=1)
        await spy.subscribe("fedbus/fl/#", qos=1)
        await director.publish(topics.envoy("e2"), b"secret share for e2")
        assert await anext(victim_inbox) == b"secret share for e2"
        await director.publish(topics.envoy("e1"), b"sentinel")
        message = await first_message(spy)
        assert message.payload == b"sentinel"
        assert str(message.topic) == topics.envoy("e1")


async def test_envoy_cannot_read_the_directors_inbox(
    mosquitto: Broker, bus: BusFactory, topics
) -> None:
    director = await bus("director")
    inbox = director.subscribe(topics.director)
    await inbox.ready()
    e2 = await bus("e2")
    async with raw_client(mosquitto, "e1", mosquitto.passwords["e1"]) as spy:
        await spy.subscribe(topics.director, qos=1)
        await spy.subscribe(topics.presence_filter, qos=1)
        await e2.publish(topics.director, b"masked input of e2")
        await e2.publish(topics.presence("e2"), b"e2 online", retain=True)
        assert await anext(inbox) == b"masked input of e2"
        await spy.subscribe(topics.broadcast, qos=1)
        await director.publish(topics.broadcast, b"sentinel")
        message = await first_message(spy)
        assert message.payload == b"sentinel"


async def test_envoy_cannot_publish_on_broadcast_or_as_another_envoy(
    mosquitto: Broker, bus: BusFactory, topics
) -> None:
    director = await bus("director")
    e2 = await bus("e2")
    e2_broadcast = e2.subscribe(topics.broadcast)
    e2_inbox = e2.subscribe(topics.envoy("e2"))
    presence = director.subscribe(topics.presence_filter)
    for sub in (e2_broadcast, e2_inbox, presence):
        await sub.ready()
    async with raw_client(mosquitto, "e1", mosquitto.passwords["e1"]) as attacker:
        refusals = record_refusals(attacker)
        # Each publish returns on its PUBACK: Mosquitto has handled (and dropped) it.
        await attacker.publish(topics.broadcast, b"forged round start", qos=1)
        await attacker.publish(topics.envoy("e2"), b"forged unmask request", qos=1)
        await attacker.publish(topics.presence("e2"), b"e2 offline (forged)", qos=1, retain=True)
    assert refusals == [0x87, 0x87, 0x87]  # "Not authorized", three times
    await director.publish(topics.broadcast, b"sentinel-broadcast")
    await director.publish(topics.envoy("e2"), b"sentinel-inbox")
    await e2.publish(topics.presence("e2"), b"e2 online", retain=True)
    assert await anext(e2_broadcast) == b"sentinel-broadcast"
    assert await anext(e2_inbox) == b"sentinel-inbox"
    assert await anext(presence) == b"e2 online"


async def test_envoy_cannot_impersonate_with_its_own_password(mosquitto: Broker) -> None:
    # Username e2 with e1's password: the password file binds each secret to one name.
    client = raw_client(mosquitto, "e2", mosquitto.passwords["e1"])
    with pytest.raises(MqttConnectError):
        async with client:
            pass


async def test_director_rights_are_its_own(mosquitto: Broker) -> None:
    """The director may not speak as an envoy (publish on the director inbox or presence)."""
    async with raw_client(mosquitto, "director", mosquitto.passwords["director"]) as rogue:
        refusals = record_refusals(rogue)
        topics = Topics(FEDERATION)
        await rogue.publish(topics.director, b"forged envoy message", qos=1)
        await rogue.publish(topics.presence("e1"), b"e1 offline (forged)", qos=1)
    assert refusals == [0x87, 0x87]  # "Not authorized"


async def test_6_an_envoy_cannot_take_another_nodes_client_id(
    mosquitto: Broker, bus: BusFactory, topics
) -> None:
    """Issue #11, point 6: e1, with its own login, connects under the client id "director".
    Before use_username_as_clientid, Mosquitto closed the director's connection and the clean
    start wiped its persistent session; now the client id is the username, e1."""
    director = await bus("director")
    inbox = director.subscribe(topics.director)
    await inbox.ready()
    hijacker = aiomqtt.Client(
        "127.0.0.1",
        mosquitto.plain_port,
        username="e1",
        password=mosquitto.passwords["e1"],
        identifier="director",
        clean_start=True,
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=30,
    )
    async with hijacker:
        await hijacker.publish(topics.director, b"from e1 as 'director'", qos=1)
    e2 = await bus("e2")
    await e2.publish(topics.director, b"sentinel")
    # (Bounded waits: a director kicked off the bus would wait for ever.)
    first = await asyncio.wait_for(anext(inbox), 20)
    assert first == b"from e1 as 'director'"  # an envoy may write there
    assert await asyncio.wait_for(anext(inbox), 20) == b"sentinel"
    log = mosquitto.proc.log_tail(400)
    assert "already connected" not in log, log
    connects = [line for line in log.splitlines() if "New client connected" in line]
    assert sum(" as director " in line for line in connects) == 1  # never kicked, never back
    assert any(" as e1 " in line and "u'e1'" in line for line in connects), connects


async def test_6_over_tls_the_certificate_is_the_identity(
    mosquitto: Broker, bus: BusFactory, topics
) -> None:
    """e1's certificate and the director's (stolen) password: with the username taken from
    CONNECT, e1 logged in as the director and read its inbox; with use_identity_as_username
    the certificate's common name, e1, is the username, and so are its rights."""
    director = await bus("director", tls=True)
    e2 = await bus("e2", tls=True)
    context = ssl.create_default_context(cafile=str(mosquitto.pki.path("ca.crt")))
    context.load_cert_chain(mosquitto.pki.path("e1.crt"), mosquitto.pki.path("e1.key"))
    async with raw_client(
        mosquitto, "director", mosquitto.passwords["director"], tls=context
    ) as spy:
        await spy.subscribe(topics.director, qos=1)
        await spy.subscribe(topics.envoy("e1"), qos=1)
        await e2.publish(topics.director, b"masked input of e2")
        await director.publish(topics.envoy("e1"), b"sentinel for e1")
        message = await first_message(spy)
        assert message.payload == b"sentinel for e1"  # e1's rights, not the director's


async def test_tls_with_federation_certificate_works(
    mosquitto: Broker, bus: BusFactory, topics
) -> None:
    director = await bus("director", tls=True)
    e1 = await bus("e1", tls=True)
    inbox = director.subscribe(topics.director)
    await inbox.ready()
    await e1.publish(topics.director, b"over TLS")
    assert await anext(inbox) == b"over TLS"


def _tls_bus(broker: Broker, *, ca: str, cert: str | None, key: str | None) -> MqttBus:
    return MqttBus(
        broker.tls_url,
        node_id="e1",
        role="envoy",
        credentials=Credentials(
            username="e1",
            password=broker.passwords["e1"],
            tls_ca=str(broker.pki.path(ca)),
            tls_cert=str(broker.pki.path(cert)) if cert else None,
            tls_key=str(broker.pki.path(key)) if key else None,
        ),
    )


async def test_tls_client_certificate_from_another_ca_is_refused(mosquitto: Broker) -> None:
    # Right password, but a certificate the federation CA did not sign.
    b = _tls_bus(mosquitto, ca="ca.crt", cert="other-e1.crt", key="other-e1.key")
    with pytest.raises(BusError, match=r"(?i)unknown ca|certificate"):
        await b.start(timeout_s=20)
    assert " as e1 (" not in mosquitto.proc.log_tail(200)  # no MQTT session was ever opened


async def test_tls_client_without_certificate_is_refused(mosquitto: Broker) -> None:
    b = _tls_bus(mosquitto, ca="ca.crt", cert=None, key=None)
    with pytest.raises(BusError, match=r"(?i)certificate"):
        await b.start(timeout_s=20)


async def test_client_refuses_a_broker_certificate_from_another_ca(mosquitto: Broker) -> None:
    # The client trusts only the federation CA: a broker (or a man in the middle) holding a
    # certificate from any other CA is refused before any credential is sent.
    b = MqttBus(
        mosquitto.tls_url,
        node_id="e1",
        role="envoy",
        credentials=Credentials(
            username="e1",
            password=mosquitto.passwords["e1"],
            tls_ca=str(mosquitto.pki.path("other-ca.crt")),
            tls_cert=str(mosquitto.pki.path("e1.crt")),
            tls_key=str(mosquitto.pki.path("e1.key")),
        ),
    )
    with pytest.raises(BusError, match=r"(?i)certificate"):
        await b.start(timeout_s=20)


async def test_plain_mqtt_to_the_tls_listener_gets_no_session(mosquitto: Broker) -> None:
    b = MqttBus(
        f"mqtt://127.0.0.1:{mosquitto.tls_port}",
        node_id="e1",
        role="envoy",
        credentials=Credentials(username="e1", password=mosquitto.passwords["e1"]),
    )
    with pytest.raises(BusError):
        await b.start(timeout_s=2)


@pytest.fixture
async def subscribed_spy(mosquitto: Broker) -> AsyncIterator[aiomqtt.Client]:
    async with raw_client(mosquitto, "e3", mosquitto.passwords["e3"]) as spy:
        await spy.subscribe("#", options=SubscribeOptions(qos=1))
        yield spy


async def test_wildcard_subscription_sees_only_what_the_acl_lets_through(
    subscribed_spy: aiomqtt.Client, bus: BusFactory, topics
) -> None:
    director = await bus("director")
    e1 = await bus("e1")
    await e1.publish(topics.director, b"for the director only")
    await director.publish(topics.envoy("e1"), b"for e1 only")
    await e1.publish(topics.presence("e1"), b"e1 online", retain=True)
    await director.publish(topics.broadcast, b"for everyone")
    message = await first_message(subscribed_spy)
    assert message.payload == b"for everyone"
