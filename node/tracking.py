"""TensorBoard event files from the director's round records.

Each completed round's record (the dict the director appends to rounds.jsonl) becomes, at
step = round number:

* scalars: ``val/*`` (auc, accuracy, sensitivity, specificity, balanced_accuracy, f1,
  loss, threshold, youden; with more than two classes the macro averages, and per class
  ``val/class/<name>/{auc,sensitivity,specificity,f1}``), ``train/loss``, ``federation/*`` (participants, survivors,
  dropouts, secure, best_round), ``time/round_seconds`` and ``time/stage/<stage>``;
* ``val/pr_curve``: the precision-recall curve in TensorBoard's own PR-curve format, one
  point per histogram threshold, computed from the ROC and the class counts the record
  already holds (the curve's hover shows a threshold as k / bins, the bin index, because
  the plugin assumes equally spaced thresholds; the histogram edges are logit-spaced);
* ``val/roc``: the ROC curve drawn as an image with its AUC (TensorBoard has no ROC view).

Only the record is read: the aggregate validation metrics the director computed from
summed histograms. Nothing per envoy or per image reaches the event files.

The files are written with the `tensorboard` package's own event writer and protobufs
(no TensorFlow, no torch). An event file is an append-only log of length-prefixed,
CRC-checked records, so a crash can only cut its last record, which readers skip.
A director that resumes at round r opens its tracker with ``resume_from=r``: the writer
records a session restart at step r, and TensorBoard then discards the older files' events
from step r on, so a round that was logged but not checkpointed is not shown twice.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.compat.proto.types_pb2 import DT_FLOAT
from tensorboard.plugins.pr_curve import metadata as pr_curve_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from node.training.metrics import SUMMARY_METRICS

__all__ = ["RoundTracker", "pr_curve_table", "round_scalars", "write_round_records"]

VAL_SCALARS = (*SUMMARY_METRICS, "loss", "youden")
PR_CURVE_TAG = "val/pr_curve"
ROC_TAG = "val/roc"


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalar curves of one round record, tag -> value (undefined metrics left out)."""
    metrics = record.get("metrics") or {}
    val = metrics.get("val") or {}
    out: dict[str, float | None] = {f"val/{k}": _number(val.get(k)) for k in VAL_SCALARS}
    out["train/loss"] = _number(metrics.get("train_loss"))
    out["federation/participants"] = float(len(record.get("participants", [])))
    out["federation/survivors"] = float(len(record.get("survivors", [])))
    out["federation/dropouts"] = float(len(record.get("dropped", [])))
    out["federation/secure"] = _number(bool(record.get("secure")))
    out["federation/best_round"] = _number(record.get("best_round"))
    out["time/round_seconds"] = _number(record.get("seconds"))
    for stage, seconds in (record.get("stage_seconds") or {}).items():
        out[f"time/stage/{stage}"] = _number(seconds)
    for entry in val.get("per_class") or []:  # more than two classes: one-vs-rest per class
        name = entry.get("class")
        if isinstance(name, str):
            for key in ("auc", "sensitivity", "specificity", "f1"):
                out[f"val/class/{name}/{key}"] = _number(entry.get(key))
    return {tag: value for tag, value in out.items() if value is not None}


def pr_curve_table(val: Mapping[str, Any]) -> np.ndarray | None:
    """TensorBoard's PR-curve tensor [TP, FP, TN, FN, precision, recall] x thresholds.

    Thresholds run from the lowest (everything positive) to the highest, as the plugin
    expects. None when the record has no ROC or only one class.
    """
    fpr, tpr = val.get("roc_fpr"), val.get("roc_tpr")
    n_pos, n_neg = val.get("num_positive"), val.get("num_negative")
    if not fpr or not tpr or not n_pos or not n_neg or len(fpr) != len(tpr):
        return None
    tp = np.asarray(tpr, np.float64) * n_pos
    fp = np.asarray(fpr, np.float64) * n_neg
    if not (np.all(np.isfinite(tp)) and np.all(np.isfinite(fp))):
        return None
    tp, fp = np.round(tp), np.round(fp)
    fn, tn = n_pos - tp, n_neg - fp
    # The plugin's own convention (tensorboard.plugins.pr_curve.summary): no division by 0.
    precision = tp / np.maximum(tp + fp, 1e-7)
    recall = tp / np.maximum(tp + fn, 1e-7)
    return np.stack([tp, fp, tn, fn, precision, recall]).astype(np.float32)


def _roc_png(val: Mapping[str, Any], round_number: int) -> bytes | None:
    fpr, tpr = val.get("roc_fpr"), val.get("roc_tpr")
    if not fpr or not tpr:
        return None
    from matplotlib.figure import Figure  # drawn off-screen (Agg), no pyplot state

    fig = Figure(figsize=(3.2, 3.2), dpi=100)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="#1f77b4", lw=1.8)
    ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
    auc = _number(val.get("auc"))
    ax.set_title(f"round {round_number}" + (f", AUC {auc:.3f}" if auc is not None else ""))
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _image_size(png: bytes) -> tuple[int, int]:
    """(width, height) from the PNG header."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


class RoundTracker:
    """One TensorBoard run folder written from round records; a context manager."""

    def __init__(
        self, log_dir: str | Path, *, resume_from: int | None = None, roc_images: bool = True
    ) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.roc_images = roc_images
        self._writer = EventFileWriter(str(self.log_dir), flush_secs=120)
        if resume_from is not None:
            self._writer.add_event(
                Event(step=resume_from, session_log=SessionLog(status=SessionLog.START))
            )
            self._writer.flush()

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Write one round record's curves and flush, so TensorBoard shows them at once."""
        step = int(record["round"])
        values = [
            Summary.Value(tag=tag, simple_value=v) for tag, v in round_scalars(record).items()
        ]
        val = (record.get("metrics") or {}).get("val") or {}
        table = pr_curve_table(val)
        if table is not None:
            values.append(
                Summary.Value(
                    tag=PR_CURVE_TAG,
                    metadata=pr_curve_metadata.create_summary_metadata(
                        display_name="validation PR curve",
                        description="from the summed validation histograms",
                        num_thresholds=table.shape[1],
                    ),
                    tensor=TensorProto(
                        dtype=DT_FLOAT,
                        tensor_shape=TensorShapeProto(
                            dim=[TensorShapeProto.Dim(size=s) for s in table.shape]
                        ),
                        tensor_content=table.astype("<f4").tobytes(),
                    ),
                )
            )
        png = _roc_png(val, step) if self.roc_images else None
        if png is not None:
            width, height = _image_size(png)
            values.append(
                Summary.Value(
                    tag=ROC_TAG,
                    image=Summary.Image(
                        height=height, width=width, colorspace=4, encoded_image_string=png
                    ),
                )
            )
        wall = record.get("finished")
        self._writer.add_event(
            Event(
                step=step,
                wall_time=float(wall) if isinstance(wall, int | float) else time.time(),
                summary=Summary(value=values),
            )
        )
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> RoundTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_round_records(log_dir: str | Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Replay finished rounds (e.g. a state folder's rounds.jsonl) into a run folder."""
    count = 0
    with RoundTracker(log_dir) as tracker:
        for record in records:
            tracker.log_round(record)
            count += 1
    return count
