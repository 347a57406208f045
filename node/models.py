"""The federation's network from a `[model]` section: a bundled model or a team's own factory.

The director (initial weights, export) and every envoy (training, evaluation) build the model
here, so all of them call the same factory with the same arguments:

* no ``factory``: node.training.model.build_model with the bundled fields (arch, defense,
  width, norm, dropout) and the I/O fields;
* ``factory = "package.module:function"``: ``function(num_classes=..., in_channels=...,
  image_size=..., **options)``, which must return a torch.nn.Module taking float images
  N x in_channels x image_size x image_size in [0, 1] and returning logits N x num_classes.

`check_model` runs one forward pass on a blank batch and names what does not fit, so a wrong
factory fails when the node starts, with the reason, not in the middle of round 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from node.config import ModelConfig, model_kwargs
from node.entrypoints import EntryPointError, load_entry_point

__all__ = ["build_configured_model", "check_model", "initial_model_weights"]

# What the round code, the trainer and export read from any model; taken from [model] when a
# team's module does not set them itself.
IO_ATTRIBUTES = ("num_classes", "in_channels", "image_size")


def build_configured_model(m: ModelConfig, *, seed: int | None = None) -> nn.Module:
    """The model `m` describes; `seed` makes its initial weights reproducible."""
    if m.factory is None:
        from node.training.model import build_model

        return build_model(**model_kwargs(m), seed=seed)
    factory = load_entry_point(m.factory, field="model.factory")
    kwargs = model_kwargs(m)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = factory(**kwargs)
        except TypeError as exc:
            raise EntryPointError(
                f"model.factory = {m.factory!r} cannot be called with the keyword arguments "
                f"{sorted(kwargs)} (num_classes, in_channels, image_size and [model.options]): "
                f"{exc}"
            ) from exc
        except Exception as exc:  # the team's code failed: say where and how
            raise EntryPointError(
                f"model.factory = {m.factory!r} raised {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(model, nn.Module):
        raise EntryPointError(
            f"model.factory = {m.factory!r} returned a {type(model).__name__}, not a "
            f"torch.nn.Module"
        )
    for name in IO_ATTRIBUTES:
        configured = getattr(m, name)
        own = getattr(model, name, None)
        if own is None:
            setattr(model, name, configured)
        elif own != configured:
            raise EntryPointError(
                f"model.factory = {m.factory!r} built a model with {name} = {own!r}, but "
                f"[model] {name} = {configured!r}"
            )
    return model


@torch.no_grad()
def check_model(model: nn.Module, m: ModelConfig) -> None:
    """One forward pass on a blank batch: the output must be logits N x num_classes."""
    shape = (2, m.in_channels, m.image_size, m.image_size)
    was_training = model.training
    model.eval()
    try:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        out: Any = model(torch.zeros(shape, device=device))
    except Exception as exc:
        raise EntryPointError(
            f"the model of [model] ({m.factory_name}) fails on a batch of shape {list(shape)} "
            f"(in_channels x image_size x image_size): {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, m.num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EntryPointError(
            f"the model of [model] ({m.factory_name}) returns {got} for a batch of 2; it must "
            f"return logits of shape [batch, num_classes] = [2, {m.num_classes}]"
        )


def initial_model_weights(m: ModelConfig) -> dict[str, np.ndarray]:
    """The federation's seeded initial weights (`init_seed`), checked against [model]."""
    from node.training.weights import get_weights

    model = build_configured_model(m, seed=m.init_seed)
    check_model(model, m)
    return {k: np.asarray(v, dtype=np.float32) for k, v in get_weights(model).items()}
