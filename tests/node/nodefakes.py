"""In-memory stand-ins for the unit tests of the node layer: a bus and a numpy trainer.

The bus follows the `Bus` contract (MQTT filters, retained frames, last will on an abrupt
disconnect) so the director and envoy code under test is exactly the production code; the
real ZeroMQ broker is exercised by tests/integration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping

import numpy as np

from broker.client import Bus, BusError, Will
from broker.topics import topic_matches
from protocol.messages import TrainPlan


class MemoryBroker:
    def __init__(self) -> None:
        self.subs: list[tuple[str, asyncio.Queue[bytes | None], MemoryBus]] = []
        self.retained: dict[str, bytes] = {}
        self.log: list[tuple[str, str, bytes]] = []  # (sender node, topic, frame)
        # Which copies the bus loses, as a lossy link would: called per delivery with
        # (sender node, topic, frame, receiving node); True loses that copy only.
        self.lose: Callable[[str, str, bytes, str], bool] | None = None

    def connect(self, node_id: str, will: Will | None = None) -> MemoryBus:
        return MemoryBus(self, node_id, will)

    def deliver(self, sender: str, topic: str, frame: bytes, retain: bool) -> None:
        self.log.append((sender, topic, frame))
        if retain:
            self.retained[topic] = frame
        for flt, queue, bus in self.subs:
            if topic_matches(flt, topic):
                if self.lose is not None and self.lose(sender, topic, frame, bus.node_id):
                    continue
                queue.put_nowait(frame)

    def inject(self, topic: str, frame: bytes) -> None:
        """A frame from outside any node (an attacker on the bus)."""
        self.deliver("<injected>", topic, frame, False)


class MemoryBus(Bus):
    def __init__(self, broker: MemoryBroker, node_id: str, will: Will | None) -> None:
        self.broker = broker
        self.node_id = node_id
        self.will = will
        self.closed = False
        self.queues: list[asyncio.Queue[bytes | None]] = []
        # A silent node (its link died, its session did not): nothing it publishes arrives,
        # and no will either.
        self.muted = False

    async def publish(self, topic: str, frame: bytes, *, retain: bool = False) -> None:
        if self.closed:
            raise BusError("closed")
        if self.muted:
            return
        self.broker.deliver(self.node_id, topic, bytes(frame), retain)

    def subscribe(self, topic_filter: str) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.broker.subs.append((topic_filter, queue, self))
        self.queues.append(queue)
        for topic, frame in self.broker.retained.items():
            if topic_matches(topic_filter, topic):
                queue.put_nowait(frame)
        return self._iterate(queue)

    async def _iterate(self, queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        while True:
            frame = await queue.get()
            if frame is None:
                return
            yield frame

    def _detach(self) -> None:
        self.closed = True
        self.broker.subs = [s for s in self.broker.subs if s[2] is not self]
        for q in self.queues:
            q.put_nowait(None)

    async def close(self) -> None:
        self._detach()

    def vanish(self) -> None:
        """Like kill -9: no goodbye; the broker publishes the will."""
        self._detach()
        if self.will is not None:
            self.broker.deliver(self.node_id, self.will.topic, self.will.frame, self.will.retain)


class NumpyTrainer:
    """A deterministic 'model': each envoy pulls every weight towards its own target.

    FedAvg of such updates has a closed form, so tests can check the aggregate exactly.
    Scores for evaluation come from a fixed vector of validation scores.
    """

    def __init__(
        self, target: float, num_samples: int, *, val_scores=None, val_labels=None
    ) -> None:
        self.target = target
        self.num_samples = num_samples
        self.calls = 0
        self.seeds: list[int] = []  # the seed of every training call
        self.evaluations = 0
        rng = np.random.default_rng(int(target * 1000) % 2**31)
        self.val_labels = (
            np.asarray(val_labels) if val_labels is not None else rng.integers(0, 2, 40)
        )
        self.val_scores = (
            np.asarray(val_scores)
            if val_scores is not None
            else np.clip(0.3 * self.val_labels + 0.35 + 0.2 * rng.random(40), 0, 1)
        )
        self.delay_s = 0.0  # simulated training time (runs in the envoy's worker thread)

    def train(
        self, weights: Mapping[str, np.ndarray], plan: TrainPlan, *, seed: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        self.calls += 1
        self.seeds.append(seed)
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        new = {k: (v + 0.5 * (self.target - v)).astype(np.float32) for k, v in weights.items()}
        return new, self.num_samples, abs(self.target)

    def evaluate(self, weights: Mapping[str, np.ndarray]):
        from node.trainer import Predictions

        self.evaluations += 1
        scores = np.asarray(self.val_scores, np.float64)
        return Predictions(np.stack([1 - scores, scores], axis=1), self.val_labels, 1.0)
