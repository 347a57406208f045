"""Fault plans: crashes, lossy links, partitions and broker restarts, on purpose and seeded.

One TOML format (docs/architecture.md, "Fault plans") serves `fedbus demo --faults`, the tests and
users' own harnesses; the Python API builds the same plan and can write it back as TOML for
child processes. The plan is a msgspec schema validated through `protocol.configfile`, so a
file and the builder are checked by the same rules and every error names the file and the
field. Every random choice comes from a `random.Random` seeded with the plan seed and the node
id, drawn in a fixed order per frame, so the same traffic meets the same faults and a failing
run replays exactly.

Semantics:
* [[crash]]: the node calls `plan.crash_point(node, round, stage)` when it enters a stage
  and exits at once (kill -9 style, see `crash_if_planned`) when it returns True. Stages are
  `protocol.stages.CRASH_STAGES`.
* [[link]]: faults on the frames a node *publishes* ("*" = every node). A node-specific
  entry replaces the "*" entry for that node. drop / duplicate / corrupt / reorder are
  per-frame probabilities; delay_ms = [lo, hi] is a uniform extra latency.
* [[partition]]: from from_s to to_s seconds after the plan's start, the listed nodes
  neither publish nor receive anything.
* [[broker_restart]]: the launcher kills the broker at at_s and starts a new one on the same
  address down_s later (clients reconnect and resubscribe by themselves).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

import msgspec
import structlog

from broker.errors import BrokerError
from broker.files import PUBLIC_MODE, atomic_write_text, read_toml
from protocol.configfile import ConfigError, convert_config, dump_toml, parse_toml
from protocol.stages import CRASH_STAGES, Stage

__all__ = [
    "ANY_NODE",
    "BrokerRestart",
    "CrashFault",
    "FaultPlan",
    "FaultPlanError",
    "LinkFault",
    "PartitionFault",
    "crash_if_planned",
]

ANY_NODE = "*"
MAX_DELAY_MS = 3_600_000.0
MAX_DOWN_S = 3600.0


class FaultPlanError(ConfigError, BrokerError):
    """A fault plan that cannot be used; the message names the file and the field."""


# A node id (the alphabet of broker.topics ids) or "*" for every node.
NodeName = Annotated[str, msgspec.Meta(pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$")]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0)]
Millis = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_DELAY_MS)]


class _Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class CrashFault(_Entry, frozen=True):
    envoy: NodeName
    round: Annotated[int, msgspec.Meta(ge=0)]
    stage: Stage


class LinkFault(_Entry, frozen=True):
    node: NodeName = ANY_NODE
    drop: Probability = 0.0
    duplicate: Probability = 0.0
    corrupt: Probability = 0.0
    # [low, high]; one number means a fixed delay (normalised to [n, n]). The single number
    # is a plain float checked below: msgspec 0.23 mis-decodes a union of a tuple and a
    # constrained float (garbage bounds, even a crash).
    delay_ms: tuple[Millis, Millis] | float = (0.0, 0.0)
    reorder: Probability = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.delay_ms, tuple):
            if not 0.0 <= self.delay_ms <= MAX_DELAY_MS:
                raise ValueError(f"delay_ms must be between 0 and {MAX_DELAY_MS:.0f}")
            msgspec.structs.force_setattr(self, "delay_ms", (self.delay_ms, self.delay_ms))

    @property
    def delay_range(self) -> tuple[float, float]:
        assert isinstance(self.delay_ms, tuple)
        return self.delay_ms

    @property
    def is_noop(self) -> bool:
        return not (
            self.drop or self.duplicate or self.corrupt or self.reorder or self.delay_range[1]
        )


class PartitionFault(_Entry, frozen=True):
    nodes: Annotated[tuple[NodeName, ...], msgspec.Meta(min_length=1)]
    from_s: Seconds
    to_s: Seconds

    def covers(self, node_id: str, t_s: float) -> bool:
        return (node_id in self.nodes or ANY_NODE in self.nodes) and self.from_s <= t_s < self.to_s


class BrokerRestart(_Entry, frozen=True):
    at_s: Seconds
    down_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_DOWN_S)] = 1.0


class FaultPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An immutable, seeded fault plan. Build with `FaultPlan(seed=...)` and the chainable
    `.crash()`, `.link()`, `.partition()`, `.broker_restart()`, or `load()` a TOML file."""

    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    crashes: tuple[CrashFault, ...] = msgspec.field(default=(), name="crash")
    links: tuple[LinkFault, ...] = msgspec.field(default=(), name="link")
    partitions: tuple[PartitionFault, ...] = msgspec.field(default=(), name="partition")
    broker_restarts: tuple[BrokerRestart, ...] = msgspec.field(default=(), name="broker_restart")

    def __post_init__(self) -> None:
        # Checks across entries, named like the TOML the user wrote.
        for i, crash in enumerate(self.crashes):
            if crash.stage not in CRASH_STAGES:
                raise ValueError(
                    f"crash[{i}].stage: {crash.stage.value!r} is not one of "
                    f"{[s.value for s in CRASH_STAGES]}"
                )
        seen: set[str] = set()
        for i, link in enumerate(self.links):
            low, high = link.delay_range
            if high < low:
                raise ValueError(f"link[{i}].delay_ms: high must not be below low")
            if link.node in seen:
                raise ValueError(f"link[{i}].node: a second [[link]] for {link.node!r}")
            seen.add(link.node)
        for i, part in enumerate(self.partitions):
            if part.to_s <= part.from_s:
                raise ValueError(f"partition[{i}].to_s: must be after from_s")
        ordered = tuple(sorted(self.broker_restarts, key=lambda r: r.at_s))
        msgspec.structs.force_setattr(self, "broker_restarts", ordered)

    # -- building ---------------------------------------------------------------------------

    def crash(self, envoy: str, *, round: int, stage: str) -> FaultPlan:
        entry = {"envoy": envoy, "round": round, "stage": stage}
        return self._with("crash", entry)

    def link(
        self,
        node: str = ANY_NODE,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        corrupt: float = 0.0,
        delay_ms: tuple[float, float] | list[float] = (0.0, 0.0),
        reorder: float = 0.0,
    ) -> FaultPlan:
        entry = {
            "node": node,
            "drop": drop,
            "duplicate": duplicate,
            "corrupt": corrupt,
            "delay_ms": list(delay_ms),
            "reorder": reorder,
        }
        return self._with("link", entry)

    def partition(self, nodes: Iterable[str], *, from_s: float, to_s: float) -> FaultPlan:
        return self._with("partition", {"nodes": list(nodes), "from_s": from_s, "to_s": to_s})

    def broker_restart(self, *, at_s: float, down_s: float = 1.0) -> FaultPlan:
        return self._with("broker_restart", {"at_s": at_s, "down_s": down_s})

    def _with(self, kind: str, entry: dict[str, Any]) -> FaultPlan:
        # Through the schema, so the Python API validates exactly like the TOML path.
        data = self.to_dict()
        data[kind] = [*data.get(kind, []), entry]
        return FaultPlan.from_dict(data, source="<python>")

    # -- loading and writing ----------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FaultPlan:
        try:
            data = read_toml(path)
        except ConfigError as exc:
            raise FaultPlanError(str(exc)) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def loads(cls, text: str, *, source: str = "<string>") -> FaultPlan:
        try:
            data = parse_toml(text, source=source)
        except ConfigError as exc:
            raise FaultPlanError(str(exc)) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> FaultPlan:
        try:
            return convert_config(data, cls, source=source)
        except ConfigError as exc:
            raise FaultPlanError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """The plan as the TOML table it was (or would be) read from."""
        return {
            key: value for key, value in msgspec.to_builtins(self).items() if key == "seed" or value
        }

    def to_toml(self) -> str:
        """The plan as TOML that `load` reads back to an equal plan (for child processes)."""
        return dump_toml(self.to_dict())

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, self.to_toml(), mode=PUBLIC_MODE)

    # -- queries ----------------------------------------------------------------------------

    def crash_point(self, node_id: str, round: int, stage: str) -> bool:
        """Should `node_id` crash on entering `stage` of `round`?"""
        if stage not in CRASH_STAGES:
            raise ValueError(f"stage {stage!r} is not one of {[s.value for s in CRASH_STAGES]}")
        return any(
            c.round == round and c.stage == stage and c.envoy in (node_id, ANY_NODE)
            for c in self.crashes
        )

    def crashes_of(self, node_id: str) -> bool:
        """Does the plan crash `node_id` at some point?"""
        return any(c.envoy in (node_id, ANY_NODE) for c in self.crashes)

    def link_for(self, node_id: str) -> LinkFault | None:
        specific = next((lf for lf in self.links if lf.node == node_id), None)
        if specific is not None:
            return specific
        return next((lf for lf in self.links if lf.node == ANY_NODE), None)

    def partitioned(self, node_id: str, t_s: float) -> bool:
        """Is `node_id` cut off from the bus `t_s` seconds after the plan started?"""
        return any(p.covers(node_id, t_s) for p in self.partitions)

    def ever_partitioned(self, node_id: str) -> bool:
        """Does any [[partition]] name `node_id` (or every node)?"""
        return any(node_id in p.nodes or ANY_NODE in p.nodes for p in self.partitions)

    def rng(self, node_id: str, purpose: str = "link") -> random.Random:
        """A generator private to (seed, node, purpose): nodes do not perturb each other."""
        digest = hashlib.sha256(f"{self.seed}\x00{node_id}\x00{purpose}".encode()).digest()
        return random.Random(int.from_bytes(digest[:16], "big"))


def crash_if_planned(
    plan: FaultPlan | None,
    node_id: str,
    round: int,
    stage: str,
    *,
    exit: Callable[[int], Any] = os._exit,
) -> None:
    """Exit at once, like kill -9 (no cleanup, no BYE: the broker fires the last will)."""
    if plan is not None and plan.crash_point(node_id, round, stage):
        structlog.get_logger("faults").warning(
            "planned_crash", node=node_id, round=round, stage=stage
        )
        exit(137)
