"""Which envoys the director has heard of, which are online, and who takes part in a round.

An envoy is online while its last presence said so and it was heard from (any accepted frame)
within the heartbeat timeout. When the director knows its members (their signing keys), only
members are tracked: a frame from anybody else never makes a node an envoy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.messages import Presence

__all__ = ["EnvoySeen", "Envoys", "select_participants"]


@dataclass
class EnvoySeen:
    online: bool
    last_seen: float  # monotonic
    last_seen_wall: float
    stage: str = ""


class Envoys:
    """The envoys seen so far (see the module docstring)."""

    def __init__(
        self,
        *,
        heartbeat_timeout_s: float,
        members: Collection[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.members = frozenset(members)
        self.clock = clock
        self.seen: dict[str, EnvoySeen] = {}

    def saw(self, sender: str) -> None:
        """`sender` was just heard from."""
        if self.members and sender not in self.members:
            return
        seen = self.seen.get(sender)
        if seen is None:
            self.seen[sender] = EnvoySeen(True, self.clock(), time.time())
        else:
            seen.last_seen = self.clock()
            seen.last_seen_wall = time.time()

    def update(self, sender: str, body: Presence) -> bool:
        """Take an envoy's presence; True when it went online or offline."""
        if body.role != "envoy":
            return False
        seen = self.seen.get(sender)
        if seen is None:
            return False
        was = seen.online
        seen.online = body.online
        seen.stage = body.stage
        return was != body.online

    def said_offline(self, name: str) -> bool:
        """Whether `name`'s presence says it left (its goodbye, or the broker's last will on a
        dropped connection), as opposed to merely not heard from for a while (a partition,
        a broker restart: it may be back)."""
        seen = self.seen.get(name)
        return seen is not None and not seen.online

    def online(self) -> list[str]:
        now = self.clock()
        return sorted(
            name
            for name, seen in self.seen.items()
            if seen.online and now - seen.last_seen <= self.heartbeat_timeout_s
        )

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every envoy seen, as status.json shows it."""
        now = self.clock()
        online = set(self.online())
        return {
            name: {
                "online": name in online,
                "last_seen_s": round(now - seen.last_seen, 3),
                "last_seen": seen.last_seen_wall,
                "stage": seen.stage,
            }
            for name, seen in sorted(self.seen.items())
        }


def select_participants(
    online: list[str],
    *,
    seed: int,
    round: int,
    attempt: int,
    min_envoys: int,
    target_envoys: int,
    participation: float,
) -> list[str]:
    """The envoys of one round attempt: a seeded random sample of the online ones."""
    rng = np.random.default_rng([seed, round, attempt])
    k = max(min_envoys, math.ceil(participation * len(online)))
    k = min(k, target_envoys, len(online))
    chosen = rng.choice(len(online), size=k, replace=False)
    return sorted(online[i] for i in chosen)
