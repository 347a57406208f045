"""Models: shapes, defences in the right place, bottleneck-and-after bookkeeping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradient_leakage.bottleneck import ConvVariationalBottleneck, VariationalBottleneck
from node.training.model import build_model


def _forward_order_of_parameters(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Parameter names in the order their modules actually run (hooks on a real forward)."""
    owners = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owners[module] = [*owners.get(module, []), f"{mname}.{pname}" if mname else pname]
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, _i: order.extend(owners[m])) for m in owners]
    model(x)
    for h in hooks:
        h.remove()
    return order


@pytest.mark.parametrize("defense", ["none", "cvb", "precode"])
@pytest.mark.parametrize("image_size", [28, 40, 64])
def test_cnn_shapes_and_kl(defense: str, image_size: int) -> None:
    model = build_model("cnn", defense, image_size, seed=0, width=8)
    x = torch.rand(3, 1, 28, 28)  # any input size: the model resizes to its own
    out = model(x)
    assert out.shape == (3, 2)
    kl = model.kl_loss()
    if defense == "none":
        assert kl.item() == 0.0
        assert model.bottleneck is None and model.bottleneck_and_after == ()
    else:
        assert kl.item() > 0.0
        kl.backward()  # the KL is differentiable through the encoder
        assert model.bottleneck.mu_encoder.weight.grad is not None if defense == "cvb" else True
    assert model.image_size == image_size and model.defense == defense


def test_cvb_sits_right_after_the_first_conv() -> None:
    model = build_model("cnn", "cvb", 28, seed=0, width=8)
    seen: dict[str, torch.Tensor] = {}
    model.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("conv1", o))
    model.cvb.register_forward_pre_hook(lambda m, i: seen.__setitem__("cvb_in", i[0]))
    model(torch.rand(2, 1, 28, 28))
    assert seen["cvb_in"] is seen["conv1"]
    assert isinstance(model.bottleneck, ConvVariationalBottleneck)
    assert model.before_bottleneck == ("conv1.weight",)


def test_precode_sits_before_the_classifier() -> None:
    model = build_model("cnn", "precode", 28, seed=0, width=8)
    assert isinstance(model.bottleneck, VariationalBottleneck)
    assert model.bottleneck_and_after == (
        "precode.encoder.weight",
        "precode.encoder.bias",
        "precode.decoder.weight",
        "precode.decoder.bias",
        "classifier.weight",
        "classifier.bias",
    )


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
@pytest.mark.parametrize("defense", ["cvb", "precode"])
def test_bottleneck_and_after_follows_the_real_forward_order(arch: str, defense: str) -> None:
    model = build_model(arch, defense, 28, seed=0, width=8)
    order = _forward_order_of_parameters(model, torch.rand(2, 1, 28, 28))
    assert sorted(order) == sorted(n for n, _ in model.named_parameters())
    first = min(order.index(n) for n in model.bottleneck_param_names)
    assert set(model.bottleneck_and_after) == set(order[first:])
    assert set(model.before_bottleneck) == set(order[:first])


def test_resnet18_one_channel_no_download() -> None:
    model = build_model("resnet18", "cvb", 32, seed=0)
    assert model.conv1.in_channels == 1 and model.conv1.stride == (1, 1)
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_400_000
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 2)


def test_seed_fixes_the_weights_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model("cnn", "cvb", 28, seed=5, width=8)
    assert torch.equal(state, torch.get_rng_state())
    b = build_model("cnn", "cvb", 28, seed=5, width=8)
    c = build_model("cnn", "cvb", 28, seed=6, width=8)
    for (na, pa), (_, pb), (_, _pc) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), na
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_default_cnn_is_compact() -> None:
    n = sum(p.numel() for p in build_model("cnn", "none", 28).parameters())
    assert 100_000 <= n <= 400_000


def test_bad_choices_are_refused() -> None:
    with pytest.raises(ValueError, match="arch"):
        build_model("vgg")
    with pytest.raises(ValueError, match="defense"):
        build_model("cnn", "dp")
    with pytest.raises(ValueError, match="image_size"):
        build_model("cnn", "none", 8)
    with pytest.raises(ValueError, match="norm"):
        build_model("cnn", "none", 28, norm="layer")


def test_norm_none_has_no_normalisation_and_biased_convolutions() -> None:
    model = build_model("cnn", "none", 28, seed=0, norm="none")
    kinds = (torch.nn.BatchNorm2d, torch.nn.GroupNorm)
    assert not any(isinstance(m, kinds) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.bias is not None for c in convs)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 2)


@pytest.mark.parametrize(("norm", "kind"), [("group", torch.nn.GroupNorm), ("none", None)])
def test_resnet_uses_the_norm_it_is_asked_for(norm: str, kind: type | None) -> None:
    model = build_model("resnet18", "none", 28, seed=0, norm=norm)
    norms = (torch.nn.BatchNorm2d, torch.nn.GroupNorm)
    found = {type(m) for m in model.modules() if isinstance(m, norms)}
    assert found == ({kind} if kind else set())


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cnn_depth_counts_convolutions_per_stage(depth: int) -> None:
    model = build_model("cnn", "cvb", 28, width=8, depth=depth, seed=0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bottleneck_convs = [m for m in model.cvb.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) - len(bottleneck_convs) == 3 * depth
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 2)
    with pytest.raises(ValueError, match="depth"):
        build_model("cnn", "none", 28, depth=0)


def test_depth_two_is_the_default_model() -> None:
    a = build_model("cnn", "cvb", 28, seed=0)
    b = build_model("cnn", "cvb", 28, seed=0, depth=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    # The conv and norm weight names every checkpoint so far was saved under.
    feature_weights = [k for k in sa if k.startswith("features") and k.endswith("weight")]
    assert feature_weights == [f"features.{i}.weight" for i in (1, 2, 5, 6, 8, 9, 12, 13, 15, 16)]
