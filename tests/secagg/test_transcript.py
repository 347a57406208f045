"""Known-answer test of the wire format: a seeded SecAgg round, byte for byte.

With every party's randomness seeded, a round's transcript (every frame body, both directions,
in order, as MessagePack) is a pure function of the code. Its SHA-256 is pinned here like a
crypto test vector: a refactoring must leave it unchanged, so old and new nodes interoperate.
A deliberate change of the messages, the masking or the signing payloads changes it; then bump
protocol.messages.PROTOCOL_VERSION and update the digest in the same commit.

The digests were reproduced with the code before the SecAgg machines were rewritten as tables
(commit 3f16797, its client's Shamir coefficients drawn from the injected randomness as now),
and changed on purpose by issue #11 (PROTOCOL_VERSION 2): every signature, HKDF info and AEAD
associated data binds the session context (federation, purpose, roster), the graph is seeded
with the key roster's digest, consistency signatures carry partner sets, and RoundStart
announces the update norm bound.
"""

from __future__ import annotations

import hashlib

import msgspec
import numpy as np
import pytest

from protocol.events import Outgoing
from protocol.messages import PROTOCOL_VERSION, Envelope, RoundStart, TrainPlan
from protocol.secagg.messages import SecAggMaskedInput, SecAggParams
from protocol.secagg.update import Layout, encode_update, qrange_for
from protocol.tensors import state_from_numpy

from .conftest import Driver

_encoder = msgspec.msgpack.Encoder()

ROUNDS = {
    "semi-honest": (
        SecAggParams(graph="complete", k=5, t=4, clip=1.0, malicious=False),
        "a26cc9d00b77844631a59af725fc2f28e5c02055459132dfe3c2a11b420f6d8d",
    ),
    "malicious": (
        SecAggParams(graph="complete", k=5, t=4, clip=1.0, malicious=True),
        "aeee6e59124044ac081826ad6bbd046f30a0e230eed0f7387b031a4a065c0561",
    ),
    "harary": (
        SecAggParams(graph="harary", k=4, t=3, clip=1.0, malicious=True),
        "67fb5b89225da00d59e26bb67d62a2ee5b7b20a848b20cd489b30ce74f301a96",
    ),
}


def transcript(params: SecAggParams, dropped: str) -> str:
    drv = Driver(7, params, d=24, round=195, seed=11)
    h = hashlib.sha256()

    def frames(sender: str, outs: list[Outgoing]) -> None:
        for out in outs:
            h.update(f"{sender}>{out.recipient}:".encode() + _encoder.encode(out.body))

    alive = set(drv.names)
    outs = drv.start()
    while not drv.server.done:
        if any(isinstance(o.body, SecAggMaskedInput) for o in outs.get(dropped, [])):
            # It vanishes before its masked input leaves: the others unmask without it.
            del outs[dropped]
            alive.discard(dropped)
        for u in sorted(outs):
            frames(u, outs[u])
        replies = drv.to_server(outs)
        frames("director", replies)
        outs = drv.to_clients(replies, only=alive)
    h.update(drv.server.result.tobytes() if drv.server.result is not None else b"aborted")
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(ROUNDS))
def test_a_seeded_round_is_the_same_bytes(name):
    params, digest = ROUNDS[name]
    assert transcript(params, dropped="envoy-5") == digest


def test_the_update_vector_and_the_envelope_are_the_same_bytes():
    weights = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
    gen = np.random.default_rng(1)
    delta = {k: gen.normal(0, 0.3, v.shape).astype(np.float32) for k, v in weights.items()}
    params = SecAggParams(graph="complete", k=4, t=3, clip=1.0, malicious=True)
    vector = encode_update(
        Layout.of(weights), delta, 1234, 0.75, qrange_for(params, 5), np.random.default_rng(7)
    )
    start = RoundStart(
        weights=state_from_numpy(delta),
        selected=["envoy-1", "envoy-2"],
        plan=TrainPlan(local_epochs=1, batch_size=4, lr=0.1),
        deadlines={"training": 5.0, "share_keys": 3.0},
        secagg=params,
        attempt=2,
    )
    envelope = Envelope(
        version=PROTOCOL_VERSION,
        federation="f",
        round=4,
        sender="director",
        recipient="broadcast",
        msg_id=b"m" * 16,
        body=start,
    )
    # Before issue #11 (RoundStart without update_norm, SecAggParams with graph_seed) the
    # same inputs gave e0516863...; that digest came from the code before the update format
    # moved into protocol/ too. Before TrainPlan carried FedProx's prox_mu (#15): 285cd17b...
    h = hashlib.sha256(vector.tobytes() + _encoder.encode(envelope))
    assert h.hexdigest() == "7f610612fa162cb8527e810cca0b69c29fb445c248ac9b5e63a5498ebfd49c85"
