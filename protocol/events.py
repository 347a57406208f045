"""What a sans-IO machine hands back to whoever drives it: messages to send, and refusals.

Every machine in fedbus (the SecAgg client and server, the director's aggregation, the envoy's
contribution) answers an input with a list of `Outgoing` messages and never raises because a
peer sent something wrong: it records a `Refusal` instead. The driver sends the messages and
reads the refusals with `take_refusals()` (to log them), as h11's callers read events.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from protocol.messages import Body

__all__ = ["BROADCAST", "Outgoing", "Refusal", "RefusalLog", "Refused"]

# The recipient of a message every participant of the round gets.
BROADCAST = "*"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message a machine wants sent: to a node id, or to BROADCAST."""

    recipient: str
    body: Body


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message a machine ignored without changing its state, and why."""

    sender: str
    type: str
    reason: str


class RefusalLog:
    """The refusals of one machine, kept until its driver takes them.

    `refusals` holds every refusal not yet taken (tests read it directly); `take_refusals()`
    hands them over and forgets them, so a driver that takes them after every input reads
    exactly the refusals that input caused.
    """

    def __init__(self, logger_name: str, event: str = "refused") -> None:
        self.refusals: list[Refusal] = []
        self._refusal_logger = structlog.get_logger(logger_name)
        self._refusal_event = event

    def refuse(self, sender: str, body: object, reason: str, **context: object) -> list[Outgoing]:
        """Record that `body` from `sender` was refused; returns the (empty) answer."""
        self.refusals.append(Refusal(sender, type(body).__name__, reason))
        self._refusal_logger.debug(self._refusal_event, sender=sender, reason=reason, **context)
        return []

    def take_refusals(self) -> list[Refusal]:
        taken, self.refusals = self.refusals, []
        return taken


class Refused(Exception):
    """Raised inside a machine to refuse the message at hand. It never leaves the machine:
    the one place that dispatches messages turns it into a Refusal and keeps the state."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
