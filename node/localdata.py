"""What an envoy trains and validates on: its own train and val datasets, from its config.

Two ways, one result (`LocalData`: two torch Datasets of (image, class index) items):

* the bundled sources (`[data] source`): PneumoniaMNIST or a Kermany-style image folder, read
  into memory (`ArrayDataset`), `limit` and `partition` applied as they always were;
* a team's own loader (`[data] loader = "package.module:function"`), called as
  ``loader(path, **options)`` (``loader(**options)`` without `[data] path`). It returns this
  envoy's datasets as a pair ``(train, val)`` or a mapping with "train" and "val" (and
  maybe "test", which the envoy ignores: its test split is its own business). Datasets may
  read their files on demand (node.training.manifest's do): nothing is loaded here but the
  labels. `limit` and `partition` then apply to them too, by index (torch Subset), so a
  demo federation can share one data set between envoys the same way.

`check_local_data` reads one item of each split and checks it against `[model]`: image
channels and size, labels within the classes, the class names where the dataset names them.
A mismatch is a `DataMismatch` naming both sides, when the envoy starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from node.config import DataSource, EnvoyConfig, ModelConfig
from node.entrypoints import EntryPointError, load_entry_point
from node.errors import ExitCode, FedbusError
from node.training import data as d
from node.training.batches import ArrayDataset, dataset_labels, with_labels
from node.training.partition import select_partition

__all__ = ["DataMismatch", "LocalData", "call_loader", "check_local_data", "load_local_data"]


class DataMismatch(FedbusError):
    """The envoy's data does not fit its [model] (channels, size, labels, class names)."""

    exit_code = ExitCode.CONFIG


@dataclass(frozen=True)
class LocalData:
    train: Dataset[Any]
    val: Dataset[Any]
    # Class names, in label order, where the data names them (a manifest's classes).
    classes: tuple[str, ...] | None = None


def _limit_indices(n: int, limit: int, seed: int) -> np.ndarray | None:
    if not limit or limit >= n:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def _bundled(src: DataSource) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    assert src.path is not None  # DataSource requires it without a loader
    if src.source == "pneumoniamnist":
        ds = d.load_pneumoniamnist(src.path)
    else:
        ds = d.load_image_folder_dataset(
            src.path, src.image_size, val_fraction=src.val_fraction, seed=_seed(src)
        )
    return {"train": (ds.train.images, ds.train.labels), "val": (ds.val.images, ds.val.labels)}


def call_loader(src: DataSource) -> dict[str, Dataset[Any]]:
    """The splits a team's loader returns: "train" and "val", and "test" if it gives one."""
    assert src.loader is not None
    loader = load_entry_point(src.loader, field="data.loader")
    try:
        out = loader(src.path, **src.options) if src.path is not None else loader(**src.options)
    except FedbusError:
        raise
    except Exception as exc:  # the team's loader failed: say which and how
        raise EntryPointError(
            f"data.loader = {src.loader!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(out, Mapping):
        missing = [k for k in ("train", "val") if k not in out]
        if missing:
            raise EntryPointError(
                f"data.loader = {src.loader!r} returned a mapping without {missing}; it must "
                f"hold 'train' and 'val' datasets"
            )
        splits = {k: out[k] for k in ("train", "val", "test") if k in out}
    elif isinstance(out, tuple | list) and len(out) == 2:
        splits = {"train": out[0], "val": out[1]}
    else:
        raise EntryPointError(
            f"data.loader = {src.loader!r} returned a {type(out).__name__}; it must return "
            f"(train, val) datasets or a mapping with 'train' and 'val'"
        )
    for name, ds in splits.items():
        if not isinstance(ds, Dataset) or not hasattr(ds, "__len__"):
            raise EntryPointError(
                f"data.loader = {src.loader!r}: its {name} split is a {type(ds).__name__}, "
                f"not a torch.utils.data.Dataset with a length"
            )
    return splits


def _seed(src: DataSource) -> int:
    return src.partition.seed if src.partition is not None else 0


def _shared_out(src: DataSource) -> bool:
    """This envoy holds one part of data other envoys hold too ([data.partition]); without
    a partition, or with "folder", all of its data is its own."""
    return src.partition is not None and src.partition.scheme != "folder"


def load_local_data(cfg: EnvoyConfig) -> LocalData:
    """This envoy's share of the data, computed locally from the config (no coordination)."""
    src = cfg.data
    part = src.partition
    seed = _seed(src)
    out: dict[str, Dataset[Any]] = {}
    if src.loader is None:
        for offset, (name, (images, labels)) in enumerate(_bundled(src).items()):
            idx = _limit_indices(len(labels), src.limit, seed + 7)
            if idx is not None:
                images, labels = images[idx], labels[idx]
            if part is not None and _shared_out(src):
                keep = select_partition(
                    labels,
                    scheme=part.scheme,
                    num_envoys=part.count,
                    index=part.index,
                    seed=part.seed + offset,
                    alpha=part.alpha,
                )
                images, labels = images[keep], labels[keep]
            out[name] = ArrayDataset(images, labels)
        return LocalData(out["train"], out["val"])
    splits = call_loader(src)
    names = getattr(splits["train"], "classes", None)
    classes = tuple(str(c) for c in names) if names else None
    for offset, name in enumerate(("train", "val")):
        ds = splits[name]
        ds = with_labels(ds)
        idx = _limit_indices(len(ds), src.limit, seed + 7)  # type: ignore[arg-type]
        if idx is not None:
            ds = Subset(ds, idx.tolist())
        if part is not None and _shared_out(src):
            keep = select_partition(
                dataset_labels(ds),
                scheme=part.scheme,
                num_envoys=part.count,
                index=part.index,
                seed=part.seed + offset,
                alpha=part.alpha,
            )
            ds = Subset(ds, np.asarray(keep).tolist())
        out[name] = ds
    return LocalData(out["train"], out["val"], classes)


def check_local_data(data: LocalData, model: ModelConfig) -> None:
    """The data fits [model]: one item of each split, every label, the class names."""
    if data.classes is not None:
        if model.classes is not None and tuple(model.classes) != data.classes:
            raise DataMismatch(
                f"the data names the classes {list(data.classes)} (in label order), [model] "
                f"classes = {model.classes}; the label order must be the federation's"
            )
        if len(data.classes) != model.num_classes:
            raise DataMismatch(
                f"the data has {len(data.classes)} classes {list(data.classes)}, [model] "
                f"num_classes = {model.num_classes}"
            )
    for name, ds in (("train", data.train), ("val", data.val)):
        n = len(ds)  # type: ignore[arg-type]
        if n == 0:
            raise DataMismatch(f"the {name} split is empty")
        labels = dataset_labels(ds)
        bad = labels[(labels < 0) | (labels >= model.num_classes)]
        if bad.size:
            raise DataMismatch(
                f"the {name} split has label {int(bad[0])}, outside the classes 0.."
                f"{model.num_classes - 1} of [model] num_classes = {model.num_classes}"
            )
        image = _image_of(ds[0], name)
        channels = 1 if image.dim() == 2 else int(image.shape[0])
        if channels != model.in_channels:
            raise DataMismatch(
                f"the {name} split's images have {channels} channel(s) (shape "
                f"{list(image.shape)}), [model] in_channels = {model.in_channels}"
            )


def _image_of(item: Any, split: str) -> torch.Tensor:
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise DataMismatch(
            f"the {split} split's items are {type(item).__name__}, not (image, label) pairs"
        )
    image = torch.as_tensor(np.asarray(item[0]))
    if image.dim() not in (2, 3):
        raise DataMismatch(
            f"the {split} split's images have shape {list(image.shape)}; expected C x H x W "
            f"(or H x W for grey)"
        )
    return image
