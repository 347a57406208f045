"""The director's state folder: what survives a restart, and what others read while it runs.

    checkpoint.msgpack   the last completed round, global weights, best model, every round's
                         record (node.checkpoint; one atomic write, so a round is applied once)
    rounds.jsonl         the same records, one JSON line each (node.status reads it)
    status.json          round, stage and envoys, rewritten at every stage change
    audit/               --audit: each round's unmasked sum and its survivors

Every file is written through broker.files (temporary file, fsync, rename) with mode 0600:
the folder holds the federation's model. The round driver (node.director) decides what to
write and when; this module only knows how.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broker.files import atomic_path, atomic_write_text, private_dir
from node.checkpoint import Checkpoint, load_checkpoint, make_checkpoint, save_checkpoint
from node.status import ROUNDS_LOG, STATUS_FILE

__all__ = ["BestModel", "FederationState", "StateStore"]

PRIVATE = 0o600
AUDIT_DIR = "audit"


@dataclass
class BestModel:
    """The model with the best validation AUC so far, and what it was chosen on."""

    round: int
    weights: dict[str, np.ndarray]
    threshold: float | None
    metrics: dict[str, Any]


@dataclass
class FederationState:
    """The federation after its last completed round (round 0: the initial weights)."""

    round: int
    weights: dict[str, np.ndarray]
    records: list[dict[str, Any]] = field(default_factory=list)
    best: BestModel | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> FederationState:
        best = None
        best_weights = ckpt.best_weights_numpy()
        if ckpt.best_round is not None and best_weights is not None:
            best = BestModel(
                round=ckpt.best_round,
                weights=best_weights,
                threshold=ckpt.best_threshold,
                metrics=ckpt.best_metrics or {},
            )
        return cls(ckpt.round, ckpt.weights_numpy(), list(ckpt.records), best)

    def consider_best(self, round: int, val: dict[str, Any] | None) -> None:
        """Keep the current weights as the best model if their validation AUC is the best."""
        if not val or val.get("auc") is None:
            return
        if self.best is not None and val["auc"] < self.best.metrics.get("auc", -1):
            return
        self.best = BestModel(
            round=round,
            weights={k: v.copy() for k, v in self.weights.items()},
            threshold=val.get("threshold"),
            metrics=val,
        )


class StateStore:
    """Reads and writes one director's state folder (see the module docstring)."""

    def __init__(self, state_dir: str | Path, *, federation: str) -> None:
        self.state_dir = Path(state_dir)
        self.federation = federation

    def load(self) -> Checkpoint | None:
        """The last checkpoint, or None for a new federation (CheckpointError if unreadable)."""
        return load_checkpoint(self.state_dir)

    def save_checkpoint(self, state: FederationState) -> None:
        best = state.best
        save_checkpoint(
            self.state_dir,
            make_checkpoint(
                federation=self.federation,
                round=state.round,
                weights=state.weights,
                best_round=best.round if best else None,
                best_weights=best.weights if best else None,
                best_threshold=best.threshold if best else None,
                best_metrics=best.metrics if best else None,
                records=state.records,
            ),
            mode=PRIVATE,
        )

    def write_rounds_log(self, records: list[dict[str, Any]]) -> None:
        """rounds.jsonl = `records`, exactly (after a crash it may lag the checkpoint)."""
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write_text(self.state_dir / ROUNDS_LOG, lines, mode=PRIVATE)

    def write_status(self, status: dict[str, Any]) -> None:
        # Progress for readers only: a full disk must not stop the federation.
        with contextlib.suppress(OSError):
            atomic_write_text(
                self.state_dir / STATUS_FILE, json.dumps(status, indent=1), mode=PRIVATE
            )

    def write_audit(self, round: int, unmasked_sum: np.ndarray, survivors: list[str]) -> None:
        """--audit: the unmasked sum of `round`, bit for bit, and whose inputs it holds."""
        folder = private_dir(self.state_dir / AUDIT_DIR)
        with atomic_path(folder / f"round-{round}-sum.npy", mode=PRIVATE) as tmp:
            np.save(tmp, np.asarray(unmasked_sum, dtype=np.uint32))
        atomic_write_text(
            folder / f"round-{round}-survivors.json", json.dumps(survivors), mode=PRIVATE
        )
