"""The `Bus` interface every transport implements: bytes and topics, nothing else.

Topic filters follow MQTT: `+` matches one level, a trailing `#` matches the rest. Both the
ZeroMQ broker and Mosquitto apply the same filters, so nodes never know which one they talk to.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass

from broker.errors import BrokerError


class BusError(BrokerError, RuntimeError):
    """The bus refused or could not carry out an operation (auth, ACL, closed, unreachable)."""


@dataclass(frozen=True)
class Will:
    """A frame the broker publishes on the node's behalf when the node vanishes."""

    topic: str
    frame: bytes
    retain: bool = True


class Bus(abc.ABC):
    """An asyncio connection to the message bus, owned by one node identity."""

    @abc.abstractmethod
    async def publish(self, topic: str, frame: bytes, *, retain: bool = False) -> None:
        """Queue `frame` for delivery on `topic`."""

    @abc.abstractmethod
    def subscribe(self, topic_filter: str) -> AsyncIterator[bytes]:
        """Frames published on topics matching `topic_filter`, from now on."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Leave the bus; pending frames may be lost."""

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
