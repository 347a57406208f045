"""Shamir t-of-n: any t shares reconstruct, fewer reveal nothing, tampering is caught."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import shamir
from crypto.errors import CryptoError

secrets_st = st.binary(min_size=32, max_size=32)


def counter_randbytes(label: str):
    """Deterministic randomness (SHA-256 in counter mode) so statistical tests never flake."""
    state = {"i": 0}

    def randbytes(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += hashlib.sha256(f"{label}/{state['i']}".encode()).digest()
            state["i"] += 1
        return bytes(out[:n])

    return randbytes


@st.composite
def sharing(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(st.integers(1, 50))
    t = draw(st.integers(1, n))
    return t, n


@settings(max_examples=60, deadline=None)
@given(tn=sharing(), secret=secrets_st, data=st.data())
def test_any_subset_of_at_least_t_shares_reconstructs(
    tn: tuple[int, int], secret: bytes, data: st.DataObject
) -> None:
    t, n = tn
    xs = list(range(1, n + 1))
    shares = shamir.split(secret, threshold=t, xs=xs)
    assert len(shares) == n
    assert all(len(s) == shamir.SHARE_BYTES for s in shares)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
    chosen = {x: shares[x - 1] for x in subset}
    assert shamir.combine(chosen, threshold=t) == secret
    assert shamir.combine(chosen, threshold=t, verify=True) == secret


@settings(max_examples=60, deadline=None)
@given(tn=sharing().filter(lambda tn: tn[0] >= 2), secret=secrets_st, data=st.data())
def test_fewer_than_t_shares_do_not_give_the_secret(
    tn: tuple[int, int], secret: bytes, data: st.DataObject
) -> None:
    t, n = tn
    xs = list(range(1, n + 1))
    shares = shamir.split(secret, threshold=t, xs=xs)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t - 1, max_size=t - 1, unique=True))
    few = {x: shares[x - 1] for x in subset}
    with pytest.raises(CryptoError, match="threshold"):
        shamir.combine(few, threshold=t)
    # Interpolating t-1 points as if the degree were t-2 gives garbage: either it does not
    # even decode as a secret, or it decodes to a different one.
    try:
        wrong = shamir.combine(few, threshold=t - 1)
    except CryptoError:
        return
    assert wrong != secret


@settings(max_examples=25, deadline=None)
@given(tn=sharing(), secrets=st.lists(secrets_st, min_size=1, max_size=12), data=st.data())
def test_combine_many_with_mixed_share_sets(
    tn: tuple[int, int], secrets: list[bytes], data: st.DataObject
) -> None:
    # Different secrets reconstructed from different survivor sets in one vectorised call.
    t, n = tn
    xs = list(range(1, n + 1))
    rows = shamir.split_many(secrets, threshold=t, xs=xs)
    assert len(rows) == len(secrets) and all(len(r) == n for r in rows)
    maps = []
    for row in rows:
        subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
        maps.append({x: row[x - 1] for x in subset})
    assert shamir.combine_many(maps, threshold=t, verify=True) == secrets


def test_split_many_matches_split_with_the_same_randomness() -> None:
    secrets = [bytes([i]) * 32 for i in range(5)]
    many = shamir.split_many(
        secrets, threshold=3, xs=[1, 2, 3, 4], randbytes=counter_randbytes("m")
    )
    assert [shamir.combine(dict(enumerate(r, 1)), threshold=3) for r in many] == secrets
    # Shares are fresh every time with real randomness.
    assert shamir.split(secrets[0], threshold=3, xs=[1, 2, 3]) != shamir.split(
        secrets[0], threshold=3, xs=[1, 2, 3]
    )


def test_extreme_secrets_and_large_x() -> None:
    for secret in (bytes(32), b"\xff" * 32, bytes(31) + b"\x80"):
        xs = [1, 2, shamir.PRIME - 1]
        shares = shamir.split(secret, threshold=2, xs=xs)
        assert shamir.combine({2: shares[1], shamir.PRIME - 1: shares[2]}, threshold=2) == secret


def test_threshold_one_shares_are_the_encoded_secret() -> None:
    shares = shamir.split(b"\x01" * 32, threshold=1, xs=[1, 2, 3])
    assert shares[0] == shares[1] == shares[2]
    assert shamir.combine({3: shares[2]}, threshold=1) == b"\x01" * 32


def test_t_minus_one_shares_are_uniform_whatever_the_secret() -> None:
    # Perfect secrecy, statistically: with t = 3, the shares at x = 1, 2 of the all-zero and
    # the all-ones secret are both uniform over GF(p). Chi-square on the top 4 bits of every
    # limb (deterministic randomness, so the test cannot flake).
    t, xs, trials = 3, [1, 2, 3], 4000
    for secret in (bytes(32), b"\xff" * 32):
        rows = shamir.split_many(
            [secret] * trials, threshold=t, xs=xs, randbytes=counter_randbytes(secret.hex())
        )
        seen = np.frombuffer(b"".join(r[0] + r[1] for r in rows), dtype="<u4")
        assert (seen < shamir.PRIME).all()
        buckets = (seen.astype(np.int64) * 16) // shamir.PRIME
        counts = np.bincount(buckets, minlength=16)
        expected = seen.size / 16
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 50.0, (secret.hex(), counts)  # 15 dof: P(chi2 > 50) ~ 1e-5


def test_t_minus_one_shares_are_consistent_with_every_secret() -> None:
    # The algebraic reason for the uniformity above: for any t-1 shares and any candidate
    # secret there is a degree t-1 polynomial through both, so the shares rule nothing out.
    real, candidate = b"\x11" * 32, b"\xee" * 32
    shares = shamir.split(real, threshold=3, xs=[1, 2, 3, 4])
    observed = {1: shares[0], 2: shares[1]}
    # A third point chosen to put the candidate at x = 0: p(4) from (0, cand), (1, .), (2, .).
    cand_limbs = shamir._secrets_to_limbs([candidate])[0]
    pts = np.stack(
        [cand_limbs] + [np.frombuffer(observed[x], dtype="<u4").astype(np.int64) for x in (1, 2)]
    )
    # lagrange_coefficients refuses x = 0 (not a share point), so interpolate by hand.
    xs = [0, 1, 2]
    p = shamir.PRIME
    forged = np.zeros(shamir.LIMBS, dtype=np.int64)
    for j, xj in enumerate(xs):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (4 - xm) % p
                den = den * (xj - xm) % p
        forged = (forged + pts[j] * (num * pow(den, p - 2, p) % p)) % p
    forged_share = forged.astype("<u4").tobytes()
    assert shamir.combine({**observed, 4: forged_share}, threshold=3) == candidate


def test_tampered_share_is_detected_with_verify() -> None:
    secret = b"\x42" * 32
    shares = shamir.split(secret, threshold=3, xs=[1, 2, 3, 4, 5])
    bad = bytearray(shares[4])
    bad[0] ^= 1
    with pytest.raises(CryptoError, match=r"shares\[0\]\[5\]"):
        shamir.combine(
            {1: shares[0], 2: shares[1], 3: shares[2], 5: bytes(bad)}, threshold=3, verify=True
        )
    # A tampered share among the interpolated ones moves the polynomial off the extra share.
    bad1 = bytearray(shares[0])
    bad1[5] ^= 0x10
    with pytest.raises(CryptoError, match="inconsistent"):
        shamir.combine(
            {1: bytes(bad1), 2: shares[1], 3: shares[2], 4: shares[3]}, threshold=3, verify=True
        )
    assert shamir.combine({1: shares[0], 2: shares[1], 3: shares[2]}, threshold=3) == secret


def test_garbage_shares_almost_never_decode() -> None:
    # Random field elements in every limb land inside the 30/16-bit limb encoding with
    # probability ~2^-23, so reconstructions from unrelated shares are refused.
    rand = counter_randbytes("garbage")
    refused = 0
    for _ in range(50):
        fake = {
            x: shamir._random_field_elements((shamir.LIMBS,), rand).astype("<u4").tobytes()
            for x in (1, 2)
        }
        try:
            shamir.combine(fake, threshold=2)
        except CryptoError as exc:
            assert "outside the encoding" in str(exc)
            refused += 1
    assert refused == 50


def test_bad_inputs_are_named() -> None:
    with pytest.raises(CryptoError, match="secrets"):
        shamir.split(b"short", threshold=1, xs=[1])
    with pytest.raises(CryptoError, match="threshold"):
        shamir.split(b"\x00" * 32, threshold=4, xs=[1, 2, 3])
    with pytest.raises(CryptoError, match="threshold"):
        shamir.split(b"\x00" * 32, threshold=0, xs=[1, 2, 3])
    with pytest.raises(CryptoError, match="xs"):
        shamir.split(b"\x00" * 32, threshold=1, xs=[0, 1])
    with pytest.raises(CryptoError, match="xs"):
        shamir.split(b"\x00" * 32, threshold=1, xs=[1, 1])
    with pytest.raises(CryptoError, match="xs"):
        shamir.split(b"\x00" * 32, threshold=1, xs=[shamir.PRIME])
    for bad_xs in ([True, 2], [1, 2**70], [1.0, 2], ["1"], [np.uint64(2**63)]):
        with pytest.raises(CryptoError, match="xs"):
            shamir.split(b"\x00" * 32, threshold=1, xs=bad_xs)
    assert shamir.split(b"\x00" * 32, threshold=1, xs=np.array([1, 2], dtype=np.uint8))
    share = shamir.split(b"\x00" * 32, threshold=1, xs=[1])[0]
    with pytest.raises(CryptoError, match=r"shares\[0\]\[1\]"):
        shamir.combine({1: share[:-1]}, threshold=1)
    for junk in (5, None, "x" * shamir.SHARE_BYTES):
        with pytest.raises(CryptoError, match=r"shares\[0\]\[2\]"):
            shamir.combine({1: share, 2: junk}, threshold=2)  # type: ignore[dict-item]
    assert shamir.combine({1: bytearray(share)}, threshold=1) == bytes(32)
    with pytest.raises(CryptoError, match="field prime"):
        shamir.combine({1: b"\xff" * shamir.SHARE_BYTES}, threshold=1)
    with pytest.raises(CryptoError, match="threshold"):
        shamir.combine({1: share}, threshold=0)


@settings(max_examples=50, deadline=None)
@given(
    xs=st.lists(st.integers(1, shamir.PRIME - 1), min_size=1, max_size=30, unique=True),
    at=st.integers(0, shamir.PRIME - 1),
)
def test_lagrange_coefficients_match_a_big_integer_reference(xs: list[int], at: int) -> None:
    p = shamir.PRIME
    expected = []
    for j, xj in enumerate(xs):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (at - xm) % p
                den = den * (xj - xm) % p
        expected.append(num * pow(den, p - 2, p) % p)
    got = shamir.lagrange_coefficients(xs, at)
    assert got.tolist() == expected
    assert int(got.sum()) % p == 1  # they interpolate the constant polynomial 1
