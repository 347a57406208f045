"""Key agreement, AEAD and signatures: round trips, and refusal of everything not authentic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import aead, agreement, signing
from crypto.errors import AuthenticationError, CryptoError, InvalidSignature

KEY = bytes(range(32))
AD = aead.associated_data(3, "envoy-1", "envoy-2", "share_keys")


# -- agreement ------------------------------------------------------------------------------


def test_agreement_is_symmetric_and_separated_by_info() -> None:
    a = agreement.generate_agreement_keypair()
    b = agreement.generate_agreement_keypair()
    k_ab = agreement.agree(a.private, b.public, info=b"mask")
    assert k_ab == agreement.agree(b.private, a.public, info=b"mask")
    assert len(k_ab) == 32
    assert k_ab != agreement.agree(a.private, b.public, info=b"encrypt")
    c = agreement.generate_agreement_keypair()
    assert k_ab != agreement.agree(a.private, c.public, info=b"mask")


def test_agree_many_matches_agree_and_names_the_bad_peer() -> None:
    a = agreement.generate_agreement_keypair()
    peers = [agreement.generate_agreement_keypair().public for _ in range(5)]
    many = agreement.agree_many(a.private, peers, info=b"mask")
    assert many == [agreement.agree(a.private, p, info=b"mask") for p in peers]
    assert len(set(many)) == 5
    with pytest.raises(CryptoError, match=r"peer_publics\[1\]"):
        agreement.agree_many(a.private, [peers[0], bytes(32)], info=b"mask")


def test_agreement_keypair_from_injected_randomness_is_deterministic() -> None:
    one = agreement.generate_agreement_keypair(lambda n: b"\x07" * n)
    two = agreement.generate_agreement_keypair(lambda n: b"\x07" * n)
    assert one == two
    assert one.public == agreement.agreement_public_key(one.private)
    assert "redacted" in repr(one) and one.private.hex() not in repr(one)


@pytest.mark.parametrize(
    "small_order_point",
    [
        bytes(32),  # the identity
        (1).to_bytes(32, "little"),  # order 1 in Montgomery form (u = 1)
        bytes.fromhex(
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"
        ),  # order 8
    ],
)
def test_agreement_refuses_small_order_peer_keys(small_order_point: bytes) -> None:
    a = agreement.generate_agreement_keypair()
    with pytest.raises(CryptoError, match="peer_public"):
        agreement.agree(a.private, small_order_point, info=b"x")


def test_agreement_rejects_malformed_keys_by_name() -> None:
    a = agreement.generate_agreement_keypair()
    with pytest.raises(CryptoError, match="peer_public"):
        agreement.agree(a.private, b"short", info=b"x")
    with pytest.raises(CryptoError, match="private"):
        agreement.agree(b"\x01" * 31, a.public, info=b"x")
    with pytest.raises(CryptoError, match="peer_public"):
        agreement.agree(a.private, "not bytes", info=b"x")  # type: ignore[arg-type]


# -- associated data --------------------------------------------------------------------------

fields = st.text(max_size=12)


@settings(deadline=None)
@given(
    a=st.tuples(st.integers(0, 2**64 - 1), fields, fields, fields),
    b=st.tuples(st.integers(0, 2**64 - 1), fields, fields, fields),
)
def test_associated_data_is_injective(a: tuple, b: tuple) -> None:
    assert (aead.associated_data(*a) == aead.associated_data(*b)) == (a == b)


def test_associated_data_is_unambiguous_where_concatenation_is_not() -> None:
    assert aead.associated_data(1, "ab", "c", "p") != aead.associated_data(1, "a", "bc", "p")
    assert aead.associated_data(1, "a", "", "bp") != aead.associated_data(1, "a", "b", "p")
    assert aead.associated_data(256, "a", "b", "p") != aead.associated_data(1, "a", "b", "p")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((-1, "a", "b", "p"), "round"),
        ((2**64, "a", "b", "p"), "round"),
        ((True, "a", "b", "p"), "round"),
        ((1, b"a", "b", "p"), "sender"),
        ((1, "a", None, "p"), "recipient"),
        ((1, "a", "b", 5), "purpose"),
    ],
)
def test_associated_data_rejects_bad_fields_by_name(args: tuple, field: str) -> None:
    with pytest.raises(CryptoError, match=field):
        aead.associated_data(*args)


# -- AEAD -------------------------------------------------------------------------------------


@settings(deadline=None)
@given(plaintext=st.binary(max_size=300))
def test_aead_round_trip(plaintext: bytes) -> None:
    sealed = aead.encrypt(KEY, plaintext, AD)
    assert len(sealed) == len(plaintext) + aead.OVERHEAD
    assert aead.decrypt(KEY, sealed, AD) == plaintext


def test_aead_uses_fresh_nonces() -> None:
    assert aead.encrypt(KEY, b"same", AD) != aead.encrypt(KEY, b"same", AD)


@settings(deadline=None)
@given(plaintext=st.binary(min_size=0, max_size=64), data=st.data())
def test_aead_refuses_any_single_bit_flip(plaintext: bytes, data: st.DataObject) -> None:
    sealed = bytearray(aead.encrypt(KEY, plaintext, AD))
    bit = data.draw(st.integers(0, 8 * len(sealed) - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthenticationError):
        aead.decrypt(KEY, bytes(sealed), AD)


@pytest.mark.parametrize(
    "other_ad",
    [
        aead.associated_data(4, "envoy-1", "envoy-2", "share_keys"),  # another round
        aead.associated_data(3, "envoy-2", "envoy-1", "share_keys"),  # swapped direction
        aead.associated_data(3, "envoy-1", "envoy-3", "share_keys"),  # another recipient
        aead.associated_data(3, "envoy-1", "envoy-2", "unmask"),  # another purpose
        b"",
    ],
)
def test_aead_refuses_wrong_associated_data(other_ad: bytes) -> None:
    sealed = aead.encrypt(KEY, b"shares of b_u and s_u", AD)
    with pytest.raises(AuthenticationError):
        aead.decrypt(KEY, sealed, other_ad)


def test_aead_refuses_wrong_key_truncation_and_extension() -> None:
    sealed = aead.encrypt(KEY, b"payload", AD)
    with pytest.raises(AuthenticationError):
        aead.decrypt(bytes(32), sealed, AD)
    for bad in (sealed[:-1], sealed + b"\x00", sealed[: aead.OVERHEAD - 1], b""):
        with pytest.raises(AuthenticationError):
            aead.decrypt(KEY, bad, AD)


def test_aead_rejects_malformed_key_by_name() -> None:
    with pytest.raises(CryptoError, match="key"):
        aead.encrypt(b"k" * 16, b"x", AD)
    with pytest.raises(CryptoError, match="key"):
        aead.decrypt(b"k" * 31, b"x" * 40, AD)


# -- signatures -------------------------------------------------------------------------------


@settings(deadline=None)
@given(message=st.binary(max_size=200))
def test_sign_verify_round_trip(message: bytes) -> None:
    pair = signing.generate_signing_keypair(lambda n: b"\x2a" * n)
    signature = signing.sign(pair.private, message)
    assert len(signature) == signing.SIGNATURE_BYTES
    signing.verify(pair.public, message, signature)


@settings(deadline=None)
@given(message=st.binary(max_size=64), data=st.data())
def test_verify_refuses_flipped_bits(message: bytes, data: st.DataObject) -> None:
    pair = signing.generate_signing_keypair(lambda n: b"\x2a" * n)
    signature = bytearray(signing.sign(pair.private, message))
    bit = data.draw(st.integers(0, 8 * len(signature) - 1))
    signature[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InvalidSignature):
        signing.verify(pair.public, message, bytes(signature))


def test_verify_refuses_other_message_other_key_and_malformed_input() -> None:
    pair = signing.generate_signing_keypair()
    other = signing.generate_signing_keypair()
    signature = signing.sign(pair.private, b"round 7 survivors")
    with pytest.raises(InvalidSignature):
        signing.verify(pair.public, b"round 7 survivorz", signature)
    with pytest.raises(InvalidSignature):
        signing.verify(other.public, b"round 7 survivors", signature)
    with pytest.raises(InvalidSignature, match="signature"):
        signing.verify(pair.public, b"round 7 survivors", signature[:-1])
    with pytest.raises(InvalidSignature, match="public"):
        signing.verify(b"\x00" * 5, b"round 7 survivors", signature)
    assert isinstance(InvalidSignature("x"), CryptoError)
    assert "redacted" in repr(pair)
