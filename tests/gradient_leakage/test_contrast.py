"""The contrast prior: it reads only an image's shape, and its guess beats the population's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradient_leakage.contrast import ContrastPrior
from node.training.model import PIXEL_MEAN, PIXEL_STD
from tests.datafiles import PNEUMONIAMNIST

CENTER = 0.5


def references(m: int = 12, seed: int = 0) -> torch.Tensor:
    """Distinct images in [0.25, 0.75], so any contrast up to x2 still fits the box."""
    g = torch.Generator().manual_seed(seed)
    return CENTER + 0.25 * (2 * torch.rand((m, 1, 6, 6), generator=g) - 1)


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, 11), contrast=st.floats(0.1, 10.0))
def test_a_reference_seen_at_any_contrast_comes_back_exactly(index: int, contrast: float) -> None:
    refs = references()
    prior = ContrastPrior(refs, CENTER, k=1)
    seen = CENTER + contrast * (refs[index : index + 1] - CENTER)
    torch.testing.assert_close(prior.apply(seen, box=None), refs[index : index + 1])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), contrast=st.floats(0.05, 20.0))
def test_the_estimate_reads_only_the_shape(seed: int, contrast: float) -> None:
    prior = ContrastPrior(references(), CENTER, k=3)
    x = references(3, seed=seed + 1).double()
    scaled = CENTER + contrast * (x - CENTER)
    torch.testing.assert_close(prior.estimate(scaled), prior.estimate(x))
    # and the result lies on the input's own ray: same shape, new contrast
    out = prior.apply(scaled, box=None)
    dev_in, dev_out = (x - CENTER).flatten(1), (out - CENTER).flatten(1)
    cos = torch.nn.functional.cosine_similarity(dev_in.double(), dev_out.double())
    torch.testing.assert_close(cos, torch.ones(3, dtype=torch.float64))


def test_flat_images_come_back_unchanged_and_the_box_holds() -> None:
    prior = ContrastPrior(references(), CENTER, k=2)
    flat = torch.full((1, 1, 6, 6), CENTER)
    torch.testing.assert_close(prior.apply(flat), flat)
    loud = CENTER + 50 * (references(1, seed=7) - CENTER)
    assert prior.apply(loud, box=None).abs().max() < 2
    boxed = prior.apply(torch.cat([loud, flat]), box=(0.3, 0.7))
    assert boxed.min() >= 0.3 and boxed.max() <= 0.7


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="k=13"):
        ContrastPrior(references(), CENTER, k=13)
    with pytest.raises(ValueError, match="k=0"):
        ContrastPrior(references(), CENTER, k=0)
    with pytest.raises(ValueError, match="references"):
        ContrastPrior(torch.zeros(5), CENTER)
    with pytest.raises(ValueError, match="k=1"):  # flat references carry no shape
        ContrastPrior(torch.full((4, 1, 6, 6), CENTER), CENTER, k=1)
    prior = ContrastPrior(references(), CENTER, k=2)
    with pytest.raises(ValueError, match="images of shape"):
        prior.estimate(torch.zeros(1, 1, 5, 5))


def test_on_real_x_rays_the_neighbours_guess_beats_the_population_rms() -> None:
    with np.load(PNEUMONIAMNIST) as npz:
        train = torch.from_numpy(npz["train_images"].astype(np.float32) / 255)[:, None]
        test = torch.from_numpy(npz["test_images"].astype(np.float32) / 255)[:, None]
    prior = ContrastPrior(train, PIXEL_MEAN)
    truth = (test.double() - PIXEL_MEAN).flatten(1).pow(2).mean(1).sqrt()
    # The victim's shape is all the attacker has; any contrast on the ray gives the same guess.
    shown = PIXEL_MEAN + 0.37 * (test - PIXEL_MEAN)
    knn_error = (prior.estimate(shown) / truth).log().abs().mean()
    population_error = (PIXEL_STD / truth).log().abs().mean()
    assert knn_error < 0.8 * population_error
    # and so the images themselves come back closer
    mse_knn = (prior.apply(shown) - test).pow(2).mean()
    rms_shown = (shown - PIXEL_MEAN).flatten(1).pow(2).mean(1).sqrt()[:, None, None, None]
    fixed = (PIXEL_MEAN + (shown - PIXEL_MEAN) * PIXEL_STD / rms_shown).clamp(0, 1)
    assert mse_knn < (fixed - test).pow(2).mean()
