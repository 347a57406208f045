"""Training from a Dataset read batch by batch is training from the arrays, step for step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset

from node.training.batches import (
    ArrayDataset,
    LabelledDataset,
    dataset_labels,
    images_to_tensor,
    with_labels,
)
from node.training.data import load_pneumoniamnist
from node.training.model import build_model
from node.training.train import predict_dataset, predict_logits, train_local
from node.training.weights import get_weights
from protocol.messages import TrainPlan
from tests.datafiles import PNEUMONIAMNIST


class OnDemand(Dataset):
    """Items made when asked (as a file-reading dataset would), counting the reads."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, with_labels: bool) -> None:
        self._images, self._labels = images, labels
        if with_labels:
            self.labels = labels
        self.reads = 0

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int):
        self.reads += 1
        return images_to_tensor(self._images[i : i + 1])[0], int(self._labels[i])


@pytest.fixture(scope="module")
def data():
    ds = load_pneumoniamnist(PNEUMONIAMNIST)
    return ds.train.images[:97], ds.train.labels[:97]  # 97 = 3 * 32 + 1: a folded last batch


PLAN = TrainPlan(local_epochs=2, batch_size=32, lr=0.05, momentum=0.9, kl_beta=0.01)


def trained(images, labels, **kw) -> dict[str, np.ndarray]:
    model = build_model("cnn", "cvb", 28, seed=0, width=8)
    result = train_local(model, images, labels, PLAN, seed=7, **kw)
    assert result.num_samples == 97 and result.steps == 2 * 3
    return get_weights(model)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_dataset_trains_exactly_like_the_arrays(data, workers) -> None:
    images, labels = data
    want = trained(images, labels)
    streamed = OnDemand(images, labels, with_labels=True)
    got = trained(streamed, None, workers=workers)
    assert all(np.array_equal(want[k], got[k]) for k in want)
    if workers == 0:
        assert streamed.reads == 2 * 97  # every item read once per epoch, nothing held
    assert all(np.array_equal(want[k], v) for k, v in trained(ArrayDataset(*data), None).items())


def test_predictions_over_a_dataset_are_the_array_predictions(data) -> None:
    images, labels = data
    model = build_model("cnn", "cvb", 28, seed=0, width=8)
    logits, got_labels = predict_dataset(model, OnDemand(images, labels, with_labels=False), 40)
    assert torch.allclose(logits, predict_logits(model, images), atol=1e-6)
    assert got_labels.tolist() == labels.tolist()


def test_labels_are_found_without_reading_images_where_the_dataset_tells_them(data) -> None:
    images, labels = data
    told = OnDemand(images, labels, with_labels=True)
    assert dataset_labels(told).tolist() == labels.tolist() and told.reads == 0
    sub = Subset(told, [5, 1, 9])
    assert dataset_labels(sub).tolist() == labels[[5, 1, 9]].tolist() and told.reads == 0
    assert with_labels(sub) is sub

    class Targets(OnDemand):
        @property
        def targets(self) -> list[int]:  # torchvision's ImageFolder convention
            return [int(x) for x in self._labels]

    assert dataset_labels(Targets(images, labels, with_labels=False)).tolist() == labels.tolist()
    silent = OnDemand(images, labels, with_labels=False)
    wrapped = with_labels(silent)
    assert isinstance(wrapped, LabelledDataset) and silent.reads == 97  # read once, here
    assert dataset_labels(wrapped).tolist() == labels.tolist() and silent.reads == 97
    assert wrapped[3][1] == int(labels[3])


def test_array_input_without_labels_and_a_dataset_with_them_are_refused(data) -> None:
    images, labels = data
    model = build_model("cnn", "cvb", 28, seed=0, width=8)
    with pytest.raises(ValueError, match="need their labels"):
        train_local(model, images, None, PLAN, seed=0)
    with pytest.raises(ValueError, match="carries its own labels"):
        train_local(model, OnDemand(images, labels, with_labels=True), labels, PLAN, seed=0)
