"""A hospital's own images from a CSV manifest: DICOM, PNG or JPEG, streamed from disk.

The manifest is a CSV file with a header and one row per image::

    path,label,patient_id,split
    scans/0001.dcm,PNEUMONIA,P-0001,train
    scans/0002.dcm,NORMAL,P-0002,
    scans/0003.png,NORMAL,P-0002,

* ``path``: the image, relative to the manifest's folder (or absolute). ``.dcm``/``.dicom``
  (or any file with the DICOM preamble) is read with pydicom; ``.png``, ``.jpg``, ``.jpeg``
  with Pillow.
* ``label``: a class name or a class index. Multi-class is fine; the classes are given, or
  taken from the labels (all integers: 0..max; names: sorted, so NORMAL, PNEUMONIA -> 0, 1).
* ``patient_id``: who the image is of. Splits are made per patient, never per image: a
  patient's follow-up films in train and val would make validation measure recognition of
  the patient, not of the disease.
* ``split`` (optional column, optional per row): ``train``, ``val`` or ``test``. Rows left
  empty take their patient's split: the one the patient's other rows name, else one drawn
  from a keyed hash of (seed, patient_id) against the configured fractions. The hash makes a
  patient's split a function of that patient alone: adding next month's images to the
  manifest never moves an existing patient to another split. A patient given two different
  splits is refused, naming the patient and the lines.

Extra columns (age, view, ...) are allowed and ignored. Every problem is a `ManifestError`
naming the file, the line and the field, raised before any image is read.

`ManifestDataset` is a torch Dataset that reads, windows and resizes one file per item: it
holds the paths as one numpy bytes array and the labels as one int64 array (no per-row
Python objects, so forked DataLoader workers do not copy the list page by page as reference
counts touch it), and nothing decoded is kept. Memory stays flat however many files the
manifest has (benchmarks/data/manifest_memory.py measures it).

Pixels become float32 in [0, 1], C x size x size:

1. DICOM: the modality LUT (RescaleSlope/Intercept) first, then the window: the configured
   `Window` if any, else the file's first WindowCenter/WindowWidth, else its VOI LUT
   sequence, else the image's own min..max. MONOCHROME1 (white = low values) is inverted
   after windowing so that bone is always bright. 8-bit PNG/JPEG map 0..255 to 0..1 unless a
   window is configured (in the same 0..255 units); 16-bit PNG is windowed like DICOM.
2. The centre square (side = the short edge) is cropped, as MedMNIST does, and resized to
   `size` with antialiased bilinear interpolation (a box-like average when shrinking a
   2000-pixel film to 224, never aliasing).
3. ``channels = 3`` repeats a grey image into RGB; an RGB file read with ``channels = 1``
   becomes grey by ITU-R BT.601 luma (what Pillow's "L" does).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from node.errors import ExitCode, FedbusError

__all__ = [
    "DEFAULT_FRACTIONS",
    "SPLITS",
    "ImageSpec",
    "Manifest",
    "ManifestDataset",
    "ManifestError",
    "ManifestRow",
    "Window",
    "assign_patient_splits",
    "manifest_datasets",
    "read_image",
    "read_manifest",
    "resolve_splits",
]

REQUIRED_COLUMNS = ("path", "label", "patient_id")
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
DICOM_SUFFIXES = (".dcm", ".dicom")
BITMAP_SUFFIXES = (".png", ".jpg", ".jpeg")
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


class ManifestError(FedbusError):
    """A manifest, or an image it names, that cannot be used; the message says where."""

    exit_code = ExitCode.CONFIG


@dataclass(frozen=True)
class Window:
    """A linear intensity window: [center - width / 2, center + width / 2] -> [0, 1]."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.center) and np.isfinite(self.width) and self.width > 0):
            raise ValueError(f"window width must be > 0 and finite, got {self}")

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        low = self.center - self.width / 2
        return np.clip((pixels.astype(np.float32) - low) / self.width, 0.0, 1.0)


@dataclass(frozen=True)
class ImageSpec:
    """How every image is turned into the model's input."""

    size: int = 224
    channels: int = 1
    window: Window | None = None  # None: the file's own window (see the module docstring)

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 4096:
            raise ValueError(f"size must be 8..4096 pixels, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")


@dataclass(frozen=True)
class ManifestRow:
    line: int  # in the CSV file, header = line 1
    path: Path
    label: int
    patient_id: str
    split: str


@dataclass(frozen=True)
class Manifest:
    source: Path
    classes: tuple[str, ...]
    rows: tuple[ManifestRow, ...] = field(repr=False)

    def split(self, name: str) -> tuple[ManifestRow, ...]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return tuple(r for r in self.rows if r.split == name)

    def patients(self, name: str) -> set[str]:
        return {r.patient_id for r in self.split(name)}


# ----------------------------------------------------------------------------- splits


def _check_fractions(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"fractions name unknown splits {sorted(unknown)}; use {SPLITS}")
    items = [(name, float(fractions.get(name, 0.0))) for name in SPLITS]
    if any(not np.isfinite(f) or f < 0 for _, f in items):
        raise ValueError(f"fractions must be finite and >= 0, got {dict(fractions)}")
    total = sum(f for _, f in items)
    if abs(total - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {total} ({dict(fractions)})")
    return items


def _patient_draw(patient_id: str, seed: int) -> float:
    """Uniform in [0, 1), a keyed hash of the patient: independent of every other row."""
    digest = hashlib.blake2b(
        patient_id.encode("utf-8"), digest_size=8, key=str(seed).encode("ascii")
    ).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_patient_splits(
    patient_ids: Iterable[str], fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, str]:
    """Each patient's split, drawn per patient: stable under adding patients or reordering."""
    items = _check_fractions(fractions)
    out: dict[str, str] = {}
    for patient in patient_ids:
        if patient in out:
            continue
        u = _patient_draw(patient, seed)
        edge = 0.0
        chosen = next(name for name, f in items if f > 0)
        for name, f in items:
            if f <= 0:
                continue
            edge += f
            chosen = name
            if u < edge:
                break
        out[patient] = chosen
    return out


def resolve_splits(
    rows: Sequence[tuple[str, str]],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    *,
    source: str = "manifest",
    first_line: int = 2,
) -> list[str]:
    """The split of each (patient_id, split or "") row, patient by patient.

    A patient's explicit split covers all its rows; a patient with none gets
    `assign_patient_splits`'s. Two different explicit splits for one patient is an error.
    """
    explicit: dict[str, tuple[str, int]] = {}
    for offset, (patient, split) in enumerate(rows):
        if not split:
            continue
        line = first_line + offset
        seen = explicit.setdefault(patient, (split, line))
        if seen[0] != split:
            raise ManifestError(
                f"{source}: patient {patient!r} is in split {seen[0]!r} (line {seen[1]}) and "
                f"{split!r} (line {line}); a patient's images must all be in one split"
            )
    drawn = assign_patient_splits(
        (p for p, _ in rows if p not in explicit), fractions=fractions, seed=seed
    )
    return [explicit[p][0] if p in explicit else drawn[p] for p, _ in rows]


# ----------------------------------------------------------------------------- the CSV


def _classes_of(labels: Sequence[str], classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes is not None:
        names = tuple(str(c) for c in classes)
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"classes must be >= 2 distinct names, got {list(names)}")
        return names
    distinct = set(labels)
    if all(label.isdigit() for label in distinct):
        return tuple(str(i) for i in range(max(2, max(int(x) for x in distinct) + 1)))
    return tuple(sorted(distinct))


def _label_index(label: str, classes: tuple[str, ...]) -> int | None:
    if label in classes:
        return classes.index(label)
    if label.isdigit() and int(label) < len(classes):
        return int(label)
    return None


def read_manifest(
    csv_path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    check_files: bool = True,
) -> Manifest:
    """Parse and check a manifest; every row gets a class index and a patient-level split."""
    source = Path(csv_path)
    base = source.resolve().parent
    try:
        with source.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ManifestError(
                    f"{source}: the header {header} lacks column(s) {missing}; a manifest has "
                    f"path,label,patient_id and optionally split"
                )
            raw = [
                {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                for row in reader
            ]
    except FileNotFoundError:
        raise ManifestError(f"{source}: manifest not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{source}: not a readable CSV file: {exc}") from None
    if not raw:
        raise ManifestError(f"{source}: the manifest has no rows")
    # reader.line_num counts physical lines; rows are one line each after the header.
    seen_paths: dict[Path, int] = {}
    parsed: list[tuple[int, Path, str, str, str]] = []
    for offset, row in enumerate(raw):
        line = offset + 2
        for column in REQUIRED_COLUMNS:
            if not row.get(column):
                raise ManifestError(f"{source}: line {line}: empty {column!r}")
        split = row.get("split", "").lower()
        if split and split not in SPLITS:
            raise ManifestError(
                f"{source}: line {line}: split {row['split']!r} is not one of {SPLITS} or empty"
            )
        path = Path(row["path"])
        path = path if path.is_absolute() else base / path
        if path in seen_paths:
            raise ManifestError(
                f"{source}: line {line}: {row['path']!r} is listed again (first on line "
                f"{seen_paths[path]})"
            )
        seen_paths[path] = line
        if check_files and not path.is_file():
            raise ManifestError(f"{source}: line {line}: image {str(path)!r} does not exist")
        parsed.append((line, path, row["label"], row["patient_id"], split))
    try:
        names = _classes_of([p[2] for p in parsed], classes)
        splits = resolve_splits([(p[3], p[4]) for p in parsed], fractions, seed, source=str(source))
    except ValueError as exc:
        raise ManifestError(f"{source}: {exc}") from None
    rows = []
    for (line, path, label, patient, _), split in zip(parsed, splits, strict=True):
        index = _label_index(label, names)
        if index is None:
            raise ManifestError(
                f"{source}: line {line}: label {label!r} is not one of the classes {list(names)}"
            )
        rows.append(ManifestRow(line, path, index, patient, split))
    return Manifest(source=source, classes=names, rows=tuple(rows))


# ----------------------------------------------------------------------------- pixels


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in BITMAP_SUFFIXES:
        return False
    with path.open("rb") as fh:
        return fh.read(132)[128:132] == b"DICM"


def _first(value: Any) -> float:
    """WindowCenter/WindowWidth may be multi-valued (several presets): the first is primary."""
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return float(value)
    return float(value[0])


def _read_dicom(path: Path, window: Window | None) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise ManifestError(f"{path}: not a DICOM file: {exc}") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ManifestError(f"{path}: {frames} frames; one radiograph per file is expected")
    try:
        pixels = ds.pixel_array
    except (AttributeError, KeyError, ValueError) as exc:
        raise ManifestError(f"{path}: DICOM without usable pixel data ({exc})") from None
    except (NotImplementedError, RuntimeError) as exc:
        # Compressed transfer syntaxes need a decoder plugin (pylibjpeg, gdcm).
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise ManifestError(
            f"{path}: cannot decode its pixel data (transfer syntax {syntax}): {exc}"
        ) from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        # pydicom 3 converts YBR to RGB itself; colour images carry no VOI window.
        return pixels.astype(np.float32) / float(np.iinfo(pixels.dtype).max)
    if pixels.ndim != 2:
        raise ManifestError(f"{path}: pixel array of shape {pixels.shape}, expected rows x cols")
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    if window is not None:
        out = window.apply(values)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        out = Window(_first(ds.WindowCenter), _first(ds.WindowWidth)).apply(values)
    elif "VOILUTSequence" in ds:
        lut = apply_voi_lut(pixels, ds).astype(np.float32)
        out = _min_max(lut)
    else:
        out = _min_max(values)
    return 1.0 - out if photometric == "MONOCHROME1" else out


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def _read_bitmap(path: Path, window: Window | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                values = np.asarray(img, dtype=np.float32)
                return window.apply(values) if window else _min_max(values)
            if img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA", "PA"):
                rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
                return window.apply(rgb) if window else rgb / 255.0
            grey = np.asarray(img.convert("L"), dtype=np.float32)
            return window.apply(grey) if window else grey / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ManifestError(f"{path}: cannot read image: {exc}") from None


def read_image(path: str | os.PathLike[str], spec: ImageSpec) -> np.ndarray:
    """One image as float32 C x size x size in [0, 1], windowed, cropped and resized."""
    path = Path(path)
    try:
        pixels = (
            _read_dicom(path, spec.window) if _is_dicom(path) else _read_bitmap(path, spec.window)
        )
    except FileNotFoundError:
        raise ManifestError(f"{path}: image not found") from None
    if pixels.ndim == 3:  # H x W x 3
        pixels = pixels @ _LUMA if spec.channels == 1 else np.moveaxis(pixels, -1, 0)
    if pixels.ndim == 2:
        pixels = pixels[None]
        if spec.channels == 3:
            pixels = np.repeat(pixels, 3, axis=0)
    h, w = pixels.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(pixels[:, top : top + side, left : left + side], np.float32)
    if side != spec.size:
        t = torch.from_numpy(square)[None]
        t = F.interpolate(
            t, size=(spec.size, spec.size), mode="bilinear", antialias=True, align_corners=False
        )
        square = t[0].clamp_(0.0, 1.0).numpy()
    return square


# ----------------------------------------------------------------------------- dataset


class ManifestDataset(Dataset):
    """One split of a manifest as a torch Dataset: (float32 C x size x size, class index)."""

    def __init__(
        self, rows: Sequence[ManifestRow], spec: ImageSpec, classes: Sequence[str]
    ) -> None:
        self.spec = spec
        self.classes = tuple(classes)
        self._paths = np.asarray([os.fsencode(r.path) for r in rows], dtype=np.bytes_)
        self.labels = np.asarray([r.label for r in rows], dtype=np.int64)
        self.labels.setflags(write=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, index: int) -> Path:
        return Path(os.fsdecode(bytes(self._paths[index])))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        pixels = read_image(self.path(index), self.spec)
        return torch.from_numpy(pixels), int(self.labels[index])


def manifest_datasets(
    csv_path: str | os.PathLike[str],
    *,
    size: int = 224,
    channels: int = 1,
    window: tuple[float, float] | Window | None = None,
    classes: Sequence[str] | None = None,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, ManifestDataset]:
    """train/val/test datasets of a manifest (an empty split is an empty dataset)."""
    if isinstance(window, tuple):
        window = Window(*window)
    spec = ImageSpec(size=size, channels=channels, window=window)
    manifest = read_manifest(csv_path, classes=classes, fractions=fractions, seed=seed)
    return {name: ManifestDataset(manifest.split(name), spec, manifest.classes) for name in SPLITS}
