"""Batch-norm statistics through secure aggregation: the pooled envoys equal the union of their data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from crypto.quantize import QuantizationRange, decode_weighted_sum, encode_weighted_update
from node.training.batchnorm import (
    MOMENTS_CLIP,
    BatchNormLayout,
    batchnorm_moments,
    running_stats_from_moments,
)
from node.training.model import build_model
from node.training.weights import get_weights, set_weights, weighted_average

SAMPLE_CAP = 65536


def _images(seed: int, n: int, size: int = 28) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth-ish random images with a per-image brightness, so channels have real spread.
    base = rng.integers(0, 256, (n, size, size)).astype(np.float64)
    bright = rng.uniform(-60, 60, (n, 1, 1))
    return np.clip(base * 0.5 + 64 + bright, 0, 255).astype(np.uint8)


def _model(defense: str = "cvb", seed: int = 0) -> nn.Module:
    m = build_model("cnn", defense, 28, width=4, seed=seed)
    # Running statistics far from the truth, as an averaged model's are.
    w = get_weights(m)
    rng = np.random.default_rng(seed)
    for k in w:
        if k.endswith("running_mean"):
            w[k] = rng.normal(0, 0.5, w[k].shape).astype(np.float32)
        elif k.endswith("running_var"):
            w[k] = rng.uniform(0.2, 3.0, w[k].shape).astype(np.float32)
    set_weights(m, w)
    return m


def _bn_inputs_eval(model: nn.Module, x: np.ndarray) -> dict[str, torch.Tensor]:
    """Each BatchNorm layer's input over x, with BatchNorm normalising by the whole batch."""
    seen: dict[str, torch.Tensor] = {}
    work = copy.deepcopy(model)
    work.eval()
    hooks = []
    for name, m in work.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.momentum = 0.0
            hooks.append(
                m.register_forward_pre_hook(lambda _m, a, name=name: seen.__setitem__(name, a[0]))
            )
    with torch.no_grad():
        work(torch.as_tensor(x).float().div(255).unsqueeze(1))
    for h in hooks:
        h.remove()
    return seen


def test_first_layer_statistics_equal_the_direct_computation() -> None:
    model = _model()
    x = _images(1, 40)
    vector, n = batchnorm_moments(model, x, batch_size=64)
    assert n == 40
    layout = BatchNormLayout.of(model)
    new = running_stats_from_moments(get_weights(model), layout, vector)
    first = layout.names[0]
    assert first == "norm1"  # after conv1 and the bottleneck (at its mean in eval)
    inputs = _bn_inputs_eval(model, x)[first].double()
    mean = inputs.mean(dim=(0, 2, 3)).numpy()
    var = inputs.var(dim=(0, 2, 3), unbiased=False).numpy()
    np.testing.assert_allclose(new["norm1.running_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["norm1.running_var"], var, rtol=1e-4, atol=1e-6)


def test_matches_torch_update_bn_with_one_batch() -> None:
    """With one batch, update_bn's statistics are the pooled ones (its variance unbiased)."""
    model = _model("none")
    x = _images(2, 64)
    vector, _ = batchnorm_moments(model, x, batch_size=64)
    layout = BatchNormLayout.of(model)
    ours = running_stats_from_moments(get_weights(model), layout, vector)
    ref = copy.deepcopy(model)
    loader = [torch.as_tensor(x).float().div(255).unsqueeze(1)]
    torch.optim.swa_utils.update_bn(loader, ref)
    inputs = _bn_inputs_eval(model, x)
    assert set(inputs) == set(layout.names)
    for name in layout.names:
        m = inputs[name].shape[0] * inputs[name].shape[2] * inputs[name].shape[3]
        ref_state = ref.get_submodule(name)
        np.testing.assert_allclose(
            ours[f"{name}.running_mean"], ref_state.running_mean.numpy(), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            ours[f"{name}.running_var"] * m / (m - 1),
            ref_state.running_var.numpy(),
            rtol=1e-4,
            atol=1e-5,
        )


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(0, 1000))
def test_secure_pooling_over_envoys_equals_the_union(batches: list[int], seed: int) -> None:
    """Envoys' vectors, quantised, summed mod 2^32 and decoded = the moments of all their images.

    Shares are whole batches of 8, so the union sees exactly the same batches (batch
    statistics shape every layer after the first).
    """
    model = _model(seed=seed % 7)
    shares = [_images(seed + i, 8 * b) for i, b in enumerate(batches)]
    union, n_union = batchnorm_moments(model, np.concatenate(shares), batch_size=8)
    qrange = QuantizationRange(clip=MOMENTS_CLIP, max_summands=len(shares))
    rng = np.random.default_rng(seed)
    total = np.zeros(BatchNormLayout.of(model).size + 1, np.uint64)
    plain = []
    for share in shares:
        vector, n = batchnorm_moments(model, share, batch_size=8)
        plain.append(vector)
        total += encode_weighted_update(
            vector, n, sample_cap=SAMPLE_CAP, qrange=qrange, rng=rng
        ).astype(np.uint64)
    pooled, samples = decode_weighted_sum(
        (total % 2**32).astype(np.uint32),
        sample_cap=SAMPLE_CAP,
        qrange=qrange,
        summands=len(shares),
    )
    assert round(samples) == n_union
    weights = [len(s) for s in shares]
    exact = weighted_average([{"v": v} for v in plain], weights)["v"]
    np.testing.assert_allclose(exact, union, rtol=1e-5, atol=1e-6)
    # Quantisation error: within summands * (1/scale) / (total weight) per element.
    bound = len(shares) * qrange.max_error_per_summand / (n_union / SAMPLE_CAP)
    assert np.max(np.abs(pooled - union)) <= bound + 1e-6


def test_recalibrated_model_normalises_its_first_layer() -> None:
    model = _model()
    x = _images(5, 48)
    vector, _ = batchnorm_moments(model, x, batch_size=16)
    set_weights(
        model, running_stats_from_moments(get_weights(model), BatchNormLayout.of(model), vector)
    )
    model.eval()
    with torch.no_grad():
        h = model.norm1(
            model.cvb(
                model.conv1(model.preprocess(torch.as_tensor(x).float().div(255).unsqueeze(1)))
            )
        )
    # norm1 = gamma * z + beta with gamma 1, beta 0 at initialisation
    assert h.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (h.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-2


def test_the_model_is_left_untouched() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    batchnorm_moments(model, _images(3, 17), batch_size=4)  # 4+4+4+5: a lone last image folds in
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_refusals() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        batchnorm_moments(build_model("cnn", "none", 28, width=4, norm="group"), _images(0, 4))
    model = _model()
    with pytest.raises(ValueError, match="no images"):
        batchnorm_moments(model, np.zeros((0, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="at least 2"):
        batchnorm_moments(model, _images(0, 1))
    layout = BatchNormLayout.of(model)
    with pytest.raises(ValueError, match="entries"):
        running_stats_from_moments(get_weights(model), layout, np.zeros(layout.size - 1))
    w = get_weights(model)
    del w["norm1.running_var"]
    with pytest.raises(ValueError, match="norm1"):
        running_stats_from_moments(w, layout, np.zeros(layout.size))
