"""PRECODE and CVB: shapes, the KL against torch.distributions, sampling, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from gradient_leakage.bottleneck import (
    Bottleneck,
    ConvVariationalBottleneck,
    VariationalBottleneck,
    gaussian_kl_bits,
)


def _reference_kl_bits(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    nats = kl_divergence(Normal(mu, sigma), Normal(torch.zeros_like(mu), torch.ones_like(sigma)))
    return nats.sum(dim=1).mean() / math.log(2)


def test_gaussian_kl_matches_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in [(7, 5), (3, 4, 6, 6)]:
        mu = torch.randn(shape, generator=gen) * 2
        sigma = torch.rand(shape, generator=gen) * 3 + 0.01
        assert torch.allclose(gaussian_kl_bits(mu, sigma), _reference_kl_bits(mu, sigma), rtol=1e-5)
    # the prior itself costs nothing
    assert gaussian_kl_bits(torch.zeros(4, 3), torch.ones(4, 3)).item() == pytest.approx(
        0, abs=1e-7
    )


@pytest.mark.parametrize(
    "module, shape",
    [
        (lambda: VariationalBottleneck(48, latent_dim=16), (5, 48)),
        (lambda: VariationalBottleneck(2 * 4 * 4, latent_dim=8), (5, 2, 4, 4)),
        (lambda: ConvVariationalBottleneck(12), (5, 12, 9, 9)),
        (lambda: ConvVariationalBottleneck(12, latent_channels=3, kernel_size=1), (5, 12, 9, 9)),
    ],
)
def test_shape_is_preserved_and_kl_is_that_of_the_last_forward(module, shape) -> None:
    torch.manual_seed(0)
    vb: Bottleneck = module()
    assert vb.kl_loss().item() == 0.0  # before any forward
    x = torch.randn(shape)
    y = vb(x)
    assert y.shape == x.shape
    assert vb.last_mu is not None and vb.last_sigma is not None
    expected = _reference_kl_bits(vb.last_mu, vb.last_sigma)
    assert torch.allclose(vb.kl_loss(), expected, rtol=1e-5)
    vb.beta = 0.25
    assert torch.allclose(vb.kl_loss(), 0.25 * expected, rtol=1e-5)
    vb(torch.randn(shape) * 3)
    assert not torch.allclose(vb.kl_loss(), 0.25 * expected)


def test_cvb_adaptive_latent_channels() -> None:
    assert ConvVariationalBottleneck(32).latent_channels == 16
    assert ConvVariationalBottleneck(6).latent_channels == 8
    assert ConvVariationalBottleneck(64, latent_channels=5).latent_channels == 5


@pytest.mark.parametrize(
    "vb, x",
    [
        (VariationalBottleneck(20, latent_dim=6), torch.randn(4, 20)),
        (ConvVariationalBottleneck(8), torch.randn(4, 8, 5, 5)),
    ],
)
def test_training_samples_eval_uses_the_mean(vb: Bottleneck, x: torch.Tensor) -> None:
    vb.train()
    a, b = vb(x), vb(x)
    assert not torch.allclose(a, b), "training forward must draw fresh noise"
    vb.eval()
    c, d = vb(x), vb(x)
    assert torch.equal(c, d)
    # eval output is exactly decoder(mu)
    assert torch.allclose(c, vb.decoder(vb.last_mu).view(x.shape), atol=1e-6)
    vb.sample_in_eval = True
    assert not torch.allclose(vb(x), vb(x))


def test_the_noise_has_the_encoded_standard_deviation() -> None:
    torch.manual_seed(1)
    vb = VariationalBottleneck(3, latent_dim=2)
    with torch.no_grad():
        vb.encoder.weight.zero_()
        vb.encoder.bias.copy_(torch.tensor([1.0, -2.0, 0.3, 1.7]))  # mu = (1, -2); raw sigma
        vb.decoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        vb.decoder.bias.zero_()
    out = vb(torch.zeros(20000, 3))
    sigma = torch.nn.functional.softplus(torch.tensor([0.3, 1.7]))
    assert torch.allclose(out[:, :2].mean(0), torch.tensor([1.0, -2.0]), atol=0.05)
    assert torch.allclose(out[:, :2].std(0), sigma, rtol=0.03)


def test_gradients_reach_mean_and_sigma_encoders() -> None:
    torch.manual_seed(2)
    vb = ConvVariationalBottleneck(4, latent_channels=2)
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    loss = vb(x).pow(2).sum() + vb.kl_loss()
    loss.backward()
    for p in (vb.mu_encoder.weight, vb.sigma_encoder.weight, vb.decoder.weight, x):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_sigma_is_bounded_away_from_zero() -> None:
    vb = VariationalBottleneck(2, latent_dim=1)
    with torch.no_grad():
        vb.encoder.weight.zero_()
        vb.encoder.bias.copy_(torch.tensor([0.0, -1e6]))
    vb(torch.zeros(1, 2))
    assert vb.last_sigma.min().item() > 0.005
    assert math.isfinite(vb.kl_loss().item())


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="beta"):
        VariationalBottleneck(4, beta=-1)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvVariationalBottleneck(4, kernel_size=2)
    with pytest.raises(ValueError, match="expects"):
        ConvVariationalBottleneck(4)(torch.randn(2, 3, 5, 5))
