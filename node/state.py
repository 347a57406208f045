"""The director's state folder: what survives a restart, and what others read while it runs.

    checkpoint.msgpack       the last completed round, global weights, the server optimiser's
                             state, best model and the last round's record, checksummed
                             (node.checkpoint)
    checkpoint.prev.msgpack  the checkpoint before it, kept in case the last one rots
    rounds.jsonl             every completed round's record, one checksummed line each,
                             append-only (node.roundlog; node.status and the UI read it)
    status.json              round, stage and envoys, rewritten at every stage change
    director.lock            held (flock) by the one director running on this folder
    audit/                   --audit: each round's unmasked sum and its survivors

A round's I/O is one checkpoint (its size does not depend on the number of rounds) and one
appended line. The checkpoint is written first: if the director dies before the line is in
the log, the next start completes the log from the checkpoint's last record, and a log line
past the checkpoint is dropped (the checkpoint wins), so a round is never applied twice nor
reported without being applied.

Every file is written with mode 0600 through broker.files (atomically, fsynced): the folder
holds the federation's model. A full disk, a read-only folder or any other OSError while
saving becomes a `StateError` (exit code STATE) that names the file and leaves no temporary
file; status.json alone is best effort (progress for readers must not stop the federation).
The round driver (node.director) decides what to write and when; this module only knows how.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broker.files import atomic_path, atomic_write_text, private_dir
from node.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from node.errors import ExitCode, FedbusError
from node.roundlog import RoundLog
from node.status import STATUS_FILE

__all__ = ["BestModel", "FederationState", "StateError", "StateStore"]

PRIVATE = 0o600
AUDIT_DIR = "audit"
LOCK_FILE = "director.lock"


class StateError(FedbusError, RuntimeError):
    """The state folder cannot be used or written (the message names the file and the fix)."""

    exit_code = ExitCode.STATE


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
    # The server optimiser that produced `weights` and its state (node.strategy); None: a
    # checkpoint from before optimisers were configurable, i.e. plain FedAvg.
    strategy: str | None = None
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, records: list[dict[str, Any]] | None = None
    ) -> FederationState:
        best = None
        best_weights = ckpt.best_weights_numpy()
        if ckpt.best_round is not None and best_weights is not None:
            best = BestModel(
                round=ckpt.best_round,
                weights=best_weights,
                threshold=ckpt.best_threshold,
                metrics=ckpt.best_metrics or {},
            )
        strategy = ckpt.strategy
        return cls(
            ckpt.round,
            ckpt.weights_numpy(),
            list(records or []),
            best,
            strategy=strategy.name if strategy else None,
            strategy_state=strategy.state_numpy() if strategy else {},
        )

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


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


class StateStore:
    """Reads and writes one director's state folder (see the module docstring)."""

    def __init__(self, state_dir: str | Path, *, federation: str) -> None:
        self.state_dir = Path(state_dir)
        self.federation = federation
        self.round_log = RoundLog(self.state_dir, mode=PRIVATE)
        self._lock_fd: int | None = None

    # -- the lock ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the folder for this process; StateError if another director holds it.

        An flock on director.lock: the kernel releases it when the holder exits, however it
        exits (kill -9 included), so a crash never leaves a stale lock behind.
        """
        if self._lock_fd is not None:
            return
        path = self.state_dir / LOCK_FILE
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, PRIVATE)
        except OSError as exc:
            raise StateError(
                f"{path}: cannot open the state folder's lock: {_describe(exc)}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise StateError(
                f"{self.state_dir} is in use by another director ({holder}); two directors "
                "on one state folder would overwrite each other's rounds"
            ) from None
        # Who holds it, for the message above (best effort: the flock is the lock).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    # -- checkpoint and round log -----------------------------------------------------------

    def load(self) -> Checkpoint | None:
        """The last checkpoint, or None for a new federation (CheckpointError if unusable)."""
        return load_checkpoint(self.state_dir)

    def load_records(self, ckpt: Checkpoint) -> list[dict[str, Any]]:
        """The round log reconciled with `ckpt`: records 1..ckpt.round, exactly.

        A line past the checkpoint is dropped and the checkpoint's last record appended when
        the log stops one round short (a crash between the two writes). Any other gap means
        a damaged history: StateError.
        """
        records = self.round_log.load()
        records = self.round_log.truncate_after(ckpt.round, records)
        have = [int(r.get("round", 0)) for r in records]
        if ckpt.round and have == list(range(1, ckpt.round)) and ckpt.last_record is not None:
            self._append(ckpt.last_record)
            records.append(ckpt.last_record)
            have.append(ckpt.round)
        if have != list(range(1, ckpt.round + 1)):
            raise StateError(
                f"{self.round_log.path}: holds rounds {_ranges(have) or 'none'} but the "
                f"checkpoint is at round {ckpt.round}; restore the round log from a backup or "
                "start a new state folder"
            )
        return records

    def save_checkpoint(self, state: FederationState) -> None:
        best = state.best
        ckpt = make_checkpoint(
            federation=self.federation,
            round=state.round,
            weights=state.weights,
            strategy=state.strategy,
            strategy_state=state.strategy_state,
            best_round=best.round if best else None,
            best_weights=best.weights if best else None,
            best_threshold=best.threshold if best else None,
            best_metrics=best.metrics if best else None,
            last_record=state.records[-1] if state.records else None,
        )
        try:
            save_checkpoint(self.state_dir, ckpt, mode=PRIVATE)
        except OSError as exc:
            raise StateError(
                f"{self.state_dir / CHECKPOINT_NAME}: cannot save the checkpoint of round "
                f"{state.round}: {_describe(exc)}. The previous checkpoint is intact: make "
                "room or make the folder writable, then restart the director with --resume"
            ) from None

    def append_record(self, record: dict[str, Any]) -> None:
        """One completed round's record onto the round log (after its checkpoint)."""
        self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        try:
            self.round_log.append(record)
        except OSError as exc:
            raise StateError(
                f"{self.round_log.path}: cannot append the record of round "
                f"{record.get('round')}: {_describe(exc)}. The checkpoint holds the round: "
                "make room or make the folder writable, then restart the director with --resume"
            ) from None

    # -- progress and audit -----------------------------------------------------------------

    def write_status(self, status: dict[str, Any]) -> None:
        # Progress for readers only: a full disk must not stop the federation.
        with contextlib.suppress(OSError):
            atomic_write_text(
                self.state_dir / STATUS_FILE, json.dumps(status, indent=1), mode=PRIVATE
            )

    def write_audit(self, round: int, unmasked_sum: np.ndarray, survivors: list[str]) -> None:
        """--audit: the unmasked sum of `round`, bit for bit, and whose inputs it holds."""
        try:
            folder = private_dir(self.state_dir / AUDIT_DIR)
            with atomic_path(folder / f"round-{round}-sum.npy", mode=PRIVATE) as tmp:
                np.save(tmp, np.asarray(unmasked_sum, dtype=np.uint32))
            atomic_write_text(
                folder / f"round-{round}-survivors.json", json.dumps(survivors), mode=PRIVATE
            )
        except OSError as exc:
            raise StateError(
                f"{folder}: cannot save the audit of round {round}: {_describe(exc)}"
            ) from None


def _ranges(rounds: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    out: list[str] = []
    for r in rounds:
        if out and out[-1].split("-")[-1] == str(r - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out)
