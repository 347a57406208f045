"""A subscription's queue of frames, shared by every transport's client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol, cast

from broker.client.bus import BusError

_CLOSED = object()


class _Unsubscriber(Protocol):
    async def _unsubscribe(self, sub: Any) -> None: ...


class Subscription(AsyncIterator[bytes]):
    """Frames on one topic filter, in arrival order. Iterate it; `aclose()` to leave.

    The first `__anext__` (or `await sub.ready()`) raises BusError if the broker refused the
    subscription. Iteration ends when the subscription or the bus is closed.
    """

    def __init__(self, bus: _Unsubscriber, topic_filter: str) -> None:
        self.topic_filter = topic_filter
        self._bus = bus
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._broken: BaseException | None = None

    def __repr__(self) -> str:
        return f"Subscription({self.topic_filter!r}, pending={self._queue.qsize()})"

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
        return cast(bytes, item)

    def get_nowait(self) -> bytes | None:
        """A frame already here, or None."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)
            return None
        return cast(bytes, item)

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
