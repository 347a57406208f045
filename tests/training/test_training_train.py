"""Local training on real PneumoniaMNIST images: learns, is seeded, augments sanely."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from node.training.data import load_pneumoniamnist
from node.training.metrics import binary_metrics
from node.training.model import build_model
from node.training.train import (
    augment_batch,
    class_weights,
    evaluate,
    images_to_tensor,
    predict_scores,
    round_lr,
    train_local,
)
from node.training.weights import get_weights
from protocol.messages import TrainPlan
from tests.datafiles import PNEUMONIAMNIST

NPZ = PNEUMONIAMNIST


@pytest.fixture(scope="module")
def data():
    return load_pneumoniamnist(NPZ)


def _plan(**kw) -> TrainPlan:
    base = dict(local_epochs=1, batch_size=32, lr=0.05, momentum=0.9, kl_beta=0.01, augment=True)
    base.update(kw)
    return TrainPlan(**base)


def test_training_learns_pneumonia_from_real_images(data) -> None:
    model = build_model("cnn", "cvb", 28, seed=0, width=8, norm="batch")
    idx = np.random.default_rng(0).choice(len(data.train), 600, replace=False)
    before = binary_metrics(predict_scores(model, data.val.images), data.val.labels)["auc"]
    result = train_local(
        model, data.train.images[idx], data.train.labels[idx], _plan(local_epochs=3), seed=1
    )
    assert result.num_samples == 600
    assert result.steps == 3 * 19
    assert np.isfinite(result.loss) and result.kl_bits > 0
    after = binary_metrics(predict_scores(model, data.val.images), data.val.labels)["auc"]
    assert after > 0.9 > before


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_training_is_a_function_of_the_seed(data, norm: str) -> None:
    images, labels = data.train.images[:97], data.train.labels[:97]  # 97 = 3 * 32 + 1
    runs = []
    for seed in (3, 3, 4):
        model = build_model("cnn", "cvb", 28, seed=0, width=8, norm=norm)
        torch.manual_seed(seed * 100)  # global RNG state must not matter
        train_local(model, images, labels, _plan(), seed=seed)
        runs.append(get_weights(model))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not np.array_equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_global_rng_is_left_alone(data) -> None:
    model = build_model("cnn", "precode", 28, seed=0, width=8)
    torch.manual_seed(9)
    state = torch.get_rng_state()
    train_local(model, data.train.images[:40], data.train.labels[:40], _plan(), seed=1)
    assert torch.equal(state, torch.get_rng_state())


def test_progress_reports_every_step(data) -> None:
    calls: list[tuple[int, int, float]] = []
    model = build_model("cnn", "none", 28, seed=0, width=8)
    train_local(
        model,
        data.train.images[:70],
        data.train.labels[:70],
        _plan(local_epochs=2, batch_size=16),
        seed=0,
        progress=lambda s, t, loss: calls.append((s, t, loss)),
    )
    assert [c[0] for c in calls] == list(range(1, 11))
    assert {c[1] for c in calls} == {10}
    assert all(np.isfinite(c[2]) for c in calls)


def test_adam_and_plain_sgd_plans_run(data) -> None:
    model = build_model("cnn", "none", 28, seed=0, width=8)

    class AdamPlan:  # a plan carrying the optional optimizer field
        local_epochs, batch_size, lr, momentum, weight_decay = 1, 16, 1e-3, 0.0, 1e-4
        kl_beta, augment, optimizer = 0.0, False, "adam"

    before = get_weights(model)
    train_local(model, data.train.images[:32], data.train.labels[:32], AdamPlan(), seed=0)
    assert any(not np.array_equal(before[k], v) for k, v in get_weights(model).items())
    train_local(model, data.train.images[:32], data.train.labels[:32], _plan(momentum=0.0), seed=0)


def test_divergence_is_reported_not_hidden(data) -> None:
    model = build_model("cnn", "none", 28, seed=0, width=8)
    images = images_to_tensor(data.train.images[:64])
    images[5, 0, 3, 3] = float("nan")  # one bad pixel poisons the loss
    with pytest.raises(FloatingPointError, match="diverged"):
        train_local(model, images, data.train.labels[:64], _plan(augment=False), seed=0)


def test_identity_augmentation_is_the_identity(data) -> None:
    x = images_to_tensor(data.train.images[:8])
    gen = torch.Generator().manual_seed(0)
    same = augment_batch(
        x, 28, gen, max_rotate_deg=0, max_scale=0, max_shift=0, flip=False, jitter=0
    )
    assert torch.allclose(same, x, atol=1e-5)


def test_augmentation_is_mild_and_in_range(data) -> None:
    x = images_to_tensor(data.train.images[:64])
    out = augment_batch(x, 28, torch.Generator().manual_seed(1), flip=False)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)
    # mild: each augmented image still correlates strongly with its original
    a = (out - out.mean((1, 2, 3), keepdim=True)).flatten(1)
    b = (x - x.mean((1, 2, 3), keepdim=True)).flatten(1)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert corr.median() > 0.8
    flipped = augment_batch(
        x,
        28,
        torch.Generator().manual_seed(1),
        max_rotate_deg=0,
        max_scale=0,
        max_shift=0,
        jitter=0,
    )
    n_flipped = sum(torch.allclose(flipped[i], x[i].flip(-1), atol=1e-5) for i in range(64))
    n_same = sum(torch.allclose(flipped[i], x[i], atol=1e-5) for i in range(64))
    assert n_flipped + n_same == 64 and 16 < n_flipped < 48
    assert augment_batch(x, 48, torch.Generator().manual_seed(1)).shape == (64, 1, 48, 48)


def test_balanced_class_weights() -> None:
    w = class_weights(np.array([0, 1, 1, 1]), 2, "balanced")
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3]))
    assert torch.allclose(class_weights(np.array([1, 1]), 2, "balanced"), torch.tensor([0.0, 1.0]))
    assert class_weights(np.array([0, 1]), 2, "none") is None
    with pytest.raises(ValueError, match="class_weighting"):
        class_weights(np.array([0, 1]), 2, "focal")


def test_predictions_and_evaluation_are_deterministic(data) -> None:
    model = build_model("cnn", "cvb", 28, seed=0, width=8)
    a = predict_scores(model, data.val.images[:50])
    b = predict_scores(model, data.val.images[:50])
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() <= 1 and a.shape == (50,)
    assert model.training  # prediction restored the mode
    ev = evaluate(model, data.val.images[:50], data.val.labels[:50], bins=10)
    assert ev.num_samples == 50 and len(ev.hist_negative) == 10
    assert sum(ev.hist_negative) == int(np.sum(data.val.labels[:50] == 0))
    assert sum(ev.hist_positive) == int(np.sum(data.val.labels[:50] == 1))
    assert ev.loss_sum > 0


def test_round_lr_schedule() -> None:
    assert round_lr(0.1, 0, 20) == pytest.approx(0.1)
    assert round_lr(0.1, 19, 20) == pytest.approx(0.005)
    lrs = [round_lr(0.1, r, 20) for r in range(20)]
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert round_lr(0.1, 7, 20, schedule="constant") == 0.1
    with pytest.raises(ValueError):
        round_lr(0.1, 20, 20)


def test_round_lr_holds_the_final_rate_for_an_swa_tail() -> None:
    held = [round_lr(0.1, r, 20, final_fraction=0.2, hold_rounds=5) for r in range(20)]
    assert held[0] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(held[:15]))
    assert held[14:] == [pytest.approx(0.02)] * 6
    # the decay itself is the cosine of a 15-round run
    assert held[:15] == [pytest.approx(round_lr(0.1, r, 15, final_fraction=0.2)) for r in range(15)]
    assert [round_lr(0.1, r, 20) for r in range(20)] == [
        round_lr(0.1, r, 20, hold_rounds=0) for r in range(20)
    ]
    with pytest.raises(ValueError, match="hold_rounds"):
        round_lr(0.1, 0, 20, hold_rounds=20)


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a if "running" not in k)))


def test_fedprox_term_pulls_local_training_towards_the_global_model(data) -> None:
    images, labels = data.train.images[:256], data.train.labels[:256]
    start = get_weights(build_model("cnn", "cvb", 28, seed=0, width=8))
    moved = {}
    for mu in (0.0, 0.0, 1.0, 10.0):
        model = build_model("cnn", "cvb", 28, seed=0, width=8)
        train_local(model, images, labels, _plan(local_epochs=2, lr=0.05), seed=1, prox_mu=mu)
        w = get_weights(model)
        if mu in moved:  # mu = 0 is bit for bit the plain objective
            assert all(np.array_equal(w[k], moved[mu][1][k]) for k in w)
        moved[mu] = (_distance(w, start), w)
    assert moved[10.0][0] < moved[1.0][0] < moved[0.0][0]
    with pytest.raises(ValueError, match="prox_mu"):
        train_local(
            build_model("cnn", "none", 28, width=4), images, labels, _plan(), seed=1, prox_mu=-1
        )


def test_label_smoothing_is_passed_to_the_loss(data) -> None:
    images, labels = data.train.images[:64], data.train.labels[:64]
    losses = []
    for smoothing in (0.0, 0.2):
        model = build_model("cnn", "none", 28, seed=0, width=4)
        res = train_local(
            model, images, labels, _plan(lr=1e-6, augment=False), seed=1, label_smoothing=smoothing
        )
        losses.append(res.loss)
    # At lr ~ 0 the model is the initial one: a near-uniform prediction, whose smoothed
    # cross-entropy differs from the plain one but stays near log 2.
    assert losses[0] != losses[1]
    assert abs(losses[1] - np.log(2)) < 0.2
    with pytest.raises(ValueError, match="label_smoothing"):
        train_local(model, images, labels, _plan(), seed=1, label_smoothing=1.0)


def test_flip_tta_averages_the_logits_of_both_views(data) -> None:
    model = build_model("cnn", "cvb", 28, seed=0, width=8)
    x = images_to_tensor(data.val.images[:37])
    from node.training.train import predict_logits

    plain = predict_logits(model, x)
    mirrored = predict_logits(model, x.flip(-1))
    tta = predict_logits(model, x, batch_size=16, flip_tta=True)
    torch.testing.assert_close(tta, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
    symmetric = (x + x.flip(-1)) / 2
    torch.testing.assert_close(
        predict_logits(model, symmetric, flip_tta=True),
        predict_logits(model, symmetric),
        rtol=1e-5,
        atol=1e-6,
    )
    ev = evaluate(model, data.val.images[:37], data.val.labels[:37], flip_tta=True)
    scores = torch.softmax(tta.double(), 1)[:, 1].numpy()
    np.testing.assert_allclose(predict_scores(model, x, flip_tta=True), scores, rtol=1e-6)
    assert sum(ev.hist_negative) + sum(ev.hist_positive) == 37
