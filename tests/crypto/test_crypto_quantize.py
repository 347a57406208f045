"""Fixed-point quantisation: bounded error, unbiased rounding, sums that never wrap."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from crypto.quantize import (
    QuantizationRange,
    decode_weighted_sum,
    dequantize_sum,
    encode_weighted_update,
    quantize,
)


@st.composite
def ranges(draw: st.DrawFn) -> QuantizationRange:
    bits = draw(st.integers(8, 32))
    return QuantizationRange(
        clip=draw(st.floats(1e-3, 1e3)),
        max_summands=draw(st.integers(1, min(5000, 2**bits - 1))),
        bits=bits,
    )


def floats_within(clip: float, size: int) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float64, size, elements=st.floats(-clip, clip))


@settings(max_examples=80, deadline=None)
@given(qrange=ranges(), data=st.data())
def test_sum_error_is_within_documented_bound(
    qrange: QuantizationRange, data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, min(qrange.max_summands, 8)))
    size = data.draw(st.integers(1, 40))
    xs = [data.draw(floats_within(qrange.clip, size)) for _ in range(k)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    total = np.zeros(size, dtype=np.uint32)
    for x in xs:
        q = quantize(x, qrange, rng=rng)
        assert q.dtype == np.uint32
        assert int(q.max()) <= qrange.max_level
        total += q
    got = dequantize_sum(total, qrange, k)
    exact = np.sum(xs, axis=0)
    # The documented bound, plus float64 rounding relative to the magnitudes involved.
    bound = k * qrange.max_error_per_summand + 1e-12 * k * qrange.clip
    assert np.all(np.abs(got - exact) <= bound)


@settings(max_examples=60, deadline=None)
@given(qrange=ranges())
def test_max_summands_extreme_values_never_wrap(qrange: QuantizationRange) -> None:
    rng = np.random.default_rng(0)
    top = quantize(np.array([qrange.clip, 1e30, np.finfo(np.float64).max]), qrange, rng=rng)
    bottom = quantize(np.array([-qrange.clip, -1e30]), qrange, rng=rng)
    assert np.all(top == qrange.max_level) and np.all(bottom == 0)
    # The worst case: every summand at the top of the range. Exact sum fits in `bits` bits.
    exact = int(top[0]) * qrange.max_summands
    assert exact <= 2**qrange.bits - 1
    wrapped = np.full(1, top[0], dtype=np.uint32) * np.uint32(qrange.max_summands)
    assert int(wrapped[0]) == exact
    n = qrange.max_summands
    assert dequantize_sum(wrapped, qrange, n)[0] == pytest.approx(n * qrange.clip, rel=1e-9)
    assert dequantize_sum(np.zeros(1, np.uint32), qrange, n)[0] == pytest.approx(-n * qrange.clip)


@settings(max_examples=40, deadline=None)
@given(qrange=ranges(), x=st.floats(-1e6, 1e6))
def test_out_of_range_values_are_clipped(qrange: QuantizationRange, x: float) -> None:
    q = quantize(np.array([x]), qrange, rng=np.random.default_rng(1))
    got = dequantize_sum(q, qrange, 1)[0]
    clipped = min(max(x, -qrange.clip), qrange.clip)
    assert abs(got - clipped) <= qrange.max_error_per_summand * (1 + 1e-9)


def test_stochastic_rounding_is_unbiased() -> None:
    # Coarse range so rounding dominates: levels 0 and 1 only, i.e. -1 and +1.
    qrange = QuantizationRange(clip=1.0, max_summands=2**31, bits=32)
    assert qrange.max_level == 1
    x = np.full(200_000, 0.3)
    q = quantize(x, qrange, rng=np.random.default_rng(7))
    # P(q = 1) = 0.65; mean of dequantised values is 0.3 within a few standard errors.
    mean = dequantize_sum(q, qrange, 1).mean()
    stderr = 2 * np.sqrt(0.65 * 0.35 / x.size)
    assert abs(mean - 0.3) < 5 * stderr
    finer = QuantizationRange(clip=1.0, max_summands=2**28)  # levels 0..15
    values = np.linspace(-1, 1, 37)
    reps = quantize(np.repeat(values, 20_000), finer, rng=np.random.default_rng(3))
    means = dequantize_sum(reps, finer, 1).reshape(37, 20_000).mean(axis=1)
    assert np.all(np.abs(means - values) < 5 * finer.max_error_per_summand / np.sqrt(20_000))


def test_quantize_is_deterministic_given_the_rng() -> None:
    qrange = QuantizationRange(clip=0.5, max_summands=10)
    x = np.random.default_rng(0).normal(0, 0.2, 1000).astype(np.float32)
    a = quantize(x, qrange, rng=np.random.default_rng(11))
    b = quantize(x, qrange, rng=np.random.default_rng(11))
    assert np.array_equal(a, b)


def test_range_validation_names_the_field() -> None:
    for kwargs, field in [
        ({"clip": 0.0, "max_summands": 1}, "clip"),
        ({"clip": float("inf"), "max_summands": 1}, "clip"),
        ({"clip": 1.0, "max_summands": 0}, "max_summands"),
        ({"clip": 1.0, "max_summands": 300, "bits": 8}, "max_summands"),
        ({"clip": 1.0, "max_summands": 2, "bits": 33}, "bits"),
    ]:
        with pytest.raises(ValueError, match=field):
            QuantizationRange(**kwargs)
    qrange = QuantizationRange(clip=1.0, max_summands=4)
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([0.0, np.nan]), qrange, rng=np.random.default_rng())
    with pytest.raises(ValueError, match="summands"):
        dequantize_sum(np.zeros(3, np.uint32), qrange, 5)
    with pytest.raises(ValueError, match="total"):
        dequantize_sum(np.zeros(3, np.int64), qrange, 2)
    with pytest.raises(ValueError, match="total"):  # more than 2 summands could have produced
        dequantize_sum(np.full(3, 2 * qrange.max_level + 1, np.uint32), qrange, 2)


# -- weighted FedAvg ---------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    counts=st.lists(st.integers(0, 1000), min_size=1, max_size=8).filter(lambda c: sum(c) > 0),
    size=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_weighted_sum_recovers_the_sample_weighted_mean(
    counts: list[int], size: int, seed: int
) -> None:
    cap = 1000
    qrange = QuantizationRange(clip=1.0, max_summands=len(counts))
    rng = np.random.default_rng(seed)
    deltas = [rng.uniform(-1, 1, size).astype(np.float32) for _ in counts]
    total = np.zeros(size + 1, dtype=np.uint32)
    for delta, n in zip(deltas, counts, strict=True):
        enc = encode_weighted_update(delta, n, sample_cap=cap, qrange=qrange, rng=rng)
        assert enc.shape == (size + 1,) and enc.dtype == np.uint32
        total += enc
    mean, samples = decode_weighted_sum(total, sample_cap=cap, qrange=qrange, summands=len(counts))
    k = len(counts)
    weight = sum(counts) / cap
    err = k * qrange.max_error_per_summand
    assert abs(samples - sum(counts)) <= err * cap / qrange.clip + 1e-9
    exact = sum(d.astype(np.float64) * n for d, n in zip(deltas, counts, strict=True)) / sum(counts)
    # |num/W' - N/W| <= (|num - N| + |N/W| |W - W'|) / W'  with both errors <= err.
    bound = (err + np.abs(exact) * err) / (weight - err) + 1e-12
    assert mean.dtype == np.float64
    assert np.all(np.abs(mean - exact) <= bound)


def test_weighted_update_rejects_counts_over_the_cap_and_empty_sums() -> None:
    qrange = QuantizationRange(clip=1.0, max_summands=3)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_samples"):
        encode_weighted_update(np.zeros(4, np.float32), 101, sample_cap=100, qrange=qrange, rng=rng)
    with pytest.raises(ValueError, match="num_samples"):
        encode_weighted_update(np.zeros(4, np.float32), -1, sample_cap=100, qrange=qrange, rng=rng)
    with pytest.raises(ValueError, match="delta"):
        encode_weighted_update(np.array([np.inf]), 1, sample_cap=100, qrange=qrange, rng=rng)
    zero = encode_weighted_update(
        np.zeros(4, np.float32), 0, sample_cap=100, qrange=qrange, rng=rng
    )
    with pytest.raises(ValueError, match="no samples"):
        decode_weighted_sum(zero, sample_cap=100, qrange=qrange, summands=1)


def test_weight_is_masked_together_with_the_update() -> None:
    # The last element carries n / cap: a full-cap client at +clip, an empty one at 0 offset.
    qrange = QuantizationRange(clip=2.0, max_summands=2)
    rng = np.random.default_rng(0)
    full = encode_weighted_update(
        np.zeros(3, np.float32), 50, sample_cap=50, qrange=qrange, rng=rng
    )
    assert full[-1] == qrange.max_level
    half = encode_weighted_update(np.ones(3, np.float32), 25, sample_cap=50, qrange=qrange, rng=rng)
    mean, samples = decode_weighted_sum(full + half, sample_cap=50, qrange=qrange, summands=2)
    assert samples == pytest.approx(75, abs=1e-6)
    assert np.allclose(mean, 25 / 75, atol=1e-6)
