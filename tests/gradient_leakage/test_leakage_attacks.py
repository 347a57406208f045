"""Attacks on tiny undefended models recover the image; threat simulation is exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gradient_leakage.attacks import (
    DLG,
    IDLG,
    AdaptiveAttack,
    AttackProgress,
    InvertingGradients,
    build_attack,
    gradient_distance,
    infer_labels,
    relus_as_softplus,
    total_variation,
)
from gradient_leakage.metrics import psnr
from gradient_leakage.observation import (
    Observation,
    observe,
    parameters_before_bottleneck,
    simulate,
)
from tests.gradient_leakage.leakage_models import SIZE, TinyCNN, TinyMLP, smooth_images

SHAPE = (1, SIZE, SIZE)


def victim(seed: int = 1, label: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return smooth_images(1, seed), torch.tensor([label])


def ig(**kw: object) -> InvertingGradients:
    cfg = {"iterations": 300, "lr": 0.1, "tv_weight": 0.0, "init": "rand"}
    cfg.update(kw)
    return InvertingGradients(**cfg)  # type: ignore[arg-type]


def test_dlg_recovers_image_and_label() -> None:
    model = TinyMLP()
    x, y = victim(label=1)
    rec = DLG(iterations=30).reconstruct(model, observe(model, x, y), SHAPE, seed=0)
    assert psnr(rec.images.clamp(0, 1), x).item() > 40
    assert rec.labels.tolist() == [1]


@pytest.mark.parametrize("label", [0, 1])
def test_idlg_reads_the_label_and_recovers_the_image(label: int) -> None:
    model = TinyMLP()
    x, y = victim(seed=2, label=label)
    rec = IDLG(iterations=30).reconstruct(model, observe(model, x, y), SHAPE, seed=0)
    assert rec.labels.tolist() == [label]
    assert psnr(rec.images.clamp(0, 1), x).item() > 40


def test_inverting_gradients_recovers_from_a_cnn() -> None:
    model = TinyCNN()
    x, y = victim(seed=3)
    rec = ig().reconstruct(model, observe(model, x, y), SHAPE, seed=0)
    assert psnr(rec.images, x).item() > 30
    assert rec.labels.tolist() == [1]


def test_adaptive_attack_without_bottleneck_is_ig_and_recovers() -> None:
    model = TinyCNN()
    x, y = victim(seed=3)
    attack = AdaptiveAttack(iterations=300, lr=0.1, tv_weight=0.0, init="rand")
    assert attack.matched_parameters(model, SHAPE) == [n for n, _ in model.named_parameters()]
    rec = attack.reconstruct(model, observe(model, x, y), SHAPE, seed=0)
    assert psnr(rec.images, x).item() > 30


def test_adaptive_attack_matches_only_layers_before_the_bottleneck() -> None:
    model = TinyCNN(defense="cvb")
    attack = AdaptiveAttack(iterations=1)
    assert attack.matched_parameters(model, SHAPE) == ["conv1.weight", "conv1.bias"]
    x, y = victim()
    rec = attack.reconstruct(model, observe(model, x, y, generator_seed=0), SHAPE)
    assert rec.matched_parameters == ["conv1.weight", "conv1.bias"]


@pytest.mark.parametrize("defense", ["cvb", "precode", "none"])
def test_parameters_before_bottleneck_on_the_federation_model(defense: str) -> None:
    from node.training.model import build_model

    model = build_model("cnn", defense, seed=0)
    found = parameters_before_bottleneck(model.eval(), torch.zeros(1, 1, 28, 28))
    assert found == list(model.before_bottleneck)
    if defense == "cvb":
        assert found == ["conv1.weight"]


def test_the_bottleneck_defeats_the_attack_that_beats_the_bare_model() -> None:
    x, y = victim(seed=4)
    bare, defended = TinyCNN(seed=5), TinyCNN(seed=5, defense="cvb")
    undefended = ig().reconstruct(bare, observe(bare, x, y), SHAPE, seed=0)
    attacked = ig().reconstruct(defended, observe(defended, x, y, generator_seed=1), SHAPE, seed=0)
    assert psnr(undefended.images, x).item() > 30
    assert psnr(attacked.images, x).item() < 20


def test_victim_noise_is_seeded_and_changes_the_update() -> None:
    model = TinyCNN(defense="cvb")
    x, y = victim()
    a = observe(model, x, y, generator_seed=1).target
    b = observe(model, x, y, generator_seed=1).target
    c = observe(model, x, y, generator_seed=2).target
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.allclose(a["conv1.weight"], c["conv1.weight"])


def test_single_gradient_observation_is_the_models_gradient() -> None:
    model = TinyCNN()
    x, y = smooth_images(2, 7), torch.tensor([0, 1])
    obs = observe(model, x, y)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(obs.target[n], p.grad, atol=1e-7)


def test_fedavg_observation_replays_local_sgd() -> None:
    model = TinyCNN()
    x, y = smooth_images(4, 8), torch.tensor([0, 1, 1, 0])
    obs = observe(model, x, y, local_steps=3, lr=0.05, batch_size=2)
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=0.05)
    for idx in ([0, 1], [2, 3], [0, 1]):
        opt.zero_grad()
        F.cross_entropy(local(x[idx]), y[idx]).backward()
        opt.step()
    before = dict(model.named_parameters())
    for n, p in local.named_parameters():
        assert torch.allclose(obs.target[n], p.detach() - before[n].detach(), atol=1e-6)


def test_secure_aggregate_is_the_sum_of_envoy_updates() -> None:
    model = TinyCNN()
    x, y = smooth_images(4, 9), torch.tensor([0, 1, 1, 0])
    total = observe(model, x, y, envoys=2, local_steps=2, lr=0.1)
    first = observe(model, x[:2], y[:2], local_steps=2, lr=0.1)
    second = observe(model, x[2:], y[2:], local_steps=2, lr=0.1)
    assert total.num_images == 4
    for n in total.target:
        assert torch.allclose(total.target[n], first.target[n] + second.target[n], atol=1e-6)


def test_inverting_gradients_through_a_fedavg_update() -> None:
    model = TinyCNN()
    x, y = victim(seed=10, label=0)
    obs = observe(model, x, y, local_steps=2, lr=0.1)
    rec = ig().reconstruct(model, obs, SHAPE, seed=0)
    assert rec.labels.tolist() == [0]  # read off the update despite its flipped sign
    assert psnr(rec.images, x).item() > 25


def test_labels_of_a_batch_from_the_output_bias() -> None:
    model = TinyMLP()
    x = smooth_images(4, 11)
    y = torch.tensor([1, 1, 1, 0])
    labels = infer_labels(model, observe(model, x, y), SHAPE)
    assert sorted(labels.tolist()) == [0, 1, 1, 1]


def test_batched_victims_equal_one_at_a_time() -> None:
    model = TinyCNN()
    observations = [observe(model, *victim(seed=s, label=s % 2)) for s in (1, 2, 3)]
    attack = ig(iterations=5, signed=False, lr=0.01)
    together = attack.reconstruct_many(model, observations, SHAPE, seeds=[4, 5, 6])
    alone = [
        attack.reconstruct(model, o, SHAPE, seed=s)
        for o, s in zip(observations, [4, 5, 6], strict=True)
    ]
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(a.images, b.images, atol=1e-5)
        assert a.loss == pytest.approx(b.loss, abs=1e-5)
        assert torch.equal(a.labels, b.labels)


def test_progress_callback_every_n_iterations_and_restarts() -> None:
    model = TinyCNN()
    seen: list[AttackProgress] = []
    attack = ig(iterations=10, restarts=2)
    rec = attack.reconstruct(
        model, observe(model, *victim()), SHAPE, progress=seen.append, progress_every=4
    )
    assert [(p.trial, p.iteration) for p in seen] == [
        (0, 4),
        (0, 8),
        (0, 10),
        (1, 4),
        (1, 8),
        (1, 10),
    ]
    assert all(p.images.shape == (1, *SHAPE) for p in seen)
    assert len(rec.trial_losses) == 2
    assert rec.loss == min(rec.trial_losses)


def test_contrast_gauge_and_box_are_enforced() -> None:
    model = TinyCNN()
    attack = ig(iterations=20, contrast=(0.5, 0.2))
    rec = attack.reconstruct(model, observe(model, *victim()), SHAPE)
    assert rec.images.min() >= 0 and rec.images.max() <= 1
    # The gauge is applied before the box, so clipping can only shrink the deviation.
    assert (rec.images - 0.5).pow(2).mean().sqrt().item() <= 0.2 + 1e-6


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="attack="):
        build_attack("nope")
    with pytest.raises(ValueError, match="iterations"):
        InvertingGradients(iterations=0)
    with pytest.raises(ValueError, match="box"):
        InvertingGradients(box=(1.0, 0.0))
    with pytest.raises(ValueError, match="lr"):
        Observation(target={"w": torch.zeros(1)}, images_per_envoy=1, local_steps=2, lr=0.0)
    model = TinyCNN()
    obs = observe(model, *victim())
    with pytest.raises(ValueError, match="no"):
        ig(iterations=1, parameters=["missing.weight"]).reconstruct(model, obs, SHAPE)
    with pytest.raises(ValueError, match="images"):
        simulate(model, smooth_images(2, 0), torch.tensor([0, 1]), obs)


def test_relus_as_softplus_swaps_every_relu_and_puts_them_back() -> None:
    from node.training.model import build_model

    model = build_model("cnn", "cvb", image_size=16, seed=0, norm="group")
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    x = torch.rand((2, 1, 16, 16), generator=torch.Generator().manual_seed(5))
    model.eval()  # the bottleneck's mean path: deterministic outputs to compare
    before = model(x)
    with relus_as_softplus(model, 1000.0):
        assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
        assert sum(isinstance(m, torch.nn.Softplus) for m in model.modules()) == len(relus)
        # Sharp softplus is ReLU up to log(2) / beta per unit.
        torch.testing.assert_close(model(x), before, atol=0.05, rtol=0)
    assert [m for m in model.modules() if isinstance(m, torch.nn.ReLU)] == relus
    torch.testing.assert_close(model(x), before)
    with pytest.raises(RuntimeError, match="inside"), relus_as_softplus(model, 10.0):
        raise RuntimeError("inside")
    assert [m for m in model.modules() if isinstance(m, torch.nn.ReLU)] == relus
    with pytest.raises(ValueError, match=r"no nn\.ReLU"), relus_as_softplus(TinyCNN(), 10.0):
        pass
    with pytest.raises(ValueError, match="beta"), relus_as_softplus(model, 0.0):
        pass
    with pytest.raises(ValueError, match="smooth_relu"):
        ig(smooth_relu=-1.0)


def test_smooth_relu_is_scored_on_the_exact_model_and_batches_exactly() -> None:
    model = TinyCNN(act="relu")
    observations = [observe(model, *victim(seed=s, label=s % 2)) for s in (1, 2)]
    attack = ig(iterations=5, smooth_relu=5.0, tv_weight=0.1)
    together = attack.reconstruct_many(model, observations, SHAPE, seeds=[4, 5])
    for obs, seed, rec in zip(observations, [4, 5], together, strict=True):
        alone = attack.reconstruct(model, obs, SHAPE, seed=seed)
        torch.testing.assert_close(alone.images, rec.images, atol=1e-5, rtol=0)
        names = [n for n, _ in model.named_parameters()]
        sim = simulate(model, rec.images, rec.labels, obs, names=names)
        exact = gradient_distance(sim, obs.target, names, "cosine") + 0.1 * total_variation(
            rec.images
        )
        assert rec.loss == pytest.approx(float(exact.detach()), abs=1e-5)


def test_two_stage_decodes_the_image_from_its_latent_mean() -> None:
    from gradient_leakage.attacks import TwoStageAttack, _mean_path

    model = TinyCNN(seed=2, defense="cvb")
    x = smooth_images(2, seed=6)
    with torch.no_grad():
        z = _mean_path(model)(x)
    attack = TwoStageAttack(
        iterations=1, decode_iterations=600, decode_lr=0.05, decode_tv=0.0, init="rand"
    )
    x0 = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    decoded = attack._decode(model, [z], tuple(x.shape), x0, iterations=600)
    assert psnr(decoded.clamp(0, 1), x).min().item() > 25


def test_two_stage_matches_only_the_decoder_and_later_layers() -> None:
    from gradient_leakage.attacks import TwoStageAttack

    model = TinyCNN(seed=2, defense="cvb")
    names = TwoStageAttack(iterations=1).matched_parameters(model, SHAPE)
    assert names == ["cvb.decoder.weight", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias"]


def test_the_true_noise_draws_make_the_joint_objective_exact() -> None:
    # Record the victim's noise as the observation drew it; handed those draws, the joint
    # attack's simulation at the true image reproduces the update exactly.
    from gradient_leakage.attacks import _NoiseVariables
    from gradient_leakage.bottleneck import noise_from

    model = TinyCNN(seed=4, defense="cvb")
    x, y = victim(seed=3)
    obs = observe(model, x, y, generator_seed=11)
    names = [n for n, _ in model.named_parameters()]
    draws = _NoiseVariables()
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        with noise_from(model, draws.record(lambda s: torch.randn_like(s))):
            simulate(model, x, y, obs, names=names, create_graph=False)
    with noise_from(model, draws.replay()):
        exact = simulate(model, x, y, obs, names=names, create_graph=False)
    assert float(gradient_distance(exact, obs.target, names, "cosine")) < 1e-6
    with noise_from(model, draws.replay()):
        model(x)  # the one recorded draw
        with pytest.raises(RuntimeError, match="more noise"):
            model(x)
