"""Fault plans: crashes, lossy links, partitions and broker restarts, on purpose and seeded.

One TOML format (DESIGN.md, "Fault plans") serves `fedbus demo --faults`, the tests and
users' own harnesses; the Python API builds the same plan and can write it back as TOML for
child processes. Every random choice comes from a `random.Random` seeded with the plan seed
and the node id, drawn in a fixed order per frame, so the same traffic meets the same faults
and a failing run replays exactly.

Semantics:
* [[crash]]: the node calls `plan.crash_point(node, round, stage)` when it enters a stage
  and exits at once (kill -9 style, see `crash_if_planned`) when it returns True.
* [[link]]: faults on the frames a node *publishes* ("*" = every node). A node-specific
  entry replaces the "*" entry for that node. drop / duplicate / corrupt / reorder are
  per-frame probabilities; delay_ms = [lo, hi] is a uniform extra latency.
* [[partition]]: from from_s to to_s seconds after the plan's start, the listed nodes
  neither publish nor receive anything.
* [[broker_restart]]: the launcher kills the broker at at_s and starts a new one on the same
  address down_s later (clients reconnect and resubscribe by themselves).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import random
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from broker.bus import Bus

STAGES: tuple[str, ...] = (
    "training",
    "advertise_keys",
    "share_keys",
    "masked_input",
    "consistency",
    "unmask",
)
ANY_NODE = "*"


class FaultPlanError(ValueError):
    """A fault plan that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class CrashFault:
    envoy: str
    round: int
    stage: str


@dataclass(frozen=True)
class LinkFault:
    node: str = ANY_NODE
    drop: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    delay_ms: tuple[float, float] = (0.0, 0.0)
    reorder: float = 0.0

    @property
    def is_noop(self) -> bool:
        return not (self.drop or self.duplicate or self.corrupt or self.reorder or self.delay_ms[1])


@dataclass(frozen=True)
class PartitionFault:
    nodes: tuple[str, ...]
    from_s: float
    to_s: float

    def covers(self, node_id: str, t_s: float) -> bool:
        return (node_id in self.nodes or ANY_NODE in self.nodes) and self.from_s <= t_s < self.to_s


@dataclass(frozen=True)
class BrokerRestart:
    at_s: float
    down_s: float = 1.0


def _node_name(value: Any, where: str, fail: Callable[[str, str], FaultPlanError]) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 64
        or any(c in value for c in "/+#\x00 ")
    ):
        raise fail(where, 'must be a node id or "*"')
    return value


@dataclass(frozen=True)
class FaultPlan:
    """An immutable, seeded fault plan. Build with `FaultPlan(seed=...)` and the chainable
    `.crash()`, `.link()`, `.partition()`, `.broker_restart()`, or `load()` a TOML file."""

    seed: int = 0
    crashes: tuple[CrashFault, ...] = ()
    links: tuple[LinkFault, ...] = ()
    partitions: tuple[PartitionFault, ...] = ()
    broker_restarts: tuple[BrokerRestart, ...] = ()
    source: str = field(default="<python>", compare=False)

    # -- building ---------------------------------------------------------------------------

    def crash(self, envoy: str, *, round: int, stage: str) -> FaultPlan:
        return self._rebuilt(
            crash=[*self._dicts("crash"), {"envoy": envoy, "round": round, "stage": stage}]
        )

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
        return self._rebuilt(link=[*self._dicts("link"), entry])

    def partition(self, nodes: Iterable[str], *, from_s: float, to_s: float) -> FaultPlan:
        entry = {"nodes": list(nodes), "from_s": from_s, "to_s": to_s}
        return self._rebuilt(partition=[*self._dicts("partition"), entry])

    def broker_restart(self, *, at_s: float, down_s: float = 1.0) -> FaultPlan:
        entry = {"at_s": at_s, "down_s": down_s}
        return self._rebuilt(broker_restart=[*self._dicts("broker_restart"), entry])

    def _dicts(self, kind: str) -> list[dict[str, Any]]:
        return self.to_dict().get(kind, [])

    def _rebuilt(self, **changed: Any) -> FaultPlan:
        # Rebuild through from_dict so the Python API validates exactly like the TOML path.
        data = self.to_dict()
        data.update(changed)
        return FaultPlan.from_dict(data, source=self.source)

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FaultPlan:
        path = Path(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise FaultPlanError(f"{path}: cannot read fault plan: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise FaultPlanError(f"{path}: invalid TOML: {exc}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def loads(cls, text: str, *, source: str = "<string>") -> FaultPlan:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FaultPlanError(f"{source}: invalid TOML: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> FaultPlan:
        def fail(fld: str, why: str) -> FaultPlanError:
            return FaultPlanError(f"{source}: {fld}: {why}")

        if not isinstance(data, Mapping):
            raise fail("<top>", "a fault plan must be a table")
        known = {"seed", "crash", "link", "partition", "broker_restart"}
        for key in data:
            if key not in known:
                raise fail(key, f"unknown field (expected one of {sorted(known)})")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise fail("seed", "must be an integer in [0, 2^63)")

        def entries(kind: str) -> list[tuple[str, Mapping[str, Any]]]:
            value = data.get(kind, [])
            if not isinstance(value, list):
                raise fail(kind, f"must be an array of tables ([[{kind}]])")
            out = []
            for i, entry in enumerate(value):
                where = f"{kind}[{i}]"
                if not isinstance(entry, Mapping):
                    raise fail(where, "must be a table")
                out.append((where, entry))
            return out

        def check_keys(where: str, entry: Mapping[str, Any], allowed: set[str]) -> None:
            for key in entry:
                if key not in allowed:
                    raise fail(
                        f"{where}.{key}", f"unknown field (expected one of {sorted(allowed)})"
                    )

        def number(where: str, value: Any, *, lo: float, hi: float = math.inf) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise fail(where, "must be a number")
            if not (lo <= value <= hi) or math.isnan(value):
                raise fail(where, f"must be between {lo} and {hi}")
            return float(value)

        def required(where: str, entry: Mapping[str, Any], key: str) -> Any:
            if key not in entry:
                raise fail(f"{where}.{key}", "required")
            return entry[key]

        crashes = []
        for where, entry in entries("crash"):
            check_keys(where, entry, {"envoy", "round", "stage"})
            envoy = _node_name(required(where, entry, "envoy"), f"{where}.envoy", fail)
            rnd = required(where, entry, "round")
            if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
                raise fail(f"{where}.round", "must be a non-negative integer")
            stage = required(where, entry, "stage")
            if stage not in STAGES:
                raise fail(f"{where}.stage", f"{stage!r} is not one of {list(STAGES)}")
            crashes.append(CrashFault(envoy, rnd, stage))

        links = []
        seen_nodes: set[str] = set()
        for where, entry in entries("link"):
            check_keys(
                where, entry, {"node", "drop", "duplicate", "corrupt", "delay_ms", "reorder"}
            )
            node = _node_name(entry.get("node", ANY_NODE), f"{where}.node", fail)
            if node in seen_nodes:
                raise fail(f"{where}.node", f"a second [[link]] for {node!r}")
            seen_nodes.add(node)
            probs = {
                k: number(f"{where}.{k}", entry.get(k, 0.0), lo=0.0, hi=1.0)
                for k in ("drop", "duplicate", "corrupt", "reorder")
            }
            delay = entry.get("delay_ms", [0, 0])
            if isinstance(delay, (int, float)) and not isinstance(delay, bool):
                delay = [delay, delay]
            if not isinstance(delay, list) or len(delay) != 2:
                raise fail(f"{where}.delay_ms", "must be [low, high] in milliseconds")
            lo = number(f"{where}.delay_ms[0]", delay[0], lo=0.0, hi=3_600_000.0)
            hi = number(f"{where}.delay_ms[1]", delay[1], lo=0.0, hi=3_600_000.0)
            if hi < lo:
                raise fail(f"{where}.delay_ms", "high must not be below low")
            links.append(LinkFault(node=node, delay_ms=(lo, hi), **probs))

        partitions = []
        for where, entry in entries("partition"):
            check_keys(where, entry, {"nodes", "from_s", "to_s"})
            nodes = required(where, entry, "nodes")
            if not isinstance(nodes, list) or not nodes:
                raise fail(f"{where}.nodes", "must be a non-empty list of node ids")
            names = tuple(_node_name(n, f"{where}.nodes[{j}]", fail) for j, n in enumerate(nodes))
            start = number(f"{where}.from_s", required(where, entry, "from_s"), lo=0.0)
            end = number(f"{where}.to_s", required(where, entry, "to_s"), lo=0.0)
            if end <= start:
                raise fail(f"{where}.to_s", "must be after from_s")
            partitions.append(PartitionFault(names, start, end))

        restarts = []
        for where, entry in entries("broker_restart"):
            check_keys(where, entry, {"at_s", "down_s"})
            at = number(f"{where}.at_s", required(where, entry, "at_s"), lo=0.0)
            down = number(f"{where}.down_s", entry.get("down_s", 1.0), lo=0.0, hi=3600.0)
            restarts.append(BrokerRestart(at, down))
        restarts.sort(key=lambda r: r.at_s)

        return cls(
            seed=seed,
            crashes=tuple(crashes),
            links=tuple(links),
            partitions=tuple(partitions),
            broker_restarts=tuple(restarts),
            source=source,
        )

    # -- writing ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seed": self.seed}
        if self.crashes:
            out["crash"] = [
                {"envoy": c.envoy, "round": c.round, "stage": c.stage} for c in self.crashes
            ]
        if self.links:
            out["link"] = [
                {
                    "node": lf.node,
                    "drop": lf.drop,
                    "duplicate": lf.duplicate,
                    "corrupt": lf.corrupt,
                    "delay_ms": list(lf.delay_ms),
                    "reorder": lf.reorder,
                }
                for lf in self.links
            ]
        if self.partitions:
            out["partition"] = [
                {"nodes": list(p.nodes), "from_s": p.from_s, "to_s": p.to_s}
                for p in self.partitions
            ]
        if self.broker_restarts:
            out["broker_restart"] = [
                {"at_s": r.at_s, "down_s": r.down_s} for r in self.broker_restarts
            ]
        return out

    def to_toml(self) -> str:
        """The plan as TOML that `load` reads back to an equal plan (for child processes)."""

        def value(v: Any) -> str:
            if isinstance(v, str):
                return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, float):
                return repr(v)
            if isinstance(v, int):
                return str(v)
            if isinstance(v, list):
                return "[" + ", ".join(value(x) for x in v) + "]"
            raise TypeError(type(v))

        data = self.to_dict()
        lines = [f"seed = {data.pop('seed')}"]
        for kind, items in data.items():
            for item in items:
                lines += ["", f"[[{kind}]]"]
                lines += [f"{k} = {value(v)}" for k, v in item.items()]
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_toml())
        os.replace(tmp, path)

    # -- queries ----------------------------------------------------------------------------

    def crash_point(self, node_id: str, round: int, stage: str) -> bool:
        """Should `node_id` crash on entering `stage` of `round`?"""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {list(STAGES)}")
        return any(
            c.round == round and c.stage == stage and c.envoy in (node_id, ANY_NODE)
            for c in self.crashes
        )

    def link_for(self, node_id: str) -> LinkFault | None:
        specific = next((lf for lf in self.links if lf.node == node_id), None)
        if specific is not None:
            return specific
        return next((lf for lf in self.links if lf.node == ANY_NODE), None)

    def partitioned(self, node_id: str, t_s: float) -> bool:
        """Is `node_id` cut off from the bus `t_s` seconds after the plan started?"""
        return any(p.covers(node_id, t_s) for p in self.partitions)

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
        delay_s = rng.uniform(*link.delay_ms) / 1000.0
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
                self._spawn(self._send_later(delay_s, topic, frame, retain))
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
        task = asyncio.ensure_future(coro)
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
