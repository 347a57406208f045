"""Run one SecAgg round in memory: n clients, one server, a dropout schedule, duplicates.

Used by the tests (every dropout schedule in milliseconds) and the benchmarks (the whole
protocol in one process). Messages go through the real MessagePack encoding by default
(`wire=True`), so what the server sees is exactly what would come off the bus.

A client scheduled to drop at stage S behaves like the fault plans' crash: it stops when it
enters S, before sending that stage's message, and never answers again. Deadlines are
simulated: when no message is in flight, the server's stage is closed.
"""

from __future__ import annotations

import os
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Union

import msgspec
import numpy as np

from crypto.signing import generate_signing_keypair
from protocol.secagg.client import SecAggClient
from protocol.secagg.common import (
    ADVERTISE_KEYS,
    BROADCAST,
    CONSISTENCY,
    MASKED_INPUT,
    SHARE_KEYS,
    STAGES,
    UNMASK,
    Outgoing,
)
from protocol.secagg.messages import (
    SECAGG_MESSAGES,
    SecAggAdvertiseKeys,
    SecAggConsistencySignature,
    SecAggMaskedInput,
    SecAggParams,
    SecAggShareKeys,
    SecAggUnmaskResponse,
)
from protocol.secagg.server import SecAggServer

SERVER = "director"
_STAGE_OF = {
    SecAggAdvertiseKeys: ADVERTISE_KEYS,
    SecAggShareKeys: SHARE_KEYS,
    SecAggMaskedInput: MASKED_INPUT,
    SecAggConsistencySignature: CONSISTENCY,
    SecAggUnmaskResponse: UNMASK,
}
_Body = msgspec.msgpack.Decoder(Union[SECAGG_MESSAGES])  # noqa: UP007  (built from a tuple)
_encoder = msgspec.msgpack.Encoder()


@dataclass
class SimulationResult:
    result: np.ndarray | None  # the server's unmasked sum, None on abort
    expected: np.ndarray | None  # the plain sum over the server's survivors (None on abort)
    survivors: frozenset[str]
    aborted: bool
    abort_reason: str
    inputs: dict[str, np.ndarray]
    view: list[tuple[str, object]] = field(default_factory=list)  # every message the server got
    server: SecAggServer | None = None
    clients: dict[str, SecAggClient] = field(default_factory=dict)
    # Filled only when a clock is given: seconds inside each state machine's calls, and in
    # MessagePack encoding/decoding (the bus's share of the work).
    client_seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    wire_seconds: float = 0.0


def node_names(n: int) -> list[str]:
    return [f"envoy-{i + 1}" for i in range(n)]


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
    signing_keys: Mapping[str, tuple[bytes, bytes]] | None = None,
    client_factory: Callable[..., SecAggClient] = SecAggClient,
    clock: Callable[[], float] | None = None,
) -> SimulationResult:
    """One whole round; returns the server's result and everything it received.

    dropouts: node -> stage at which it crashes (one of protocol.secagg.common.STAGES).
    duplicate: probability that any message (either direction) is delivered twice.
    randbytes: the randomness of every party; default os.urandom (tests pass a seeded one).
    clock: e.g. time.perf_counter, to account the time of every call per party (benchmarks);
        injected because protocol code reads no clock of its own.
    """
    rng = random.Random(seed)
    names = node_names(n)
    dropouts = dict(dropouts or {})
    for node, stage in dropouts.items():
        if stage not in STAGES:
            raise ValueError(f"dropouts[{node!r}]: unknown stage {stage!r}; one of {STAGES}")
    if randbytes is None:
        randbytes = os.urandom
    if inputs is None:
        gen = np.random.default_rng(seed)
        inputs = {u: gen.integers(0, 2**32, vector_length, dtype=np.uint32) for u in names}
    inputs = {u: np.asarray(v, dtype=np.uint32) for u, v in inputs.items()}
    pub: dict[str, bytes] = {}
    priv: dict[str, bytes] = {}
    if params.malicious:
        if signing_keys is None:
            pairs = {u: generate_signing_keypair(randbytes) for u in names}
            signing_keys = {u: (p.private, p.public) for u, p in pairs.items()}
        priv = {u: signing_keys[u][0] for u in names}
        pub = {u: signing_keys[u][1] for u in names}

    server = SecAggServer(round, params, names, vector_length, pub if params.malicious else None)
    clients = {
        u: client_factory(
            u,
            round,
            params,
            names,
            priv.get(u),
            pub if params.malicious else None,
            randbytes,
            server_id=SERVER,
        )
        for u in names
    }
    view: list[tuple[str, object]] = []
    dead: set[str] = set()
    to_server: deque[tuple[str, object]] = deque()
    to_clients: deque[tuple[str, object]] = deque()
    client_seconds = dict.fromkeys(names, 0.0)
    totals = {"server": 0.0, "wire": 0.0}
    now = clock or (lambda: 0.0)

    def transport(body: object) -> object:
        if not wire:
            return body
        t0 = now()
        decoded = _Body.decode(_encoder.encode(body))
        totals["wire"] += now() - t0
        return decoded

    def times() -> int:
        return 2 if duplicate and rng.random() < duplicate else 1

    def on_client(u: str, call: Callable[[], list[Outgoing]]) -> None:
        t0 = now()
        outgoing = call()
        client_seconds[u] += now() - t0
        for out in outgoing:
            stage = _STAGE_OF.get(type(out.body))
            if dropouts.get(u) == stage:
                dead.add(u)
                return
            if u in dead:
                return
            body = transport(out.body)
            for _ in range(times()):
                to_server.append((u, body))

    def on_server(call: Callable[[], list[Outgoing]]) -> None:
        t0 = now()
        outgoing = call()
        totals["server"] += now() - t0
        for out in outgoing:
            targets = names if out.recipient == BROADCAST else [out.recipient]
            body = transport(out.body)
            for v in targets:
                for _ in range(times()):
                    to_clients.append((v, body))

    for u in names:
        on_client(u, lambda u=u: clients[u].set_input(inputs[u]))
        on_client(u, clients[u].start)

    # Until the server is done and every message in flight (e.g. the abort) is delivered.
    while not server.done or to_server or to_clients:
        if not to_server and not to_clients:
            on_server(server.close_stage)  # the deadline of the current stage passes
            continue
        while to_server:
            u, body = to_server.popleft()
            if record_view:
                view.append((u, body))
            on_server(lambda u=u, body=body: server.receive(u, body))
        while to_clients:
            v, body = to_clients.popleft()
            if v in dead:
                continue
            on_client(v, lambda v=v, body=body: clients[v].receive(SERVER, body))

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
        view=view,
        server=server,
        clients=clients,
        client_seconds=client_seconds if clock else {},
        server_seconds=totals["server"],
        wire_seconds=totals["wire"],
    )


def seeded_randbytes(seed: int) -> Callable[[int], bytes]:
    """Deterministic randomness for tests (never for real rounds)."""
    gen = random.Random(seed)
    return lambda k: gen.randbytes(k)


__all__ = ["SERVER", "SimulationResult", "node_names", "seeded_randbytes", "simulate_round"]
