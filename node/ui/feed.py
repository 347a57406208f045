"""What the operator page shows: a feed of (status, round records) and its public view.

A feed is anything with ``snapshot() -> (status, records)``, in the director's own shapes:
`status` is the dict the director writes to status.json (federation, round, stage,
rounds_total, secure, envoys {id: {online, last_seen, stage}}, and ``stage_deadline``, the
wall-clock time the current stage closes, where the director provides it), `records` the
round records of rounds.jsonl. Two feeds exist:

* `MemoryFeed`: the director publishes into it as it goes (thread-safe);
* `StateDirFeed`: reads a director's state folder (status.json and rounds.jsonl, both
  written atomically or append-only by the director), so the page also runs beside a
  director in another process.

`public_view` is the only way data reaches the page, and it copies by allow-list: named
fields, of the expected types, strings cut to a bound. Whatever else a status or a record
holds now or later (paths, keys, per-envoy numbers) never leaves the process. Per-round ROC
points are sent for the latest evaluated round and the best one only, so a long
federation's page stays small.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from node.status import ROUNDS_LOG, STATUS_FILE, read_records
from node.training.histograms import MAX_CLASS_CURVES
from node.training.metrics import SUMMARY_METRICS

__all__ = ["MemoryFeed", "OperatorFeed", "StateDirFeed", "public_view"]

Snapshot = tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]

MAX_TEXT = 120
MAX_ENVOYS = 1000
MAX_ROUNDS = 10000
VAL_FIELDS = (*SUMMARY_METRICS, "loss", "num_samples")


class OperatorFeed(Protocol):
    def snapshot(self) -> Snapshot:
        """(status, round records), in the director's shapes."""


def _text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _num(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _names(value: Any) -> list[str]:
    if not isinstance(value, list | tuple):
        return []
    return [v[:MAX_TEXT] for v in value[:MAX_ENVOYS] if isinstance(v, str)]


def _curve(value: Any) -> list[float] | None:
    if not isinstance(value, list | tuple) or len(value) > 100_000:
        return None
    out = [_num(v) for v in value]
    return None if any(v is None for v in out) else [float(v) for v in out]  # type: ignore[arg-type]


def _val(metrics: Any) -> dict[str, Any] | None:
    if not isinstance(metrics, Mapping):
        return None
    return {k: _num(metrics.get(k)) for k in VAL_FIELDS}


def _roc(metrics: Any) -> dict[str, Any] | None:
    """A ROC curve: the binary one, or for more classes the micro-average one with each
    class's one-vs-rest curve where the director kept them (node.training.histograms)."""
    if not isinstance(metrics, Mapping):
        return None
    fpr, tpr = _curve(metrics.get("roc_fpr")), _curve(metrics.get("roc_tpr"))
    if fpr is None or tpr is None or len(fpr) != len(tpr) or not fpr:
        return None
    out: dict[str, Any] = {"fpr": fpr, "tpr": tpr, "auc": _num(metrics.get("auc"))}
    per_class = metrics.get("per_class")
    if isinstance(per_class, list | tuple):
        out["classes"] = [
            {"name": _text(c.get("class")) or str(i), "auc": _num(c.get("auc")), **curve}
            for i, c in enumerate(per_class[:MAX_CLASS_CURVES])
            if isinstance(c, Mapping) and (curve := _roc_points(c)) is not None
        ]
    return out


def _roc_points(metrics: Mapping[str, Any]) -> dict[str, list[float]] | None:
    fpr, tpr = _curve(metrics.get("roc_fpr")), _curve(metrics.get("roc_tpr"))
    if fpr is None or tpr is None or len(fpr) != len(tpr) or not fpr:
        return None
    return {"fpr": fpr, "tpr": tpr}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _record(r: Mapping[str, Any]) -> dict[str, Any]:
    metrics = _mapping(r.get("metrics"))
    stages = _mapping(r.get("stage_seconds"))
    return {
        "round": _num(r.get("round")),
        "participants": _names(r.get("participants")),
        "survivors": _names(r.get("survivors")),
        "dropped": _names(r.get("dropped")),
        "secure": bool(r.get("secure")),
        "seconds": _num(r.get("seconds")),
        "stage_seconds": {
            str(k)[:MAX_TEXT]: _num(v) for k, v in list(stages.items())[:32] if isinstance(k, str)
        },
        "train_loss": _num(metrics.get("train_loss")),
        "val": _val(metrics.get("val")),
    }


def public_view(
    status: Mapping[str, Any], records: Sequence[Mapping[str, Any]], *, now: float
) -> dict[str, Any]:
    """The page's data: allow-listed fields of the status and the records."""
    envoys_in = _mapping(status.get("envoys"))
    envoys = [
        {
            "name": name[:MAX_TEXT],
            "online": bool(e.get("online")),
            "last_seen": _num(e.get("last_seen")),
            "stage": _text(e.get("stage")) or "",
            "refused": _text(e.get("refused")) or "",
        }
        for name, e in sorted(envoys_in.items())[:MAX_ENVOYS]
        if isinstance(name, str) and isinstance(e, Mapping)
    ]
    kept = [r for r in records[-MAX_ROUNDS:] if isinstance(r, Mapping)]
    evaluated = [r for r in kept if _roc((r.get("metrics") or {}).get("val")) is not None]
    latest = evaluated[-1] if evaluated else None
    best_round = next(
        (r.get("best_round") for r in reversed(kept) if r.get("best_round") is not None), None
    )
    best = next((r for r in evaluated if r.get("round") == best_round), None)
    return {
        "now": now,
        "federation": _text(status.get("federation")) or "",
        "round": _num(status.get("round")),
        "rounds_total": _num(status.get("rounds_total")),
        "stage": _text(status.get("stage")) or "",
        "stage_deadline": _num(status.get("stage_deadline")),
        "secure": bool(status.get("secure", True)),
        "updated": _num(status.get("updated")),
        "envoys": envoys,
        "rounds": [_record(r) for r in kept],
        "best_round": _num(best_round),
        "roc_latest": None
        if latest is None
        else {
            "round": _num(latest.get("round")),
            **(_roc(latest["metrics"]["val"]) or {}),
        },
        "roc_best": None
        if best is None
        else {
            "round": _num(best.get("round")),
            **(_roc(best["metrics"]["val"]) or {}),
        },
    }


class MemoryFeed:
    """The director's live state, published as it changes; safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {}
        self._records: list[dict[str, Any]] = []

    def publish_status(self, status: Mapping[str, Any]) -> None:
        with self._lock:
            self._status = copy.deepcopy(dict(status))

    def publish_record(self, record: Mapping[str, Any]) -> None:
        with self._lock:
            self._records.append(copy.deepcopy(dict(record)))

    def replace_records(self, records: Sequence[Mapping[str, Any]]) -> None:
        """After a resume: the checkpoint's records are the truth."""
        with self._lock:
            self._records = [copy.deepcopy(dict(r)) for r in records]

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._status, list(self._records)


class StateDirFeed:
    """A director's state folder; rounds.jsonl is re-read only when it changed."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self._records: list[dict[str, Any]] = []
        self._records_key: tuple[int, int] | None = None

    def snapshot(self) -> Snapshot:
        import json

        try:
            status = json.loads((self.state_dir / STATUS_FILE).read_text())
        except (OSError, ValueError):
            status = {"stage": "no director status yet"}
        try:
            st = (self.state_dir / ROUNDS_LOG).stat()
            key = (st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        if key != self._records_key:
            self._records = read_records(self.state_dir)
            self._records_key = key
        return status if isinstance(status, dict) else {}, self._records
