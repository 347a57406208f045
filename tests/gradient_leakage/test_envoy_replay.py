"""The attack replays the envoy's own local training, exactly, and inverts through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradient_leakage.attacks import InvertingGradients, gradient_distance, infer_labels
from gradient_leakage.metrics import psnr
from gradient_leakage.observation import Observation, simulate
from node.attack.deployed import load_deployment, observe_group
from node.attack.replay import EnvoyProgram, EnvoyRecipe, fed_batches, replay, victim_update
from node.training.data import load_pneumoniamnist
from node.training.model import build_model
from node.training.privacy import DPConfig
from node.training.train import train_local
from protocol.messages import TrainPlan
from tests.datafiles import PNEUMONIAMNIST
from tests.gradient_leakage.leakage_models import SIZE, TinyCNN, smooth_images

DEPLOYED = TrainPlan(
    local_epochs=1, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4, kl_beta=0.01,
    augment=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def xrays() -> tuple[np.ndarray, np.ndarray]:
    ds = load_pneumoniamnist(PNEUMONIAMNIST)
    return ds.test.images[:70], ds.test.labels[:70]


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    errors = [float((a[k].detach() - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in b]
    return max(errors, default=0.0)


@pytest.mark.parametrize(
    ("defense", "norm", "n", "epochs"),
    [
        ("cvb", "batch", 8, 1),  # the deployed model, one step of 8
        ("cvb", "batch", 64, 1),  # two full steps: momentum carries over
        ("none", "group", 33, 1),  # a lone last sample folded into the batch
        ("precode", "batch", 5, 2),  # two epochs, reshuffled and re-augmented
    ],
)
def test_replay_equals_train_local(
    xrays: tuple[np.ndarray, np.ndarray], defense: str, norm: str, n: int, epochs: int
) -> None:
    images, labels = xrays[0][:n], xrays[1][:n]
    model = build_model("cnn", defense, 28, norm=norm, seed=0)
    recipe = EnvoyRecipe.deployed(TrainPlan(**{**_plan_fields(DEPLOYED), "local_epochs": epochs}))
    params, buffers = victim_update(model, images, labels, recipe, seed=1234)
    fed = fed_batches(model, images, labels, recipe, seed=1234)
    assert fed.sizes == tuple(recipe.schedule(n)) and sum(fed.sizes) == n * epochs
    assert sorted(fed.index[:n].tolist()) == list(range(n))  # each image once per epoch
    model.train()
    got = replay(model, fed.images, fed.labels, recipe, fed.sizes, noise_seed=1235)
    # Float-level differences grow with the steps (the recipe is not smooth: clipping, the
    # bottleneck's clamp, ReLU patterns), yet stay far below any attack's resolution.
    assert _relative_error(got.params, params) < 2e-3
    assert _relative_error(got.buffers, buffers) < 1e-4
    assert set(got.buffers) == ({k for k in buffers} if norm == "batch" else set())


def _plan_fields(plan: TrainPlan) -> dict:
    return {f: getattr(plan, f) for f in plan.__struct_fields__}


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(SIZE * SIZE, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 80),
    batch=st.integers(1, 40),
    epochs=st.integers(1, 3),
)
def test_schedule_is_how_train_local_cuts_batches(n: int, batch: int, epochs: int) -> None:
    plan = TrainPlan(local_epochs=epochs, batch_size=batch, lr=0.01, augment=False)
    recipe = EnvoyRecipe(plan, class_weighting="none", max_grad_norm=None)
    sizes = recipe.schedule(n)
    images = torch.rand(n, 1, SIZE, SIZE)
    result = train_local(
        _Tiny(), images, np.zeros(n, np.int64), plan, seed=0, class_weighting="none"
    )
    assert len(sizes) == result.steps and sum(sizes) == n * epochs
    assert all(s >= 1 for s in sizes) and (n == 1 or min(sizes) >= 2 or batch == 1)


def test_recipe_follows_train_local_defaults() -> None:
    recipe = EnvoyRecipe.deployed(DEPLOYED)
    assert (recipe.class_weighting, recipe.flip, recipe.max_grad_norm, recipe.augment_strength) == (
        "balanced", True, 5.0, 1.0,
    )  # fmt: skip


def test_inverting_gradients_through_the_envoy_recipe() -> None:
    # A smooth tiny CNN (sigmoids) and one envoy training on one image with the whole
    # recipe: the attack, replaying it, recovers the image the envoy fed.
    model = TinyCNN(seed=3)
    model.image_size, model.num_classes = SIZE, 2
    plan = TrainPlan(local_epochs=1, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4)
    recipe = EnvoyRecipe.deployed(plan)
    x, y = smooth_images(1, seed=4), np.array([1])
    params, _ = victim_update(model, x, y, recipe, seed=9)
    fed = fed_batches(model, x, y, recipe, seed=9).images
    program = EnvoyProgram(recipe, images_per_envoy=1, buffers=False)
    obs = Observation.of_program(program, params)
    assert infer_labels(model, obs, (1, SIZE, SIZE)).tolist() == [1]
    attack = InvertingGradients(iterations=400, lr=0.1, tv_weight=0.0, init="rand")
    rec = attack.reconstruct(model, obs, (1, SIZE, SIZE), seed=0)
    assert psnr(rec.images.clamp(0, 1), fed).item() > 30


@pytest.fixture(scope="module")
def deployed_cvb():
    deployment = load_deployment()  # configs/director.toml: batch norm + CVB, round 1
    return deployment, deployment.build_model()


def test_the_deployment_is_the_director_config(deployed_cvb) -> None:
    deployment, model = deployed_cvb
    assert deployment.defense == "cvb" and deployment.norm == "batch"
    assert deployment.round == 1
    plan = deployment.recipe.plan
    assert (plan.kl_beta, plan.lr, plan.batch_size, plan.momentum) == (0.01, 0.05, 32, 0.9)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_the_oracle_alone_replays_the_victims_noise(deployed_cvb, xrays) -> None:
    deployment, model = deployed_cvb
    x = xrays[0][:2].astype(np.float32)[:, None] / 255
    victims = observe_group(deployment, model, "update", x, xrays[1][:2], group=0, seed=5)
    obs, names = victims.observation, list(victims.observation.target)
    y = torch.from_numpy(xrays[1][:2])[torch.from_numpy(victims.fed_index)]
    model.train()
    exact = simulate(model, victims.fed, y, obs, names=names, oracle=True, create_graph=False)
    assert float(gradient_distance(exact, obs.target, names, "cosine").detach()) < 1e-5
    fresh = simulate(model, victims.fed, y, obs, names=names, create_graph=False)
    assert float(gradient_distance(fresh, obs.target, names, "cosine").detach()) > 1e-3
    with pytest.raises(ValueError, match="noise seeds"):
        simulate(
            model, victims.fed, y, Observation.of_program(obs.program, obs.target), oracle=True
        )


def test_threats_observe_what_they_say(deployed_cvb, xrays) -> None:
    deployment, model = deployed_cvb
    x = xrays[0][:4].astype(np.float32)[:, None] / 255
    y = xrays[1][:4]
    plain = observe_group(deployment, model, "update", x, y, group=1, seed=0).observation
    with_bn = observe_group(deployment, model, "update+bn", x, y, group=1, seed=0).observation
    params = {n for n, _ in model.named_parameters()}
    assert set(plain.target) == params
    assert set(with_bn.target) - params == {
        n for n, b in model.named_buffers() if b.is_floating_point()
    }
    for n in params:  # the same secrets, the same update
        assert torch.equal(plain.target[n], with_bn.target[n])
    agg = observe_group(deployment, model, "aggregate", x, y, group=1, seed=0, envoys=2)
    parts = [
        victim_update(model, x[e * 2 : e * 2 + 2], y[e * 2 : e * 2 + 2], deployment.recipe, s - 1)
        for e, s in enumerate(agg.observation.noise_seeds)
    ]
    for n in params:
        mean = (parts[0][0][n] + parts[1][0][n]) / 2
        assert torch.allclose(agg.observation.target[n], mean, atol=1e-7)
    assert agg.fed.shape[0] == 4 and sorted(agg.fed_index.tolist()) == [0, 1, 2, 3]


def test_labels_come_off_the_recipe_update(deployed_cvb, xrays) -> None:
    # One image per envoy: momentum, weight decay, clipping and class weights do not hide
    # the label (the output bias still moves against it).
    deployment, model = deployed_cvb
    for i in range(6):
        x = xrays[0][i : i + 1].astype(np.float32)[:, None] / 255
        victims = observe_group(
            deployment, model, "update", x, xrays[1][i : i + 1], group=i, seed=0
        )
        assert infer_labels(model, victims.observation, (1, 28, 28)).tolist() == [xrays[1][i]]


@pytest.mark.parametrize("clip", [1e6, 0.5])
def test_replay_equals_dp_training_without_its_noise(
    xrays: tuple[np.ndarray, np.ndarray], clip: float
) -> None:
    # DP-SGD with every record in the one step: per-record clipping, the bottleneck's noise
    # drawn for the batch as the DP trainer draws it; the DP noise itself (sigma 0 here) is
    # the victim's secret, which the replay leaves at its mean.
    images, labels = xrays[0][:8], xrays[1][:8]
    model = build_model("cnn", "cvb", 28, norm="group", seed=0)
    dp = DPConfig(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=1.0)
    recipe = EnvoyRecipe.deployed(DEPLOYED, dp)
    params, _ = victim_update(model, images, labels, recipe, seed=11)
    fed = fed_batches(model, images, labels, recipe, seed=11)
    assert fed.sizes == (8,)
    model.train()
    got = replay(model, fed.images, fed.labels, recipe, fed.sizes, noise_seed=12)
    assert _relative_error(got.params, params) < 2e-3
    with pytest.raises(ValueError, match="sample rate 1"):
        EnvoyRecipe.deployed(DEPLOYED, DPConfig(noise_multiplier=1.0, sample_rate=0.5))
