"""Run one SecAgg round in memory: n clients, one server, a dropout schedule, duplicates.

Used by the tests (every dropout schedule in milliseconds) and the benchmarks (the whole
protocol in one process). Messages go through the real MessagePack encoding by default
(`wire=True`), so what the server sees is exactly what would come off the bus.

A client scheduled to drop at stage S behaves like the fault plans' crash: it stops when it
enters S, before sending that stage's message, and never answers again. Deadlines are
simulated: when no message is in flight, the server's stage is closed.
"""

from __future__ import annotations

import functools
import os
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import msgspec
import numpy as np

from crypto.signing import generate_signing_keypair
from protocol.base import Message
from protocol.events import BROADCAST, Outgoing
from protocol.secagg.client import SecAggClient
from protocol.secagg.messages import SecAggMessage, SecAggParams
from protocol.secagg.policy import ClientPolicy
from protocol.secagg.server import SecAggServer
from protocol.secagg.transitions import CLIENT_SENDS
from protocol.stages import SECAGG_STAGES

SERVER = "director"
_Body = msgspec.msgpack.Decoder(SecAggMessage)
_encoder = msgspec.msgpack.Encoder()


@dataclass
class SimulationResult:
    result: np.ndarray | None  # the server's unmasked sum, None on abort
    expected: np.ndarray | None  # the plain sum over the server's survivors (None on abort)
    survivors: frozenset[str]
    aborted: bool
    abort_reason: str
    inputs: dict[str, np.ndarray]
    view: list[tuple[str, Message]] = field(default_factory=list)  # every message the server got
    server: SecAggServer | None = None
    clients: dict[str, SecAggClient] = field(default_factory=dict)
    # Filled only when a clock is given: seconds inside each state machine's calls, and in
    # MessagePack encoding/decoding (the bus's share of the work).
    client_seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    wire_seconds: float = 0.0


def node_names(n: int) -> list[str]:
    return [f"envoy-{i + 1}" for i in range(n)]


class _Network:
    """The in-memory bus between the parties: queues, crashes, duplicates and the time spent."""

    def __init__(
        self,
        names: list[str],
        dropouts: Mapping[str, str],
        *,
        duplicate: float,
        rng: random.Random,
        wire: bool,
        record_view: bool,
        clock: Callable[[], float],
    ) -> None:
        self.names = names
        self.dropouts = dropouts
        self.duplicate = duplicate
        self.rng = rng
        self.wire = wire
        self.record_view = record_view
        self.now = clock
        self.dead: set[str] = set()
        self.to_server: deque[tuple[str, Message]] = deque()
        self.to_clients: deque[tuple[str, Message]] = deque()
        self.view: list[tuple[str, Message]] = []
        self.client_seconds = dict.fromkeys(names, 0.0)
        self.server_seconds = 0.0
        self.wire_seconds = 0.0

    def _transport(self, body: Message) -> Message:
        if not self.wire:
            return body
        t0 = self.now()
        decoded: Message = _Body.decode(_encoder.encode(body))
        self.wire_seconds += self.now() - t0
        return decoded

    def _copies(self) -> int:
        return 2 if self.duplicate and self.rng.random() < self.duplicate else 1

    def from_client(self, u: str, call: Callable[[], list[Outgoing]]) -> None:
        """Run a client call and send what it returns, unless the client crashes first."""
        t0 = self.now()
        outgoing = call()
        self.client_seconds[u] += self.now() - t0
        for out in outgoing:
            stage = CLIENT_SENDS.get(type(out.body))
            if stage is not None and self.dropouts.get(u) == stage:
                self.dead.add(u)
                return
            if u in self.dead:
                return
            body = self._transport(out.body)
            for _ in range(self._copies()):
                self.to_server.append((u, body))

    def from_server(self, call: Callable[[], list[Outgoing]]) -> None:
        t0 = self.now()
        outgoing = call()
        self.server_seconds += self.now() - t0
        for out in outgoing:
            targets = self.names if out.recipient == BROADCAST else [out.recipient]
            body = self._transport(out.body)
            for v in targets:
                for _ in range(self._copies()):
                    self.to_clients.append((v, body))

    def run(self, server: SecAggServer, clients: Mapping[str, SecAggClient]) -> None:
        """Until the server is done and every message in flight (e.g. the abort) is delivered."""
        while not server.done or self.to_server or self.to_clients:
            if not self.to_server and not self.to_clients:
                self.from_server(server.close_stage)  # the deadline of the current stage passes
                continue
            while self.to_server:
                u, body = self.to_server.popleft()
                if self.record_view:
                    self.view.append((u, body))
                self.from_server(functools.partial(server.receive, u, body))
            while self.to_clients:
                v, body = self.to_clients.popleft()
                if v in self.dead:
                    continue
                self.from_client(v, functools.partial(clients[v].receive, SERVER, body))


def _check_dropouts(dropouts: Mapping[str, str]) -> None:
    for node, stage in dropouts.items():
        if stage not in SECAGG_STAGES:
            raise ValueError(
                f"dropouts[{node!r}]: unknown stage {stage!r}; one of {list(SECAGG_STAGES)}"
            )


def _parties(
    names: list[str],
    params: SecAggParams,
    *,
    round: int,
    vector_length: int,
    randbytes: Callable[[int], bytes],
    policy: ClientPolicy,
    federation: str,
) -> tuple[SecAggServer, dict[str, SecAggClient]]:
    """The server and the clients of one round, with fresh signing keys in malicious mode."""
    private: dict[str, bytes] = {}
    public: dict[str, bytes] = {}
    if params.malicious:
        for u in names:
            pair = generate_signing_keypair(randbytes)
            private[u], public[u] = pair.private, pair.public
    peer_keys = public if params.malicious else None
    server = SecAggServer(round, params, names, vector_length, peer_keys, federation=federation)
    clients = {
        u: SecAggClient(
            u,
            round,
            params,
            names,
            private.get(u),
            peer_keys,
            randbytes,
            server_id=SERVER,
            federation=federation,
            policy=policy,
        )
        for u in names
    }
    return server, clients


def simulate_round(
    *,
    n: int,
    params: SecAggParams,
    vector_length: int,
    inputs: Mapping[str, np.ndarray] | None = None,
    dropouts: Mapping[str, str] | None = None,
    duplicate: float = 0.0,
    seed: int = 0,
    round: int = 1,
    wire: bool = True,
    record_view: bool = True,
    randbytes: Callable[[int], bytes] | None = None,
    clock: Callable[[], float] | None = None,
    policy: ClientPolicy | None = None,
    federation: str = "simulation",
) -> SimulationResult:
    """One whole round; returns the server's result and everything it received.

    dropouts: node -> stage at which it crashes (one of protocol.stages.SECAGG_STAGES).
    duplicate: probability that any message (either direction) is delivered twice.
    randbytes: the randomness of every party; default os.urandom (tests pass a seeded one).
    clock: e.g. time.perf_counter, to account the time of every call per party (benchmarks);
        injected because protocol code reads no clock of its own.
    policy: every client's policy (default: ClientPolicy(), the secure defaults), so
        parameters weaker than it make the clients refuse (PolicyViolation).
    """
    names = node_names(n)
    dropouts = dict(dropouts or {})
    _check_dropouts(dropouts)
    if inputs is None:
        gen = np.random.default_rng(seed)
        inputs = {u: gen.integers(0, 2**32, vector_length, dtype=np.uint32) for u in names}
    inputs = {u: np.asarray(v, dtype=np.uint32) for u, v in inputs.items()}
    server, clients = _parties(
        names,
        params,
        round=round,
        vector_length=vector_length,
        randbytes=randbytes or os.urandom,
        policy=policy if policy is not None else ClientPolicy(),
        federation=federation,
    )
    net = _Network(
        names,
        dropouts,
        duplicate=duplicate,
        rng=random.Random(seed),
        wire=wire,
        record_view=record_view,
        clock=clock or (lambda: 0.0),
    )
    for u in names:
        net.from_client(u, functools.partial(clients[u].set_input, inputs[u]))
        net.from_client(u, clients[u].start)
    net.run(server, clients)

    expected = None
    if server.result is not None:
        expected = np.zeros(vector_length, dtype=np.uint32)
        for u in server.survivors:
            expected += inputs[u]
    return SimulationResult(
        result=server.result,
        expected=expected,
        survivors=server.survivors,
        aborted=server.aborted,
        abort_reason=server.abort_reason,
        inputs=dict(inputs),
        view=net.view,
        server=server,
        clients=clients,
        client_seconds=net.client_seconds if clock else {},
        server_seconds=net.server_seconds,
        wire_seconds=net.wire_seconds,
    )


def seeded_randbytes(seed: int) -> Callable[[int], bytes]:
    """Deterministic randomness for tests (never for real rounds)."""
    gen = random.Random(seed)
    return lambda k: gen.randbytes(k)


__all__ = ["SERVER", "SimulationResult", "node_names", "seeded_randbytes", "simulate_round"]
