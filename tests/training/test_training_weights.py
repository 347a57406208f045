"""Weights as float32 numpy: round trips, BatchNorm counters, flatten, FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from node.training.model import build_model
from node.training.weights import (
    add,
    flatten,
    get_weights,
    set_weights,
    subtract,
    unflatten,
    weight_spec,
    weighted_average,
)


def _bn_model():
    return build_model("cnn", "cvb", 28, seed=0, width=8, norm="batch")


def test_get_weights_is_float32_in_state_dict_order_without_counters() -> None:
    model = _bn_model()
    w = get_weights(model)
    state_keys = list(model.state_dict())
    assert list(w) == [k for k in state_keys if not k.endswith("num_batches_tracked")]
    assert any(k.endswith("running_var") for k in w)
    assert all(a.dtype == np.float32 for a in w.values())
    # copies, not views: changing the model later does not change what was taken
    with torch.no_grad():
        model.conv1.weight.add_(1.0)
    assert not np.array_equal(w["conv1.weight"], model.conv1.weight.detach().numpy())


def test_round_trip_reproduces_the_model_exactly() -> None:
    src, dst = _bn_model(), build_model("cnn", "cvb", 28, seed=1, width=8, norm="batch")
    src.train()
    src(torch.rand(8, 1, 28, 28))  # move BN running statistics off their defaults
    set_weights(dst, get_weights(src))
    src.eval()
    dst.eval()
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(src(x), dst(x))
    # the local step counter stays the receiver's own
    assert int(dst.norm1.num_batches_tracked) == 0
    assert int(src.norm1.num_batches_tracked) == 1


def test_set_weights_refuses_a_bad_dict_without_touching_the_model() -> None:
    model = _bn_model()
    before = get_weights(model)
    good = get_weights(model)
    bad_shape = dict(good, **{"classifier.bias": np.zeros(3, np.float32)})
    bad_shape["conv1.weight"] = good["conv1.weight"] + 1  # would be copied first
    with pytest.raises(ValueError, match=r"classifier\.bias"):
        set_weights(model, bad_shape)
    missing = {k: v for k, v in good.items() if k != "norm1.running_mean"}
    with pytest.raises(ValueError, match="missing"):
        set_weights(model, missing)
    with pytest.raises(ValueError, match="unknown"):
        set_weights(model, dict(good, extra=np.zeros(1, np.float32)))
    nan = dict(good, **{"conv1.weight": np.full_like(good["conv1.weight"], np.nan)})
    with pytest.raises(ValueError, match="NaN"):
        set_weights(model, nan)
    after = get_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


shapes = st.lists(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5), max_size=6)


@settings(max_examples=80, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**31))
def test_flatten_unflatten_round_trip(shapes: list[tuple[int, ...]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    vec = flatten(weights)
    assert vec.dtype == np.float32
    assert vec.size == sum(a.size for a in weights.values())
    for spec in (weights, weight_spec(weights)):
        back = unflatten(vec, spec)
        assert list(back) == list(weights)
        for k in weights:
            assert back[k].shape == weights[k].shape
            assert np.array_equal(back[k], weights[k])
    with pytest.raises(ValueError, match="entries"):
        unflatten(np.zeros(vec.size + 1, np.float32), weights)


def test_flatten_of_a_model_matches_its_parameters() -> None:
    model = _bn_model()
    vec = flatten(get_weights(model))
    n_float = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert vec.size == n_float
    assert np.array_equal(
        vec[: model.conv1.weight.numel()], model.conv1.weight.detach().numpy().ravel()
    )


def test_weighted_average_and_deltas() -> None:
    a = {"x": np.array([1.0, 2.0], np.float32)}
    b = {"x": np.array([3.0, 6.0], np.float32)}
    avg = weighted_average([a, b], [1, 3])
    assert np.allclose(avg["x"], [2.5, 5.0])
    assert avg["x"].dtype == np.float32
    d = subtract(b, a)
    assert np.array_equal(add(a, d)["x"], b["x"])
    with pytest.raises(ValueError):
        weighted_average([a], [1, 2])
    with pytest.raises(ValueError):
        weighted_average([a, b], [0, 0])
