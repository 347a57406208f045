"""The model from [model]: a team's factory is called as documented, checked, and seeded."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from node.config import ModelConfig
from node.entrypoints import EntryPointError
from node.models import build_configured_model, check_model, initial_model_weights
from tests.byo.teamcode import team_module

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    CALLS = []

    def net(num_classes, in_channels, image_size, width=4):
        CALLS.append(dict(num_classes=num_classes, in_channels=in_channels,
                          image_size=image_size, width=width))
        return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(width, num_classes))

    def no_kwargs():
        return nn.Linear(1, 1)

    def not_a_module(**kw):
        return "a string"

    def raises(**kw):
        raise RuntimeError("out of memory")

    def wrong_output(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes + 1))

    def fails_on_input(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Conv2d(in_channels + 1, num_classes, 3))

    def says_two_classes(num_classes, in_channels, image_size):
        model = net(num_classes, in_channels, image_size)
        model.num_classes = 2
        return model
    """
)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    with team_module(tmp_path, monkeypatch, "teamnets", FACTORIES):
        yield


def cfg(factory: str, **kw) -> ModelConfig:
    base = {"num_classes": 3, "in_channels": 3, "image_size": 16}
    return ModelConfig(factory=f"teamnets:{factory}", **{**base, **kw})


def test_the_factory_gets_the_documented_arguments_and_the_model_its_io(factories) -> None:
    import teamnets

    model = build_configured_model(cfg("net", options={"width": 6}))
    assert teamnets.CALLS[-1] == {"num_classes": 3, "in_channels": 3, "image_size": 16, "width": 6}
    assert (model.num_classes, model.in_channels, model.image_size) == (3, 3, 16)
    check_model(model, cfg("net"))


def test_the_seed_makes_the_initial_weights_and_leaves_the_global_rng_alone(factories) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = initial_model_weights(cfg("net", init_seed=5))
    assert torch.equal(torch.rand(1), expected_next)
    b = initial_model_weights(cfg("net", init_seed=5))
    c = initial_model_weights(cfg("net", init_seed=6))
    assert a.keys() == b.keys() == c.keys() and all(v.dtype == np.float32 for v in a.values())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        ("no_kwargs", r"cannot be called with the keyword arguments \['image_size', 'in_chan"),
        ("not_a_module", "returned a str, not a torch.nn.Module"),
        ("raises", "raised RuntimeError: out of memory"),
        ("says_two_classes", r"built a model with num_classes = 2, but \[model\] num_classes = 3"),
    ],
)
def test_a_factory_that_does_not_keep_the_contract_is_named(factories, factory, words) -> None:
    with pytest.raises(EntryPointError, match=words):
        build_configured_model(cfg(factory))


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        ("wrong_output", r"returns \[2, 4\] for a batch of 2; .* \[2, 3\]"),
        ("fails_on_input", r"fails on a batch of shape \[2, 3, 16, 16\]"),
    ],
)
def test_the_forward_check_names_what_does_not_fit(factories, factory, words) -> None:
    with pytest.raises(EntryPointError, match=words):
        initial_model_weights(cfg(factory))


def test_the_bundled_model_takes_rgb_and_many_classes() -> None:
    m = ModelConfig(width=4, in_channels=3, num_classes=5, image_size=32)
    model = build_configured_model(m, seed=0)
    check_model(model, m)
    assert model.conv1.in_channels == 3 and model.classifier.out_features == 5
