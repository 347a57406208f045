"""A step-by-step driver for one SecAgg round, so tests can play a cheating server or peer.

`simulate_round` runs a whole honest round; `Driver` hands the messages back to the test at
each step so it can drop, alter, replay or forge them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pytest
import structlog

from crypto.signing import generate_signing_keypair
from protocol.events import BROADCAST, Outgoing
from protocol.secagg.client import SecAggClient
from protocol.secagg.messages import SecAggParams
from protocol.secagg.policy import ClientPolicy
from protocol.secagg.server import SecAggServer
from protocol.secagg.simulate import SERVER, node_names, seeded_randbytes

# Tests of the protocol's mechanics (stages, dropouts, replays) run any parameters, weak or
# semi-honest ones included, and any number of dropouts; the client's own policy is tested in
# test_malicious_director.py. (A survivor set must still be a majority of the participants.)
MECHANICS = ClientPolicy(
    insecure_semi_honest=True, insecure_any_threshold=True, dropout_fraction=0.99
)


@pytest.fixture(autouse=True, scope="session")
def _quiet_structlog() -> None:
    # The state machines log every refusal at debug level; tests provoke thousands.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


@dataclass
class Driver:
    n: int
    params: SecAggParams
    d: int = 16
    round: int = 3
    seed: int = 0
    policy: ClientPolicy = MECHANICS
    federation: str = "fedtest"
    names: list[str] = field(init=False)
    server: SecAggServer = field(init=False)
    clients: dict[str, SecAggClient] = field(init=False)
    inputs: dict[str, np.ndarray] = field(init=False)
    signing: dict[str, tuple[bytes, bytes]] = field(init=False)

    def __post_init__(self) -> None:
        rb = seeded_randbytes(self.seed)
        self.names = node_names(self.n)
        self.signing = {}
        for u in self.names:
            pair = generate_signing_keypair(rb)
            self.signing[u] = (pair.private, pair.public)
        public = {u: pub for u, (_, pub) in self.signing.items()}
        mal = self.params.malicious
        self.server = SecAggServer(
            self.round,
            self.params,
            self.names,
            self.d,
            public if mal else None,
            federation=self.federation,
        )
        self.clients = {
            u: SecAggClient(
                u,
                self.round,
                self.params,
                self.names,
                self.signing[u][0] if mal else None,
                public if mal else None,
                rb,
                server_id=SERVER,
                federation=self.federation,
                policy=self.policy,
            )
            for u in self.names
        }
        gen = np.random.default_rng(self.seed)
        self.inputs = {u: gen.integers(0, 2**32, self.d, dtype=np.uint32) for u in self.names}
        for u in self.names:
            assert self.clients[u].set_input(self.inputs[u]) == []

    def start(self) -> dict[str, list[Outgoing]]:
        return {u: c.start() for u, c in self.clients.items()}

    def to_server(self, outs: dict[str, list[Outgoing]]) -> list[Outgoing]:
        """Deliver client messages; close the stage if it did not close by itself."""
        replies: list[Outgoing] = []
        stage = self.server.stage
        for u, msgs in outs.items():
            for out in msgs:
                assert out.recipient == SERVER
                replies += self.server.receive(u, out.body)
        if self.server.stage == stage and not self.server.done:
            replies += self.server.close_stage()
        return replies

    def to_clients(
        self, replies: list[Outgoing], only: set[str] | None = None
    ) -> dict[str, list[Outgoing]]:
        outs: dict[str, list[Outgoing]] = {}
        for out in replies:
            targets = self.names if out.recipient == BROADCAST else [out.recipient]
            for v in targets:
                if only is not None and v not in only:
                    continue
                outs.setdefault(v, []).extend(self.clients[v].receive(SERVER, out.body))
        return outs

    def expected(self, survivors: frozenset[str] | set[str]) -> np.ndarray:
        total = np.zeros(self.d, dtype=np.uint32)
        for u in survivors:
            total += self.inputs[u]
        return total


def body_of(replies: list[Outgoing], kind: type) -> object:
    found = [o.body for o in replies if isinstance(o.body, kind)]
    assert len(found) == 1, f"expected one {kind.__name__}, got {len(found)}"
    return found[0]
