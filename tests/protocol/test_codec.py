"""The codec: typed round trips, and nothing but CodecError out of untrusted bytes."""

from __future__ import annotations

import msgpack
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import Codec, CodecError
from protocol.messages import (
    ALL_MESSAGES,
    PROTOCOL_VERSION,
    EvaluateRequest,
    Presence,
    RoundEnd,
    envelope,
)
from protocol.tensors import TensorError, from_numpy, to_numpy
from tests.protocol.strategies import envelopes, struct_strategy

codec = Codec(max_frame_bytes=1 << 20)
SETTINGS = settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)


def _valid_frame() -> bytes:
    weights = {"conv.weight": from_numpy(np.arange(12, dtype=np.float32).reshape(3, 4))}
    env = envelope(
        federation="fed",
        round=3,
        sender="director",
        recipient="envoy-1",
        body=EvaluateRequest(weights=weights, bins=100),
    )
    return codec.encode(env)


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_every_message_type_round_trips(cls: type, data: st.DataObject) -> None:
    body = data.draw(struct_strategy(cls))
    env = data.draw(envelopes(bodies=st.just(body)))
    decoded = codec.decode(codec.encode(env))
    assert decoded == env
    assert decoded.type == cls.__name__


@SETTINGS
@given(frame=st.binary(max_size=512))
def test_random_bytes_raise_only_codec_error(frame: bytes) -> None:
    try:
        decoded = codec.decode(frame)
    except CodecError as exc:
        assert str(exc)  # the error says what is wrong
    else:  # random bytes that happen to decode are a complete, valid envelope
        assert decoded.type in {cls.__name__ for cls in ALL_MESSAGES}


@SETTINGS
@given(env=envelopes(), data=st.data())
def test_mutated_frames_raise_only_codec_error(env, data: st.DataObject) -> None:
    frame = bytearray(codec.encode(env))
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if kind == "flip" and frame:
            frame[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del frame[pos:]
        elif kind == "insert":
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif frame:
            del frame[pos]
    try:
        decoded = codec.decode(bytes(frame))
    except CodecError:
        return
    # A mutation that still decodes must still be a fully valid envelope.
    assert decoded.version == PROTOCOL_VERSION
    assert decoded.type in {cls.__name__ for cls in ALL_MESSAGES}


def test_truncated_frame_is_refused() -> None:
    frame = _valid_frame()
    for cut in (1, len(frame) // 2, len(frame) - 1):
        with pytest.raises(CodecError):
            codec.decode(frame[:cut])


def test_oversized_frame_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    small = Codec(max_frame_bytes=64)
    frame = _valid_frame()
    assert len(frame) > 64

    class RefusingDecoder:
        def decode(self, _frame: bytes) -> None:
            raise AssertionError("the decoder ran on an oversized frame")

    monkeypatch.setattr(small, "_decoder", RefusingDecoder())
    with pytest.raises(CodecError, match="over the limit"):
        small.decode(frame)


def test_encoding_over_the_limit_is_refused() -> None:
    with pytest.raises(CodecError, match="over the limit"):
        Codec(max_frame_bytes=64).encode(codec.decode(_valid_frame()))


def _foreign(**overrides: object) -> bytes:
    """A frame crafted with the independent `msgpack` package, as a foreign peer would."""
    fields = {
        "version": PROTOCOL_VERSION,
        "federation": "fed",
        "round": 1,
        "sender": "envoy-1",
        "recipient": "director",
        "msg_id": b"\x01" * 16,
        "body": {"type": "RoundEnd", "status": "completed", "reason": ""},
        "signature": b"",
    }
    fields.update(overrides)
    return msgpack.packb({k: v for k, v in fields.items() if v is not ...}, use_bin_type=True)


def test_foreign_encoder_frame_decodes() -> None:
    decoded = codec.decode(_foreign())
    assert decoded.body == RoundEnd(status="completed", reason="")


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"version": PROTOCOL_VERSION + 1}, "version"),
        ({"body": {"type": "Pickle", "payload": b"x"}}, "Pickle"),
        ({"body": {"type": "RoundEnd", "status": "maybe"}}, "status"),
        ({"body": {"type": "RoundEnd", "status": "completed", "evil": 1}}, "evil"),
        ({"sender": "../../etc/passwd"}, "sender"),
        ({"round": -1}, "round"),
        ({"msg_id": b"short"}, "msg_id"),
        ({"msg_id": ...}, "msg_id"),
        ({"extra": 1}, "extra"),
        (
            {"body": {"type": "Presence", "online": "yes", "role": "envoy", "heartbeat_s": 1.0}},
            "online",
        ),
    ],
)
def test_well_formed_but_invalid_frames_name_the_problem(overrides: dict, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        codec.decode(_foreign(**overrides))


def test_msgpack_extension_types_are_refused() -> None:
    frame = msgpack.packb({"version": msgpack.ExtType(1, b"\x00")}, use_bin_type=True)
    with pytest.raises(CodecError):
        codec.decode(frame)


def test_signing_payload_ignores_the_signature_only() -> None:
    env = codec.decode(_foreign())
    signed = msgspec.structs.replace(env, signature=b"s" * 64)
    assert codec.signing_payload(env) == codec.signing_payload(signed)
    other_round = msgspec.structs.replace(env, round=env.round + 1)
    assert codec.signing_payload(env) != codec.signing_payload(other_round)


@given(
    array=st.sampled_from(["<f4", "<f8", "<u4", "<i8", "|u1"]).flatmap(
        lambda dt: st.lists(st.integers(0, 4), max_size=3).map(
            lambda shape: np.random.default_rng(len(shape)).integers(0, 100, size=shape).astype(dt)
        )
    )
)
def test_tensor_round_trip_preserves_dtype_shape_and_values(array: np.ndarray) -> None:
    back = to_numpy(from_numpy(array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_tensor_with_lying_shape_is_refused() -> None:
    tensor = from_numpy(np.zeros(4, dtype=np.float32))
    with pytest.raises(TensorError, match="needs 32 bytes"):
        to_numpy(msgspec.structs.replace(tensor, shape=(8,)))
    with pytest.raises(TensorError, match="not allowed"):
        to_numpy(msgspec.structs.replace(tensor, dtype="|O"))
    with pytest.raises(TensorError, match="cannot travel"):
        from_numpy(np.array(["a"]))


def test_big_endian_arrays_travel_as_little_endian() -> None:
    array = np.arange(5, dtype=">f4")
    tensor = from_numpy(array)
    assert tensor.dtype == "<f4"
    np.testing.assert_array_equal(to_numpy(tensor), array)


def test_presence_round_trip_example() -> None:
    env = envelope(
        federation="fed",
        round=0,
        sender="envoy-2",
        recipient="director",
        body=Presence(online=True, role="envoy", heartbeat_s=2.0, stage="idle"),
    )
    assert codec.decode(codec.encode(env)).body.stage == "idle"


# -- issue #11, point 10: every container in a frame is bounded in its type -------------------


def _round_start(weights: object, selected: object = ("envoy-1",)) -> dict:
    return {
        "type": "RoundStart",
        "weights": weights,
        "selected": list(selected),
        "plan": {"local_epochs": 1, "batch_size": 1, "lr": 0.1},
        "deadlines": {},
    }


def _tensor(shape: list[int]) -> list:
    return ["<f4", shape, b""]


@pytest.mark.parametrize(
    "body, where",
    [
        (_round_start({"w": _tensor([0] * 9)}), "length <= 8"),  # tensor rank
        (_round_start({f"w{i}": _tensor([0]) for i in range(5000)}), "length <= 4096"),
        (_round_start({}, selected=[f"e{i}" for i in range(100_001)]), "length <= 100000"),
        (
            {
                "type": "EvaluateResult",
                "num_samples": 0,
                "loss_sum": 0.0,
                "histograms": [0] * (2**21 + 1),
            },
            "length <= 2097152",
        ),
    ],
    ids=["rank", "tensors", "selected", "histogram"],
)
def test_oversized_containers_are_refused_by_the_decoder(body: dict, where: str) -> None:
    with pytest.raises(CodecError, match=where):
        Codec().decode(_foreign(body=body))  # the default frame limit lets each frame through


def test_an_adversarial_frame_costs_memory_in_proportion_to_its_size() -> None:
    """8 MiB of one-byte integers as a tensor shape: decoded unbounded, each byte becomes a
    Python int and a tuple slot (x14-x16 in the old decoder); bounded, the decoder stops at
    the array header."""
    import tracemalloc

    frame = _foreign(body=_round_start({"w": _tensor([1] * (8 * 2**20))}))
    default = Codec()  # the frame is within the default limit: the decoder must see it
    assert 8 * 2**20 < len(frame) < default.max_frame_bytes
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="length <= 8"):
            default.decode(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(frame) // 4, f"decoding took {peak / len(frame):.1f} x the frame"
