"""The director's inbox: accepted envelopes waiting for the round driver, in bounded memory.

Frames arrive from the bus faster than a round may consume them (a flooding or replaying
envoy, a burst after a partition heals). The inbox keeps at most `per_sender` envelopes of
any one sender and at most `limit` in all; anything beyond is dropped, counted per sender and
logged (the first drop of a sender, then every power of two), never queued: one sender can
neither grow the director's memory nor crowd the other envoys' messages out.
"""

from __future__ import annotations

import asyncio
import collections

from node.logs import get_logger
from protocol.messages import Envelope

__all__ = ["Inbox"]


class Inbox:
    def __init__(self, *, per_sender: int, limit: int) -> None:
        if per_sender < 1 or limit < 1:
            raise ValueError("inbox bounds must be >= 1")
        self.per_sender = per_sender
        self.limit = limit
        self._queue: asyncio.Queue[Envelope] = asyncio.Queue()
        self._held: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.log = get_logger()

    def qsize(self) -> int:
        return self._queue.qsize()

    def put(self, env: Envelope) -> bool:
        """Queue `env`; False (counted, logged) if its sender or the inbox is full."""
        sender = env.sender
        if self._held[sender] >= self.per_sender or self._queue.qsize() >= self.limit:
            self.dropped[sender] += 1
            count = self.dropped[sender]
            if count & (count - 1) == 0:
                self.log.warning(
                    "inbox_full",
                    sender=sender,
                    type=env.type,
                    dropped=count,
                    queued=self._queue.qsize(),
                )
            return False
        self._held[sender] += 1
        self._queue.put_nowait(env)
        return True

    async def get(self) -> Envelope:
        return self._taken(await self._queue.get())

    def get_nowait(self) -> Envelope:
        """The next queued envelope at once; asyncio.QueueEmpty if there is none."""
        return self._taken(self._queue.get_nowait())

    def _taken(self, env: Envelope) -> Envelope:
        self._held[env.sender] -= 1
        if self._held[env.sender] <= 0:
            del self._held[env.sender]
        return env
