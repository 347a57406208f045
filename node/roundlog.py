"""rounds.jsonl: the director's append-only log of completed rounds, one checksummed line each.

Each line is one JSON object, ``{"record": {...}, "sha256": "<hex>"}``, where the digest covers
the record's canonical JSON (sorted keys, no spaces). A completed round costs one appended,
fsynced line, whatever the number of rounds before it (rewriting the whole history every round
made checkpoint I/O grow with the federation's age).

Two kinds of readers:
* `read_records` (progress readers: `fedbus status`, the operator page, the demo): lenient.
  The line being appended right now may be incomplete, so reading stops at the first line that
  does not decode; a line that decodes but fails its checksum is skipped.
* `RoundLog.load` (the director, on resume): strict. A torn last line (a crash mid-append) is
  cut off; any other bad line is a `RoundLogError`, since a history with a hole or a flipped
  bit must not be extended as if nothing happened.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.files import durable_append
from node.errors import ExitCode, FedbusError

__all__ = [
    "ROUNDS_LOG",
    "RoundLog",
    "RoundLogError",
    "decode_line",
    "encode_line",
    "read_records",
]

ROUNDS_LOG = "rounds.jsonl"


class RoundLogError(FedbusError, RuntimeError):
    """rounds.jsonl is damaged beyond a torn last line (the message names the line)."""

    exit_code = ExitCode.STATE


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_line(record: dict[str, Any]) -> bytes:
    """One log line (with its newline) holding `record` and the digest of its canonical JSON."""
    body = _canonical(record)
    digest = hashlib.sha256(body).hexdigest()
    return b'{"record":' + body + b',"sha256":"' + digest.encode("ascii") + b'"}\n'


class _BadLine(ValueError):
    pass


def decode_line(line: bytes | str) -> dict[str, Any]:
    """The record of one log line; ValueError if it does not decode or fails its checksum."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _BadLine(f"not JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict) or set(obj) != {"record", "sha256"}:
        raise _BadLine("not a round log entry")
    record = obj["record"]
    if not isinstance(record, dict):
        raise _BadLine("the record is not an object")
    if hashlib.sha256(_canonical(record)).hexdigest() != obj["sha256"]:
        raise _BadLine("checksum mismatch")
    return record


@dataclass(frozen=True)
class _Line:
    number: int  # 1-based
    start: int  # byte offset
    end: int  # byte offset just past the newline (or the end of the file)
    raw: bytes
    terminated: bool


def _lines(data: bytes) -> Iterator[_Line]:
    start = 0
    number = 0
    while start < len(data):
        number += 1
        nl = data.find(b"\n", start)
        end = len(data) if nl < 0 else nl + 1
        yield _Line(number, start, end, data[start : nl if nl >= 0 else end], nl >= 0)
        start = end


def read_records(state_dir: str | Path) -> list[dict[str, Any]]:
    """The completed rounds' records, for progress readers (lenient: see the module docstring)."""
    try:
        data = (Path(state_dir) / ROUNDS_LOG).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in _lines(data):
        try:
            out.append(decode_line(line.raw))
        except _BadLine as exc:
            if str(exc).startswith("not JSON"):
                break  # being appended right now: read next time
    return out


class RoundLog:
    """The director's writer of rounds.jsonl (append-only, fsynced, mode 0600)."""

    def __init__(self, state_dir: str | Path, *, mode: int = 0o600) -> None:
        self.path = Path(state_dir) / ROUNDS_LOG
        self.mode = mode

    def load(self) -> list[dict[str, Any]]:
        """Every record, verified; a torn last line is cut off the file (RoundLogError for any
        other damage)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        records: list[dict[str, Any]] = []
        lines = list(_lines(data))
        for line in lines:
            try:
                records.append(decode_line(line.raw))
            except _BadLine as exc:
                if line is lines[-1] and not line.terminated:
                    # A crash while appending: the round it held is restored from the
                    # checkpoint, which is written first.
                    self._truncate(line.start)
                    break
                raise RoundLogError(
                    f"{self.path}: line {line.number} is damaged ({exc}); the checkpoint is "
                    "intact, but the round history is not: restore rounds.jsonl from a backup "
                    "or start a new state folder"
                ) from None
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Add one record durably (written and fsynced before this returns)."""
        durable_append(self.path, encode_line(record), mode=self.mode)

    def truncate_after(self, round: int, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drop the records of rounds after `round` (from `records` and from the file)."""
        keep = [r for r in records if int(r.get("round", 0)) <= round]
        if len(keep) == len(records):
            return records
        data = self.path.read_bytes()
        offset = 0
        for line, _record in zip(_lines(data), keep, strict=False):
            offset = line.end
        self._truncate(offset)
        return keep

    def _truncate(self, size: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
