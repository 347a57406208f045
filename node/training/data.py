"""Data sources: PneumoniaMNIST (MedMNIST v2) and a Kermany-style image folder.

Both sources yield the same thing, `Split(images, labels)` with images as uint8 N x H x W
grey (0..255) and labels as int64 N (0 normal, 1 pneumonia), so the partitioners, the
trainer and the evaluator never care where the pixels came from.

The PneumoniaMNIST file is verified by MD5 before a single array is read from it: a
truncated or substituted file fails loudly instead of training on the wrong data. The
downloader writes to a temporary file next to the destination and renames it into place
only after the MD5 matched, so a crash or a bad mirror never leaves a half file behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from node.errors import ExitCode, FedbusError

log = structlog.get_logger(__name__)

PNEUMONIAMNIST_FILENAME = "pneumoniamnist.npz"
PNEUMONIAMNIST_MD5 = "28209eda62fecd6e6a2d98b1501bb15f"
# MedMNIST v2's official record (the file the MD5 above belongs to).
PNEUMONIAMNIST_URL = "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1"
PNEUMONIAMNIST_SIZES = {"train": 4708, "val": 524, "test": 624}
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
DATA_ENV = "FEDBUS_DATA"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

_HOW_TO_GET = f"""\
PneumoniaMNIST (MedMNIST v2, CC BY 4.0) is one 4.2 MB file, {PNEUMONIAMNIST_FILENAME}
(MD5 {PNEUMONIAMNIST_MD5}). Get it in one of these ways:
  * on a machine with internet:
      python -c "from node.training.data import download_pneumoniamnist as d; d('data/{PNEUMONIAMNIST_FILENAME}')"
    or download {PNEUMONIAMNIST_URL}
  * or copy it from a machine that has it (here: ../shared/data/{PNEUMONIAMNIST_FILENAME}).
Then pass its path (the file or the folder holding it) with --data PATH, the `data` key of the
envoy config, or the {DATA_ENV} environment variable."""


class DataUnavailable(FedbusError):
    """The data set is missing, unreadable or not the expected file; says how to get it."""

    exit_code = ExitCode.CONFIG


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N x H x W
    labels: np.ndarray  # int64, N (0 normal, 1 pneumonia)

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 N x H x W, got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> Split:
        return Split(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_pneumoniamnist(path: str | os.PathLike[str] | None = None) -> Path:
    """Find the npz: the argument, else $FEDBUS_DATA, else MedMNIST's own cache (~/.medmnist).

    A folder is accepted wherever a path is, and means the file of the canonical name in it.
    """
    candidates: list[tuple[str, Path]] = []
    if path is not None:
        candidates.append(("the given path", Path(path)))
    elif os.environ.get(DATA_ENV):
        candidates.append((f"${DATA_ENV}", Path(os.environ[DATA_ENV])))
    else:
        candidates.append(("MedMNIST's cache", Path.home() / ".medmnist"))
    tried = []
    for origin, candidate in candidates:
        file = candidate / PNEUMONIAMNIST_FILENAME if candidate.is_dir() else candidate
        if file.is_file():
            return file
        tried.append(f"{origin}: {file}")
    raise DataUnavailable(
        f"PneumoniaMNIST not found (looked at {'; '.join(tried)}).\n{_HOW_TO_GET}"
    )


def load_pneumoniamnist(
    path: str | os.PathLike[str] | None = None, *, verify: bool = True
) -> Dataset:
    """Load and MD5-verify PneumoniaMNIST: train 4708 / val 524 / test 624, 28 x 28 grey."""
    file = resolve_pneumoniamnist(path)
    if verify:
        actual = md5_of(file)
        if actual != PNEUMONIAMNIST_MD5:
            raise DataUnavailable(
                f"{file} has MD5 {actual}, expected {PNEUMONIAMNIST_MD5}: not the official "
                f"PneumoniaMNIST file (truncated, corrupted or another release).\n{_HOW_TO_GET}"
            )
    try:
        with np.load(file, allow_pickle=False) as npz:
            splits = {}
            for name, size in PNEUMONIAMNIST_SIZES.items():
                images = np.ascontiguousarray(npz[f"{name}_images"], dtype=np.uint8)
                labels = np.asarray(npz[f"{name}_labels"]).reshape(-1).astype(np.int64)
                if images.shape != (size, 28, 28):
                    raise DataUnavailable(f"{file}: {name}_images has shape {images.shape}")
                splits[name] = Split(images, labels)
    except (KeyError, ValueError, OSError) as exc:
        raise DataUnavailable(f"{file} is not a readable PneumoniaMNIST npz: {exc}") from exc
    return Dataset(**splits)


def download_pneumoniamnist(
    dest: str | os.PathLike[str],
    url: str = PNEUMONIAMNIST_URL,
    *,
    md5: str = PNEUMONIAMNIST_MD5,
    timeout_s: float = 60.0,
) -> Path:
    """Download the npz to `dest` (a file, or a folder for the canonical name), MD5-checked.

    An existing file with the right MD5 is kept as it is. The bytes go to a temporary file
    in the same folder and are renamed into place only after the MD5 matched, so `dest`
    is either the verified file or untouched.
    """
    target = Path(dest)
    if target.is_dir():
        target = target / PNEUMONIAMNIST_FILENAME
    if target.is_file() and md5_of(target) == md5:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response:
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except OSError as exc:  # URLError and HTTPError are OSErrors
                raise DataUnavailable(f"download of {url} failed: {exc}\n{_HOW_TO_GET}") from exc
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != md5:
            raise DataUnavailable(
                f"download of {url} has MD5 {digest.hexdigest()}, expected {md5}; "
                f"nothing was written to {target}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("pneumoniamnist.downloaded", path=str(target), url=url)
    return target


# ----------------------------------------------------------------------------- image folder


def _class_dirs(root: Path) -> dict[int, Path] | None:
    found = {}
    for label, name in enumerate(CLASS_NAMES):
        matches = [p for p in root.iterdir() if p.is_dir() and p.name.upper() == name]
        if matches:
            found[label] = matches[0]
    return found or None


def find_split_root(root: str | os.PathLike[str], split: str | None = None) -> Path:
    """Where the NORMAL/PNEUMONIA folders of `split` live in a Kermany-style tree.

    Accepted: ROOT/{NORMAL,PNEUMONIA} (split None), ROOT/SPLIT/..., ROOT/chest_xray/SPLIT/...
    """
    base = Path(root)
    if not base.is_dir():
        raise DataUnavailable(f"image folder {base} does not exist or is not a folder")
    candidates = [base] if split is None else []
    if split is not None:
        candidates += [base / split, base / "chest_xray" / split]
    for candidate in candidates:
        if candidate.is_dir() and _class_dirs(candidate):
            return candidate
    raise DataUnavailable(
        f"no NORMAL/ or PNEUMONIA/ folder under {' or '.join(map(str, candidates))} "
        f"(expected the Kermany layout chest_xray/{{train,test}}/{{NORMAL,PNEUMONIA}}/*.jpeg)"
    )


def load_image(path: Path, size: int) -> np.ndarray:
    """One X-ray as uint8 size x size grey, preprocessed like MedMNIST v2.

    MedMNIST crops the centre square (side = the short edge) and resizes; doing the same
    keeps hospital image folders and PneumoniaMNIST on one footing, so a model trained on
    one reads the other.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            grey = img.convert("L")
            w, h = grey.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            square = grey.crop((left, top, left + side, top + side))
            resized = square.resize((size, size), Image.Resampling.BOX, reducing_gap=3.0)
            return np.asarray(resized, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataUnavailable(f"cannot read image {path}: {exc}") from exc


def load_image_folder(
    root: str | os.PathLike[str], size: int = 28, *, split: str | None = None
) -> Split:
    """Load a Kermany-layout folder (NORMAL/ -> 0, PNEUMONIA/ -> 1) as `size` x `size` grey.

    Files are read in sorted order so the same folder always gives the same arrays.
    """
    if not 8 <= size <= 1024:
        raise ValueError(f"size must be 8..1024 pixels, got {size}")
    where = find_split_root(root, split)
    dirs = _class_dirs(where) or {}
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, folder in sorted(dirs.items()):
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(load_image(file, size))
                labels.append(label)
    if not images:
        raise DataUnavailable(f"no {'/'.join(IMAGE_SUFFIXES)} images under {where}")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))


def load_image_folder_dataset(
    root: str | os.PathLike[str],
    size: int = 28,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val", "test"),
) -> Dataset:
    """A hospital's folder as train/val/test.

    Uses the split folders that exist; a missing val is carved out of train (stratified,
    seeded) and a missing test is empty. A folder with no split level is all train.
    """
    loaded: dict[str, Split] = {}
    for name in splits:
        try:
            loaded[name] = load_image_folder(root, size, split=name)
        except DataUnavailable:
            continue
    if "train" not in loaded:
        loaded["train"] = load_image_folder(root, size)
    empty = Split(np.zeros((0, size, size), np.uint8), np.zeros(0, np.int64))
    if "val" not in loaded:
        loaded["train"], loaded["val"] = stratified_holdout(loaded["train"], val_fraction, seed)
    return Dataset(train=loaded["train"], val=loaded["val"], test=loaded.get("test", empty))


def stratified_holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out `fraction` of each class (at least one image of a class that has two)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    keep, hold = [], []
    for label in np.unique(split.labels):
        idx = rng.permutation(np.flatnonzero(split.labels == label))
        n_hold = round(fraction * idx.size)
        if fraction > 0 and n_hold == 0 and idx.size >= 2:
            n_hold = 1
        hold.append(idx[:n_hold])
        keep.append(idx[n_hold:])
    keep_idx = np.sort(np.concatenate(keep))
    hold_idx = np.sort(np.concatenate(hold))
    return split.subset(keep_idx), split.subset(hold_idx)
