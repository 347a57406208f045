"""Many light envoys in one process: for scale and soak runs and for harnesses that need a
federation of dozens or hundreds of envoys in seconds.

Each envoy of a swarm is the production `Envoy` (node.envoy), from its own provisioned config
and keys, with its own bus connection (its own CurveZMQ or MQTT session, last will included),
its own SecAgg client and its own state folder; only the trainer is synthetic
(`SyntheticTrainer`: numpy, no torch, a deterministic update of any model's shape). So the bus,
the broker, the director and secure aggregation carry exactly the traffic of a real
federation, while training costs nothing.

A fault plan applies per envoy as in separate processes: link faults and partitions wrap each
envoy's bus, and a `[[crash]]` stops that envoy alone, as kill -9 stops a process: its bus is
severed at once (nothing more leaves it) and its connection dropped without a goodbye, so the
broker publishes its last will.

    python -m node.swarm --config kits/envoy-1/envoy.toml --config kits/envoy-2/envoy.toml \\
        [--faults plan.toml --faults-start T] [--audit] [--train-seconds S] [--log-level warning]
        [--poison envoy-2=nan|add:1e6|masked:max]

The process ends when every envoy has ended (the director's Shutdown, or a crash each).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from structlog.contextvars import bind_contextvars

from broker.client import Bus, BusError, connect
from node.config import EnvoyConfig, load_envoy_config
from node.envoy import Envoy
from node.logs import setup_logging
from node.trainer import Predictions
from protocol.messages import TrainPlan

__all__ = ["SyntheticTrainer", "main", "parse_poison", "run_swarm"]


class SyntheticTrainer:
    """A trainer without a model: each envoy pulls every weight part way to its own target.

    The target, sample count and validation scores follow from the envoy's id, so a run
    replays exactly and FedAvg of the updates has a closed form (like the unit tests'
    NumpyTrainer); any weights' names and shapes work, whatever [model] the director runs.

    `poison` makes it a poisoning envoy, for robustness tests: "nan" (every new weight NaN)
    or "add:X" (X added to every new weight, e.g. "add:1e6"). See `parse_poison`.
    """

    def __init__(
        self,
        node_id: str,
        *,
        step: float = 0.5,
        val_samples: int = 40,
        seconds: float = 0.0,
        poison: str | None = None,
    ) -> None:
        self.seconds = seconds  # how long "training" takes (a worker thread sleeps)
        self.poison = parse_poison(poison) if poison else None
        seed = int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:8], "big")
        rng = np.random.default_rng(seed)
        self.target = float(rng.uniform(-0.5, 0.5))
        self.num_samples = int(rng.integers(50, 500))
        self.step = step
        labels = rng.integers(0, 2, val_samples)
        self.val_labels = labels
        self.val_scores = np.clip(0.3 * labels + 0.35 + 0.2 * rng.random(val_samples), 0, 1)

    def train(
        self, weights: Mapping[str, np.ndarray], plan: TrainPlan, *, seed: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        if self.seconds:
            time.sleep(self.seconds)  # the envoy runs train() in a worker thread
        new = {
            k: (v + self.step * (self.target - v)).astype(np.float32) for k, v in weights.items()
        }
        if self.poison is not None:
            add = self.poison
            new = {k: (v + np.float32(add)).astype(np.float32) for k, v in new.items()}
        return new, self.num_samples, abs(self.target)

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> Predictions:
        scores = self.val_scores
        probabilities = np.stack([1.0 - scores, scores], axis=1)
        return Predictions(probabilities, self.val_labels, float(len(scores)) * 0.5)


# The envoy masks a crafted vector instead of its encoded update: every update word at the
# quantiser's largest level (the largest push the format can carry, about clip / weight per
# weight), its weight and loss words honest. No clipping on the envoy sees it; only the
# director's range check on the sum can.
CRAFTED = "masked:max"


def parse_poison(spec: str) -> float:
    """A trainer poison spec as the value added to every new weight: "nan" or "add:X" (X
    finite or not: "add:inf" works too). ValueError names the spec."""
    if spec == "nan":
        return float("nan")
    kind, _, value = spec.partition(":")
    if kind == "add":
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"poison {spec!r}: expected 'nan' or 'add:NUMBER'")


class _Severable(Bus):
    """One swarm envoy's transport; `sever()` is its process dying: nothing more leaves it
    and the connection drops without a goodbye, so the broker publishes its will."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.severed = False
        self._abort: asyncio.Task[None] | None = None

    async def publish(self, topic: str, frame: bytes, *, retain: bool = False) -> None:
        if self.severed:
            raise BusError("severed")
        await self.inner.publish(topic, frame, retain=retain)

    def subscribe(self, topic_filter: str) -> AsyncIterator[bytes]:
        return self.inner.subscribe(topic_filter)  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self._abort is not None:
            await self._abort
        else:
            await self.inner.close()

    def sever(self) -> None:
        if not self.severed:
            self.severed = True
            self._abort = asyncio.get_running_loop().create_task(self.inner.abort())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def _run_envoy(
    cfg: EnvoyConfig,
    *,
    plan: Any,
    faults_start: float | None,
    zmq_context: Any,
    train_seconds: float,
    poison: str | None = None,
) -> int:
    """One envoy of the swarm, start to end (in its own task, so its logs name it)."""
    from node.cli import _credentials, _faulty

    bind_contextvars(node=cfg.node_id, round=None, stage="")
    holder: dict[str, Any] = {}

    def crash(code: int) -> None:
        # kill -9 of this envoy alone: sever its bus, end its task; the process lives on.
        holder["bus"].sever()
        holder["task"].cancel()
        raise asyncio.CancelledError

    trained_poison = poison if poison != CRAFTED else None
    trainer = SyntheticTrainer(cfg.node_id, seconds=train_seconds, poison=trained_poison)
    envoy = Envoy(cfg, None, trainer, fault_plan=plan, exit_fn=crash)
    if poison == CRAFTED:
        _mask_random_words(envoy)
    credentials = None if cfg.insecure_no_auth else _credentials(cfg)
    inner = await connect(
        cfg.bus_url,
        node_id=cfg.node_id,
        role="envoy",
        credentials=credentials,
        will=envoy.will(),
        max_frame_bytes=cfg.max_frame_bytes,
        insecure_no_auth=cfg.insecure_no_auth,
        zmq_context=zmq_context,
    )
    bus = _Severable(inner)
    holder["bus"] = bus
    outer = _faulty(bus, plan, cfg.node_id, faults_start)
    envoy.attach(outer)
    holder["task"] = asyncio.current_task()
    try:
        return await envoy.run()
    except asyncio.CancelledError:
        return 137 if bus.severed else 143
    finally:
        with contextlib.suppress(Exception):
            # Through the fault wrapper: its delayed frames (the offline presence) go first.
            await outer.close()


async def run_swarm(
    configs: Sequence[EnvoyConfig],
    *,
    plan: Any = None,
    faults_start: float | None = None,
    train_seconds: float = 0.0,
    poison: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Run every envoy until it ends; {node_id: exit status} (137 for a planned crash).

    `poison` maps an envoy to its poison spec (SyntheticTrainer)."""
    import zmq.asyncio

    context = zmq.asyncio.Context()
    try:
        tasks = {
            cfg.node_id: asyncio.create_task(
                _run_envoy(
                    cfg,
                    plan=plan,
                    faults_start=faults_start,
                    zmq_context=context,
                    train_seconds=train_seconds,
                    poison=(poison or {}).get(cfg.node_id),
                )
            )
            for cfg in configs
        }
        results: dict[str, int] = {}
        for name, task in tasks.items():
            try:
                results[name] = await task
            except asyncio.CancelledError:
                results[name] = 137
            except Exception as exc:  # e.g. the broker refused it: the others go on
                print(f"fedbus swarm: {name}: {exc}", file=sys.stderr)
                results[name] = 1
        return results
    finally:
        context.term()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m node.swarm", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", required=True, type=Path, help="envoy.toml")
    p.add_argument("--faults", type=Path, help="fault plan TOML")
    p.add_argument("--faults-start", type=float, help="wall-clock origin of partition windows")
    p.add_argument("--audit", action="store_true", help="keep quantised updates (--audit)")
    p.add_argument("--train-seconds", type=float, default=0.0, help="simulated training time")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--poison",
        action="append",
        default=[],
        metavar="ENVOY=SPEC",
        help="a poisoning envoy: SPEC is nan or add:X (X added to every weight it trains), "
        f"or {CRAFTED} (it masks a crafted vector instead of its update)",
    )
    args = p.parse_args(argv)
    from node.cli import _load_fault_plan, _run_async
    from protocol.configfile import ConfigError

    try:
        configs = [load_envoy_config(path) for path in args.config]
        if args.audit:
            configs = [msgspec.structs.replace(c, audit=True) for c in configs]
        plan = _load_fault_plan(args.faults)
        poison = dict(_poison_arg(a) for a in args.poison)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"fedbus swarm: {exc}", file=sys.stderr)
        return 2
    setup_logging("swarm", level=args.log_level)

    async def run() -> int:
        results = await run_swarm(
            configs,
            plan=plan,
            faults_start=args.faults_start,
            train_seconds=args.train_seconds,
            poison=poison,
        )
        unplanned = {n: rc for n, rc in results.items() if rc not in (0, 137)}
        return 1 if unplanned else 0

    return _run_async(run)


def _poison_arg(arg: str) -> tuple[str, str]:
    name, sep, spec = arg.partition("=")
    if not sep or not name:
        raise ValueError(f"--poison {arg!r}: expected ENVOY=SPEC")
    if spec != CRAFTED:
        parse_poison(spec)
    return name, spec


def _mask_random_words(envoy: Envoy) -> None:
    """Make `envoy` a malicious client: each round's training contribution masks the CRAFTED
    vector in place of its (clipped, quantised) update; everything else stays honest."""
    from node.contribution import SecureContribution

    start = envoy._start_contribution

    def crafted(*args: Any, **kwargs: Any) -> Any:
        contribution = start(*args, **kwargs)
        if isinstance(contribution, SecureContribution):
            honest = contribution._submit_vector

            def submit_vector(vector: np.ndarray) -> Any:
                words = np.array(vector, dtype=np.uint32)
                words[: contribution.layout.size] = contribution.qrange.max_level
                return honest(words)

            contribution._submit_vector = submit_vector  # type: ignore[method-assign]
        return contribution

    envoy._start_contribution = crafted  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
