"""Every message of a real round travels inside the project's Envelope through its Codec."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from protocol.codec import Codec, CodecError
from protocol.messages import ALL_MESSAGES, envelope
from protocol.secagg.messages import (
    SECAGG_MESSAGES,
    SecAggMaskedInput,
    SecAggParams,
    SecAggUnmaskRequest,
)
from protocol.secagg.simulate import simulate_round
from protocol.tensors import from_numpy

from .conftest import MECHANICS


def test_secagg_messages_are_in_the_envelope_union() -> None:
    assert set(SECAGG_MESSAGES) <= set(ALL_MESSAGES)
    names = [cls.__name__ for cls in ALL_MESSAGES]
    assert len(names) == len(set(names))  # wire tags are unique


@pytest.mark.parametrize("malicious", [False, True])
def test_round_messages_survive_the_codec(malicious: bool) -> None:
    params = SecAggParams(graph="harary", k=4, t=3, clip=1.0, malicious=malicious)
    sim = simulate_round(
        n=8, params=params, vector_length=32, dropouts={"envoy-2": "unmask"}, policy=MECHANICS
    )
    assert not sim.aborted
    codec = Codec()
    seen = set()
    for sender, body in sim.view:
        env = envelope(federation="fed", round=1, sender=sender, recipient="director", body=body)
        back = codec.decode(codec.encode(env))
        assert back.body == body
        seen.add(type(body).__name__)
    expected = {"SecAggAdvertiseKeys", "SecAggShareKeys", "SecAggMaskedInput"}
    expected |= {"SecAggUnmaskResponse"}
    if malicious:
        expected.add("SecAggConsistencySignature")
    assert expected <= seen


def test_malformed_bodies_are_refused_by_the_codec() -> None:
    codec = Codec()
    ok = SecAggUnmaskRequest(round=1, survivors=["a"], dropouts=[])
    env = envelope(federation="fed", round=1, sender="director", recipient="a", body=ok)
    raw = msgspec.msgpack.decode(codec.encode(env))
    # A signature of the wrong length, a node id outside the safe alphabet.
    bad_sig = dict(raw, body=dict(raw["body"], signatures={"a": b"x" * 10}))
    bad_id = dict(raw, body=dict(raw["body"], survivors=["../etc"]))
    for frame in (bad_sig, bad_id):
        with pytest.raises(CodecError):
            codec.decode(msgspec.msgpack.encode(frame))


def test_masked_input_of_a_million_parameters_fits_the_default_frame() -> None:
    body = SecAggMaskedInput(round=1, masked=from_numpy(np.zeros(1_000_000, dtype=np.uint32)))
    env = envelope(federation="fed", round=1, sender="a", recipient="director", body=body)
    assert len(Codec().encode(env)) < 4_100_000
