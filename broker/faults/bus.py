"""FaultyBus: a `Bus` wrapper that applies one node's link faults and partitions of a plan.

Wrapping the bus (not the transports) keeps the faults identical on ZeroMQ and MQTT, and the
node code unaware of them: it publishes and subscribes as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from broker.client.bus import Bus
from broker.faults.plan import FaultPlan

__all__ = ["FaultyBus", "FaultySubscription", "corrupt_bytes"]


class FaultyBus(Bus):
    """Wraps a Bus and applies one node's link faults and partitions from a `FaultPlan`.

    `started_at` is the wall-clock (time.time()) origin of the partition windows; a launcher
    passes the same value to every process so partitions line up across nodes.
    """

    def __init__(
        self,
        inner: Bus,
        plan: FaultPlan,
        node_id: str,
        *,
        started_at: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self.plan = plan
        self.node_id = node_id
        self._clock = clock
        self._t0 = clock() if started_at is None else started_at
        self._link = plan.link_for(node_id)
        self._rng = plan.rng(node_id, "link")
        self._held: tuple[str, bytes, bool, int] | None = None
        self._held_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._delayed: set[asyncio.Task[None]] = set()  # frames on their way (delay_ms)
        self.log = structlog.get_logger("faults").bind(node=node_id)
        self.counts = {
            "sent": 0,
            "dropped": 0,
            "duplicated": 0,
            "corrupted": 0,
            "delayed": 0,
            "reordered": 0,
            "partitioned_out": 0,
            "partitioned_in": 0,
        }

    def elapsed(self) -> float:
        return self._clock() - self._t0

    def cut_off(self) -> bool:
        return self.plan.partitioned(self.node_id, self.elapsed())

    # -- outgoing ---------------------------------------------------------------------------

    async def publish(self, topic: str, frame: bytes, *, retain: bool = False) -> None:
        if self.cut_off():
            self.counts["partitioned_out"] += 1
            return
        link = self._link
        if link is None or link.is_noop:
            await self._send(topic, frame, retain)
            return
        # Draw every decision for this frame up front and always in the same order, so one
        # frame's outcome never shifts the random stream of the next.
        rng = self._rng
        u_drop, u_dup, u_corrupt, u_reorder = (rng.random() for _ in range(4))
        delay_s = rng.uniform(*link.delay_range) / 1000.0
        corrupt_seed = rng.getrandbits(64)
        if u_drop < link.drop:
            self.counts["dropped"] += 1
            return
        if u_corrupt < link.corrupt:
            frame = corrupt_bytes(frame, random.Random(corrupt_seed))
            self.counts["corrupted"] += 1
        copies = 2 if u_dup < link.duplicate else 1
        if copies == 2:
            self.counts["duplicated"] += 1
        if u_reorder < link.reorder and self._held is None:
            # Hold this frame back until the next one has gone out (or a short while passes).
            self.counts["reordered"] += 1
            self._held = (topic, frame, retain, copies)
            self._held_task = self._spawn(self._release_held_later(max(delay_s, 0.05)))
            return
        for _ in range(copies):
            if delay_s > 0:
                self.counts["delayed"] += 1
                sending = self._spawn(self._send_later(delay_s, topic, frame, retain))
                self._delayed.add(sending)
                sending.add_done_callback(self._delayed.discard)
            else:
                await self._send(topic, frame, retain)
        await self._release_held()

    async def _send(self, topic: str, frame: bytes, retain: bool) -> None:
        self.counts["sent"] += 1
        await self.inner.publish(topic, frame, retain=retain)

    async def _send_later(self, delay_s: float, topic: str, frame: bytes, retain: bool) -> None:
        await asyncio.sleep(delay_s)
        if self.cut_off():
            self.counts["partitioned_out"] += 1
            return
        await self._send(topic, frame, retain)

    async def _release_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            if self._held_task is not None and self._held_task is not asyncio.current_task():
                self._held_task.cancel()
            self._held_task = None
            topic, frame, retain, copies = held
            for _ in range(copies):
                await self._send(topic, frame, retain)

    async def _release_held_later(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        await self._release_held()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("faulty_send_failed", error=str(task.exception()))

    # -- incoming ---------------------------------------------------------------------------

    def subscribe(self, topic_filter: str) -> FaultySubscription:
        return FaultySubscription(self, self.inner.subscribe(topic_filter))

    async def close(self) -> None:
        # A slow link delays frames, it does not eat them: what was published before a clean
        # close (an envoy's offline presence) still arrives, after its delay.
        with contextlib.suppress(Exception):
            await self._release_held()
        if self._delayed:
            await asyncio.wait(list(self._delayed))
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Transport extras (abort(), refusals, ...) stay reachable through the wrapper.
        return getattr(self.inner, name)


class FaultySubscription(AsyncIterator[bytes]):
    """The inner subscription minus what arrives while the node is partitioned away.

    A pump task reads the inner subscription as frames arrive, so the partition check uses
    the arrival time, not the (possibly much later) time the node gets round to reading.
    """

    def __init__(self, bus: FaultyBus, inner: AsyncIterator[bytes]) -> None:
        self._bus = bus
        self.inner = inner
        self._queue: asyncio.Queue[tuple[bytes | None, BaseException | None]] = asyncio.Queue()
        self._pump = bus._spawn(self._run())

    async def _run(self) -> None:
        try:
            async for frame in self.inner:
                if self._bus.cut_off():
                    self._bus.counts["partitioned_in"] += 1
                    continue
                self._queue.put_nowait((frame, None))
            self._queue.put_nowait((None, None))
        except asyncio.CancelledError:
            self._queue.put_nowait((None, None))
            raise
        except Exception as exc:  # hand the inner error (e.g. BusError) to the reader
            self._queue.put_nowait((None, exc))

    def __aiter__(self) -> FaultySubscription:
        return self

    async def __anext__(self) -> bytes:
        frame, exc = await self._queue.get()
        if frame is None:
            self._queue.put_nowait((None, exc))  # stay finished for later readers
            if exc is not None:
                raise exc
            raise StopAsyncIteration
        return frame

    def get_nowait(self) -> bytes | None:
        try:
            frame, exc = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if frame is None:
            self._queue.put_nowait((None, exc))
        return frame

    async def ready(self) -> None:
        ready = getattr(self.inner, "ready", None)
        if ready is not None:
            await ready()

    async def aclose(self) -> None:
        self._pump.cancel()
        aclose = getattr(self.inner, "aclose", None)
        if aclose is not None:
            await aclose()


def corrupt_bytes(frame: bytes, rng: random.Random) -> bytes:
    """Flip 1-8 bytes at random positions (never a no-op on a non-empty frame)."""
    if not frame:
        return frame
    out = bytearray(frame)
    # Distinct positions: flipping one byte twice could cancel out.
    for i in rng.sample(range(len(out)), rng.randint(1, min(8, len(out)))):
        out[i] ^= rng.randint(1, 255)
    return bytes(out)
