"""The update format: what an envoy masks, and what the director reads from the unmasked sum."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.messages import MAX_ATTEMPTS
from protocol.secagg.messages import SecAggParams
from protocol.secagg.update import (
    EXTRA,
    SAMPLE_CAP,
    Layout,
    UpdateFormatError,
    decode_update,
    encode_update,
    qrange_for,
    secagg_session,
)

PARAMS = SecAggParams(graph="complete", k=4, t=3, clip=0.5, malicious=True)

shapes = st.lists(
    st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=4,
)


def weights_of(shape_list: list[tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    return {
        f"layer{i}.w": gen.uniform(-1, 1, shape).astype(np.float32)
        for i, shape in enumerate(shape_list)
    }


@given(shapes, st.integers(0, 2**16))
def test_flatten_then_unflatten_is_the_identity(shape_list, seed):
    weights = weights_of(shape_list, seed)
    layout = Layout.of(weights)
    flat = layout.flatten(weights)
    assert flat.shape == (layout.size,) and layout.vector_length == layout.size + EXTRA
    back = layout.unflatten(flat)
    assert list(back) == list(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value)


def test_flatten_refuses_other_names_order_or_shapes():
    weights = weights_of([(2, 3), (4,)], 0)
    layout = Layout.of(weights)
    renamed = {"other": weights["layer0.w"], "layer1.w": weights["layer1.w"]}
    reordered = dict(reversed(list(weights.items())))
    reshaped = {"layer0.w": weights["layer0.w"].reshape(3, 2), "layer1.w": weights["layer1.w"]}
    for bad in (renamed, reordered, reshaped):
        with pytest.raises(UpdateFormatError):
            layout.flatten(bad)


def _round(deltas, samples, losses, seed=0):
    layout = Layout.of(deltas[0])
    qrange = qrange_for(PARAMS, len(deltas))
    gen = np.random.default_rng(seed)
    vectors = [
        encode_update(layout, d, n, loss, qrange, gen)
        for d, n, loss in zip(deltas, samples, losses, strict=True)
    ]
    for v in vectors:
        assert v.dtype == np.uint32 and v.shape == (layout.vector_length,)
    total = np.sum(vectors, axis=0, dtype=np.uint32)  # what the masks cancel down to
    return layout, qrange, decode_update(layout, total, qrange, len(deltas))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=6),
    seed=st.integers(0, 2**16),
    samples=st.lists(st.integers(min_value=50, max_value=4 * SAMPLE_CAP), min_size=6, max_size=6),
)
def test_the_decoded_sum_is_the_sample_weighted_mean(n, seed, samples):
    gen = np.random.default_rng(seed)
    shape_list = [(3, 2), (5,)]
    # Inside the clip range, so the only error is the quantisation's.
    deltas = [
        {
            k: gen.uniform(-PARAMS.clip, PARAMS.clip, v.shape)
            for k, v in weights_of(shape_list, 0).items()
        }
        for _ in range(n)
    ]
    losses = [float(x) for x in gen.uniform(0, PARAMS.clip, n)]
    counts = samples[:n]
    _layout, qrange, (mean, loss, total_samples) = _round(deltas, counts, losses, seed)
    w = np.array([min(c, SAMPLE_CAP) / SAMPLE_CAP for c in counts])  # bigger envoys are capped
    weight = w.sum()
    # Every summand is off by less than one level; dividing by the (equally noisy) weight sum.
    step = qrange.max_error_per_summand
    tol = 2 * n * step / (weight - n * step / PARAMS.clip)
    for name in mean:
        want = sum(wi * d[name] for wi, d in zip(w, deltas, strict=True)) / weight
        np.testing.assert_allclose(mean[name], want, atol=tol + 1e-6)  # + float32 rounding
    assert loss == pytest.approx(float(np.dot(w, losses) / weight), abs=tol)
    assert total_samples == pytest.approx(
        weight * SAMPLE_CAP, abs=n * step * SAMPLE_CAP / PARAMS.clip
    )


def test_a_non_finite_loss_counts_as_zero_and_never_poisons_the_sum():
    deltas = [{"w": np.full(3, 0.1)}, {"w": np.full(3, 0.3)}]
    _l, _q, (mean, loss, _n) = _round(deltas, [100, 100], [float("nan"), 0.4])
    np.testing.assert_allclose(mean["w"], 0.2, atol=1e-6)
    assert loss == pytest.approx(0.2, abs=1e-6)


def test_decode_refuses_what_is_not_a_sum_of_this_format():
    deltas = [{"w": np.zeros(4)}, {"w": np.zeros(4)}]
    layout, qrange, _ = _round(deltas, [10, 10], [0.0, 0.0])
    with pytest.raises(UpdateFormatError, match="elements"):
        decode_update(layout, np.zeros(layout.vector_length + 1, np.uint32), qrange, 2)
    too_big = np.full(layout.vector_length, 2 * qrange.max_level + 1, np.uint32)
    with pytest.raises(UpdateFormatError):
        decode_update(layout, too_big, qrange, 2)  # more than two encodings can add up to
    with pytest.raises(UpdateFormatError, match="no samples"):
        decode_update(layout, np.zeros(layout.vector_length, np.uint32), qrange, 2)


def test_every_party_derives_the_same_quantisation_range():
    assert qrange_for(PARAMS, 7) == qrange_for(PARAMS, 7)
    assert qrange_for(PARAMS, 7).clip == PARAMS.clip and qrange_for(PARAMS, 7).max_summands == 7
    assert qrange_for(PARAMS, 0).max_summands == 1


@given(st.integers(0, 2**20), st.integers(0, MAX_ATTEMPTS - 1))
def test_secagg_sessions_are_unique_per_round_and_attempt(round, attempt):
    session = secagg_session(round, attempt)
    assert divmod(session, MAX_ATTEMPTS) == (round, attempt)


@pytest.mark.parametrize("attempt", [-1, MAX_ATTEMPTS])
def test_an_attempt_outside_the_range_has_no_session(attempt):
    with pytest.raises(UpdateFormatError):
        secagg_session(3, attempt)


def test_update_format_errors_are_protocol_errors_and_value_errors():
    assert issubclass(UpdateFormatError, ProtocolError)
    assert issubclass(UpdateFormatError, ValueError)
