"""The mask PRG: deterministic, seed-separated, chunking-invariant, and masks cancel."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import prg
from crypto.errors import CryptoError

seeds = st.binary(min_size=32, max_size=32)
# Small chunks make lengths around chunk boundaries cheap to explore.
chunk_sizes = st.sampled_from([64, 80, 4096, prg.DEFAULT_CHUNK_BYTES])


def seed_of(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def test_expand_mask_is_deterministic_and_seed_separated() -> None:
    a = prg.expand_mask(seed_of("a"), 10_000)
    assert np.array_equal(a, prg.expand_mask(seed_of("a"), 10_000))
    b = prg.expand_mask(seed_of("b"), 10_000)
    # Independent uniform words agree with probability 2^-32 each.
    assert (a == b).sum() < 3


@settings(deadline=None)
@given(seed=seeds, length=st.integers(0, 5000), prefix=st.integers(0, 5000))
def test_expand_mask_prefix_property(seed: bytes, length: int, prefix: int) -> None:
    # A longer mask extends a shorter one, so the vector length never changes earlier words.
    prefix = min(prefix, length)
    assert np.array_equal(prg.expand_mask(seed, length)[:prefix], prg.expand_mask(seed, prefix))


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 65_531, 65_536, 65_541, 200_003])
def test_expand_mask_into_out_matches_keystream(length: int) -> None:
    seed = seed_of(f"len{length}")
    out = np.full(length, 0xDEADBEEF, dtype=np.uint32)
    result = prg.expand_mask(seed, length, out=out)
    assert result is out
    assert np.array_equal(out, np.frombuffer(prg.keystream(seed, 4 * length), dtype="<u4"))


def test_expand_mask_rejects_bad_arguments_by_name() -> None:
    with pytest.raises(CryptoError, match="seed"):
        prg.expand_mask(b"\x00" * 16, 10)  # AES-128 key size: refused, the seed is 32 bytes
    with pytest.raises(CryptoError, match="length"):
        prg.expand_mask(seed_of("x"), -1)
    with pytest.raises(CryptoError, match="out"):
        prg.expand_mask(seed_of("x"), 10, out=np.zeros(10, dtype=np.int32))
    with pytest.raises(CryptoError, match="out"):
        prg.expand_mask(seed_of("x"), 10, out=np.zeros(11, dtype=np.uint32))
    with pytest.raises(CryptoError, match="out"):
        prg.expand_mask(seed_of("x"), 10, out=np.zeros(20, dtype=np.uint32)[::2])


def test_mask_words_look_uniform() -> None:
    # Deterministic (fixed seed) chi-square over the top 4 bits and the bottom 4 bits.
    mask = prg.expand_mask(seed_of("uniform"), 160_000)
    for nibble in (mask >> 28, mask & 0xF):
        counts = np.bincount(nibble.astype(np.int64), minlength=16)
        expected = mask.size / 16
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 50.0  # 15 degrees of freedom: P(chi2 > 50) ~ 1e-5


@settings(deadline=None, max_examples=40)
@given(
    length=st.integers(0, 3000),
    plus=st.lists(seeds, max_size=4),
    minus=st.lists(seeds, max_size=4),
    chunk=chunk_sizes,
)
def test_accumulator_equals_modular_sum_of_masks(
    length: int, plus: list[bytes], minus: list[bytes], chunk: int
) -> None:
    expected = np.zeros(length, dtype=np.uint64)
    for s in plus:
        expected += prg.expand_mask(s, length)
    for s in minus:
        expected += (1 << 32) - prg.expand_mask(s, length).astype(np.uint64)
    expected %= 1 << 32

    blocked = prg.MaskAccumulator(length, chunk_bytes=chunk)
    blocked.apply(add=plus, subtract=minus)
    one_by_one = prg.MaskAccumulator(length, chunk_bytes=chunk)
    for s in plus:
        one_by_one.add(s)
    for s in minus:
        one_by_one.subtract(s)
    assert blocked.value.dtype == np.uint32
    assert np.array_equal(blocked.value, expected.astype(np.uint32))
    assert np.array_equal(one_by_one.value, blocked.value)


@settings(deadline=None, max_examples=30)
@given(
    length=st.integers(1, 3000),
    pairs=st.lists(seeds, min_size=1, max_size=6),
    chunk=chunk_sizes,
    data=st.data(),
)
def test_pairwise_masks_cancel_in_the_sum(
    length: int, pairs: list[bytes], chunk: int, data: st.DataObject
) -> None:
    # The SecAgg identity: client u adds s_uv, client v subtracts it; the sum of the masked
    # inputs is the sum of the inputs, mod 2^32, whatever the inputs are.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x_u = rng.integers(0, 2**32, length, dtype=np.uint32)
    x_v = rng.integers(0, 2**32, length, dtype=np.uint32)
    y_u = prg.MaskAccumulator(length, initial=x_u, chunk_bytes=chunk)
    y_u.apply(add=pairs)
    y_v = prg.MaskAccumulator(length, initial=x_v, chunk_bytes=chunk)
    y_v.apply(subtract=pairs)
    assert not np.array_equal(y_u.value, x_u)  # actually masked
    assert np.array_equal(y_u.value + y_v.value, x_u + x_v)


def test_add_then_subtract_is_zero_and_initial_is_copied() -> None:
    start = np.arange(100_000, dtype=np.uint32)
    acc = prg.MaskAccumulator(start.size, initial=start)
    acc.add(seed_of("s"))
    acc.add(seed_of("t"))
    acc.subtract(seed_of("s"))
    acc.subtract(seed_of("t"))
    assert np.array_equal(acc.value, start)
    acc.add(seed_of("s"))
    assert np.array_equal(start, np.arange(100_000, dtype=np.uint32))  # caller's array untouched
    acc.subtract_vector(start)
    assert np.array_equal(acc.value, prg.expand_mask(seed_of("s"), start.size))
    acc.add_vector(start)
    acc.subtract(seed_of("s"))
    assert np.array_equal(acc.value, start)
    assert np.array_equal(prg.apply_masks(start, [seed_of("a")], [seed_of("a")]), start)


def test_accumulator_applies_nothing_when_one_seed_is_bad() -> None:
    acc = prg.MaskAccumulator(1000)
    with pytest.raises(CryptoError, match="seed"):
        acc.apply(add=[seed_of("ok"), b"short"])
    assert not acc.value.any()


def test_accumulator_rejects_bad_arguments_by_name() -> None:
    with pytest.raises(CryptoError, match="initial"):
        prg.MaskAccumulator(10, initial=np.zeros(10, dtype=np.int64))
    with pytest.raises(CryptoError, match="chunk_bytes"):
        prg.MaskAccumulator(10, chunk_bytes=100)
    acc = prg.MaskAccumulator(10)
    with pytest.raises(CryptoError, match="vector"):
        acc.add_vector(np.zeros(9, dtype=np.uint32))
    assert len(acc) == 10
