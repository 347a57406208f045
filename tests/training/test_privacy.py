"""Record-level DP: the accountant, noise calibration, DP-SGD's per-record machinery and
the distributed share of the noise."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from node.training.model import build_model
from node.training.privacy import (
    DPConfig,
    DPTrainResult,
    PrivacyAccountant,
    PrivacyError,
    PrivacySpend,
    calibrate_noise,
    train_local_dp,
)
from node.training.train import train_local
from node.training.weights import get_weights
from protocol.messages import TrainPlan

PLAN = TrainPlan(
    local_epochs=1, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.0, augment=False
)


def data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 28, 28), generator=g), np.arange(n) % 2


def test_batch_norm_is_refused_before_training() -> None:
    model = build_model("cnn", "cvb", 28, norm="batch", seed=0)
    before = get_weights(model)
    x, y = data()
    with pytest.raises(PrivacyError, match="group"):
        train_local(model, x, y, PLAN, seed=0, privacy=DPConfig(noise_multiplier=1.0))
    after = get_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_bad_settings_are_refused() -> None:
    for kwargs in (
        {"noise_multiplier": -1.0},
        {"noise_multiplier": 1.0, "max_grad_norm": 0.0},
        {"noise_multiplier": 1.0, "sample_rate": 1.5},
        {"noise_multiplier": 1.0, "delta": 0.0},
        {"noise_multiplier": 1.0, "accountant": "gdp"},
        {"noise_multiplier": 1.0, "honest_envoys": 3},  # only in distributed mode
        {"noise_multiplier": 1.0, "mode": "distributed", "honest_envoys": 0},
        {"noise_multiplier": 1.0, "physical_batch": 0},
    ):
        with pytest.raises(PrivacyError):
            DPConfig(**kwargs)  # type: ignore[arg-type]


def test_accountant_composes_and_round_trips() -> None:
    acc = PrivacyAccountant("rdp")
    assert acc.epsilon(1e-5) == 0.0
    spend = PrivacySpend(noise_multiplier=1.2, sample_rate=0.05, steps=20, own_noise_multiplier=1.2)
    eps = []
    for _ in range(4):
        acc.record(spend)
        eps.append(acc.epsilon(1e-5))
    assert acc.history == [(1.2, 0.05, 80)] and acc.steps == 80
    assert all(a < b for a, b in itertools.pairwise(eps))  # every round spends more
    again = PrivacyAccountant("rdp", json.loads(json.dumps(acc.history)))
    assert again.epsilon(1e-5) == pytest.approx(eps[-1])
    assert acc.epsilon(1e-3) < acc.epsilon(1e-5)  # a looser delta, a smaller epsilon
    noisier = PrivacyAccountant("rdp", [(2.4, 0.05, 80)])
    assert noisier.epsilon(1e-5) < eps[-1]
    assert PrivacyAccountant("rdp", [(0.0, 0.05, 1)]).epsilon(1e-5) == math.inf


def test_rdp_and_prv_agree_roughly_and_prv_is_tighter() -> None:
    history = [(1.0, 0.05, 400)]
    rdp = PrivacyAccountant("rdp", history).epsilon(1e-5)
    prv = PrivacyAccountant("prv", history).epsilon(1e-5)
    assert prv <= rdp * 1.02 and prv > 0.6 * rdp


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrated_noise_meets_the_target_and_no_less_would(target: float) -> None:
    sigma = calibrate_noise(target, delta=1e-5, sample_rate=0.034, steps=600)
    spent = PrivacyAccountant("rdp", [(sigma, 0.034, 600)]).epsilon(1e-5)
    assert target - 0.02 <= spent <= target
    less = PrivacyAccountant("rdp", [(sigma * 0.97, 0.034, 600)]).epsilon(1e-5)
    assert less > target


def test_without_noise_or_clipping_dp_sgd_is_sgd() -> None:
    # sigma 0, a clip nothing reaches, every record sampled: DP-SGD's per-record gradients,
    # summed and divided by the batch, are the mean gradient, and the step is plain SGD.
    # (No bottleneck: its noise would be drawn for the records in another order.)
    x, y = data(32)
    plan = TrainPlan(
        local_epochs=1, batch_size=32, lr=0.1, momentum=0.0, weight_decay=0.0, augment=False
    )
    reference = build_model("cnn", "none", 28, norm="group", seed=1)
    private = build_model("cnn", "none", 28, norm="group", seed=1)
    train_local(reference, x, y, plan, seed=3, class_weighting="none", max_grad_norm=None)
    dp = DPConfig(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=1.0)
    result = train_local(private, x, y, plan, seed=3, privacy=dp)
    assert isinstance(result, DPTrainResult) and result.steps == 1 and result.sampled == [32]
    a, b = get_weights(reference), get_weights(private)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5


@settings(max_examples=8, deadline=None)
@given(physical=st.integers(min_value=1, max_value=40), sigma=st.sampled_from([0.0, 1.0]))
@example(physical=5, sigma=1.0)
def test_a_step_in_pieces_is_the_step_in_one_pass(physical: int, sigma: float) -> None:
    # Per-record clips summed piece by piece, then noised once from the same generator:
    # the same step as one pass over the batch, whatever the piece size.
    x, y = data(32)
    plan = TrainPlan(
        local_epochs=1, batch_size=32, lr=0.1, momentum=0.9, weight_decay=0.0, augment=False
    )
    models = []
    for pb in (1000, physical):
        model = build_model("cnn", "none", 28, norm="group", seed=1)
        dp = DPConfig(noise_multiplier=sigma, max_grad_norm=0.5, sample_rate=1.0, physical_batch=pb)
        noise = torch.Generator().manual_seed(11)
        result = train_local_dp(model, x, y, plan, dp, seed=3, noise=noise)
        assert result.sampled == [32] and result.steps == 1
        models.append(get_weights(model))
    a, b = models
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5


def test_every_record_is_clipped_to_the_bound() -> None:
    x, y = data(48)
    model = build_model("cnn", "none", 28, norm="group", seed=0)
    before = get_weights(model)
    dp = DPConfig(noise_multiplier=0.0, max_grad_norm=1e-3, sample_rate=1.0)
    plan = TrainPlan(local_epochs=1, batch_size=48, lr=1.0, momentum=0.0, augment=False)
    result = train_local_dp(model, x, y, plan, dp, seed=0)
    assert result.clipped_fraction == 1.0
    after = get_weights(model)
    step = math.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k in before))
    # The mean of 48 gradients each of norm 1e-3 moves the weights by at most lr * 1e-3.
    assert 0 < step <= 1e-3 * (1 + 1e-4)


def test_the_distributed_share_of_the_noise() -> None:
    # One step where (almost) only noise moves the weights: its spread is the envoy's
    # share, sigma C / sqrt(t), over the expected batch, times lr (1 + momentum).
    sigma, clip, t, q = 2.0, 1e-4, 4, 0.5
    dp = DPConfig(
        noise_multiplier=sigma,
        max_grad_norm=clip,
        sample_rate=q,
        mode="distributed",
        honest_envoys=t,
    )
    assert dp.own_noise_multiplier == pytest.approx(1.0)
    x, y = data(64)
    model = build_model("cnn", "none", 28, norm="group", seed=0)
    before = get_weights(model)
    plan = TrainPlan(local_epochs=3, batch_size=16, lr=0.1, momentum=0.9, augment=False)
    result = train_local_dp(model, x, y, plan, dp, seed=0)
    assert result.steps == 1  # distributed mode: one DP-SGD step a round, whatever the plan
    assert result.spend == PrivacySpend(
        noise_multiplier=2.0, sample_rate=q, steps=1, own_noise_multiplier=1.0
    )
    after = get_weights(model)
    moves = np.concatenate(
        [(after[k] - before[k]).ravel() for k in before if "conv" in k or "features" in k]
    )
    expected = plan.lr * (1 + plan.momentum) * sigma / math.sqrt(t) * clip / (q * 64)
    assert float(moves.std()) == pytest.approx(expected, rel=0.05)


def test_local_rounds_spend_what_the_accountant_says() -> None:
    x, y = data(64)
    model = build_model("cnn", "cvb", 28, norm="group", seed=0)
    dp = DPConfig(noise_multiplier=1.5, max_grad_norm=1.0)
    result = train_local(model, x, y, PLAN, seed=1, privacy=dp)
    assert result.spend is not None
    assert result.spend.sample_rate == 16 / 64 and result.steps == 4 == len(result.sampled)
    acc = PrivacyAccountant("rdp")
    acc.record(result.spend)
    assert acc.history == [(1.5, 0.25, 4)]
    # The model is a plain module again: no Opacus hooks left behind.
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    assert not any(getattr(m, h, None) for m in model.modules() for h in hooks)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
