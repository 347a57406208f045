"""Real DICOM files written with pydicom, as a hospital's PACS export would hold them.

Digital X-ray images (DX, "For Presentation"): 12 bits stored in 16, rescale slope and
intercept, a VOI window, MONOCHROME2 or MONOCHROME1, explicit VR little endian, with a file
meta header and the 128-byte preamble + "DICM". Used by the manifest tests and the memory
benchmark; nothing here is committed as a file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    patient_id: str = "P-0001",
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = (2048.0, 4096.0),
    slope: float = 1.0,
    intercept: float = 0.0,
    bits_stored: int = 12,
) -> Path:
    """Write `pixels` (uint16 rows x cols, or uint8 rows x cols x 3 for RGB) as a DICOM file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientID = patient_id
    ds.PatientName = "Anonymous^Test"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    if photometric == "RGB":
        assert pixels.dtype == np.uint8 and pixels.ndim == 3
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
    else:
        assert pixels.dtype == np.uint16 and pixels.ndim == 2
        ds.SamplesPerPixel = 1
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
    ds.PhotometricInterpretation = photometric
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def synthetic_xray(size: int, seed: int, *, bits: int = 12) -> np.ndarray:
    """A uint16 chest-film-like image: dark lungs in a bright body, smooth noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.48) ** 2) * 2)
    lungs = sum(np.exp(-(((x - cx) / 0.12) ** 2 + ((y - 0.45) / 0.22) ** 2)) for cx in (0.33, 0.67))
    image = 0.25 + 0.6 * body - 0.35 * lungs + 0.03 * rng.standard_normal((size, size))
    top = 2**bits - 1
    return np.clip(image * top, 0, top).astype(np.uint16)
