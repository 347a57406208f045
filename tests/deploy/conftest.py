"""A real Mosquitto on free loopback ports (plain + TLS listeners), real certificates."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.client.bus import Will
from broker.client.credentials import Credentials
from broker.client.mqtt_bus import MqttBus
from broker.server.mosquitto_files import (
    Listener,
    TlsFiles,
    generate_password,
    write_broker_files,
)
from broker.server.mosquitto_process import MosquittoProcess
from broker.server.ports import free_port
from broker.topics import Topics
from node.pki import issue_cert, make_ca

FEDERATION = "fl"
NODES = {"director": "director", "e1": "envoy", "e2": "envoy", "e3": "envoy"}

if shutil.which("mosquitto", path="/usr/sbin:/usr/bin:/usr/local/sbin") is None:
    raise RuntimeError("tests/deploy need the mosquitto binary: run `make system-deps`")


@dataclass(frozen=True)
class Pki:
    root: Path

    def path(self, name: str) -> Path:
        return self.root / name


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The federation CA, a foreign CA, the broker's server cert and one client cert per node."""
    root = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = make_ca(FEDERATION)
    _write(root / "ca.key", ca_key)
    _write(root / "ca.crt", ca_cert)
    key, cert = issue_cert(
        ca_key, ca_cert, common_name="broker", server_names=["127.0.0.1", "localhost"], client=False
    )
    _write(root / "server.key", key)
    _write(root / "server.crt", cert)
    for node in NODES:
        key, cert = issue_cert(ca_key, ca_cert, common_name=node)
        _write(root / f"{node}.key", key)
        _write(root / f"{node}.crt", cert)
    other_key, other_cert = make_ca("someone-else")
    _write(root / "other-ca.crt", other_cert)
    for node in ("e1", "server"):
        key, cert = issue_cert(
            other_key,
            other_cert,
            common_name=node,
            **({"server_names": ["127.0.0.1"], "client": False} if node == "server" else {}),
        )
        _write(root / f"other-{node}.key", key)
        _write(root / f"other-{node}.crt", cert)
    return Pki(root)


@dataclass
class Broker:
    proc: MosquittoProcess
    passwords: dict[str, str]
    plain_port: int
    tls_port: int
    pki: Pki
    dir: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.plain_port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def credentials(
        self, node: str, *, tls: bool = False, password: str | None = None
    ) -> Credentials:
        pw = password if password is not None else self.passwords[node]
        if not tls:
            return Credentials(username=node, password=pw)
        return Credentials(
            username=node,
            password=pw,
            tls_ca=str(self.pki.path("ca.crt")),
            tls_cert=str(self.pki.path(f"{node}.crt")),
            tls_key=str(self.pki.path(f"{node}.key")),
        )


@pytest.fixture
def mosquitto(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    passwords = {node: generate_password() for node in NODES}
    plain, tls = free_port(), free_port()
    import getpass
    import os

    files = write_broker_files(
        tmp_path / "broker",
        federation=FEDERATION,
        nodes=NODES,
        passwords=passwords,
        listeners=(
            Listener(port=plain),
            Listener(
                port=tls,
                tls=TlsFiles(
                    ca=pki.path("ca.crt"), cert=pki.path("server.crt"), key=pki.path("server.key")
                ),
            ),
        ),
        max_frame_bytes=1024 * 1024,
        run_as_user=getpass.getuser() if os.geteuid() == 0 else None,
    )
    proc = MosquittoProcess(files.conf, (plain, tls))
    with proc:
        yield Broker(proc, passwords, plain, tls, pki, tmp_path / "broker")


@pytest.fixture
def topics() -> Topics:
    return Topics(FEDERATION)


BusFactory = Callable[..., Awaitable[MqttBus]]


@pytest.fixture
async def bus(mosquitto: Broker) -> AsyncIterator[BusFactory]:
    """`await bus("e1")` -> a started MqttBus for that node, closed at teardown."""
    made: list[MqttBus] = []

    async def make(
        node: str,
        *,
        tls: bool = False,
        will: Will | None = None,
        credentials: Credentials | None = None,
        **kwargs: object,
    ) -> MqttBus:
        b = MqttBus(
            mosquitto.tls_url if tls else mosquitto.url,
            node_id=node,
            role=NODES.get(node, "envoy"),
            credentials=credentials or mosquitto.credentials(node, tls=tls),
            will=will,
            max_frame_bytes=1024 * 1024,
            **kwargs,  # type: ignore[arg-type]
        )
        made.append(b)
        return await b.start(timeout_s=20)

    yield make
    for b in made:
        await b.close()
