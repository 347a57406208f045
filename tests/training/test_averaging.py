"""Averaging over rounds: the window, the weight average and the ensemble of the last k models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from node.training.averaging import RecentModels, average_weights, ensemble_logits
from node.training.model import build_model
from node.training.train import predict_logits
from node.training.weights import get_weights, set_weights


def _models(n: int) -> list[dict[str, np.ndarray]]:
    return [get_weights(build_model("cnn", "cvb", 28, width=4, seed=s)) for s in range(n)]


def test_average_is_the_elementwise_mean() -> None:
    ws = _models(3)
    avg = average_weights(ws)
    for k in ws[0]:
        np.testing.assert_allclose(
            avg[k], np.mean([w[k] for w in ws], axis=0), rtol=1e-6, atol=1e-7
        )
    same = average_weights([ws[0]] * 4)
    for k in ws[0]:
        np.testing.assert_allclose(same[k], ws[0][k], rtol=1e-6)
    with pytest.raises(ValueError):
        average_weights([])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(1, 3), min_size=1, max_size=12))
def test_window_keeps_the_newest_rounds(capacity: int, gaps: list[int]) -> None:
    window = RecentModels(capacity)
    rounds = list(np.cumsum(gaps))
    for r in rounds:
        window.push(int(r), {"x": np.full(2, float(r), np.float32)})
    kept = rounds[-capacity:]
    assert window.rounds == kept and len(window) == len(kept)
    for k in range(1, len(kept) + 1):
        assert [float(w["x"][0]) for w in window.last(k)] == [float(r) for r in kept[-k:]]
        np.testing.assert_allclose(window.average(k)["x"], np.mean(kept[-k:]), rtol=1e-6)
    with pytest.raises(ValueError):
        window.last(len(kept) + 1)
    with pytest.raises(ValueError, match="not after"):
        window.push(int(rounds[-1]), {"x": np.zeros(2, np.float32)})


def test_window_copies_what_it_is_given() -> None:
    window = RecentModels(2)
    w = {"x": np.zeros(2, np.float32)}
    window.push(0, w)
    w["x"][:] = 5
    assert window.last(1)[0]["x"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        RecentModels(0)


def test_ensemble_of_one_is_the_member_and_restores_the_template() -> None:
    ws = _models(3)
    model = build_model("cnn", "cvb", 28, width=4, seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(6, 1, 28, 28)
    out = ensemble_logits(model, ws[:1], x)
    set_weights(model, ws[0])
    np.testing.assert_allclose(
        out.exp().numpy(), torch.softmax(predict_logits(model, x).double(), 1).numpy(), rtol=1e-6
    )
    model.load_state_dict(before)
    both = ensemble_logits(model, ws[1:], x, flip_tta=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    probs = []
    for w in ws[1:]:
        set_weights(model, w)
        probs.append(torch.softmax(predict_logits(model, x, flip_tta=True).double(), 1))
    np.testing.assert_allclose(both.exp().numpy(), ((probs[0] + probs[1]) / 2).numpy(), rtol=1e-6)
    with pytest.raises(ValueError):
        ensemble_logits(model, [], x)
