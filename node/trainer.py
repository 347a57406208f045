"""What an envoy trains with: its share of the data and the trainer that runs the model.

The envoy's round code (node.envoy) only sees the `Trainer` protocol; the default
`TorchTrainer` rebuilds the federation's model and runs node.training on this envoy's part of
the data, which `load_local_data` computes locally from the config (no coordination).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from node.config import EnvoyConfig, model_kwargs
from node.training import data as d
from node.training.partition import select_partition
from protocol.messages import TrainPlan

__all__ = ["LocalData", "TorchTrainer", "Trainer", "load_local_data"]


class Trainer(Protocol):
    """Local training and validation scoring; the default runs the ml team's torch code."""

    def train(
        self, weights: Mapping[str, np.ndarray], plan: TrainPlan, *, seed: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        """(new weights, number of samples, mean training loss)."""

    def evaluate(
        self, weights: Mapping[str, np.ndarray], bins: int
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """(negative histogram, positive histogram, summed log loss) on the validation split."""


@dataclass(frozen=True)
class LocalData:
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


def _limit(
    images: np.ndarray, labels: np.ndarray, limit: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    if not limit or limit >= len(labels):
        return images, labels
    idx = np.sort(np.random.default_rng(seed).permutation(len(labels))[:limit])
    return images[idx], labels[idx]


def load_local_data(cfg: EnvoyConfig) -> LocalData:
    """This envoy's share of the data, computed locally from the config (no coordination)."""
    src = cfg.data
    part = src.partition
    seed = part.seed if part is not None else 0
    if src.source == "pneumoniamnist":
        ds = d.load_pneumoniamnist(src.path)
        splits = {"train": ds.train, "val": ds.val}
    else:
        ds = d.load_image_folder_dataset(
            src.path, src.image_size, val_fraction=src.val_fraction, seed=seed
        )
        splits = {"train": ds.train, "val": ds.val}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for offset, (name, split) in enumerate(splits.items()):
        images, labels = _limit(split.images, split.labels, src.limit, seed + 7)
        # No partition, or "folder": all of this envoy's data is its own.
        if part is not None and part.scheme != "folder":
            idx = select_partition(
                labels,
                scheme=part.scheme,
                num_envoys=part.count,
                index=part.index,
                seed=part.seed + offset,
                alpha=part.alpha,
            )
            images, labels = images[idx], labels[idx]
        out[name] = (images, labels)
    return LocalData(*out["train"], *out["val"])


class TorchTrainer:
    """Builds the federation's model and runs node.training's train/predict in this thread."""

    def __init__(self, cfg: EnvoyConfig, data: LocalData) -> None:
        import torch

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.data = data

    def _model(self, weights: Mapping[str, np.ndarray]) -> Any:
        from node.training.model import build_model
        from node.training.weights import set_weights

        model = build_model(**model_kwargs(self.cfg.model))
        set_weights(model, weights)
        return model

    def train(
        self, weights: Mapping[str, np.ndarray], plan: TrainPlan, *, seed: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        from node.training.train import train_local
        from node.training.weights import get_weights

        model = self._model(weights)
        res = train_local(model, self.data.train_images, self.data.train_labels, plan, seed=seed)
        return get_weights(model), int(res.num_samples), float(res.loss)

    def evaluate(
        self, weights: Mapping[str, np.ndarray], bins: int
    ) -> tuple[np.ndarray, np.ndarray, float]:
        from node.training.train import evaluate

        model = self._model(weights)
        res = evaluate(model, self.data.val_images, self.data.val_labels, bins)
        return (
            np.asarray(res.hist_negative, dtype=np.int64),
            np.asarray(res.hist_positive, dtype=np.int64),
            float(res.loss_sum),
        )
