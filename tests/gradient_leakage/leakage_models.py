"""Tiny models for attack tests: 8 x 8 grey images, so an attack converges in seconds."""

from __future__ import annotations

import torch
from torch import nn

from gradient_leakage.bottleneck import ConvVariationalBottleneck

SIZE = 8


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """Smooth random images in [0, 1] (blurred noise), like downsampled X-rays: the kind
    of content a total-variation prior expects."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1, 3, 3), generator=g)
    x = nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
    return (0.1 + 0.8 * x).clamp(0, 1)


class TinyMLP(nn.Module):
    """DLG's setting: a fully connected net with sigmoid activations (smooth, twice
    differentiable everywhere, so L-BFGS on the gradient distance behaves)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(SIZE * SIZE, 32)
        self.act = nn.Sigmoid()
        self.fc2 = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.flatten(1))))


class TinyCNN(nn.Module):
    """A small convolutional net; ``defense="cvb"`` puts a CVB right after conv1;
    ``act="relu"`` swaps the sigmoids for ReLUs (the federation's activation)."""

    def __init__(self, seed: int = 0, defense: str = "none", act: str = "sigmoid") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.cvb = ConvVariationalBottleneck(8, 8) if defense == "cvb" else nn.Identity()
        self.act = nn.ReLU() if act == "relu" else nn.Sigmoid()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * SIZE * SIZE, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.cvb(self.conv1(x)))
        h = self.act(self.conv2(h))
        return self.fc(h.flatten(1))

    def kl_loss(self) -> torch.Tensor:
        cvb = self.cvb
        return cvb.kl_loss() if isinstance(cvb, ConvVariationalBottleneck) else torch.zeros(())
