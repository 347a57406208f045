"""The one progress display of fedbus's long-running commands (`fedbus demo`, `fedbus attack`).

On a terminal it is a tqdm bar redrawn in place, with a status text after it and messages
printed above it. Anywhere else (a pipe, a log file, CI) a redrawn bar would fill the log
with carriage returns, so the display writes plain lines instead: each message, and a
percentage line whenever a tenth of the work went by without a message saying so.
`quiet` keeps the messages and drops the bar and the percentage lines.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol, TextIO

__all__ = ["ProgressDisplay", "progress_display"]

# A plain display reports at least this often, in fractions of the whole work.
PLAIN_STEP = 0.1


class ProgressDisplay(Protocol):
    def update(self, n: int = 1) -> None:
        """`n` more units of work are done."""

    def set_status(self, text: str) -> None:
        """What is going on right now (shown after the bar; plain lines carry it)."""

    def message(self, line: str) -> None:
        """A line that stays: one per round, a warning, a result."""

    def close(self) -> None: ...


class TerminalProgress:
    """tqdm on a terminal."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO) -> None:
        from tqdm import tqdm

        self.stream = stream
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=stream)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_status(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=True)

    def message(self, line: str) -> None:
        self.bar.write(line, file=self.stream)

    def close(self) -> None:
        self.bar.close()


class PlainProgress:
    """Lines that read well in a log: messages, and a percentage at least every tenth."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO, *, quiet: bool) -> None:
        self.total, self.desc, self.unit, self.stream, self.quiet = total, desc, unit, stream, quiet
        self.done = 0
        self.status = ""
        self.next_report = PLAIN_STEP
        self.said_since_report = False

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        frac = self.done / max(1, self.total)
        if frac + 1e-9 < self.next_report:
            return
        # Past one or more report points: one line, unless a message already told.
        if not self.quiet and not self.said_since_report:
            status = f", {self.status}" if self.status else ""
            self._print(
                f"{self.desc}: {100 * frac:3.0f}% ({self.done}/{self.total} {self.unit}){status}"
            )
        while self.next_report <= frac + 1e-9:
            self.next_report += PLAIN_STEP
        self.said_since_report = False

    def set_status(self, text: str) -> None:
        self.status = text

    def message(self, line: str) -> None:
        self._print(line)
        self.said_since_report = True

    def close(self) -> None:
        pass


def progress_display(
    total: int,
    *,
    desc: str,
    unit: str = "it",
    quiet: bool = False,
    stream: TextIO | None = None,
) -> ProgressDisplay:
    """A tqdm bar when `stream` (default stderr) is a terminal and not `quiet`, else plain
    lines (see the module doc)."""
    out: Any = stream if stream is not None else sys.stderr
    if not quiet and out.isatty():
        return TerminalProgress(total, desc, unit, out)
    return PlainProgress(total, desc, unit, out, quiet=quiet)
