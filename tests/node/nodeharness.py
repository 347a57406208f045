"""Build a director and envoys over the in-memory bus, with real configs and keys."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crypto.signing import generate_signing_keypair
from node.config import DirectorConfig, EnvoyConfig, parse_config
from node.director import Director
from node.envoy import Envoy
from node.roundlog import RoundLog
from tests.node.nodefakes import MemoryBroker, NumpyTrainer

FED = "fedtest"


def initial() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.zeros((2, 3), np.float32),
        "fc.bias": np.full((4,), 0.25, np.float32),
    }


@dataclass
class Fed:
    tmp: Path
    broker: MemoryBroker
    director_cfg: DirectorConfig
    envoy_cfgs: dict[str, EnvoyConfig]
    trainers: dict[str, NumpyTrainer]
    envoys: dict[str, Envoy] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[int]] = field(default_factory=dict)
    crashed: list[tuple[str, int]] = field(default_factory=list)

    def start_envoy(self, name: str, fault_plan: Any = None, model: Any = None) -> Envoy:
        cfg = self.envoy_cfgs[name]
        holder: dict[str, Envoy] = {}

        def crash(code: int) -> None:
            # os._exit stand-in: the process is gone at once, without a goodbye.
            self.crashed.append((name, code))
            env = holder["envoy"]
            env.bus.vanish()
            self.tasks[name].cancel()
            raise asyncio.CancelledError

        envoy = Envoy(
            cfg, None, self.trainers[name], fault_plan=fault_plan, exit_fn=crash, model=model
        )
        envoy.bus = self.broker.connect(name, envoy.will())
        envoy.endpoint.bus = envoy.bus
        holder["envoy"] = envoy
        self.envoys[name] = envoy
        self.tasks[name] = asyncio.create_task(envoy.run())
        return envoy

    def director(self, **kw: Any) -> Director:
        bus = self.broker.connect(self.director_cfg.node_id)
        return Director(self.director_cfg, bus, weights=initial(), **kw)

    def records(self) -> list[dict[str, Any]]:
        return RoundLog(self.director_cfg.state_dir).load()

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(BaseException):
                await task


def make_fed(
    tmp: Path,
    n: int = 3,
    *,
    secure: bool = False,
    rounds: int = 2,
    min_envoys: int = 2,
    deadlines: dict[str, float] | None = None,
    signed: bool = True,
    **director_extra: Any,
) -> Fed:
    names = [f"envoy-{i + 1}" for i in range(n)]
    keys = {name: generate_signing_keypair() for name in [*names, "director"]}
    keydir = tmp / "keys"
    keydir.mkdir(parents=True, exist_ok=True)
    for name, kp in keys.items():
        (keydir / f"{name}.key").write_text(kp.private.hex())
        (keydir / f"{name}.pub").write_text(kp.public.hex())
    dl = {
        "training": 5.0,
        "advertise_keys": 5.0,
        "share_keys": 5.0,
        "masked_input": 5.0,
        "consistency": 5.0,
        "unmask": 5.0,
        "evaluate": 5.0,
    }
    dl.update(deadlines or {})
    dcfg: dict[str, Any] = {
        "federation": FED,
        "bus_url": "zmq+tcp://127.0.0.1:1",
        "state_dir": str(tmp / "director"),
        "rounds": rounds,
        "min_envoys": min_envoys,
        "target_envoys": n,
        "wait_for_envoys_s": 5.0,
        "heartbeat_timeout_s": 30.0,
        "deadlines": dl,
        "insecure_plain_aggregation": not secure,
        "secagg": {"dropout_fraction": 0.34, "clip": 1.0},
        "eval": {"bins": 20},
        "audit": True,
        "max_frame_bytes": 1 << 19,
        **director_extra,
    }
    if signed:
        dcfg["signing_key"] = str(keydir / "director.key")
        dcfg["envoy_signing_keys"] = {name: str(keydir / f"{name}.pub") for name in names}
    director_cfg = parse_config(dcfg, DirectorConfig, source="test", base=tmp)
    envoy_cfgs = {}
    trainers = {}
    for i, name in enumerate(names):
        ecfg: dict[str, Any] = {
            "node_id": name,
            "federation": FED,
            "bus_url": "zmq+tcp://127.0.0.1:1",
            "state_dir": str(tmp / name),
            "heartbeat_s": 0.2,
            "audit": True,
            "max_frame_bytes": 1 << 19,
            "data": {"path": "unused.npz"},
            # Plain rounds need the envoy's own opt-in: the director cannot switch it on.
            "policy": {"insecure_plain_updates": not secure},
        }
        if signed:
            ecfg["signing_key"] = str(keydir / f"{name}.key")
            ecfg["director_signing_key"] = str(keydir / "director.pub")
            ecfg["peer_signing_keys"] = {p: str(keydir / f"{p}.pub") for p in names}
        envoy_cfgs[name] = parse_config(ecfg, EnvoyConfig, source="test", base=tmp)
        trainers[name] = NumpyTrainer(target=float(i + 1), num_samples=100 * (i + 1))
    return Fed(tmp, MemoryBroker(), director_cfg, envoy_cfgs, trainers)


def expected_weights(fed: Fed, survivors_per_round: list[list[str]]) -> dict[str, np.ndarray]:
    """The global model after rounds of exact FedAvg over the given survivors (float64).

    Each NumpyTrainer moves every weight half way to its target, so one round of weighted
    FedAvg moves the model half way to the sample-weighted mean target of its survivors.
    """
    w = {k: v.astype(np.float64) for k, v in initial().items()}
    for survivors in survivors_per_round:
        total = sum(fed.trainers[s].num_samples for s in survivors)
        target = sum(fed.trainers[s].num_samples * fed.trainers[s].target for s in survivors)
        w = {k: v + 0.5 * (target / total - v) for k, v in w.items()}
    return w


def expected_after_one_round(fed: Fed, survivors: list[str]) -> dict[str, np.ndarray]:
    return expected_weights(fed, [survivors])
