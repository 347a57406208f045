"""Metrics against known values: identical images, analytic MSE cases, decision rules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradient_leakage.metrics import (
    baseline_psnr,
    chance_p_value,
    identified,
    identify,
    label_accuracy,
    match_reconstructions,
    mse,
    psnr,
    ssim,
)


def images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand((n, 1, size, size), generator=torch.Generator().manual_seed(seed))


def test_identical_images_have_infinite_psnr_and_unit_ssim() -> None:
    x = images(3)
    assert torch.all(torch.isinf(psnr(x, x)))
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert torch.all(mse(x, x) == 0)


@pytest.mark.parametrize("offset", [0.1, 0.25, 0.5])
def test_constant_offset_gives_analytic_mse_and_psnr(offset: float) -> None:
    x = torch.full((2, 1, 8, 8), 0.25)
    y = x + offset
    assert torch.allclose(mse(y, x), torch.full((2,), offset**2, dtype=torch.float64))
    expected = 10 * math.log10(1 / offset**2)
    assert torch.allclose(psnr(y, x), torch.full((2,), expected, dtype=torch.float64))


def test_psnr_respects_data_range() -> None:
    x = torch.zeros(1, 1, 4, 4)
    y = torch.full((1, 1, 4, 4), 25.5)  # 10 % of a 255 range
    assert psnr(y, x, data_range=255.0).item() == pytest.approx(20.0)


def test_half_the_pixels_flipped() -> None:
    x = torch.zeros(1, 1, 4, 4)
    y = x.clone()
    y[..., :2, :] = 1.0
    assert mse(y, x).item() == pytest.approx(0.5)
    assert psnr(y, x).item() == pytest.approx(10 * math.log10(2))


def test_ssim_known_cases() -> None:
    x = images(2, seed=1)
    # A constant image against a textured one shares no structure.
    flat = torch.full_like(x, 0.5)
    assert torch.all(ssim(flat, x) < 0.2)
    # Symmetric, bounded, and decreasing with noise.
    noisy = (x + 0.1 * images(2, seed=2)).clamp(0, 1)
    noisier = (x + 0.4 * images(2, seed=3)).clamp(0, 1)
    assert torch.allclose(ssim(noisy, x), ssim(x, noisy))
    assert torch.all(ssim(noisier, x) < ssim(noisy, x))
    assert torch.all(ssim(noisy, x) < 1)
    # Two constant images: luminance term only, (2 a b + c1) / (a^2 + b^2 + c1).
    a, b = torch.full((1, 1, 11, 11), 0.2), torch.full((1, 1, 11, 11), 0.6)
    c1 = 0.01**2
    assert ssim(a, b).item() == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1), rel=1e-6)


def test_ssim_handles_images_smaller_than_the_window() -> None:
    x = images(1, size=8)
    assert ssim(x, x).item() == pytest.approx(1.0)


def test_shape_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(images(1, size=8), images(1, size=16))
    with pytest.raises(ValueError, match="reconstruction"):
        mse(torch.zeros(4), torch.zeros(4))


def test_identify_finds_the_nearest_candidate() -> None:
    pool = images(20, seed=4)
    noisy = (pool[[3, 17]] + 0.02 * images(2, seed=5)).clamp(0, 1)
    assert identify(noisy, pool).tolist() == [3, 17]


def test_identified_counts_ties_with_duplicate_candidates() -> None:
    pool = images(6, seed=7)
    pool[4] = pool[1]  # a pixel-identical duplicate, as PneumoniaMNIST's test split has
    rec = (pool[[1, 4, 2]] + 0.01).clamp(0, 1)
    assert identify(rec, pool).tolist() == [1, 1, 2]  # argmin names the first of the pair
    assert identified(rec, pool, torch.tensor([4, 1, 2])).tolist() == [True, True, True]
    assert identified(rec, pool, torch.tensor([0, 3, 5])).tolist() == [False, False, False]


def test_baseline_psnr_is_the_mean_images_psnr() -> None:
    pool = images(5, seed=6)
    mean = pool.mean(dim=0, keepdim=True)
    assert torch.allclose(baseline_psnr(mean, pool), psnr(mean.expand_as(pool), pool))
    with pytest.raises(ValueError):
        baseline_psnr(pool[:2], pool)


def test_label_accuracy_counts_a_multiset() -> None:
    assert label_accuracy([1, 0], [0, 1]) == 1.0
    assert label_accuracy([1, 1], [0, 1]) == 0.5
    assert label_accuracy(torch.tensor([0]), torch.tensor([1])) == 0.0
    with pytest.raises(ValueError):
        label_accuracy([0], [0, 1])


@settings(max_examples=30, deadline=None)
@given(st.permutations(list(range(6))), st.integers(0, 1000))
def test_match_reconstructions_undoes_any_permutation(perm: list[int], seed: int) -> None:
    originals = images(6, seed=seed)
    shuffled = originals[perm]
    order = match_reconstructions(shuffled, originals)
    assert torch.equal(shuffled[order], originals)


def test_match_reconstructions_greedy_beyond_seven() -> None:
    originals = images(10, seed=9)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    order = match_reconstructions(originals[perm], originals)
    assert torch.equal(originals[perm][order], originals)


def test_chance_p_value_decision_rule() -> None:
    # Nothing identified is always consistent with guessing.
    assert chance_p_value(0, 16, 624) == pytest.approx(1.0)
    # One of 16 among 624 candidates: 1 - (623/624)^16, already below 0.05.
    assert chance_p_value(1, 16, 624) == pytest.approx(1 - (623 / 624) ** 16)
    assert chance_p_value(1, 16, 624) < 0.05
    # Among 2 candidates, 8 of 16 is exactly what guessing gives.
    assert chance_p_value(8, 16, 2) > 0.5
    with pytest.raises(ValueError):
        chance_p_value(17, 16, 624)
