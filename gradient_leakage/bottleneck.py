"""Variational bottlenecks against gradient inversion: PRECODE and the convolutional CVB.

Both modules map features h to a Gaussian q(z|h) = N(mu(h), diag(sigma(h)^2)), draw
z = mu + sigma * eps (the reparameterisation trick, so gradients flow through mu and
sigma) and decode z back to the shape of h, so they drop into a network without changing
the layers around them. The randomness of z is what breaks gradient inversion: the
gradients a client shares were computed through a sample the attacker cannot replay.

* `VariationalBottleneck` is PRECODE (Scheliga, Mäder, Seeland, WACV 2022): a linear
  encoder to K means and K softplus standard deviations, a linear decoder; placed late,
  before the classifier.
* `ConvVariationalBottleneck` is CVB (Scheliga, Mäder, Seeland 2023, "Privacy preserving
  federated learning with convolutional variational bottlenecks"): the same idea with
  convolutions (a k x k conv to mu and one to sigma, K channels each, and a 1 x 1 conv
  decoder), cheap enough to sit right after the first convolution, where it protects
  every later layer's gradients too.

`kl_loss()` returns KL(q(z|h) || N(0, I)) of the last forward, in bits, summed over the
latent units (PRECODE) or the latent channels at each position (CVB) and averaged over the
batch (and positions), times the module's `beta` (1.0 by default, so a trainer applying
its own weight, e.g. `TrainPlan.kl_beta`, gets the plain KL).

Eval mode: the reference implementations of both papers sample z in every forward, at
training and at test time alike. We sample in training mode (that is where the shared
gradients come from, so the defence is the papers'), and by default use the mean
z = mu in eval mode so that a model's scores, hence its validation threshold and ROC, are
deterministic. `sample_in_eval=True` restores the papers' always-sample behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LN2 = math.log(2.0)
# sigma is softplus(raw) with raw clipped to [-5, 5] (as the CVB reference does): keeps
# sigma in [0.0067, 5.0067], so log(sigma) in the KL never sees 0 and sigma never explodes.
_RAW_CLIP = 5.0

# Draws the standard normal noise eps for a given sigma (same shape as sigma).
NoiseSource = Callable[[Tensor], Tensor]


def gaussian_kl_bits(mu: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) in bits, summed over dim 1, averaged over the rest.

    For a vector latent (N, K) that is the KL per sample; for a feature-map latent
    (N, K, H, W) it is the KL per sample and spatial position, the CVB reference's
    normalisation, which keeps the term's scale (and a usable beta) independent of the
    image size.
    """
    nats = 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0) - torch.log(sigma)
    return nats.sum(dim=1).mean() / _LN2


class Bottleneck(nn.Module):
    """Base: holds the last forward's mu and sigma and turns them into the KL loss."""

    def __init__(self, beta: float = 1.0, *, sample_in_eval: bool = False) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)
        self.sample_in_eval = sample_in_eval
        self.last_mu: Tensor | None = None
        self.last_sigma: Tensor | None = None
        # Where eps comes from: torch's global RNG unless an attack or a test replays a
        # particular draw (see `noise_from`).
        self.noise_source: NoiseSource | None = None

    def _sample(self, mu: Tensor, sigma: Tensor) -> Tensor:
        self.last_mu, self.last_sigma = mu, sigma
        if self.training or self.sample_in_eval:
            eps = torch.randn_like(sigma) if self.noise_source is None else self.noise_source(sigma)
            return mu + sigma * eps
        return mu

    def snr_db(self) -> float:
        """Signal-to-noise ratio of the last forward in dB: the power of the mean path,
        mean(mu^2), over the power of the noise it adds, mean(sigma^2). NaN before any
        forward. How much of the latent the noise drowns: what an attacker who cannot know
        eps faces, and what training may erode (a growing mu outruns a fixed sigma)."""
        if self.last_mu is None or self.last_sigma is None:
            return math.nan
        signal = float(self.last_mu.detach().double().pow(2).mean())
        noise = float(self.last_sigma.detach().double().pow(2).mean())
        return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf

    @staticmethod
    def _sigma(raw: Tensor) -> Tensor:
        return F.softplus(torch.clamp(raw, -_RAW_CLIP, _RAW_CLIP))

    def kl_loss(self) -> Tensor:
        """beta * KL of the last forward, in bits per sample (0 before any forward)."""
        if self.last_mu is None or self.last_sigma is None:
            return torch.zeros(())
        return self.beta * gaussian_kl_bits(self.last_mu, self.last_sigma)


class VariationalBottleneck(Bottleneck):
    """PRECODE: features (N, *shape) -> linear -> (mu, sigma) in R^K -> sample -> linear -> (N, *shape)."""

    def __init__(
        self,
        in_features: int,
        latent_dim: int = 256,
        beta: float = 1.0,
        *,
        sample_in_eval: bool = False,
    ) -> None:
        super().__init__(beta, sample_in_eval=sample_in_eval)
        if in_features < 1 or latent_dim < 1:
            raise ValueError(
                f"in_features and latent_dim must be >= 1, got {in_features}, {latent_dim}"
            )
        self.in_features = in_features
        self.latent_dim = latent_dim
        self.encoder = nn.Linear(in_features, 2 * latent_dim)
        self.decoder = nn.Linear(latent_dim, in_features)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        stats = self.encoder(x.flatten(1))
        mu, raw = stats.split(self.latent_dim, dim=1)
        z = self._sample(mu, self._sigma(raw))
        return self.decoder(z).view(shape)


class ConvVariationalBottleneck(Bottleneck):
    """CVB: feature maps (N, C, H, W) -> conv -> (mu, sigma) with K channels -> sample -> 1x1 conv -> (N, C, H, W).

    `latent_channels=None` follows the reference's adaptive rule: C // 2, at least 8.
    """

    def __init__(
        self,
        channels: int,
        latent_channels: int | None = None,
        beta: float = 1.0,
        *,
        kernel_size: int = 3,
        sample_in_eval: bool = False,
    ) -> None:
        super().__init__(beta, sample_in_eval=sample_in_eval)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        k = latent_channels if latent_channels is not None else max(channels // 2, 8)
        self.channels = channels
        self.latent_channels = k
        pad = kernel_size // 2
        self.mu_encoder = nn.Conv2d(channels, k, kernel_size, padding=pad, bias=False)
        self.sigma_encoder = nn.Conv2d(channels, k, kernel_size, padding=pad, bias=False)
        self.decoder = nn.Conv2d(k, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"CVB expects (N, {self.channels}, H, W), got {tuple(x.shape)}")
        z = self._sample(self.mu_encoder(x), self._sigma(self.sigma_encoder(x)))
        return self.decoder(z)


@contextmanager
def noise_from(model: nn.Module, source: NoiseSource | None) -> Iterator[None]:
    """Within the block every bottleneck of ``model`` draws eps from ``source`` (None: the
    global RNG); each bottleneck's previous source is back on exit."""
    modules = [m for m in model.modules() if isinstance(m, Bottleneck)]
    saved = [m.noise_source for m in modules]
    try:
        for m in modules:
            m.noise_source = source
        yield
    finally:
        for m, old in zip(modules, saved, strict=True):
            m.noise_source = old


def bottleneck_snr_db(model: nn.Module) -> float:
    """The first bottleneck's SNR of its last forward (NaN without a bottleneck)."""
    first = next((m for m in model.modules() if isinstance(m, Bottleneck)), None)
    return math.nan if first is None else first.snr_db()
