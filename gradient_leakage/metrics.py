"""Reconstruction quality and privacy metrics for gradient-inversion attacks.

All image metrics take float tensors in [0, 1] (the pixel scale, not the model's normalised
input scale) shaped ``(N, C, H, W)`` or ``(C, H, W)`` and return one value per image, so a
batch summary is the mean of per-image values (as Geiping et al. report PSNR), never the
PSNR of a pooled MSE.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "baseline_psnr",
    "binomial_tail",
    "chance_p_value",
    "chance_rank_probability",
    "distance_matrix",
    "identified",
    "identify",
    "label_accuracy",
    "match_reconstructions",
    "mse",
    "psnr",
    "rank_of_truth",
    "ssim",
]

METRICS = ("mse", "ncc")


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_batch(a, "reconstruction"), _as_batch(b, "original")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def mse(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error, shape (N,)."""
    a, b = _pair(reconstruction, original)
    return ((a - b) ** 2).flatten(1).mean(dim=1)


def psnr(
    reconstruction: torch.Tensor, original: torch.Tensor, *, data_range: float = 1.0
) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB, shape (N,); ``inf`` for identical images."""
    err = mse(reconstruction, original)
    with torch.no_grad():
        out = 10.0 * torch.log10(torch.as_tensor(data_range**2, dtype=err.dtype) / err)
    return torch.where(err == 0, torch.full_like(err, math.inf), out)


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    window = torch.outer(g, g)
    return window.expand(channels, 1, size, size).contiguous()


def ssim(
    reconstruction: torch.Tensor,
    original: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image structural similarity (Wang et al. 2004), shape (N,).

    Gaussian 11x11 window with sigma 1.5, statistics over the valid region only (no padding,
    as in the reference implementation), channels averaged. The window shrinks to the image
    size for images smaller than 11 pixels so tiny test images still get a defined value.
    """
    a, b = _pair(reconstruction, original)
    channels, height, width = a.shape[1:]
    size = min(window_size, height, width)
    window = _gaussian_window(size, sigma, channels)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim_map.flatten(1).mean(dim=1)


def label_accuracy(
    predicted: Sequence[int] | torch.Tensor, true: Sequence[int] | torch.Tensor
) -> float:
    """Fraction of recovered labels equal to the true ones, as a multiset when order is unknown.

    Batch attacks recover labels without knowing which image each belongs to, so the count of
    correct labels is the size of the multiset intersection.
    """
    p = [int(v) for v in torch.as_tensor(predicted).flatten().tolist()]
    t = [int(v) for v in torch.as_tensor(true).flatten().tolist()]
    if len(p) != len(t):
        raise ValueError(f"label count mismatch: {len(p)} predicted vs {len(t)} true")
    if not t:
        raise ValueError("label_accuracy of an empty batch")
    remaining = list(t)
    hits = 0
    for v in p:
        if v in remaining:
            remaining.remove(v)
            hits += 1
    return hits / len(t)


def match_reconstructions(reconstruction: torch.Tensor, original: torch.Tensor) -> list[int]:
    """Order of reconstructions that best matches the originals (minimum total MSE).

    Gradients of a batch are invariant to the order of its images, so an attack returns the
    batch in an arbitrary order. Returns ``perm`` with ``reconstruction[perm[i]]`` matched to
    ``original[i]``. Exhaustive for up to 7 images, greedy on the MSE matrix beyond.
    """
    a, b = _as_batch(reconstruction, "reconstruction"), _as_batch(original, "original")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    n = a.shape[0]
    cost = torch.cdist(b.flatten(1), a.flatten(1)) ** 2  # cost[i, j]: original i vs recon j
    if n <= 7:
        best = min(
            itertools.permutations(range(n)),
            key=lambda perm: float(sum(cost[i, j] for i, j in enumerate(perm))),
        )
        return list(best)
    perm = [-1] * n
    work = cost.clone()
    for _ in range(n):
        flat = int(torch.argmin(work))
        i, j = divmod(flat, n)
        perm[i] = j
        work[i, :] = math.inf
        work[:, j] = math.inf
    return perm


def identify(reconstruction: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Index of each reconstruction's nearest candidate by MSE, shape (N,).

    The identification test: the attacker re-identifies the victim if the nearest image to the
    reconstruction among all candidates (the 624 PneumoniaMNIST test images) is the victim.
    """
    a = _as_batch(reconstruction, "reconstruction").flatten(1)
    c = _as_batch(candidates, "candidates").flatten(1)
    if a.shape[1] != c.shape[1]:
        raise ValueError(f"image size mismatch: {a.shape[1]} vs candidates {c.shape[1]}")
    return torch.cdist(a, c).argmin(dim=1)


def identified(
    reconstruction: torch.Tensor, candidates: torch.Tensor, victims: torch.Tensor
) -> torch.Tensor:
    """Whether each victim is a nearest candidate (by MSE) of its reconstruction, shape (N,).

    Ties count as identified: PneumoniaMNIST's test split holds pixel-identical duplicates
    (e.g. test images 302 and 401), and a reconstruction equally near both did single out
    the victim's picture; :func:`identify`'s argmin would name whichever comes first.
    """
    a = _as_batch(reconstruction, "reconstruction").flatten(1)
    c = _as_batch(candidates, "candidates").flatten(1)
    victims = torch.as_tensor(victims).long().flatten()
    if victims.numel() != a.shape[0]:
        raise ValueError(f"victims: {victims.numel()} indices for {a.shape[0]} reconstructions")
    d = torch.cdist(a, c) ** 2
    own = d[torch.arange(a.shape[0]), victims]
    return own <= d.min(dim=1).values


def baseline_psnr(mean_image: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """PSNR of one fixed image (the training-set mean) against each original, shape (N,).

    An "attack" that outputs the average X-ray scores this without looking at any gradient;
    a reconstruction below it has learned nothing about the victim that the dataset did not
    already give away.
    """
    b = _as_batch(originals, "originals")
    m = _as_batch(mean_image, "mean_image")
    if m.shape[0] != 1 or m.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"mean_image shape {tuple(m.shape)} does not fit originals {tuple(b.shape)}"
        )
    return psnr(m.expand_as(b), b)


def chance_p_value(identified: int, trials: int, candidates: int) -> float:
    """One-sided binomial p-value of identifying at least ``identified`` of ``trials`` victims
    by guessing uniformly among ``candidates``.

    The decision rule for "identification at chance": p >= 0.05. With 16 victims among 624
    images, P(X >= 1) = 1 - (623/624)^16 = 0.025, so a single identification already rejects
    chance; "at chance" then means none identified.
    """
    if not 0 <= identified <= trials or candidates < 1:
        raise ValueError(
            f"bad counts: identified={identified} trials={trials} candidates={candidates}"
        )
    return binomial_tail(identified, trials, 1.0 / candidates)


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    return _as_batch(x, name).flatten(1)


def _pairwise(a: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, M) distances between flattened rows: MSE, or 1 - normalised cross-correlation
    (Pearson correlation of the pixels: blind to brightness and contrast)."""
    if metric == "mse":
        return (a.pow(2).sum(1, keepdim=True) + c.pow(2).sum(1)[None] - 2 * a @ c.T).clamp_(
            min=0
        ) / a.shape[1]
    if metric == "ncc":
        a0 = a - a.mean(1, keepdim=True)
        c0 = c - c.mean(1, keepdim=True)
        a0 = a0 / a0.norm(dim=1, keepdim=True).clamp(min=1e-12)
        c0 = c0 / c0.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return 1.0 - a0 @ c0.T
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def distance_matrix(
    reconstructions: torch.Tensor,
    candidates: torch.Tensor,
    metric: str = "mse",
    *,
    transforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, M) distance of each reconstruction to each candidate image, lower is nearer.

    ``transforms`` (G, 2, 3) are affine sampling grids (``F.affine_grid``'s convention):
    each candidate is then compared in every transformed pose and its nearest pose counts,
    which registers a reconstruction of an augmented image (rotated, scaled, shifted,
    flipped, as the envoy fed it) against the original candidates.
    """
    a = _flat(reconstructions, "reconstructions")
    cands = _as_batch(candidates, "candidates")
    if a.shape[1] != cands[0].numel():
        raise ValueError(f"image size mismatch: {a.shape[1]} vs candidates {cands[0].numel()}")
    if transforms is None:
        return _pairwise(a, cands.flatten(1), metric)
    best = torch.full((a.shape[0], cands.shape[0]), math.inf, dtype=a.dtype)
    for theta in transforms.to(cands.dtype):
        grid = F.affine_grid(
            theta.expand(cands.shape[0], 2, 3), list(cands.shape), align_corners=False
        )
        moved = F.grid_sample(
            cands, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        best = torch.minimum(best, _pairwise(a, moved.flatten(1), metric))
    return best


def rank_of_truth(distances: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's true candidate: 1 + the candidates strictly nearer, so
    pixel-identical duplicates of the truth tie with it (as :func:`identified` counts)."""
    truth = torch.as_tensor(truth).long().flatten()
    if truth.numel() != distances.shape[0]:
        raise ValueError(f"truth: {truth.numel()} indices for {distances.shape[0]} rows")
    own = distances[torch.arange(distances.shape[0]), truth]
    return 1 + (distances < own[:, None]).sum(dim=1)


def chance_rank_probability(k: int, candidates: int, tries: int = 1) -> float:
    """P(rank <= k) for a victim by chance: the best of ``tries`` independent uniform ranks
    among ``candidates`` (a victim scored by the best of its envoy's ``tries``
    reconstructions gets that many chances)."""
    if not 1 <= k <= candidates or tries < 1:
        raise ValueError(f"bad k={k}, candidates={candidates}, tries={tries}")
    return 1.0 - (1.0 - k / candidates) ** tries


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p): the one-sided p-value of doing at least
    this well by chance."""
    if not 0 <= successes <= trials or not 0 <= p <= 1:
        raise ValueError(f"bad counts: successes={successes} trials={trials} p={p}")
    if successes == 0:
        return 1.0

    def pmf(k: int) -> float:
        return math.comb(trials, k) * p**k * (1 - p) ** (trials - k)

    # Sum the shorter side: the tail itself, or one minus the head.
    if successes > trials / 2:
        return float(sum(pmf(k) for k in range(successes, trials + 1)))
    return float(max(0.0, 1.0 - sum(pmf(k) for k in range(successes))))
