"""Verified, atomic checkpoints of the director's federation state.

`STATE_DIR/checkpoint.msgpack` holds the last completed round, the global weights, the server
optimiser's state (node.strategy: its name and, for fedavgm / fedadam / fedyogi, the moments
it steps with), the best model by validation (weights, round, threshold, metrics) and the
record of the last completed round. Its size does not depend on how many rounds came before:
the history of rounds lives in the append-only round log (node.roundlog).

On disk a checkpoint is a MessagePack envelope ``{format, version, sha256, payload}``: the
payload is the encoded `Checkpoint`, and the SHA-256 digest covers it, so a flipped bit or a
torn copy is refused with a clear error instead of loading silently. Each save

1. keeps the current checkpoint as `checkpoint.prev.msgpack` (a hard link, renamed into place:
   no copy, and no moment without a checkpoint), then
2. replaces `checkpoint.msgpack` atomically (broker.files: temporary file, fsync, rename,
   folder fsync): after a crash the file is the old checkpoint or the new one, never a mix.

So a checkpoint that rots on disk still leaves the one before it: `load_checkpoint` refuses the
corrupt file, names the intact previous one, and resumes from it once the corrupt file has been
moved aside.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from broker.files import atomic_path, atomic_write_bytes
from node.errors import ExitCode, FedbusError
from protocol.tensors import Tensor, state_from_numpy, state_to_numpy

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "PREVIOUS_NAME",
    "Checkpoint",
    "CheckpointError",
    "StrategyState",
    "decode_checkpoint",
    "encode_checkpoint",
    "load_checkpoint",
    "make_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.msgpack"
PREVIOUS_NAME = "checkpoint.prev.msgpack"
FORMAT = "fedbus-checkpoint"
# 1: no envelope, every round's record inside; 2: checksummed envelope, last record only.
# Fields added with a default (such as `strategy`) keep the version: a format 2 file written
# before them decodes with the default.
FORMAT_VERSION = 2


class CheckpointError(FedbusError, RuntimeError):
    """A checkpoint that exists but cannot be used (the message says why and what to do)."""

    exit_code = ExitCode.STATE


class StrategyState(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The server optimiser that produced the weights, and its state (node.strategy)."""

    name: str
    state: dict[str, Tensor] = {}

    def state_numpy(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in state_to_numpy(self.state).items()}


class Checkpoint(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    federation: str
    round: int  # last completed round (0 = only the initial weights)
    weights: dict[str, Tensor]
    # None in checkpoints written before server optimisers were configurable: plain FedAvg.
    strategy: StrategyState | None = None
    best_round: int | None = None
    best_weights: dict[str, Tensor] | None = None
    best_threshold: float | None = None
    best_metrics: dict[str, Any] | None = None
    # The record of `round`, also appended to the round log: if a crash tore that line, the
    # log is completed from here, so a round is never applied without its record.
    last_record: dict[str, Any] | None = None

    def weights_numpy(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in state_to_numpy(self.weights).items()}

    def best_weights_numpy(self) -> dict[str, np.ndarray] | None:
        if self.best_weights is None:
            return None
        return {k: np.array(v) for k, v in state_to_numpy(self.best_weights).items()}


class _Envelope(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    format: str
    version: int
    sha256: bytes
    payload: bytes


def make_checkpoint(
    *,
    federation: str,
    round: int,
    weights: Mapping[str, np.ndarray],
    strategy: str | None = None,
    strategy_state: Mapping[str, np.ndarray] | None = None,
    best_round: int | None = None,
    best_weights: Mapping[str, np.ndarray] | None = None,
    best_threshold: float | None = None,
    best_metrics: dict[str, Any] | None = None,
    last_record: dict[str, Any] | None = None,
) -> Checkpoint:
    return Checkpoint(
        federation=federation,
        round=round,
        weights=state_from_numpy(weights),
        strategy=None
        if strategy is None
        else StrategyState(name=strategy, state=state_from_numpy(strategy_state or {})),
        best_round=best_round,
        best_weights=None if best_weights is None else state_from_numpy(best_weights),
        best_threshold=best_threshold,
        best_metrics=best_metrics,
        last_record=last_record,
    )


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """The file's bytes: the checksummed envelope around the encoded checkpoint."""
    payload = msgspec.msgpack.encode(checkpoint)
    envelope = _Envelope(
        format=FORMAT,
        version=FORMAT_VERSION,
        sha256=hashlib.sha256(payload).digest(),
        payload=payload,
    )
    return msgspec.msgpack.encode(envelope)


def decode_checkpoint(data: bytes, *, source: str) -> Checkpoint:
    """Verify and decode a checkpoint file's bytes; CheckpointError (naming `source`) if the
    file is not a checkpoint, of another format version, or corrupt."""
    try:
        envelope = msgspec.msgpack.decode(data, type=_Envelope)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise CheckpointError(f"{source}: {_not_an_envelope(data)}") from None
    if envelope.format != FORMAT:
        raise CheckpointError(f"{source}: not a fedbus checkpoint (format {envelope.format!r})")
    if envelope.version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: checkpoint format {envelope.version}; this fedbus reads format "
            f"{FORMAT_VERSION} only"
        )
    if hashlib.sha256(envelope.payload).digest() != envelope.sha256:
        raise CheckpointError(f"{source}: corrupt checkpoint (checksum mismatch)")
    try:
        return msgspec.msgpack.decode(envelope.payload, type=Checkpoint)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # The digest matched: written like this, by a fedbus with another schema.
        raise CheckpointError(f"{source}: unreadable checkpoint: {exc}") from None


def _not_an_envelope(data: bytes) -> str:
    try:
        legacy = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return "corrupt checkpoint (truncated or not MessagePack)"
    if isinstance(legacy, dict) and legacy.get("version") == 1 and "records" in legacy:
        return (
            "checkpoint format 1 (written before checkpoints carried a checksum); this "
            f"fedbus reads format {FORMAT_VERSION} only: finish that federation with the "
            "fedbus that started it, or start a new state folder"
        )
    return "corrupt checkpoint (not a checkpoint envelope)"


def save_checkpoint(state_dir: str | Path, checkpoint: Checkpoint, *, mode: int = 0o600) -> Path:
    """Keep the current checkpoint as the previous one, then replace it atomically.

    OSError (a full disk, a read-only folder) propagates with no temporary file left behind
    and both files as they were, or the previous one updated to the current one.
    """
    folder = Path(state_dir)
    current = folder / CHECKPOINT_NAME
    data = encode_checkpoint(checkpoint)
    if current.exists():
        _keep_as_previous(current, folder / PREVIOUS_NAME)
    return atomic_write_bytes(current, data, mode=mode)


def _keep_as_previous(current: Path, previous: Path) -> None:
    # The current file becomes the previous one by a second name (a hard link: no copy),
    # put in place by rename, like every write of broker.files.
    with atomic_path(previous, mode=current.stat().st_mode & 0o777) as tmp:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a process of ours that died right here
        try:
            os.link(current, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                raise
            tmp.write_bytes(current.read_bytes())  # a file system without hard links


def _read(path: Path) -> Checkpoint:
    return decode_checkpoint(path.read_bytes(), source=str(path))


def load_checkpoint(state_dir: str | Path) -> Checkpoint | None:
    """The last checkpoint in `state_dir`, verified; None when there is none yet.

    A corrupt `checkpoint.msgpack` is a CheckpointError that names the previous checkpoint
    when that one is intact. Without `checkpoint.msgpack` (moved aside by an operator) the
    previous checkpoint is the last one.
    """
    folder = Path(state_dir)
    current = folder / CHECKPOINT_NAME
    previous = folder / PREVIOUS_NAME
    try:
        return _read(current)
    except FileNotFoundError:
        pass
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. {_about_previous(previous, current)}") from None
    try:
        return _read(previous)
    except FileNotFoundError:
        return None


def _about_previous(previous: Path, current: Path) -> str:
    try:
        prev = _read(previous)
    except FileNotFoundError:
        return "There is no previous checkpoint to fall back to."
    except CheckpointError as exc:
        return f"The previous checkpoint is unusable too ({exc})."
    return (
        f"The previous checkpoint ({previous.name}, round {prev.round}) is intact and kept: "
        f"move {current} aside to resume from round {prev.round}."
    )
