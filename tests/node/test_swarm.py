"""node.swarm's synthetic trainer: a closed-form update, and the poisons of the robustness
tests (tests/integration/test_poisoning.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.swarm import SyntheticTrainer, _poison_arg, parse_poison
from protocol.messages import TrainPlan

WEIGHTS = {
    "a": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "b": np.zeros(2, np.float32),
}
PLAN = TrainPlan(local_epochs=1, batch_size=8, lr=0.1)


def test_honest_update_pulls_every_weight_half_way_to_the_envoys_target():
    t = SyntheticTrainer("envoy-1")
    new, n, loss = t.train(WEIGHTS, PLAN, seed=0)
    for k, w in WEIGHTS.items():
        np.testing.assert_allclose(new[k], w + 0.5 * (t.target - w), rtol=1e-6)
    assert 50 <= n < 500
    assert loss == abs(t.target)
    # Deterministic per envoy id, different between envoys.
    assert SyntheticTrainer("envoy-1").target == t.target != SyntheticTrainer("envoy-2").target


@given(x=st.floats(allow_nan=False, width=32))
def test_add_poison_adds_its_value_to_every_trained_weight(x):
    honest, _, _ = SyntheticTrainer("envoy-3").train(WEIGHTS, PLAN, seed=0)
    poisoned, _, _ = SyntheticTrainer("envoy-3", poison=f"add:{x!r}").train(WEIGHTS, PLAN, seed=0)
    for k in WEIGHTS:
        np.testing.assert_array_equal(poisoned[k], (honest[k] + np.float32(x)).astype(np.float32))


def test_nan_poison_makes_every_weight_nan():
    new, _, _ = SyntheticTrainer("envoy-3", poison="nan").train(WEIGHTS, PLAN, seed=0)
    assert all(np.isnan(w).all() for w in new.values())


def test_poison_specs():
    assert math.isnan(parse_poison("nan"))
    assert parse_poison("add:1e6") == 1e6
    assert parse_poison("add:-inf") == -math.inf
    for bad in ("", "add", "add:", "add:x", "mul:2", "NaN"):
        with pytest.raises(ValueError, match="poison"):
            parse_poison(bad)
    assert _poison_arg("envoy-2=add:5") == ("envoy-2", "add:5")
    assert _poison_arg("envoy-2=masked:max") == ("envoy-2", "masked:max")
    for bad in ("envoy-2", "=nan", "envoy-2=bogus"):
        with pytest.raises(ValueError):
            _poison_arg(bad)
