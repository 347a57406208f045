"""The CSV-manifest loader: DICOM/PNG/JPEG pixels, patient-level splits, streaming, memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from node.errors import ExitCode
from node.training.manifest import (
    DEFAULT_FRACTIONS,
    SPLITS,
    ImageSpec,
    ManifestDataset,
    ManifestError,
    Window,
    assign_patient_splits,
    manifest_datasets,
    read_image,
    read_manifest,
    resolve_splits,
)
from tests.datafiles import KERMANY_SAMPLE, REPO
from tests.dicomfiles import synthetic_xray, write_dicom

RAMP = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 60).astype(np.uint16)  # 0 .. 3780


def _manifest(folder: Path, rows: list[str], header: str = "path,label,patient_id,split") -> Path:
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"x")


# ----------------------------------------------------------------------------- pixels


def test_dicom_rescale_then_the_files_window(tmp_path: Path) -> None:
    path = write_dicom(
        tmp_path / "a.dcm", RAMP, window=(1000.0, 3000.0), slope=2.0, intercept=-500.0
    )
    got = read_image(path, ImageSpec(size=8))
    hu = RAMP.astype(np.float32) * 2 - 500  # the modality LUT
    expected = np.clip((hu - (1000 - 1500)) / 3000, 0, 1)
    assert got.shape == (1, 8, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], expected, atol=1e-6)


def test_monochrome1_is_inverted_after_windowing(tmp_path: Path) -> None:
    mono2 = read_image(write_dicom(tmp_path / "2.dcm", RAMP), ImageSpec(size=8))
    mono1 = read_image(
        write_dicom(tmp_path / "1.dcm", RAMP, photometric="MONOCHROME1"), ImageSpec(size=8)
    )
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_a_configured_window_overrides_the_files(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a.dcm", RAMP, window=(2048.0, 4096.0))
    got = read_image(path, ImageSpec(size=8, window=Window(center=1000.0, width=400.0)))
    np.testing.assert_allclose(got[0], np.clip((RAMP - 800.0) / 400.0, 0, 1), atol=1e-6)


def test_a_dicom_without_a_window_spans_its_own_range(tmp_path: Path) -> None:
    got = read_image(write_dicom(tmp_path / "a.dcm", RAMP, window=None), ImageSpec(size=8))
    np.testing.assert_allclose(got[0], RAMP / RAMP.max(), atol=1e-6)


def test_a_dicom_without_a_suffix_is_recognised_by_its_preamble(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "IM000017", RAMP, window=None)
    np.testing.assert_allclose(read_image(path, ImageSpec(size=8))[0], RAMP / RAMP.max(), atol=1e-6)


def test_rgb_dicom_as_rgb_and_as_grey(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0
    path = write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB")
    colour = read_image(path, ImageSpec(size=8, channels=3))
    np.testing.assert_allclose(colour[:, 0, 0], [1.0, 128 / 255, 0.0], atol=1e-6)
    grey = read_image(path, ImageSpec(size=8, channels=1))
    np.testing.assert_allclose(grey[0, 0, 0], 0.299 + 0.587 * 128 / 255, atol=1e-6)


def test_png_8_and_16_bit_and_jpeg(tmp_path: Path) -> None:
    eight = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "a.png")
    np.testing.assert_allclose(
        read_image(tmp_path / "a.png", ImageSpec(size=8))[0], eight / 255, atol=1e-6
    )
    Image.fromarray(RAMP).save(tmp_path / "b.png")  # 16-bit grey PNG
    assert Image.open(tmp_path / "b.png").mode.startswith("I;16")
    np.testing.assert_allclose(
        read_image(tmp_path / "b.png", ImageSpec(size=8))[0], RAMP / RAMP.max(), atol=1e-6
    )
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "c.jpeg", quality=100)
    got = read_image(tmp_path / "c.jpeg", ImageSpec(size=8, channels=3))
    assert got.shape == (3, 8, 8)
    np.testing.assert_allclose(got, 200 / 255, atol=2 / 255)


def test_the_centre_square_is_cropped_then_resized(tmp_path: Path) -> None:
    tall = np.zeros((60, 20), np.uint8)
    tall[20:40] = 255  # the centre 20 x 20 square is white, the rest black
    Image.fromarray(tall).save(tmp_path / "tall.png")
    got = read_image(tmp_path / "tall.png", ImageSpec(size=10))
    np.testing.assert_allclose(got, 1.0, atol=1e-6)


def test_downsizing_averages_instead_of_aliasing(tmp_path: Path) -> None:
    stripes = np.zeros((512, 512), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: point sampling would give all 0 or all 1
    Image.fromarray(stripes).save(tmp_path / "s.png")
    got = read_image(tmp_path / "s.png", ImageSpec(size=16))
    np.testing.assert_allclose(got, 0.5, atol=0.02)


def test_real_kermany_jpegs_read_at_model_size() -> None:
    files = sorted(KERMANY_SAMPLE.rglob("*.jpeg"))
    assert len(files) == 16
    for file in files[:4]:
        image = read_image(file, ImageSpec(size=64))
        assert image.shape == (1, 64, 64)
        assert 0.0 <= image.min() < 0.3 and 0.7 < image.max() <= 1.0  # a real film's range


def test_unreadable_images_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(ManifestError, match=r"bad\.dcm"):
        read_image(tmp_path / "bad.dcm", ImageSpec(size=8))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ManifestError, match=r"bad\.png: cannot read image"):
        read_image(tmp_path / "bad.png", ImageSpec(size=8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": 4}, "size"), ({"channels": 2}, "channels")],
)
def test_image_spec_bounds(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageSpec(**kwargs)


def test_window_width_must_be_positive() -> None:
    with pytest.raises(ValueError, match="width"):
        Window(40.0, 0.0)


# ----------------------------------------------------------------------------- the CSV


def test_classes_from_names_integers_or_given(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png", "b.png", "c.png")
    names = _manifest(tmp_path, ["a.png,PNEUMONIA,p1,", "b.png,NORMAL,p2,", "c.png,COVID,p3,"])
    m = read_manifest(names)
    assert m.classes == ("COVID", "NORMAL", "PNEUMONIA")
    assert [r.label for r in m.rows] == [2, 1, 0]
    given_order = read_manifest(names, classes=["NORMAL", "PNEUMONIA", "COVID"])
    assert [r.label for r in given_order.rows] == [1, 0, 2]
    ints = _manifest(tmp_path, ["a.png,0,p1,", "b.png,3,p2,", "c.png,1,p3,"])
    assert read_manifest(ints).classes == ("0", "1", "2", "3")


def test_paths_are_relative_to_the_manifest_and_extra_columns_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "scans").mkdir()
    _touch(tmp_path / "scans", "a.png")
    m = read_manifest(
        _manifest(tmp_path, ["scans/a.png,1,p1,val,71"], "path,label,patient_id,split,age")
    )
    assert m.rows[0].path == tmp_path / "scans" / "a.png"
    assert m.rows[0].split == "val" and m.rows[0].line == 2


def test_the_split_column_is_optional(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png", "b.png")
    m = read_manifest(_manifest(tmp_path, ["a.png,0,p1", "b.png,1,p2"], "path,label,patient_id"))
    assert all(r.split in SPLITS for r in m.rows)


@pytest.mark.parametrize(
    ("header", "rows", "match"),
    [
        ("path,label,split", ["a.png,0,train"], r"lacks column\(s\) \['patient_id'\]"),
        ("path,label,patient_id,split", [], "no rows"),
        ("path,label,patient_id,split", ["a.png,,p1,train"], "line 2: empty 'label'"),
        ("path,label,patient_id,split", ["a.png,0,p1,train", "b.png,1,,"], "line 3: empty"),
        ("path,label,patient_id,split", ["a.png,0,p1,tune"], "line 2: split 'tune'"),
        ("path,label,patient_id,split", ["a.png,0,p1,", "a.png,1,p2,"], r"line 3: .*line 2"),
        ("path,label,patient_id,split", ["gone.png,0,p1,"], "line 2: image .*gone.png"),
        (
            "path,label,patient_id,split",
            ["a.png,0,p1,train", "b.png,1,p1,val"],
            r"patient 'p1' is in split 'train' \(line 2\) and 'val' \(line 3\)",
        ),
    ],
)
def test_bad_manifests_name_the_file_line_and_field(
    tmp_path: Path, header: str, rows: list[str], match: str
) -> None:
    _touch(tmp_path, "a.png", "b.png")
    path = _manifest(tmp_path, rows, header)
    with pytest.raises(ManifestError, match=match) as info:
        read_manifest(path)
    assert str(path) in str(info.value)
    assert info.value.exit_code == ExitCode.CONFIG


def test_a_label_outside_the_given_classes_is_refused(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png")
    with pytest.raises(ManifestError, match=r"line 2: label 'COVID' is not one of"):
        read_manifest(_manifest(tmp_path, ["a.png,COVID,p1,"]), classes=["NORMAL", "PNEUMONIA"])


def test_a_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"nope\.csv: manifest not found"):
        read_manifest(tmp_path / "nope.csv")


# ----------------------------------------------------------------------------- patient splits

PATIENTS = st.text(alphabet="abcdefgh", min_size=1, max_size=3)
ROWS = st.lists(st.tuples(PATIENTS, st.sampled_from(["", "", "train", "val", "test"])), max_size=60)


@given(ROWS, st.integers(0, 2**32 - 1))
def test_no_patient_is_ever_in_two_splits(rows: list[tuple[str, str]], seed: int) -> None:
    explicit: dict[str, set[str]] = {}
    for patient, split in rows:
        if split:
            explicit.setdefault(patient, set()).add(split)
    conflicting = any(len(s) > 1 for s in explicit.values())
    try:
        splits = resolve_splits(rows, seed=seed)
    except ManifestError as exc:
        assert conflicting, exc
        return
    assert not conflicting
    of_patient: dict[str, set[str]] = {}
    for (patient, _), split in zip(rows, splits, strict=True):
        assert split in SPLITS
        of_patient.setdefault(patient, set()).add(split)
    assert all(len(s) == 1 for s in of_patient.values())  # one split per patient
    for patient, named in explicit.items():
        assert of_patient[patient] == named  # an explicit split is kept for all its rows


@given(
    st.lists(PATIENTS, unique=True, min_size=1, max_size=40),
    st.lists(PATIENTS, max_size=20),
    st.integers(0, 1000),
)
def test_adding_patients_or_reordering_never_moves_a_patient(
    patients: list[str], more: list[str], seed: int
) -> None:
    before = assign_patient_splits(patients, seed=seed)
    after = assign_patient_splits([*reversed(more), *reversed(patients)], seed=seed)
    assert all(after[p] == before[p] for p in patients)


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from([DEFAULT_FRACTIONS, {"train": 0.7, "val": 0.3}, {"train": 0.5, "test": 0.5}]),
    st.integers(0, 2**32 - 1),
)
def test_split_sizes_follow_the_fractions(fractions: dict[str, float], seed: int) -> None:
    n = 4000
    splits = assign_patient_splits([f"patient-{i}" for i in range(n)], fractions, seed=seed)
    counts = {name: 0 for name in SPLITS}
    for split in splits.values():
        counts[split] += 1
    for name in SPLITS:
        f = fractions.get(name, 0.0)
        sd = (n * f * (1 - f)) ** 0.5
        assert abs(counts[name] - n * f) <= 5 * sd, (name, counts)


@pytest.mark.parametrize(
    "fractions", [{"train": 0.9}, {"train": 0.9, "val": 0.2, "test": -0.1}, {"tune": 1.0}]
)
def test_bad_fractions_are_refused(fractions: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        assign_patient_splits(["p"], fractions)


def test_kermany_patients_with_two_films_stay_together(tmp_path: Path) -> None:
    """person1946 has two films in the sample: both land in the same split, for any seed."""
    rows = []
    for file in sorted(KERMANY_SAMPLE.rglob("*.jpeg")):
        name = file.stem
        patient = name.split("_")[0] if name.startswith("person") else name.rsplit("-", 1)[0]
        rows.append(f"{file},{file.parent.name},{patient},")
    manifest = _manifest(tmp_path, rows)
    for seed in range(20):
        m = read_manifest(manifest, seed=seed, fractions={"train": 0.5, "val": 0.5})
        person = {r.split for r in m.rows if r.patient_id == "person1946"}
        assert len(person) == 1
        assert not (m.patients("train") & m.patients("val"))


# ----------------------------------------------------------------------------- dataset


@pytest.fixture
def mixed_manifest(tmp_path: Path) -> Path:
    rows = []
    for i in range(6):
        write_dicom(tmp_path / f"d{i}.dcm", synthetic_xray(96, i), patient_id=f"D{i}")
        rows.append(f"d{i}.dcm,{i % 3},D{i},{'train' if i < 4 else 'val'}")
    Image.fromarray((synthetic_xray(80, 9) >> 4).astype(np.uint8)).save(tmp_path / "p.png")
    Image.fromarray((synthetic_xray(80, 10) >> 4).astype(np.uint8)).save(tmp_path / "j.jpg")
    rows += ["p.png,1,P1,train", "j.jpg,2,P2,val"]
    return _manifest(tmp_path, rows)


def test_datasets_stream_each_split(mixed_manifest: Path) -> None:
    sets = manifest_datasets(mixed_manifest, size=32, channels=3)
    assert [len(sets[s]) for s in SPLITS] == [5, 3, 0]
    train = sets["train"]
    assert train.num_classes == 3 and train.labels.tolist() == [0, 1, 2, 0, 1]
    image, label = train[1]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32)
    assert image.dtype == torch.float32 and label == 1
    np.testing.assert_array_equal(
        image.numpy(), read_image(train.path(1), ImageSpec(size=32, channels=3))
    )
    with pytest.raises(IndexError):
        train[5]
    with pytest.raises(ValueError):
        train.labels[0] = 2  # read-only: the labels are the manifest's


def test_a_dataloader_with_worker_processes_gives_the_same_batches(mixed_manifest: Path) -> None:
    train = manifest_datasets(mixed_manifest, size=16)["train"]
    direct = torch.stack([train[i][0] for i in range(len(train))])
    loader = DataLoader(train, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), direct)
    assert torch.cat([b[1] for b in batches]).tolist() == train.labels.tolist()


def test_the_dataset_keeps_no_images() -> None:
    m_rows = [type("R", (), {"path": Path(f"/x/{i}.dcm"), "label": i % 2})() for i in range(10_000)]
    dataset = ManifestDataset(m_rows, ImageSpec(size=8), ["a", "b"])  # type: ignore[arg-type]
    # Two arrays, no per-row objects: 10 000 rows take well under a megabyte.
    assert dataset._paths.nbytes + dataset.labels.nbytes < 300_000
    assert dataset.path(9_999) == Path("/x/9999.dcm")


def test_memory_stays_flat_while_streaming_ten_times_more_files(tmp_path: Path) -> None:
    """RSS while reading 30 and 300 DICOM files in fresh processes; a list-holding control."""
    out = tmp_path / "memory.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "manifest" / "memory.py"),
            "--files",
            "30,300",
            "--source-size",
            "512",
            "--size",
            "128",
            "--modes",
            "stream,hold,train",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    rows = {(r["mode"], r["files"]): r for r in json.loads(out.read_text())["rows"]}
    small, large = rows[("stream", 30)], rows[("stream", 300)]
    assert large["mib_on_disk"] > 140  # 300 files of 512 x 512 x 16 bit were read
    assert large["growth_mib"] < 8, large
    assert large["growth_mib"] - small["growth_mib"] < 4, (small, large)
    # The control holds 290 decoded 128 x 128 images (18 MiB): the measurement sees it.
    assert rows[("hold", 300)]["growth_mib"] > 15, rows[("hold", 300)]
    # An epoch of the training step streaming the same files keeps none of them either.
    trained = rows[("train", 300)]
    assert trained["steps"] == 38 and trained["items"] == 300
    assert trained["growth_mib"] < rows[("hold", 300)]["growth_mib"] / 2, (trained, rows)
