"""The update format: what an envoy masks, and what the director reads from the unmasked sum."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.messages import MAX_ATTEMPTS
from protocol.secagg.common import EVALUATE, PURPOSES
from protocol.secagg.messages import SecAggParams
from protocol.secagg.update import (
    EXTRA,
    SAMPLE_CAP,
    AggregateOutOfRange,
    Layout,
    UpdateFormatError,
    UpdateNotFinite,
    clip_to_norm,
    decode_update,
    encode_update,
    qrange_for,
    secagg_session,
    update_norm,
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


@given(st.integers(0, 2**20), st.integers(0, MAX_ATTEMPTS - 1), st.sampled_from(PURPOSES))
def test_secagg_sessions_are_unique_per_round_attempt_and_purpose(round, attempt, purpose):
    session = secagg_session(round, attempt, purpose)
    try_number, is_evaluation = divmod(session, 2)
    assert divmod(try_number, MAX_ATTEMPTS) == (round, attempt)
    assert is_evaluation == (purpose == EVALUATE)


@pytest.mark.parametrize("attempt", [-1, MAX_ATTEMPTS])
def test_an_attempt_outside_the_range_has_no_session(attempt):
    with pytest.raises(UpdateFormatError):
        secagg_session(3, attempt)


def test_update_format_errors_are_protocol_errors_and_value_errors():
    assert issubclass(UpdateFormatError, ProtocolError)
    assert issubclass(UpdateFormatError, ValueError)


# -- issue #11, point 10: robustness of the sum -------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    scale=st.floats(1e-6, 1e6),
    bound=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_clipping_bounds_the_norm_and_keeps_what_is_within(scale, bound, seed):
    gen = np.random.default_rng(seed)
    delta = {"a": gen.normal(0, scale, (3, 4)), "b": gen.normal(0, scale, 5)}
    clipped, before = clip_to_norm(delta, bound)
    assert before == pytest.approx(update_norm(delta))
    after = update_norm(clipped)
    assert after <= bound * (1 + 1e-9)
    if before <= bound:
        for k in delta:
            np.testing.assert_array_equal(clipped[k], delta[k])
    else:
        assert after == pytest.approx(bound)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_update_is_a_named_error(bad):
    delta = {"w": np.array([0.1, bad, 0.2])}
    with pytest.raises(UpdateNotFinite, match="'w'"):
        update_norm(delta)
    with pytest.raises(UpdateNotFinite):
        encode_update(
            Layout.of(delta), delta, 10, 0.0, qrange_for(PARAMS, 2), np.random.default_rng()
        )


def _encode_raw(layout, payload, qrange):
    from crypto.quantize import quantize

    return quantize(np.asarray(payload, np.float64), qrange, rng=np.random.default_rng(0))


def test_an_aggregate_outside_what_honest_updates_give_is_refused():
    """Three honest updates of norm <= 1, and one hostile vector: a weight that cancels the
    others' down to two samples (the mean would grow ~100-fold), or deltas that push the
    mean beyond the bound."""
    weights = {"w": np.zeros(4, np.float32)}
    layout = Layout.of(weights)
    qrange = qrange_for(PARAMS, 4)
    c = qrange.clip
    gen = np.random.default_rng(0)
    honest = [
        encode_update(layout, {"w": np.full(4, 0.4)}, 100, 0.1, qrange, gen) for _ in range(3)
    ]
    total = np.sum(honest, axis=0, dtype=np.uint32)
    # What the three give alone is fine.
    mean, _loss, samples = decode_update(layout, total, qrange, 3, norm_bound=1.0)
    assert samples == pytest.approx(300, abs=0.1)
    tiny = _encode_raw(layout, [0.01 * c] * 4 + [0.0, (2 - 300) / SAMPLE_CAP * c], qrange)
    with pytest.raises(AggregateOutOfRange, match="below one sample"):
        decode_update(layout, total + tiny, qrange, 4, norm_bound=1.0)
    long = _encode_raw(layout, [c] * 4 + [0.0, 100 / SAMPLE_CAP * c], qrange)
    with pytest.raises(AggregateOutOfRange, match="norm"):
        decode_update(layout, total + long, qrange, 4, norm_bound=1.0)
    # Without the bound, the same sum decodes (and would have blown the model up).
    mean, _loss, _n = decode_update(layout, total + long, qrange, 4)
    assert np.linalg.norm(mean["w"]) > 10


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 8),
    classes=st.integers(2, 5),
    bins=st.integers(2, 30),
    seed=st.integers(0, 2**16),
)
@example(m=1, classes=2, bins=2, seed=65536)  # one envoy without a validation image
def test_evaluation_sums_are_exact_and_refused_out_of_range(m, classes, bins, seed):
    """The evaluation session carries node.training.histograms' vector for any number of
    classes (issue #13's multi-class layout) and sums it exactly."""
    from node.training.histograms import histogram_vector, vector_length
    from protocol.secagg.evaluation import (
        LOSS_CAP,
        EvaluationLayout,
        count_cap,
        decode_evaluation,
        encode_evaluation,
    )

    gen = np.random.default_rng(seed)
    layout = EvaluationLayout(classes, bins)
    assert layout.histogram_length == vector_length(classes, bins)
    hists = []
    for _ in range(m):
        images = int(gen.integers(0, 60))
        probs = gen.dirichlet(np.ones(classes), size=images)
        hists.append(histogram_vector(probs, gen.integers(0, classes, images), bins))
    losses = [float(gen.uniform(0, 2)) * layout.images(h) for h in hists]
    vectors = [
        encode_evaluation(layout, h, loss, participants=m, rng=gen)
        for h, loss in zip(hists, losses, strict=True)
    ]
    total = np.sum(vectors, axis=0, dtype=np.uint32)
    got = decode_evaluation(layout, total, participants=m, summands=m)
    np.testing.assert_array_equal(got.histograms, np.sum(hists, axis=0))
    assert got.num_samples == sum(layout.images(h) for h in hists)
    step = count_cap(m) * LOSS_CAP / (2**32 // m)  # one quantisation level of the loss
    assert got.loss_sum == pytest.approx(sum(losses), abs=2 * m * step + 1e-6)
    inflated = total.copy()
    # One image more than m envoys may hold between them (the sum may hold no image at all).
    inflated[0] += np.uint32(m * count_cap(m) + 1)
    with pytest.raises(AggregateOutOfRange):
        decode_evaluation(layout, inflated, participants=m, summands=m)
    if classes > 2:
        # One class's pair counting an image the others do not: no honest sum looks so.
        skewed = total.copy()
        skewed[2 * bins] += np.uint32(1)
        with pytest.raises(AggregateOutOfRange):
            decode_evaluation(layout, skewed, participants=m, summands=m)
