"""Helpers shared by the broker tests (importable, unlike conftest)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import zmq

from broker import zmq_commands as commands
from broker.client.credentials import Credentials
from broker.keys import CurveKeyPair

FEDERATION = "fedtest"
ENVOYS = ("envoy-a", "envoy-b", "envoy-c")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Keys:
    broker: CurveKeyPair
    nodes: dict[str, CurveKeyPair]
    roles: dict[str, str]

    def allow(self) -> dict[str, tuple[str, str]]:
        return {kp.public: (n, self.roles[n]) for n, kp in self.nodes.items()}

    def creds(self, node_id: str) -> Credentials:
        return Credentials.for_curve(
            secret_key=self.nodes[node_id].secret, broker_public_key=self.broker.public
        )


def hello_parts(node_id: str, role: str, will: tuple[str, bytes] | None = None) -> list[bytes]:
    """A HELLO command (with a retained last will when `will` is given)."""
    return [
        commands.HELLO,
        node_id.encode(),
        role.encode(),
        will[0].encode() if will else b"",
        commands.RETAIN_FLAGS if will else commands.NO_FLAGS,
        will[1] if will else b"",
    ]


class RawClient:
    """A bare DEALER speaking broker.zmq_commands directly, to test what the broker itself enforces
    (the ZmqBus client refuses many of these operations before they leave the process)."""

    def __init__(
        self, endpoint: str, keypair: CurveKeyPair | None, broker_public: str | None
    ) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if keypair is not None:
            self.sock.curve_secretkey = keypair.secret.encode()
            self.sock.curve_publickey = keypair.public.encode()
            self.sock.curve_serverkey = broker_public.encode()  # type: ignore[union-attr]
        self.sock.connect(endpoint)

    def send(self, *parts: bytes) -> None:
        self.sock.send_multipart(list(parts))

    def recv(self) -> list[bytes]:
        return self.sock.recv_multipart()

    def recv_until(self, cmd: bytes) -> list[bytes]:
        while True:
            msg = self.recv()
            if msg[0] == cmd:
                return msg

    def hello(self, node_id: str, role: str, will: tuple[str, bytes] | None = None) -> list[bytes]:
        self.send(*hello_parts(node_id, role, will))
        while True:
            msg = self.recv()
            if msg[0] in (commands.WELCOME, commands.ERR):
                return msg

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
