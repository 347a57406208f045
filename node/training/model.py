"""Models for 28-64 px grey chest X-rays, with an optional variational bottleneck.

`build_model(arch, defense, image_size)` gives a compact CNN or torchvision's ResNet-18
(one input channel, 3x3 stride-1 stem and no max-pool, as is usual for small images; no
pretrained weights, nothing downloads). Every model:

* takes float images in [0, 1], shape (N, C, H, W) at any H = W; it resizes to its own
  `image_size` (bilinear) and normalises inside `forward`, so trainers, evaluators and
  gradient-inversion attacks all feed the same pixel space;
* has `.kl_loss()`: the KL (bits, batch mean) of its bottleneck's last forward, 0 without one;
* declares its modules in forward order, so `named_parameters()` is in forward order and
  `bottleneck_and_after` (parameter names of the bottleneck and of every layer after it)
  is exact. The adaptive attack skips those: their gradients went through the noise.

Defences: "cvb" puts `ConvVariationalBottleneck` right after the first convolution (before
its normalisation), "precode" puts `VariationalBottleneck` on the pooled features before
the classifier, "none" has no bottleneck.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradient_leakage.bottleneck import Bottleneck, ConvVariationalBottleneck, VariationalBottleneck
from node.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

ARCHS = ("cnn", "resnet18")
DEFENSES = ("cvb", "precode", "none")
NORMS = ("batch", "group", "none")
# PneumoniaMNIST train pixel statistics (of x / 255): centring the input keeps the first
# conv's gradients, and hence the learning rate that works, independent of the data set.
PIXEL_MEAN = 0.572
PIXEL_STD = 0.167


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # Groups of 4 channels: GroupNorm keeps no running statistics, so nothing
        # client-specific is averaged by FedAvg under label skew (the known BN problem).
        return nn.GroupNorm(max(1, channels // 4), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class Preprocess(nn.Module):
    """[0, 1] pixels at any size -> the model's size, normalised. No parameters."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return (x - PIXEL_MEAN) / PIXEL_STD


class FedModel(nn.Module):
    """Common bookkeeping: bottleneck discovery, kl_loss, parameter-name groups."""

    arch: str
    defense: str
    image_size: int
    in_channels: int
    num_classes: int

    def bottlenecks(self) -> Iterator[Bottleneck]:
        return (m for m in self.modules() if isinstance(m, Bottleneck))

    def kl_loss(self) -> Tensor:
        total = torch.zeros(())
        for b in self.bottlenecks():
            total = total + b.kl_loss()
        return total

    @property
    def bottleneck(self) -> Bottleneck | None:
        return next(self.bottlenecks(), None)

    def _bottleneck_prefix(self) -> str | None:
        for name, module in self.named_modules():
            if isinstance(module, Bottleneck):
                return name + "."
        return None

    @property
    def bottleneck_param_names(self) -> tuple[str, ...]:
        prefix = self._bottleneck_prefix()
        if prefix is None:
            return ()
        return tuple(n for n, _ in self.named_parameters() if n.startswith(prefix))

    @property
    def bottleneck_and_after(self) -> tuple[str, ...]:
        """Parameter names of the bottleneck and every layer after it (forward order)."""
        prefix = self._bottleneck_prefix()
        if prefix is None:
            return ()
        names = [n for n, _ in self.named_parameters()]
        first = next(i for i, n in enumerate(names) if n.startswith(prefix))
        return tuple(names[first:])

    @property
    def before_bottleneck(self) -> tuple[str, ...]:
        after = set(self.bottleneck_and_after)
        if not after:
            return tuple(n for n, _ in self.named_parameters())
        return tuple(n for n, _ in self.named_parameters() if n not in after)


class CompactCNN(FedModel):
    """Three stages of `depth` 3x3 convs (width w, 2w, 4w), max-pool between, global average pool.

    conv1 is the first convolution (CVB follows it directly); PRECODE sits on the pooled
    4w features before the linear classifier. depth 2 is the default model (module names
    and order are those of every checkpoint so far).
    """

    def __init__(
        self,
        *,
        defense: str = "cvb",
        image_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 32,
        depth: int = 2,
        norm: str = "batch",
        dropout: float = 0.0,
        cvb_latent_channels: int | None = None,
        precode_latent_dim: int = 256,
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got {width}, {depth}")
        w = width
        self.preprocess = Preprocess(image_size)
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=norm == "none")
        self.cvb = (
            ConvVariationalBottleneck(w, cvb_latent_channels) if defense == "cvb" else nn.Identity()
        )
        self.norm1 = _norm(norm, w)
        layers: list[nn.Module] = [nn.ReLU(inplace=True)]

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"),
                _norm(norm, cout),
                nn.ReLU(inplace=True),
            ]

        for _ in range(depth - 1):
            layers += conv(w, w)
        layers += [nn.MaxPool2d(2)]
        for cin, cout in ((w, 2 * w), (2 * w, 4 * w)):
            layers += conv(cin, cout)
            for _ in range(depth - 1):
                layers += conv(cout, cout)
            if cout == 2 * w:
                layers += [nn.MaxPool2d(2)]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.precode = (
            VariationalBottleneck(4 * w, precode_latent_dim)
            if defense == "precode"
            else nn.Identity()
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(self.cvb(self.conv1(self.preprocess(x))))
        x = self.precode(self.features(x))
        return self.classifier(self.dropout(x))


class ResNet18(FedModel):
    """torchvision ResNet-18, one input channel, small-image stem, bottleneck slots."""

    def __init__(
        self,
        *,
        defense: str = "cvb",
        image_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 2,
        norm: str = "batch",
        cvb_latent_channels: int | None = None,
        precode_latent_dim: int = 256,
    ) -> None:
        super().__init__()
        from torchvision.models import resnet18

        norm_layer = nn.BatchNorm2d if norm == "batch" else (lambda c: _norm(norm, c))
        base = resnet18(weights=None, num_classes=num_classes, norm_layer=norm_layer)
        self.preprocess = Preprocess(image_size)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.cvb = (
            ConvVariationalBottleneck(64, cvb_latent_channels)
            if defense == "cvb"
            else nn.Identity()
        )
        self.bn1 = base.bn1
        self.relu = base.relu
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            base.layer1,
            base.layer2,
            base.layer3,
            base.layer4,
        )
        self.avgpool = base.avgpool
        self.precode = (
            VariationalBottleneck(512, precode_latent_dim)
            if defense == "precode"
            else nn.Identity()
        )
        self.fc = base.fc

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.cvb(self.conv1(self.preprocess(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.precode(torch.flatten(self.avgpool(x), 1))
        return self.fc(x)


def build_model(
    arch: str = "cnn",
    defense: str = "cvb",
    image_size: int = 28,
    num_classes: int = 2,
    *,
    in_channels: int = 1,
    width: int = 32,
    depth: int = 2,
    norm: str | None = None,
    dropout: float = 0.0,
    seed: int | None = None,
) -> FedModel:
    """The federation's model. `seed` makes the initial weights reproducible.

    `width` and `depth` (convolutions per stage) size the compact CNN; ResNet-18 has its own.

    `norm` defaults to BatchNorm. GroupNorm ("group") avoids averaging client-specific
    running statistics under label skew, but here it learned far more slowly than BatchNorm
    (local training at lr 0.01 and 0.05: validation AUC 0.82-0.92 against 0.98 after 3
    epochs; FedAvg at lr 0.02: AUC 0.55 after round 1 against 0.83), so BatchNorm, its
    running statistics averaged like any weight, is the default.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if defense not in DEFENSES:
        raise ValueError(f"defense must be one of {DEFENSES}, got {defense!r}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {image_size}")
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = _construct(
            arch, defense, image_size, num_classes, in_channels, width, depth, norm, dropout
        )
    model.arch, model.defense = arch, defense
    model.image_size, model.in_channels, model.num_classes = image_size, in_channels, num_classes
    return model


def _construct(
    arch: str,
    defense: str,
    image_size: int,
    num_classes: int,
    in_channels: int,
    width: int,
    depth: int,
    norm: str | None,
    dropout: float,
) -> FedModel:
    if arch == "cnn":
        return CompactCNN(
            defense=defense,
            image_size=image_size,
            in_channels=in_channels,
            num_classes=num_classes,
            width=width,
            depth=depth,
            norm=norm or "batch",
            dropout=dropout,
        )
    return ResNet18(
        defense=defense,
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        norm=norm or "batch",
    )
