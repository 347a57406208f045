"""Re-sending stage messages, so a lost frame costs a retry, not the round.

The bus may lose any frame (a lossy link, a broker restart, a partition). A round's stages
are request and answer: the director's message opens a stage (RoundStart, the key roster, the
forwarded shares, ...) and each participant answers it. The director cannot tell a lost
request from a lost answer, so it does one thing for both: it sends the stage's request again
to every participant it still waits for (`StageRequests`, on the schedule of `RetrySchedule`),
and a participant that already answered that very request sends the very same answer again
(`Answers`) instead of computing a second one. Re-sending is idempotent:

* a request arriving twice gets the same answer twice, never a different one, so a director
  gains nothing by asking again (a SecAgg client that answered two different unmask requests
  would leak; the machines in protocol.secagg refuse a second request that differs, and this
  module only ever repeats what was sent);
* an answer arriving twice is refused as a duplicate by the director's SecAgg server, without
  a state change.

Requests are matched by round and content (`message_key`), not by envelope: every re-sent
frame is a new envelope with a fresh message id (the endpoints refuse a replayed message
id), so only the round and the body say that it is the same question.

Nothing here does I/O or reads a clock: the director and the envoy pass times and send what
these classes return.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import msgspec

from protocol.base import Message
from protocol.events import BROADCAST, Outgoing
from protocol.messages import Body

__all__ = ["Answers", "RetrySchedule", "StageRequests", "message_key", "resend_plan"]

_ENCODER = msgspec.msgpack.Encoder()


def message_key(round: int, body: Message) -> bytes:
    """What identifies a message of `round` by content (its type and every field), whatever
    envelope carried it: SHA-256 of the round and the body's MessagePack encoding. The round
    is the envelope's: two rounds' RoundStarts may carry the very same body."""
    return hashlib.sha256(_ENCODER.encode([round, body])).digest()


class Answers:
    """What one participant sent in answer to each director message of one session.

    `opened(key)` when a director message starts being handled; everything `sent` afterwards,
    until the next `opened`, answers it (the masked input, sent once training ends, answers
    the forwarded shares that came before it). `replay(key)` is that answer, for a message
    that arrives again, or None for a message not seen before (handle it normally). A request
    seen but not answered yet (the envoy is still training) replays as an empty list: there
    is nothing to repeat, and nothing new may be computed for it either.
    """

    def __init__(self) -> None:
        self._by_request: dict[bytes, list[Body]] = {}
        self._latest: bytes | None = None

    def opened(self, key: bytes) -> None:
        self._by_request.setdefault(key, [])
        self._latest = key

    def sent(self, body: Body) -> None:
        if self._latest is not None:
            self._by_request[self._latest].append(body)

    def replay(self, key: bytes) -> list[Body] | None:
        answer = self._by_request.get(key)
        return None if answer is None else list(answer)


class StageRequests:
    """The messages that opened the director's current stage, by recipient: what a
    participant that has not answered is sent again."""

    def __init__(self, opening: Iterable[Outgoing] = ()) -> None:
        self._sent: list[Outgoing] = list(opening)

    def add(self, outs: Iterable[Outgoing]) -> None:
        """Messages sent later in the same stage (they are re-sent too)."""
        self._sent.extend(outs)

    def for_participant(self, name: str) -> list[Body]:
        """Every message of the stage that `name` should have received, in order."""
        return [out.body for out in self._sent if out.recipient in (BROADCAST, name)]


@dataclass(frozen=True)
class RetrySchedule:
    """When the director sends a stage's requests again to those that have not answered.

    Silence is the sign of a loss: the requests go again once the stage has been quiet for
    `first_s` (no answer since it opened, since the last answer, or since the last re-send).
    While the silence lasts, each further wait doubles, up to `max_s`, so a participant that
    is merely slow (local training takes minutes) costs a few small frames; every answer that
    arrives resets the wait to `first_s`, so a frame lost while the others are still
    answering costs about `first_s`, not the stage's deadline. A stage whose answers keep
    trickling in (hundreds of envoys on a few cores) is not re-sent at all.
    """

    first_s: float
    max_s: float
    opened_at: float
    last_answer_at: float | None = None
    resent_at: float | None = None
    resends: int = 0  # since the last answer

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError(f"need 0 < first_s <= max_s, got {self.first_s}, {self.max_s}")

    @property
    def quiet_since(self) -> float:
        """When the stage last heard or sent anything."""
        return max(
            t for t in (self.opened_at, self.last_answer_at, self.resent_at) if t is not None
        )

    @property
    def due(self) -> float:
        """The time of the next re-send."""
        return self.quiet_since + min(self.max_s, self.first_s * 2.0 ** min(self.resends, 64))

    def answered(self, now: float) -> RetrySchedule:
        """An answer arrived at `now`: the wait starts again from first_s."""
        return replace(self, last_answer_at=now, resends=0)

    def resent(self, now: float) -> RetrySchedule:
        """The requests were sent again at `now` (the next wait doubles)."""
        return replace(self, resent_at=now, resends=self.resends + 1)


def resend_plan(requests: StageRequests, names: Sequence[str]) -> list[Outgoing]:
    """The messages to send again, each addressed to one participant."""
    return [Outgoing(name, body) for name in names for body in requests.for_participant(name)]
