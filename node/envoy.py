"""The envoy: one hospital's node. Trains on local data, sends only masked updates.

On RoundStart (when selected) the envoy starts the SecAgg client at once (AdvertiseKeys), so
key exchange overlaps local training; training runs in a worker thread so heartbeats and the
protocol keep flowing. When training ends the quantised, sample-weighted update becomes the
client's input, and the client's MaskedInput goes out as soon as the director has forwarded
the shares. Only with the director's `insecure_plain_aggregation` does a PlainUpdate go out.

Fault hooks: a fault plan's `[[crash]]` makes the process exit at once (os._exit, as under
kill -9) when it enters a stage, before that stage's message leaves; link faults are applied
by wrapping the bus in broker.faults.FaultyBus (see node.cli).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from broker.client import Bus, Will
from broker.topics import Topics
from node.aggregation import Layout, encode_update, qrange_for, secagg_session
from node.config import EnvoyConfig, model_kwargs
from node.logs import get_logger, set_round, set_stage
from node.wire import Endpoint, read_key_file, subscribe_ready
from protocol.codec import Codec
from protocol.messages import (
    EvaluateRequest,
    EvaluateResult,
    PlainUpdate,
    Presence,
    RoundEnd,
    RoundStart,
    Shutdown,
    TrainPlan,
)
from protocol.tensors import TensorError, state_from_numpy, state_to_numpy

# The stage an envoy enters when it receives each director message (fault-plan stage names).
ENTRY_STAGE = {
    "SecAggKeyRoster": "share_keys",
    "SecAggForwardedShares": "masked_input",
    "SecAggConsistencyRequest": "consistency",
    "SecAggUnmaskRequest": "unmask",
}
# The stage each outgoing message belongs to.
SEND_STAGE = {
    "SecAggAdvertiseKeys": "advertise_keys",
    "SecAggShareKeys": "share_keys",
    "SecAggMaskedInput": "masked_input",
    "SecAggConsistencySignature": "consistency",
    "SecAggUnmaskResponse": "unmask",
    "PlainUpdate": "masked_input",
}


class Trainer(Protocol):
    """Local training and validation scoring; the default runs the ml team's torch code."""

    def train(
        self, weights: Mapping[str, np.ndarray], plan: TrainPlan, *, seed: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        """(new weights, number of samples, mean training loss)."""

    def evaluate(
        self, weights: Mapping[str, np.ndarray], bins: int
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """(negative histogram, positive histogram, summed log loss) on the validation split."""


@dataclass(frozen=True)
class LocalData:
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


def _limit(
    images: np.ndarray, labels: np.ndarray, limit: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    if not limit or limit >= len(labels):
        return images, labels
    idx = np.sort(np.random.default_rng(seed).permutation(len(labels))[:limit])
    return images[idx], labels[idx]


def load_local_data(cfg: EnvoyConfig) -> LocalData:
    """This envoy's share of the data, computed locally from the config (no coordination)."""
    from node.training import data as d
    from node.training.partition import select_partition

    src = cfg.data
    part = src.partition
    if src.source == "pneumoniamnist":
        ds = d.load_pneumoniamnist(src.path)
        splits = {"train": ds.train, "val": ds.val}
    else:
        ds = d.load_image_folder_dataset(
            src.path, src.image_size, val_fraction=src.val_fraction, seed=part.seed
        )
        splits = {"train": ds.train, "val": ds.val}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for offset, (name, split) in enumerate(splits.items()):
        images, labels = _limit(split.images, split.labels, src.limit, part.seed + 7)
        if part.scheme != "folder" and part.count > 1:
            idx = select_partition(
                labels,
                scheme=part.scheme,
                num_envoys=part.count,
                index=part.index,
                seed=part.seed + offset,
                alpha=part.alpha,
            )
            images, labels = images[idx], labels[idx]
        out[name] = (images, labels)
    return LocalData(*out["train"], *out["val"])


class TorchTrainer:
    """Builds the federation's model and runs node.training's train/predict in this thread."""

    def __init__(self, cfg: EnvoyConfig, data: LocalData) -> None:
        import torch

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.data = data

    def _model(self, weights: Mapping[str, np.ndarray]) -> Any:
        from node.training.model import build_model
        from node.training.weights import set_weights

        model = build_model(**model_kwargs(self.cfg.model))
        set_weights(model, weights)
        return model

    def train(
        self, weights: Mapping[str, np.ndarray], plan: TrainPlan, *, seed: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        from node.training.train import train_local
        from node.training.weights import get_weights

        model = self._model(weights)
        res = train_local(model, self.data.train_images, self.data.train_labels, plan, seed=seed)
        return get_weights(model), int(res.num_samples), float(res.loss)

    def evaluate(
        self, weights: Mapping[str, np.ndarray], bins: int
    ) -> tuple[np.ndarray, np.ndarray, float]:
        from node.training.train import evaluate

        model = self._model(weights)
        res = evaluate(model, self.data.val_images, self.data.val_labels, bins)
        return (
            np.asarray(res.hist_negative, dtype=np.int64),
            np.asarray(res.hist_positive, dtype=np.int64),
            float(res.loss_sum),
        )


class Envoy:
    def __init__(
        self,
        cfg: EnvoyConfig,
        bus: Bus,
        trainer: Trainer,
        *,
        fault_plan: Any | None = None,
        exit_fn: Callable[[int], Any] = os._exit,
        codec: Codec | None = None,
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.trainer = trainer
        self.fault_plan = fault_plan
        self.exit_fn = exit_fn
        self.topics = Topics(cfg.federation)
        self.log = get_logger()
        self.signing_key = read_key_file(cfg.signing_key) if cfg.signing_key else None
        director_keys = (
            {cfg.director_id: read_key_file(cfg.director_signing_key)}
            if cfg.director_signing_key
            else {}
        )
        self.peer_signing_keys = {k: read_key_file(v) for k, v in cfg.peer_signing_keys.items()}
        self.endpoint = Endpoint(
            bus,
            node_id=cfg.node_id,
            federation=cfg.federation,
            codec=codec or Codec(cfg.max_frame_bytes),
            signing_key=self.signing_key,
            peer_keys=director_keys,
            require_signatures=bool(director_keys),
        )
        self.stage = "idle"
        self.round: int | None = None
        self.attempt = 0
        self._round_task: asyncio.Task[None] | None = None
        self._client: Any | None = None
        self._client_round: int | None = None
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.rounds_trained = 0
        self.evaluations = 0

    # -- presence -----------------------------------------------------------------------------

    def will(self) -> Will:
        """The offline presence the broker publishes if this envoy vanishes."""
        frame = self.endpoint.seal(
            round=0,
            recipient=self.cfg.director_id,
            body=Presence(online=False, role="envoy", heartbeat_s=self.cfg.heartbeat_s),
        )
        return Will(topic=self.topics.presence(self.cfg.node_id), frame=frame, retain=True)

    async def _heartbeat(self) -> None:
        while True:
            await self._presence(True)
            await asyncio.sleep(self.cfg.heartbeat_s)

    async def _presence(self, online: bool) -> None:
        body = Presence(
            online=online, role="envoy", heartbeat_s=self.cfg.heartbeat_s, stage=self.stage[:64]
        )
        with contextlib.suppress(Exception):
            await self.endpoint.send(
                self.topics.presence(self.cfg.node_id),
                round=self.round or 0,
                recipient=self.cfg.director_id,
                body=body,
                retain=True,
            )

    def _set_stage(self, stage: str) -> None:
        self.stage = stage
        set_stage(stage)

    # -- faults -------------------------------------------------------------------------------

    def _crash_point(self, round: int, stage: str) -> None:
        plan = self.fault_plan
        if plan is not None and plan.crash_point(self.cfg.node_id, round, stage):
            self.log.warning("fault_plan_crash", round=round, stage=stage)
            self.exit_fn(137)

    # -- main loop ----------------------------------------------------------------------------

    async def run(self) -> int:
        subs = [
            await subscribe_ready(self.bus, self.topics.broadcast),
            await subscribe_ready(self.bus, self.topics.envoy(self.cfg.node_id)),
        ]
        readers = [asyncio.create_task(self._read(sub)) for sub in subs]
        heartbeat = asyncio.create_task(self._heartbeat())
        self.log.info("envoy_started")
        try:
            await self._stop.wait()
        finally:
            heartbeat.cancel()
            for task in [*readers, *([self._round_task] if self._round_task else [])]:
                task.cancel()
            for task in [heartbeat, *readers]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._presence(False)
        return 0

    def attach(self, bus: Bus) -> None:
        """Use `bus` (connected after `will()` was computed, since the will travels in HELLO)."""
        self.bus = bus
        self.endpoint.bus = bus

    def stop(self) -> None:
        self._stop.set()

    async def _read(self, sub: AsyncIterator[bytes]) -> None:
        async for frame in sub:
            env = self.endpoint.accept(frame)
            if env is None:
                continue
            if env.sender != self.cfg.director_id:
                self.log.warning("not_from_director", sender=env.sender, type=env.type)
                continue
            try:
                await self._dispatch(env)
            except Exception as exc:  # one bad message must not stop the envoy
                self.log.warning("message_failed", type=env.type, reason=repr(exc)[:300])

    async def _dispatch(self, env: Any) -> None:
        body = env.body
        if isinstance(body, RoundStart):
            self._on_round_start(env.round, body)
        elif isinstance(body, EvaluateRequest):
            task = asyncio.create_task(self._evaluate(env.round, body))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        elif isinstance(body, RoundEnd):
            if (
                env.round == self.round
                and body.attempt == self.attempt
                and body.status == "aborted"
            ):
                self.log.info("round_aborted_by_director", reason=body.reason)
                self._cancel_round()
            self._set_stage("idle")
        elif isinstance(body, Shutdown):
            self.log.info("shutdown", reason=body.reason)
            self._cancel_round()
            self.stop()
        elif type(body).__name__.startswith("SecAgg"):
            await self._on_secagg(env.round, body)
        else:
            self.log.warning("unexpected_message", type=env.type)

    def _cancel_round(self) -> None:
        if self._round_task is not None and not self._round_task.done():
            self._round_task.cancel()
        self._round_task = None
        self._client = None
        self._client_round = None

    def _on_round_start(self, round: int, body: RoundStart) -> None:
        if self.cfg.node_id not in body.selected:
            self.log.info("not_selected", round=round)
            return
        # A new RoundStart supersedes whatever round was running (e.g. after a director restart).
        self._cancel_round()
        self.round = round
        self.attempt = body.attempt
        set_round(round, "training")
        self._round_task = asyncio.create_task(self._run_round(round, body))

    async def _run_round(self, round: int, rs: RoundStart) -> None:
        set_round(round, "training")
        try:
            weights = {k: np.array(v) for k, v in state_to_numpy(rs.weights).items()}
        except TensorError as exc:
            self.log.warning("bad_weights", reason=str(exc))
            return
        self._crash_point(round, "training")
        client = None
        if rs.secagg is not None:
            from protocol.secagg.client import SecAggClient

            client = SecAggClient(
                self.cfg.node_id,
                secagg_session(round, rs.attempt),
                rs.secagg,
                list(rs.selected),
                signing_key=self.signing_key if rs.secagg.malicious else None,
                peer_signing_keys=(self.peer_signing_keys or None) if rs.secagg.malicious else None,
                server_id=self.cfg.director_id,
            )
            self._client, self._client_round = client, round
            self._crash_point(round, "advertise_keys")
            await self._emit(round, client.start())
        self._set_stage("training")
        t0 = time.monotonic()
        seed = (self.cfg.seed * 1_000_003 + round) % 2**31
        try:
            new, num_samples, loss = await asyncio.to_thread(
                self.trainer.train, weights, rs.plan, seed=seed
            )
        except Exception as exc:
            self.log.error("training_failed", reason=repr(exc)[:300])
            return
        self.rounds_trained += 1
        delta = {k: (new[k].astype(np.float64) - weights[k]).astype(np.float32) for k in weights}
        self.log.info(
            "trained", samples=num_samples, loss=loss, seconds=round_(time.monotonic() - t0)
        )
        if client is None:
            self._crash_point(round, "masked_input")
            self._set_stage("sent_update")
            await self.endpoint.send(
                self.topics.director,
                round=round,
                recipient=self.cfg.director_id,
                body=PlainUpdate(
                    delta=state_from_numpy(delta),
                    num_samples=num_samples,
                    train_loss=loss if math.isfinite(loss) else 0.0,
                ),
            )
            return
        if self._client is not client:
            return  # superseded while training
        layout = Layout.of(weights)
        qrange = qrange_for(rs.secagg, len(rs.selected))
        vector = encode_update(layout, delta, num_samples, loss, qrange, np.random.default_rng())
        if self.cfg.audit:
            self._audit(round, vector)
        self._set_stage("masked_input")
        outs = client.set_input(vector)
        if outs:
            self._crash_point(round, "masked_input")
        await self._emit(round, outs)

    def _audit(self, round: int, vector: np.ndarray) -> None:
        folder = Path(self.cfg.state_dir) / "audit"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".round-{round}.npy.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(vector, dtype=np.uint32))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(folder / f"round-{round}.npy")

    async def _on_secagg(self, round: int, body: Any) -> None:
        client = self._client
        if client is None or self._client_round != round:
            self.log.info("secagg_not_in_round", type=type(body).__name__, round=round)
            return
        stage = ENTRY_STAGE.get(type(body).__name__)
        if stage is not None:
            self._crash_point(round, stage)
            self._set_stage(stage)
        outs = client.receive(self.cfg.director_id, body)
        await self._emit(round, outs)
        if client.aborted:
            self.log.warning("secagg_aborted")
            self._set_stage("idle")
        elif client.done:
            self._set_stage("done")

    async def _emit(self, round: int, outs: list[Any]) -> None:
        for out in outs:
            stage = SEND_STAGE.get(type(out.body).__name__)
            if stage is not None:
                self._crash_point(round, stage)
            await self.endpoint.send(
                self.topics.director,
                round=round,
                recipient=self.cfg.director_id,
                body=out.body,
            )

    async def _evaluate(self, round: int, req: EvaluateRequest) -> None:
        try:
            weights = {k: np.array(v) for k, v in state_to_numpy(req.weights).items()}
            neg, pos, loss_sum = await asyncio.to_thread(self.trainer.evaluate, weights, req.bins)
        except Exception as exc:
            self.log.warning("evaluate_failed", reason=repr(exc)[:300])
            return
        self.evaluations += 1
        body = EvaluateResult(
            num_samples=int(neg.sum() + pos.sum()),
            loss_sum=float(loss_sum),
            hist_negative=[int(x) for x in neg],
            hist_positive=[int(x) for x in pos],
        )
        await self.endpoint.send(
            self.topics.director, round=round, recipient=self.cfg.director_id, body=body
        )


def round_(x: float) -> float:
    return round(x, 3)
