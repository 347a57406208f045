"""A subscription's queue of frames, shared by every transport's client.

The queue is bounded: a node that stops reading one topic (a stuck handler, a CPU-bound
stage) must not grow without limit while the broker keeps delivering. Past
`max_queued_bytes` (or `MAX_QUEUED_FRAMES` frames) a new frame is dropped, counted in
`dropped` and logged (the first drop, then every `DROP_LOG_EVERY`th), like a broker's
per-client queue limit; to the protocol it is a lost message. An empty queue always takes a
frame, so one frame up to the frame size limit always gets through to a reader that keeps up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol, cast

import structlog

from broker.client.bus import BusError

__all__ = ["DEFAULT_MAX_QUEUED_BYTES", "DROP_LOG_EVERY", "MAX_QUEUED_FRAMES", "Subscription"]

_CLOSED = object()
# A director reading every envoy's masked input holds n x the model in the worst case: 1 GiB
# is 200 envoys' updates of a 1.3M-parameter model (4 bytes a coordinate).
DEFAULT_MAX_QUEUED_BYTES = 1 << 30
MAX_QUEUED_FRAMES = 100_000
DROP_LOG_EVERY = 100

log = structlog.get_logger("broker.subscription")


class _Unsubscriber(Protocol):
    async def _unsubscribe(self, sub: Any) -> None: ...


class Subscription(AsyncIterator[bytes]):
    """Frames on one topic filter, in arrival order. Iterate it; `aclose()` to leave.

    The first `__anext__` (or `await sub.ready()`) raises BusError if the broker refused the
    subscription. Iteration ends when the subscription or the bus is closed.
    """

    def __init__(
        self,
        bus: _Unsubscriber,
        topic_filter: str,
        *,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    ) -> None:
        if max_queued_bytes < 1:
            raise ValueError("max_queued_bytes must be positive")
        self.topic_filter = topic_filter
        self._bus = bus
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._broken: BaseException | None = None
        self.max_queued_bytes = max_queued_bytes
        self.queued_bytes = 0
        self.dropped = 0  # frames refused because the queue was full

    def __repr__(self) -> str:
        return (
            f"Subscription({self.topic_filter!r}, pending={self._queue.qsize()}, "
            f"dropped={self.dropped})"
        )

    def _offer(self, frame: bytes) -> bool:
        """Queue a frame that arrived for this subscription; False if it was dropped."""
        if self.closed:
            return False
        pending = self._queue.qsize()
        if pending and (
            self.queued_bytes + len(frame) > self.max_queued_bytes or pending >= MAX_QUEUED_FRAMES
        ):
            self.dropped += 1
            if self.dropped % DROP_LOG_EVERY == 1:
                log.warning(
                    "subscription_full_dropping",
                    filter=self.topic_filter,
                    dropped=self.dropped,
                    queued_frames=pending,
                    queued_bytes=self.queued_bytes,
                    max_queued_bytes=self.max_queued_bytes,
                )
            return False
        self.queued_bytes += len(frame)
        self._queue.put_nowait(frame)
        return True

    def _taken(self, item: Any) -> bytes:
        frame = cast(bytes, item)
        self.queued_bytes -= len(frame)
        return frame

    async def ready(self) -> None:
        """Wait until the broker confirmed the subscription (BusError if refused)."""
        await asyncio.shield(self._acked)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes:
        if not self._acked.done() or self._acked.exception() is not None:
            await self.ready()
        item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # stay closed for later readers
            if self._broken is not None:
                raise self._broken
            raise StopAsyncIteration
        return self._taken(item)

    def get_nowait(self) -> bytes | None:
        """A frame already here, or None."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)
            return None
        return self._taken(item)

    async def aclose(self) -> None:
        if not self.closed:
            self._finish()
            await self._bus._unsubscribe(self)

    def _finish(self, exc: BaseException | None = None, *, broken: bool = False) -> None:
        """End the subscription; `broken` makes readers raise `exc` instead of stopping."""
        self.closed = True
        if broken:
            self._broken = exc
        if not self._acked.done():
            self._acked.set_exception(exc or BusError("subscription closed"))
            self._acked.exception()  # mark retrieved: nobody may be waiting
        self._queue.put_nowait(_CLOSED)
