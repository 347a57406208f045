"""Real brokers on free loopback ports, real CurveZMQ keys, real client sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from broker.client.bus import Will
from broker.client.connect import connect
from broker.client.zmq_bus import ZmqBus
from broker.keys import CurveKeyPair, generate_curve_keypair
from broker.server.zmq_broker import ZmqBroker
from broker.topics import Topics
from tests.broker.broker_testkit import ENVOYS, FEDERATION, Keys, RawClient


@pytest.fixture(scope="session")
def keys() -> Keys:
    nodes = {"director": generate_curve_keypair()}
    roles = {"director": "director"}
    for e in ENVOYS:
        nodes[e] = generate_curve_keypair()
        roles[e] = "envoy"
    return Keys(broker=generate_curve_keypair(), nodes=nodes, roles=roles)


@pytest.fixture
def topics() -> Topics:
    return Topics(FEDERATION)


@pytest.fixture
def broker_factory(keys: Keys) -> Iterator[Callable[..., ZmqBroker]]:
    started: list[ZmqBroker] = []

    def make(**overrides: object) -> ZmqBroker:
        kwargs: dict[str, object] = {
            "federation": FEDERATION,
            "allow": keys.allow(),
            "secret_key": keys.broker.secret,
            "heartbeat_ivl_s": 0.2,
            "heartbeat_timeout_s": 2.0,
        }
        kwargs.update(overrides)
        if kwargs.get("insecure_no_auth"):
            kwargs["allow"] = None
            kwargs["secret_key"] = None
        bind = str(kwargs.pop("bind", "tcp://127.0.0.1:0"))
        b = ZmqBroker(bind, **kwargs).start()  # type: ignore[arg-type]
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def zbroker(broker_factory: Callable[..., ZmqBroker]) -> ZmqBroker:
    return broker_factory()


Connector = Callable[..., Awaitable[ZmqBus]]


@pytest.fixture
async def client(zbroker: ZmqBroker, keys: Keys) -> AsyncIterator[Connector]:
    buses: list[ZmqBus] = []

    async def make(
        node_id: str, *, will: Will | None = None, broker: ZmqBroker | None = None, **kw: object
    ) -> ZmqBus:
        b = broker or zbroker
        bus = await connect(
            b.url,
            node_id=node_id,
            role=keys.roles.get(node_id, "envoy"),
            credentials=keys.creds(node_id) if node_id in keys.nodes else None,
            will=will,
            heartbeat_ivl_s=0.2,
            **kw,  # type: ignore[arg-type]
        )
        assert isinstance(bus, ZmqBus)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


@pytest.fixture
def raw(zbroker: ZmqBroker, keys: Keys) -> Iterator[Callable[..., RawClient]]:
    made: list[RawClient] = []

    def make(
        node_id: str | None, *, keypair: CurveKeyPair | None = None, broker: ZmqBroker | None = None
    ) -> RawClient:
        b = broker or zbroker
        kp = keypair or (keys.nodes[node_id] if node_id is not None else None)
        c = RawClient(b.endpoint, kp, keys.broker.public)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
