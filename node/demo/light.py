"""Light federations: the demo's kits and processes (the real broker, ZeroMQ daemon or
Mosquitto, and the real `fedbus director`), with the envoys as light envoys (node.swarm: each
its own bus connection, keys, SecAgg client and state folder; a synthetic trainer), packed
`per_process` to an OS process.

Rounds take a fraction of a second at a handful of envoys, so fault plans run as whole
federations in the test suite, and hundreds of envoys fit on two cores for the scale and
soak benchmarks (benchmarks/scale).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.faults import FaultPlan
from node.demo.launcher import DIRECTOR, Federation, Options
from node.demo.report import audit_rounds

# A tiny real model (1574 weights): the updates are small, the director still builds it.
LIGHT_DIRECTOR = {
    "model.width": 2,
    "deadlines.training": 60.0,
    "deadlines.advertise_keys": 30.0,
    "deadlines.share_keys": 30.0,
    "deadlines.masked_input": 60.0,
    "deadlines.consistency": 30.0,
    "deadlines.unmask": 30.0,
    "deadlines.evaluate": 30.0,
}


@dataclass
class LightRun:
    fed: Federation
    returncode: int
    records: list[dict[str, Any]]  # audited
    seconds: float
    samples: list[dict[str, Any]]  # what `watch` returned while it ran

    def log(self, name: str) -> str:
        path = self.fed.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def scaled(plan: FaultPlan, factor: float, *, seed: int | None = None) -> FaultPlan:
    """The plan with every time (partitions, broker restarts) multiplied by `factor`."""
    import msgspec

    def times(entry: Any, *names: str) -> Any:
        return msgspec.structs.replace(entry, **{n: getattr(entry, n) * factor for n in names})

    return msgspec.structs.replace(
        plan,
        seed=plan.seed if seed is None else seed,
        partitions=tuple(times(p, "from_s", "to_s") for p in plan.partitions),
        broker_restarts=tuple(times(r, "at_s", "down_s") for r in plan.broker_restarts),
    )


def run_light_federation(
    out: Path,
    *,
    data: str | Path,
    envoys: int,
    rounds: int,
    transport: str = "zmq",
    plan: FaultPlan | None = None,
    train_seconds: float = 0.0,
    director_set: dict[str, Any] | None = None,
    timeout_s: float = 600.0,
    plan_lead_s: float = 0.0,
    per_process: int = 50,
    swarm_log_level: str = "info",
    watch: Callable[[Federation], dict[str, Any] | None] | None = None,
    watch_every_s: float = 1.0,
    poison: dict[str, str] | None = None,
) -> LightRun:
    """Run a whole light federation to its end (or `timeout_s`, the deadlock guard).

    `data` only goes into the kits (light envoys read none). The plan's clock starts
    `plan_lead_s` after the processes do (about when round 1 does). `watch(fed)` is called
    every `watch_every_s` while the director runs (e.g. to sample memory); what it returns
    is collected in `LightRun.samples`. `poison` makes envoys poisoners (envoy -> "nan" or
    "add:X", node.swarm.SyntheticTrainer).
    """
    faults = None
    if plan is not None:
        out.mkdir(parents=True, exist_ok=True)
        faults = str(out.parent / f"{out.name}-plan.toml")
        plan.save(faults)
    opts = Options(
        envoys=envoys,
        rounds=rounds,
        data=str(data),
        transport=transport,
        faults=faults,
        audit=True,
        out=str(out),
        director_set={**LIGHT_DIRECTOR, **(director_set or {})},
        quiet=True,
    )
    fed = Federation(opts)
    fed.prepare()
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        fed.started_at = time.time() + plan_lead_s
        fed.start_broker()
        fed.write_configs()
        fed.start_director()
        swarms = [fed.names[i : i + per_process] for i in range(0, envoys, per_process)]
        for k, names in enumerate(swarms):
            fed.start_swarm(
                f"swarm-{k + 1}",
                names,
                train_seconds=train_seconds,
                log_level=swarm_log_level,
                poison=poison,
            )
        director = fed.procs[DIRECTOR].popen
        next_watch = time.monotonic()
        while director.poll() is None:
            fed.tick()  # the plan's broker restarts
            now = time.monotonic()
            if watch is not None and now >= next_watch:
                next_watch = now + watch_every_s
                sample = watch(fed)
                if sample is not None:
                    samples.append(sample)
            if now - t0 > timeout_s:
                raise TimeoutError(f"light federation still running after {timeout_s} s")
            time.sleep(0.1)
        # After a clean end the envoys got Shutdown: let them leave. A director that failed
        # (quorum lost, a round failed) sent none, so the envoys would only wait for it.
        for k in range(len(swarms) if director.returncode == 0 else 0):
            with contextlib.suppress(Exception):
                fed.procs[f"swarm-{k + 1}"].popen.wait(15)
    finally:
        fed.stop_all()
    seconds = time.monotonic() - t0
    return LightRun(fed, director.returncode, audit_rounds(fed, fed.records()), seconds, samples)
