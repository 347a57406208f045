"""Averaging over rounds: the last k global models, averaged (SWA-style) or ensembled.

Late in a federated run consecutive global models differ by one noisy round of skewed
local training each; averaging the last k of them (stochastic weight averaging, Izmailov
et al. 2018, applied to the server's trajectory) or averaging their predictions (an
ensemble) cancels part of that noise. Both use only models the director already has, so
they cost no extra exposure. The averaged model's BatchNorm statistics are not an average
of anything meaningful and must be recomputed (node/training/batchnorm.py, through secure
aggregation); an ensemble keeps each member's own statistics but costs k forward passes
per image at evaluation and in deployment.

`RecentModels` is the director's window of the last k global models; k is chosen on
validation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from node.training.train import predict_logits
from node.training.weights import set_weights, weighted_average


def average_weights(models: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The uniform average of `models` (every entry, BatchNorm buffers included)."""
    if not models:
        raise ValueError("nothing to average")
    return weighted_average(models, [1] * len(models))


class RecentModels:
    """The last `capacity` global models, oldest first, keyed by round."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[tuple[int, dict[str, np.ndarray]]] = deque(maxlen=capacity)

    def push(self, round: int, weights: Mapping[str, np.ndarray]) -> None:
        if self._items and round <= self._items[-1][0]:
            raise ValueError(f"round {round} is not after round {self._items[-1][0]}")
        self._items.append((round, {k: np.array(v, np.float32) for k, v in weights.items()}))

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        return iter(self._items)

    @property
    def rounds(self) -> list[int]:
        return [r for r, _ in self._items]

    def last(self, k: int) -> list[dict[str, np.ndarray]]:
        """The newest k models (oldest first); k may not exceed what the window holds."""
        if not 1 <= k <= len(self._items):
            raise ValueError(f"k must be in 1..{len(self._items)}, got {k}")
        return [w for _, w in list(self._items)[-k:]]

    def average(self, k: int) -> dict[str, np.ndarray]:
        """Uniform average of the newest k (recompute its BatchNorm statistics before use)."""
        return average_weights(self.last(k))

    def state(self) -> list[tuple[int, dict[str, np.ndarray]]]:
        return [(r, dict(w)) for r, w in self._items]


@torch.no_grad()
def ensemble_logits(
    model: nn.Module,
    members: Sequence[Mapping[str, np.ndarray]],
    images: np.ndarray | Tensor,
    *,
    flip_tta: bool = False,
) -> Tensor:
    """Log of the members' mean P(class), per image: the ensemble as one logits tensor.

    `model` is used as the template each member's weights are loaded into (its own weights
    are restored afterwards). Probabilities, not logits, are averaged: an ensemble of
    calibrated members stays a probability.
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        probs = None
        for w in members:
            set_weights(model, w)
            p = torch.softmax(predict_logits(model, images, flip_tta=flip_tta).double(), dim=1)
            probs = p if probs is None else probs + p
        assert probs is not None
        return torch.log(probs / len(members))
    finally:
        model.load_state_dict(saved)
