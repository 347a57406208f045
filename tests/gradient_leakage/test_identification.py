"""Identification by rank: MSE and NCC distances, registration, ties, what chance gives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradient_leakage.metrics import (
    binomial_tail,
    chance_p_value,
    chance_rank_probability,
    distance_matrix,
    rank_of_truth,
)
from node.attack.deployed import augmentation_grid
from node.attack.replay import EnvoyRecipe
from node.training.train import augment_batch
from protocol.messages import TrainPlan


def images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 1, 4, 4), generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(6, 40), seed=st.integers(0, 10_000))
def test_a_copy_of_the_truth_ranks_first_and_ranks_stay_in_range(n: int, m: int, seed: int) -> None:
    cands = images(m, seed)
    truth = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:n]
    noise = 0.3 * torch.rand((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed + 1))
    for metric in ("mse", "ncc"):
        assert (
            rank_of_truth(distance_matrix(cands[truth], cands, metric), truth).tolist() == [1] * n
        )
        ranks = rank_of_truth(distance_matrix(noise, cands, metric), truth)
        assert ((ranks >= 1) & (ranks <= m)).all()


def test_ncc_ignores_brightness_and_contrast_mse_does_not() -> None:
    cands = images(20, 3)
    shifted = 0.5 * cands[[7]] + 0.3
    assert rank_of_truth(distance_matrix(shifted, cands, "ncc"), torch.tensor([7])).item() == 1
    assert distance_matrix(shifted, cands, "ncc")[0, 7] < 1e-6
    assert distance_matrix(shifted, cands, "mse")[0, 7] > 1e-3


def test_duplicates_of_the_truth_tie_with_it() -> None:
    cands = images(10, 1)
    cands[4] = cands[2]
    for truth in (2, 4):
        assert rank_of_truth(distance_matrix(cands[[2]], cands), torch.tensor([truth])).item() == 1


def test_registration_finds_an_augmented_victim() -> None:
    # An X-ray-like image flipped, rotated and shifted as the envoy's augmentation does:
    # plain MSE loses it among look-alikes, registration over the recipe's grid finds it.
    cands = images(60, 5, size=28)
    recipe = EnvoyRecipe.deployed(TrainPlan(local_epochs=1, batch_size=32, lr=0.05))
    g = torch.Generator().manual_seed(2)
    moved = augment_batch(cands[[11]], 28, g, jitter=0.0)
    grid = augmentation_grid(recipe)
    assert grid.shape == (2 * 5 * 3 * 3 * 3, 2, 3)
    assert torch.allclose(grid[len(grid) // 2 - 5], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    registered = distance_matrix(moved, cands, "ncc", transforms=grid)
    assert rank_of_truth(registered, torch.tensor([11])).item() == 1
    plain = distance_matrix(moved, cands, "ncc")
    assert registered[0, 11] < plain[0, 11]


def test_no_augmentation_no_registration() -> None:
    recipe = EnvoyRecipe(TrainPlan(local_epochs=1, batch_size=32, lr=0.05, augment=False))
    assert augmentation_grid(recipe).tolist() == [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]


@pytest.mark.parametrize(("k", "m", "tries"), [(1, 624, 1), (5, 624, 1), (1, 624, 8), (5, 624, 32)])
def test_chance_rank_probability_is_the_best_of_uniform_ranks(k: int, m: int, tries: int) -> None:
    rng = np.random.default_rng(0)
    best = rng.integers(1, m + 1, size=(200_000, tries)).min(axis=1)
    assert chance_rank_probability(k, m, tries) == pytest.approx(
        float((best <= k).mean()), abs=3e-3
    )


def test_binomial_tail() -> None:
    assert binomial_tail(0, 48, 0.3) == 1.0
    assert binomial_tail(48, 48, 0.5) == pytest.approx(0.5**48)
    assert binomial_tail(1, 48, 1 / 624) == pytest.approx(1 - (623 / 624) ** 48)
    assert chance_p_value(1, 16, 624) == pytest.approx(binomial_tail(1, 16, 1 / 624))
    # 48 victims: one top-1 hit is still chance (p = 0.074), two are not.
    assert binomial_tail(1, 48, 1 / 624) > 0.05 > binomial_tail(2, 48, 1 / 624)
    with pytest.raises(ValueError):
        binomial_tail(3, 2, 0.5)
    assert math.isclose(binomial_tail(2, 4, 0.0), 0.0)
