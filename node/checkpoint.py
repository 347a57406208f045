"""Atomic checkpoints of the director's federation state.

One file, `STATE_DIR/checkpoint.msgpack`, holds the last completed round, the global weights, the
best model by validation (weights, round, threshold, metrics) and the record of every completed
round. It is written to a temporary file, fsynced, renamed over the old one with os.replace and
the folder fsynced: after a crash the file is either the previous checkpoint or the new one,
never a mix. A round's effect on the weights and its record land in the same write, so a
resumed director can neither apply a round twice nor lose one it reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from broker.files import atomic_write_bytes
from node.errors import ExitCode, FedbusError
from protocol.tensors import Tensor, state_from_numpy, state_to_numpy

CHECKPOINT_NAME = "checkpoint.msgpack"
FORMAT_VERSION = 1


class CheckpointError(FedbusError, RuntimeError):
    """A checkpoint that exists but cannot be read back."""

    exit_code = ExitCode.STATE


class Checkpoint(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: int = FORMAT_VERSION
    federation: str
    round: int  # last completed round (0 = only the initial weights)
    weights: dict[str, Tensor]
    best_round: int | None = None
    best_weights: dict[str, Tensor] | None = None
    best_threshold: float | None = None
    best_metrics: dict[str, Any] | None = None
    records: list[dict[str, Any]] = msgspec.field(default_factory=list)

    def weights_numpy(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in state_to_numpy(self.weights).items()}

    def best_weights_numpy(self) -> dict[str, np.ndarray] | None:
        if self.best_weights is None:
            return None
        return {k: np.array(v) for k, v in state_to_numpy(self.best_weights).items()}


def make_checkpoint(
    *,
    federation: str,
    round: int,
    weights: Mapping[str, np.ndarray],
    best_round: int | None = None,
    best_weights: Mapping[str, np.ndarray] | None = None,
    best_threshold: float | None = None,
    best_metrics: dict[str, Any] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> Checkpoint:
    return Checkpoint(
        federation=federation,
        round=round,
        weights=state_from_numpy(weights),
        best_round=best_round,
        best_weights=None if best_weights is None else state_from_numpy(best_weights),
        best_threshold=best_threshold,
        best_metrics=best_metrics,
        records=list(records or []),
    )


def save_checkpoint(state_dir: str | Path, checkpoint: Checkpoint, *, mode: int = 0o600) -> Path:
    """Replace the checkpoint atomically (broker.files): the old one or the new, never a mix."""
    return atomic_write_bytes(
        Path(state_dir) / CHECKPOINT_NAME, msgspec.msgpack.encode(checkpoint), mode=mode
    )


def load_checkpoint(state_dir: str | Path) -> Checkpoint | None:
    """The last checkpoint in `state_dir`, or None when there is none yet."""
    path = Path(state_dir) / CHECKPOINT_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        ckpt = msgspec.msgpack.decode(data, type=Checkpoint)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint: {exc}") from None
    if ckpt.version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt.version} is not supported")
    return ckpt
