"""TensorBoard event files from round records, read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from node.tracking import RoundTracker, pr_curve_table, round_scalars, write_round_records
from node.training.metrics import metrics_from_histograms
from tests.datafiles import REPO


def _val(seed: int, bins: int = 100) -> dict:
    """Validation metrics as the director computes them: from summed score histograms."""
    rng = np.random.default_rng(seed)
    neg = np.bincount(np.clip(rng.normal(30, 12, 300).astype(int), 0, bins - 1), minlength=bins)
    pos = np.bincount(np.clip(rng.normal(70, 12, 500).astype(int), 0, bins - 1), minlength=bins)
    val = metrics_from_histograms(neg, pos)
    val.update(loss=0.4 - 0.01 * seed, num_samples=800)
    return val


def _record(r: int, *, seed: int | None = None) -> dict:
    return {
        "round": r,
        "attempt": 0,
        "participants": ["envoy-1", "envoy-2", "envoy-3"],
        "survivors": ["envoy-1", "envoy-2"] if r == 2 else ["envoy-1", "envoy-2", "envoy-3"],
        "dropped": ["envoy-3"] if r == 2 else [],
        "secure": True,
        "aggregate_verified": None,
        "metrics": {"train_loss": 0.6 / r, "val": _val(r if seed is None else seed)},
        "best_round": r,
        "seconds": 10.0 + r,
        "stage_seconds": {"training": 6.0, "masked_input": 2.5, "evaluate": 1.0},
    }


def _read(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_round_scalars_of_a_record() -> None:
    record = _record(2)
    got = round_scalars(record)
    val = record["metrics"]["val"]
    assert got["val/auc"] == val["auc"] and got["val/threshold"] == val["threshold"]
    assert got["train/loss"] == 0.3
    assert got["federation/participants"] == 3 and got["federation/survivors"] == 2
    assert got["federation/dropouts"] == 1 and got["federation/secure"] == 1.0
    assert got["time/stage/masked_input"] == 2.5 and got["time/round_seconds"] == 12.0


def test_undefined_metrics_are_left_out() -> None:
    record = _record(1)
    record["metrics"] = {"train_loss": float("nan"), "val": None}
    got = round_scalars(record)
    assert not any(tag.startswith(("val/", "train/")) for tag in got)
    assert got["federation/participants"] == 3


def test_rounds_read_back_with_tensorboards_reader(tmp_path: Path) -> None:
    records = [_record(r) for r in (1, 2, 3)]
    assert write_round_records(tmp_path, records) == 3
    acc = _read(tmp_path)
    assert _scalars(acc, "val/auc") == [
        (r["round"], pytest.approx(r["metrics"]["val"]["auc"], abs=1e-6)) for r in records
    ]
    assert _scalars(acc, "federation/dropouts") == [(1, 0.0), (2, 1.0), (3, 0.0)]
    assert [s for s, _ in _scalars(acc, "time/stage/training")] == [1, 2, 3]
    assert "val/pr_curve" in acc.Tags()["tensors"]
    assert "val/roc" in acc.Tags()["images"]


def test_the_pr_curve_is_in_the_plugins_format(tmp_path: Path) -> None:
    record = _record(1)
    val = record["metrics"]["val"]
    with RoundTracker(tmp_path) as tracker:
        tracker.log_round(record)
    acc = _read(tmp_path)
    (event,) = acc.Tensors("val/pr_curve")
    table = tensor_util.make_ndarray(event.tensor_proto)
    assert table.shape == (6, 101) and event.step == 1
    tp, fp, tn, fn, precision, recall = table
    np.testing.assert_array_equal(tp + fn, val["num_positive"])
    np.testing.assert_array_equal(fp + tn, val["num_negative"])
    np.testing.assert_allclose(recall, val["roc_tpr"], atol=1e-6)
    assert tp[0] == val["num_positive"] and fp[0] == val["num_negative"]  # all positive
    assert np.all(np.diff(recall) <= 1e-7)  # thresholds rise: recall never grows
    np.testing.assert_allclose(precision[0], 500 / 800, atol=1e-6)
    metadata = acc.SummaryMetadata("val/pr_curve")
    assert metadata.plugin_data.plugin_name == "pr_curves"


def test_the_roc_image_is_a_png_per_round(tmp_path: Path) -> None:
    write_round_records(tmp_path, [_record(1), _record(2)])
    images = _read(tmp_path).Images("val/roc")
    assert [i.step for i in images] == [1, 2]
    picture = Image.open(io.BytesIO(images[0].encoded_image_string))
    assert picture.format == "PNG" and picture.size == (images[0].width, images[0].height)
    assert picture.size[0] >= 200


def test_pr_table_needs_both_classes() -> None:
    val = _val(1)
    assert pr_curve_table({**val, "num_positive": 0}) is None
    assert pr_curve_table({"auc": 0.5}) is None


def test_a_resumed_director_does_not_show_a_round_twice(tmp_path: Path) -> None:
    """Round 3 was logged, then the director died before its checkpoint and redid it."""
    write_round_records(tmp_path, [_record(1), _record(2), _record(3, seed=30)])
    with RoundTracker(tmp_path, resume_from=3) as tracker:
        for r in (3, 4):
            tracker.log_round(_record(r))
    got = _scalars(_read(tmp_path), "val/auc")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert got[2][1] == pytest.approx(_record(3)["metrics"]["val"]["auc"], abs=1e-6)


def test_a_cut_event_file_still_reads_the_complete_rounds(tmp_path: Path) -> None:
    write_round_records(tmp_path, [_record(1), _record(2)])
    (events,) = tmp_path.glob("events.out.tfevents.*")
    data = events.read_bytes()
    events.write_bytes(data[:-7])  # a crash in the middle of round 2's record
    assert [s for s, _ in _scalars(_read(tmp_path), "val/auc")] == [1]


def test_tracking_needs_neither_torch_nor_tensorflow() -> None:
    code = (
        "import sys, node.tracking; "
        "bad = [m for m in ('torch', 'tensorflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
