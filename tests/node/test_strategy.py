"""Server optimisers against hand-written update rules, their state round trip, and their config."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from node.strategy import (
    STRATEGIES,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    StrategyConfig,
    build_strategy,
    is_buffer_name,
)
from protocol.configfile import ConfigError, convert_config, parse_toml

finite = st.floats(-5, 5, allow_nan=False, width=32)


def _w(a: np.ndarray, b: float = 0.0) -> dict[str, np.ndarray]:
    return {
        "conv.weight": a.astype(np.float32),
        "bn.running_var": np.full(2, 1.0 + b, np.float32),
    }


deltas = hnp.arrays(np.float32, (3,), elements=finite)


@given(hnp.arrays(np.float32, (3,), elements=finite), deltas)
def test_fedavg_adds_the_mean_update(w: np.ndarray, d: np.ndarray) -> None:
    out = FedAvg().apply(_w(w), _w(d, 0.5))
    np.testing.assert_array_equal(out["conv.weight"], (w.astype(np.float64) + d).astype(np.float32))
    half = FedAvg(server_lr=0.5).apply(_w(w), _w(d))
    np.testing.assert_allclose(half["conv.weight"], w + 0.5 * d, rtol=1e-6, atol=1e-6)


# Magnitudes from subnormal to huge: float64 then float32 must round like float32 addition.
BIG = float(np.float32(1e37))  # sums stay finite in float32
wide = st.floats(-BIG, BIG, allow_nan=False, allow_subnormal=True, width=32)


@given(hnp.arrays(np.float32, (8,), elements=wide), hnp.arrays(np.float32, (8,), elements=wide))
def test_default_fedavg_is_bit_for_bit_the_directors_old_sum(w: np.ndarray, d: np.ndarray) -> None:
    """Before [strategy] the director applied (w + delta).astype(float32) in float32; the
    default strategy must give the same bits, so default federations do not change."""
    s = build_strategy(StrategyConfig(), buffers=["bn.running_var"])
    out = s.apply({"conv.weight": w, "bn.running_var": d}, {"conv.weight": d, "bn.running_var": w})
    np.testing.assert_array_equal(out["conv.weight"], (w + d).astype(np.float32))
    np.testing.assert_array_equal(out["bn.running_var"], (d + w).astype(np.float32))
    assert s.state() == {}


@given(st.lists(deltas, min_size=1, max_size=5), st.floats(0, 0.99))
def test_fedavgm_is_heavy_ball_on_the_pseudo_gradient(steps: list[np.ndarray], beta: float) -> None:
    s = FedAvgM(server_lr=0.7, momentum=beta)
    w = np.zeros(3)
    m = np.zeros(3)
    for d in steps:
        m = beta * m + d.astype(np.float64)
        out = s.apply({"x": w.astype(np.float32)}, {"x": d})
        np.testing.assert_allclose(out["x"], w + 0.7 * m, rtol=1e-5, atol=1e-5)
        w = out["x"].astype(np.float64)


def test_fedavgm_without_momentum_is_fedavg() -> None:
    rng = np.random.default_rng(0)
    a, b = FedAvgM(momentum=0.0), FedAvg()
    w = _w(rng.normal(size=3))
    for _ in range(4):
        d = _w(rng.normal(size=3))
        wa, wb = a.apply(w, d), b.apply(w, d)
        np.testing.assert_array_equal(wa["conv.weight"], wb["conv.weight"])
        w = wa


@given(st.lists(deltas, min_size=1, max_size=4), st.sampled_from(["fedadam", "fedyogi"]))
def test_adaptive_rules_by_hand(steps: list[np.ndarray], name: str) -> None:
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    s = (FedAdam if name == "fedadam" else FedYogi)(eta, b1, b2, tau)
    m, v, w = np.zeros(3), np.full(3, tau**2), np.zeros(3)
    for d in steps:
        d = d.astype(np.float64)
        m = b1 * m + (1 - b1) * d
        if name == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        expected = w + eta * m / (np.sqrt(v) + tau)
        out = s.apply({"x": w.astype(np.float32)}, {"x": d.astype(np.float32)})
        np.testing.assert_allclose(out["x"], expected, rtol=1e-5, atol=1e-6)
        w = out["x"].astype(np.float64)


def test_adaptive_first_step_moves_each_coordinate_by_about_eta() -> None:
    """Sign-like steps: a tiny and a huge coordinate move by comparable amounts."""
    s = FedAdam(server_lr=0.01, beta1=0.0, beta2=0.0, tau=1e-9)
    out = s.apply({"x": np.zeros(2, np.float32)}, {"x": np.array([1e-4, 10.0], np.float32)})
    np.testing.assert_allclose(out["x"], [0.01, 0.01], rtol=1e-3)


@pytest.mark.parametrize("name", STRATEGIES)
def test_buffers_take_the_plain_mean(name: str) -> None:
    s = build_strategy(StrategyConfig(name=name, server_lr=0.3), buffers=["bn.running_var"])
    w = _w(np.ones(3))
    for _ in range(3):
        out = s.apply(w, _w(np.ones(3), 0.25))
        np.testing.assert_array_equal(out["bn.running_var"], w["bn.running_var"] + 1.25)
        w = out
    assert is_buffer_name("features.1.running_mean") and is_buffer_name("norm1.running_var")
    assert not is_buffer_name("features.1.weight")


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(STRATEGIES), st.lists(deltas, min_size=2, max_size=6), st.data())
def test_state_round_trip_resumes_exactly(name: str, steps: list[np.ndarray], data) -> None:
    cut = data.draw(st.integers(1, len(steps) - 1))
    cfg = StrategyConfig(name=name)
    straight = build_strategy(cfg)
    w1 = {"x": np.zeros(3, np.float32)}
    for d in steps:
        w1 = straight.apply(w1, {"x": d})
    first = build_strategy(cfg)
    w2 = {"x": np.zeros(3, np.float32)}
    for d in steps[:cut]:
        w2 = first.apply(w2, {"x": d})
    resumed = build_strategy(cfg)
    resumed.load_state(first.state())
    for d in steps[cut:]:
        w2 = resumed.apply(w2, {"x": d})
    # Bit for bit: the state at rest is float32, in memory as in a checkpoint.
    np.testing.assert_array_equal(w2["x"], w1["x"])
    assert all(v.dtype == np.float32 for v in resumed.state().values())
    for k, v in straight.state().items():
        np.testing.assert_array_equal(resumed.state()[k], v)


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_descends_a_quadratic(name: str) -> None:
    """Envoys that each take one gradient step of f(w) = |w - 3|^2 / 2: the server converges."""
    adaptive = name in ("fedadam", "fedyogi")
    s = build_strategy(StrategyConfig(name=name, server_lr=0.05 if adaptive else None))
    w = {"x": np.zeros(4, np.float32)}
    for _ in range(300):
        w = s.apply(w, {"x": 0.1 * (3.0 - w["x"])})
    np.testing.assert_allclose(w["x"], 3.0, atol=0.1)


def test_mismatched_updates_and_bad_state_are_refused() -> None:
    s = FedAdam()
    with pytest.raises(ValueError, match="differ"):
        s.apply({"x": np.zeros(2)}, {"y": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        s.apply({"x": np.zeros(2)}, {"x": np.zeros(3)})
    with pytest.raises(ValueError, match="no state"):
        s.load_state({"momentum/x": np.zeros(2)})
    with pytest.raises(ValueError, match="finite"):
        s.load_state({"m/x": np.array([np.nan])})
    with pytest.raises(ValueError, match="no state"):
        FedAvg().load_state({"m/x": np.zeros(1)})


def test_state_that_does_not_fit_the_weights_is_refused_and_nothing_loaded() -> None:
    weights = _w(np.zeros(3))
    s = FedAvgM(buffers=["bn.running_var"])
    s.load_state({"momentum/conv.weight": np.ones(3)}, weights)
    for bad, why in [
        ({"momentum/conv.weight": np.ones(4)}, "shape"),
        ({"momentum/fc.weight": np.ones(3)}, "no weight"),
        ({"momentum/bn.running_var": np.ones(2)}, "no weight"),  # buffers are never stepped
    ]:
        with pytest.raises(ValueError, match=why):
            s.load_state({"momentum/conv.weight": np.zeros(3), **bad}, weights)
        np.testing.assert_array_equal(s.state()["momentum/conv.weight"], np.ones(3))
    with pytest.raises(ValueError, match="shape"):
        s.apply(weights, {"conv.weight": np.zeros(4), "bn.running_var": np.zeros(2)})
    np.testing.assert_array_equal(s.state()["momentum/conv.weight"], np.ones(3))


def test_config_from_toml_names_the_bad_field() -> None:
    text = '[strategy]\nname = "fedyogi"\nserver_lr = 0.02\nbeta2 = 0.999\n'
    cfg = convert_config(
        parse_toml(text, source="d.toml")["strategy"], StrategyConfig, source="d.toml"
    )
    assert isinstance(build_strategy(cfg), FedYogi) and build_strategy(cfg).server_lr == 0.02
    assert build_strategy(StrategyConfig(name="fedadam")).server_lr == 0.01
    assert build_strategy(StrategyConfig()).server_lr == 1.0
    with pytest.raises(ConfigError, match=r"d\.toml.*name"):
        convert_config({"name": "fedsgd"}, StrategyConfig, source="d.toml")
    with pytest.raises(ConfigError, match=r"momentum"):
        convert_config({"momentum": 1.0}, StrategyConfig, source="d.toml")
    with pytest.raises(ConfigError, match=r"d\.toml"):
        convert_config({"lr": 1.0}, StrategyConfig, source="d.toml")
