"""Where training batches come from: images held in memory, or a torch Dataset read from disk.

`train_local` draws one permutation per epoch and asks its `BatchSource` for the batches of
that permutation, so the order, and every random draw around it, is the same whichever
source holds the data:

* `InMemoryBatches` indexes one tensor (the bundled PneumoniaMNIST / image-folder arrays);
* `StreamedBatches` reads the items of a torch Dataset through a DataLoader whose batch
  sampler is that very permutation: a dataset that reads each file on demand (a team's own
  loader, node.training.manifest) is never held in memory, and `workers` processes read
  ahead while the model trains.

A dataset's items are (image, label): the image float C x H x W in [0, 1] (or uint8 0..255),
the label an integer class index. `dataset_labels` finds the labels without reading the
images when the dataset has a `labels` array (as ArrayDataset and ManifestDataset do) or a
`targets` one (torchvision's ImageFolder), or is a torch Subset of such a dataset; otherwise
it reads the dataset once (`with_labels` keeps what it read).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "ArrayDataset",
    "BatchSource",
    "InMemoryBatches",
    "LabelledDataset",
    "StreamedBatches",
    "batch_source",
    "dataset_labels",
    "images_to_tensor",
    "loader_context",
    "with_labels",
]


def images_to_tensor(images: np.ndarray | Tensor) -> Tensor:
    """uint8 N x H x W (or N x C x H x W) -> float32 N x C x H x W in [0, 1]."""
    t = torch.as_tensor(images)
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise ValueError(f"images must be N x H x W or N x C x H x W, got {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    return t.float()


class ArrayDataset(Dataset):
    """Images and labels already in memory (uint8 N x H x W or N x C x H x W) as a Dataset."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        labels = np.asarray(labels, np.int64).reshape(-1)
        if len(images) != labels.shape[0]:
            raise ValueError(f"{len(images)} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return images_to_tensor(self.images[index : index + 1])[0], int(self.labels[index])


class LabelledDataset(Dataset):
    """A dataset whose labels were read once, so nothing needs to read them again."""

    def __init__(self, dataset: Dataset, labels: np.ndarray) -> None:
        self.dataset = dataset
        self.labels = np.asarray(labels, np.int64).reshape(-1)
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def with_labels(dataset: Dataset) -> Dataset:
    """`dataset`, able to tell its labels without reading its images (read them once now if
    it cannot: a dataset with a `labels` array spares that pass)."""
    if _knows_labels(dataset):
        return dataset
    return LabelledDataset(dataset, dataset_labels(dataset))


def _knows_labels(dataset: Any) -> bool:
    if isinstance(dataset, Subset):
        return _knows_labels(dataset.dataset)
    return _label_array(dataset) is not None


def dataset_labels(dataset: Any) -> np.ndarray:
    """The int64 labels of a dataset, in item order (see the module docstring)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, np.int64)]
    labels = _label_array(dataset)
    if labels is not None:
        return labels
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def _label_array(dataset: Any) -> np.ndarray | None:
    """`labels` (fedbus' datasets) or `targets` (torchvision's), if it has one that fits."""
    for name in ("labels", "targets"):
        values = getattr(dataset, name, None)
        if values is not None:
            out = np.asarray(values).reshape(-1)
            if out.shape[0] == len(dataset) and np.issubdtype(out.dtype, np.integer):
                return out.astype(np.int64)
    return None


def loader_context(workers: int) -> Any:
    """Worker processes start from a fork server: the node forks no thread-holding process."""
    if workers and "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return None


class BatchSource(Protocol):
    labels: np.ndarray

    def __len__(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    def batches(
        self, perm: Tensor, batch: int, steps: int, device: torch.device
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(indices, images on `device`, labels on `device`) per step, in `perm` order; the
        last step takes the rest of the permutation."""
        ...


def _slices(perm: Tensor, batch: int, steps: int) -> list[Tensor]:
    n = int(perm.shape[0])
    return [perm[b * batch : (b + 1) * batch if b < steps - 1 else n] for b in range(steps)]


class InMemoryBatches:
    def __init__(self, images: np.ndarray | Tensor, labels: Any) -> None:
        self.x = images_to_tensor(images)
        self.y = torch.as_tensor(np.asarray(labels, np.int64).reshape(-1))
        self.labels = self.y.numpy()
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.x.shape[0]} images but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])

    def batches(
        self, perm: Tensor, batch: int, steps: int, device: torch.device
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for idx in _slices(perm, batch, steps):
            yield idx, self.x[idx].to(device), self.y[idx].to(device)


class StreamedBatches:
    def __init__(self, dataset: Dataset, *, workers: int = 0) -> None:
        self.dataset = dataset
        self.workers = workers
        self.labels = dataset_labels(dataset)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(torch.as_tensor(self.dataset[0][0]).shape[-1])

    def batches(
        self, perm: Tensor, batch: int, steps: int, device: torch.device
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        slices = _slices(perm, batch, steps)
        loader = DataLoader(
            self.dataset,
            batch_sampler=[s.tolist() for s in slices],
            num_workers=self.workers,
            multiprocessing_context=loader_context(self.workers),
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the
            # global RNG, which the training step's dropout and bottleneck noise draw from.
            generator=torch.Generator().manual_seed(0),
        )
        for idx, (x, y) in zip(slices, loader, strict=True):
            yield idx, images_to_tensor(x).to(device), torch.as_tensor(y).long().to(device)


def batch_source(
    images: np.ndarray | Tensor | Dataset,
    labels: Sequence[int] | np.ndarray | None,
    *,
    workers: int = 0,
) -> InMemoryBatches | StreamedBatches:
    """The source for `train_local`'s (images, labels): arrays, an ArrayDataset (held in
    memory either way) or any other Dataset (streamed; its items carry the labels)."""
    if isinstance(images, ArrayDataset):
        return InMemoryBatches(images.images, images.labels)
    if isinstance(images, Dataset):
        if labels is not None:
            raise ValueError("a Dataset carries its own labels; pass labels=None")
        return StreamedBatches(images, workers=workers)
    if labels is None:
        raise ValueError("images given as an array need their labels")
    return InMemoryBatches(images, labels)
