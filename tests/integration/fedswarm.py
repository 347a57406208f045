"""Light federations with real processes: the real broker (ZeroMQ daemon or Mosquitto), the
real `fedbus director`, and the envoys as light envoys in one `node.swarm` process (each with
its own bus connection, keys, SecAgg client and state folder; a synthetic trainer).

A few seconds a round, so fault plans can run as whole federations in the test suite.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.faults import FaultPlan
from node.demo.launcher import DIRECTOR, Federation, Options
from node.demo.report import audit_rounds
from tests.datafiles import PNEUMONIAMNIST

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
    envoys: int,
    rounds: int,
    transport: str = "zmq",
    plan: FaultPlan | None = None,
    train_seconds: float = 0.0,
    director_set: dict[str, Any] | None = None,
    timeout_s: float = 600.0,
) -> LightRun:
    """Run a whole light federation to its end (or `timeout_s`, the deadlock guard)."""
    faults = None
    if plan is not None:
        out.mkdir(parents=True, exist_ok=True)
        faults = str(out.parent / f"{out.name}-plan.toml")
        plan.save(faults)
    opts = Options(
        envoys=envoys,
        rounds=rounds,
        data=str(PNEUMONIAMNIST),
        transport=transport,
        faults=faults,
        audit=True,
        out=str(out),
        director_set={**LIGHT_DIRECTOR, **(director_set or {})},
        quiet=True,
    )
    fed = Federation(opts)
    fed.prepare()
    t0 = time.monotonic()
    try:
        fed.started_at = time.time()
        fed.start_broker()
        fed.write_configs()
        fed.start_director()
        fed.start_swarm("swarm", list(fed.names), train_seconds=train_seconds)
        director = fed.procs[DIRECTOR].popen
        while director.poll() is None:
            fed.tick()  # the plan's broker restarts
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(f"light federation still running after {timeout_s} s")
            time.sleep(0.1)
        with contextlib.suppress(Exception):
            fed.procs["swarm"].popen.wait(15)
    finally:
        fed.stop_all()
    seconds = time.monotonic() - t0
    return LightRun(fed, director.returncode, audit_rounds(fed, fed.records()), seconds)
