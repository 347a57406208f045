"""The director: runs the rounds of one federation over the bus.

A round (DESIGN.md "A round"): select participants among online envoys, broadcast RoundStart,
drive one `Aggregation` with a deadline per stage, apply the weighted FedAvg, ask the online
envoys to score the new model on their validation splits, turn the summed histograms into
ROC/AUC/threshold, keep the best model by validation, checkpoint atomically, record the round.

Everything from the bus is untrusted: `Endpoint` refuses malformed, forged, misaddressed and
replayed frames, and the round loop drops wrong-round, wrong-type and non-participant
messages with a log line. None of it can stop the director.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker.client import Bus
from broker.topics import Topics
from node.aggregation import (
    AggregateResult,
    Aggregation,
    AggregationError,
    Layout,
    Outgoing,
    PlainFedAvg,
    secagg_session,
)
from node.checkpoint import (
    Checkpoint,
    atomic_write_bytes,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from node.config import DirectorConfig
from node.logs import get_logger, set_round, set_stage
from node.wire import BROADCAST, Endpoint, read_key_file, subscribe_ready
from protocol.codec import Codec
from protocol.messages import (
    EnvoyStatus,
    EvaluateRequest,
    EvaluateResult,
    Presence,
    RoundEnd,
    RoundStart,
    Shutdown,
    StatusReply,
    StatusRequest,
    TrainPlan,
)
from protocol.secagg.messages import SecAggUnmaskResponse
from protocol.tensors import state_from_numpy

ROUNDS_LOG = "rounds.jsonl"
STATUS_FILE = "status.json"


class DirectorError(RuntimeError):
    pass


@dataclass
class EnvoySeen:
    online: bool
    last_seen: float  # monotonic
    last_seen_wall: float
    stage: str = ""


def lr_for_round(cfg: DirectorConfig, round: int) -> float:
    """The learning rate of `round` (1-based) under the configured schedule."""
    base = cfg.train.lr
    sched = cfg.lr_schedule
    if sched.warmup_rounds and round <= sched.warmup_rounds:
        return base * round / (sched.warmup_rounds + 1)
    if sched.kind == "constant":
        return base
    if sched.kind == "step":
        return base * sched.step_gamma ** ((round - 1) // sched.step_every)
    span = max(cfg.rounds - sched.warmup_rounds - 1, 1)
    progress = min(max(round - sched.warmup_rounds - 1, 0) / span, 1.0)
    return sched.min_lr + 0.5 * (base - sched.min_lr) * (1 + math.cos(math.pi * progress))


def train_plan_for_round(cfg: DirectorConfig, round: int) -> TrainPlan:
    t = cfg.train
    return TrainPlan(
        local_epochs=t.local_epochs,
        batch_size=t.batch_size,
        lr=max(lr_for_round(cfg, round), 1e-8),
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        kl_beta=t.kl_beta,
        augment=t.augment,
    )


def initial_weights(cfg: DirectorConfig) -> dict[str, np.ndarray]:
    """Seeded initial global model (imports torch: only called when no weights are given)."""
    from node.config import model_kwargs
    from node.training.model import build_model
    from node.training.weights import get_weights

    model = build_model(**model_kwargs(cfg.model), seed=cfg.model.init_seed)
    return {k: np.asarray(v, dtype=np.float32) for k, v in get_weights(model).items()}


def histogram_metrics(neg: np.ndarray, pos: np.ndarray) -> dict[str, Any]:
    from node.training.metrics import metrics_from_histograms

    m = metrics_from_histograms(neg, pos)
    return {k: _jsonable(v) for k, v in dict(m).items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


AggregationFactory = Callable[..., Aggregation]


class Director:
    def __init__(
        self,
        cfg: DirectorConfig,
        bus: Bus,
        *,
        resume: bool = False,
        weights: Mapping[str, np.ndarray] | None = None,
        aggregation_factory: AggregationFactory | None = None,
        metrics_fn: Callable[[np.ndarray, np.ndarray], dict[str, Any]] = histogram_metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.resume = resume
        self.topics = Topics(cfg.federation)
        self.state_dir = Path(cfg.state_dir)
        self.clock = clock
        self.metrics_fn = metrics_fn
        self.log = get_logger()
        signing_key = read_key_file(cfg.signing_key) if cfg.signing_key else None
        self.envoy_keys = {k: read_key_file(v) for k, v in cfg.envoy_signing_keys.items()}
        self.endpoint = Endpoint(
            bus,
            node_id=cfg.node_id,
            federation=cfg.federation,
            codec=Codec(cfg.max_frame_bytes),
            signing_key=signing_key,
            peer_keys=self.envoy_keys,
            require_signatures=bool(self.envoy_keys),
        )
        self._given_weights = dict(weights) if weights is not None else None
        self.aggregation_factory = aggregation_factory or self._default_aggregation
        self.envoys: dict[str, EnvoySeen] = {}
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.round = 0
        self.stage = "starting"
        self.weights: dict[str, np.ndarray] = {}
        self.layout: Layout | None = None
        self.records: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._first_round = True

    # -- state --------------------------------------------------------------------------------

    def _restore(self) -> int:
        ckpt = load_checkpoint(self.state_dir)
        if ckpt is not None and not self.resume:
            raise DirectorError(
                f"{self.state_dir} already holds a checkpoint (round {ckpt.round}); "
                "pass --resume to continue it, or use an empty state_dir"
            )
        if ckpt is None:
            self.weights = (
                dict(self._given_weights)
                if self._given_weights is not None
                else initial_weights(self.cfg)
            )
            self.layout = Layout.of(self.weights)
            self._checkpoint(0)
            (self.state_dir / ROUNDS_LOG).unlink(missing_ok=True)
            return 1
        if ckpt.federation != self.cfg.federation:
            raise DirectorError(
                f"{self.state_dir}: checkpoint is of federation {ckpt.federation!r}, "
                f"not {self.cfg.federation!r}"
            )
        self.weights = ckpt.weights_numpy()
        self.layout = Layout.of(self.weights)
        self.records = list(ckpt.records)
        if ckpt.best_round is not None:
            self.best = {
                "round": ckpt.best_round,
                "weights": ckpt.best_weights_numpy(),
                "threshold": ckpt.best_threshold,
                "metrics": ckpt.best_metrics,
            }
        self._reconcile_rounds_log(ckpt)
        self.log.info("resumed", last_completed_round=ckpt.round)
        return ckpt.round + 1

    def _reconcile_rounds_log(self, ckpt: Checkpoint) -> None:
        """rounds.jsonl = the checkpoint's records, exactly (a crash may sit between the two)."""
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in ckpt.records)
        atomic_write_bytes(self.state_dir / ROUNDS_LOG, lines.encode())

    def _checkpoint(self, round: int) -> None:
        best = self.best or {}
        save_checkpoint(
            self.state_dir,
            make_checkpoint(
                federation=self.cfg.federation,
                round=round,
                weights=self.weights,
                best_round=best.get("round"),
                best_weights=best.get("weights"),
                best_threshold=best.get("threshold"),
                best_metrics=best.get("metrics"),
                records=self.records,
            ),
        )

    def _set_stage(self, stage: str) -> None:
        self.stage = stage
        set_stage(stage)
        self._write_status()

    def online_envoys(self) -> list[str]:
        now = self.clock()
        return sorted(
            name
            for name, seen in self.envoys.items()
            if seen.online and now - seen.last_seen <= self.cfg.heartbeat_timeout_s
        )

    def status(self) -> dict[str, Any]:
        now = self.clock()
        online = set(self.online_envoys())
        return {
            "federation": self.cfg.federation,
            "round": self.round,
            "stage": self.stage,
            "rounds_total": self.cfg.rounds,
            "rounds_completed": len(self.records),
            "secure": not self.cfg.insecure_plain_aggregation,
            "updated": time.time(),
            "envoys": {
                name: {
                    "online": name in online,
                    "last_seen_s": round(now - seen.last_seen, 3),
                    "last_seen": seen.last_seen_wall,
                    "stage": seen.stage,
                }
                for name, seen in sorted(self.envoys.items())
            },
        }

    def _write_status(self) -> None:
        with contextlib.suppress(OSError):
            atomic_write_bytes(
                self.state_dir / STATUS_FILE, json.dumps(self.status(), indent=1).encode()
            )

    # -- bus ----------------------------------------------------------------------------------

    async def _read(self, sub: AsyncIterator[bytes], owner: str | None = None) -> None:
        async for frame in sub:
            # On presence/<id> only <id> may publish (broker ACL): the sender must be <id>.
            env = self.endpoint.accept(frame, topic_owner=owner)
            if env is None:
                continue
            self._saw(env.sender)
            body = env.body
            if isinstance(body, Presence):
                self._presence(env.sender, body)
            elif isinstance(body, StatusRequest):
                await self._answer_status(env.sender, body)
            else:
                self.inbox.put_nowait(env)

    def _saw(self, sender: str) -> None:
        if self.envoy_keys and sender not in self.envoy_keys:
            return
        seen = self.envoys.get(sender)
        if seen is None:
            self.envoys[sender] = EnvoySeen(True, self.clock(), time.time())
        else:
            seen.last_seen = self.clock()
            seen.last_seen_wall = time.time()

    def _presence(self, sender: str, body: Presence) -> None:
        if body.role != "envoy":
            return
        seen = self.envoys.get(sender)
        if seen is None:
            return
        was = seen.online
        seen.online = body.online
        seen.stage = body.stage
        if was != body.online:
            self.log.info("presence", envoy=sender, online=body.online)
            self._write_status()

    async def _answer_status(self, sender: str, req: StatusRequest) -> None:
        st = self.status()
        reply = StatusReply(
            round=self.round,
            stage=self.stage[:64],
            rounds_total=self.cfg.rounds,
            envoys={
                k: EnvoyStatus(online=v["online"], last_seen_s=v["last_seen_s"], stage=v["stage"])
                for k, v in st["envoys"].items()
            },
        )
        await self._send(sender, reply, round=self.round)

    async def _send(self, recipient: str, body: Any, *, round: int) -> None:
        topic = self.topics.broadcast if recipient == BROADCAST else self.topics.envoy(recipient)
        await self.endpoint.send(topic, round=round, recipient=recipient, body=body)

    async def _send_all(self, outs: list[Outgoing], round: int) -> None:
        for out in outs:
            await self._send(out.recipient, out.body, round=round)

    async def _next(self, deadline: float) -> Any | None:
        timeout = deadline - self.clock()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            return None

    # -- rounds -------------------------------------------------------------------------------

    def _default_aggregation(self, *, round: int, participants: list[str]) -> Aggregation:
        min_survivors = self.cfg.min_envoys
        assert self.layout is not None
        if self.cfg.insecure_plain_aggregation:
            return PlainFedAvg(participants, self.layout, min_survivors)
        from node.secure import SecureAggregation

        return SecureAggregation.for_round(
            round=round,
            participants=participants,
            layout=self.layout,
            min_survivors=min_survivors,
            cfg=self.cfg.secagg,
            client_signing_keys=self.envoy_keys or None,
        )

    async def _wait_for_envoys(self) -> list[str]:
        """Online envoys to choose from; before the first round, wait for target_envoys."""
        start = self.clock()
        self._set_stage("waiting")
        last_log = 0.0
        while True:
            online = self.online_envoys()
            waited = self.clock() - start
            if len(online) >= self.cfg.target_envoys:
                return online
            if len(online) >= self.cfg.min_envoys and (
                not self._first_round or waited >= self.cfg.wait_for_envoys_s
            ):
                return online
            if waited - last_log >= 10:
                last_log = waited
                self.log.info("waiting_for_envoys", online=online, need=self.cfg.min_envoys)
            self._write_status()
            await asyncio.sleep(0.2)

    def _select(self, online: list[str], round: int, attempt: int) -> list[str]:
        rng = np.random.default_rng([self.cfg.seed, round, attempt])
        k = max(self.cfg.min_envoys, math.ceil(self.cfg.participation * len(online)))
        k = min(k, self.cfg.target_envoys, len(online))
        chosen = rng.choice(len(online), size=k, replace=False)
        return sorted(online[i] for i in chosen)

    async def run(self) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        first = self._restore()
        subs: list[tuple[AsyncIterator[bytes], str | None]] = [
            (await subscribe_ready(self.bus, self.topics.director), None)
        ]
        if self.envoy_keys:
            # Known members: one subscription per presence topic, so each presence frame's
            # bus identity (the topic owner) is checked against its envelope's sender.
            for name in sorted(self.envoy_keys):
                subs.append((await subscribe_ready(self.bus, self.topics.presence(name)), name))
        else:
            subs.append((await subscribe_ready(self.bus, self.topics.presence_filter), None))
        self._readers = [asyncio.create_task(self._read(sub, owner)) for sub, owner in subs]
        try:
            for r in range(first, self.cfg.rounds + 1):
                completed = False
                for attempt in range(self.cfg.max_attempts):
                    online = await self._wait_for_envoys()
                    self._first_round = False
                    participants = self._select(online, r, attempt)
                    completed = await self._round(r, attempt, participants)
                    if completed:
                        break
                if not completed:
                    self.log.error("round_failed", round=r, attempts=self.cfg.max_attempts)
                    self._set_stage("failed")
                    return 2
            self.round = self.cfg.rounds
            self._set_stage("finished")
            await self._send(BROADCAST, Shutdown(reason="federation finished"), round=self.round)
            self.log.info(
                "finished", rounds=self.cfg.rounds, best_round=(self.best or {}).get("round")
            )
            return 0
        finally:
            for task in self._readers:
                task.cancel()
            for task in self._readers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _round(self, r: int, attempt: int, participants: list[str]) -> bool:
        self.round = r
        set_round(r, "round_start")
        t0 = self.clock()
        stage_times: dict[str, float] = {}
        agg = self.aggregation_factory(round=secagg_session(r, attempt), participants=participants)
        plan = train_plan_for_round(self.cfg, r)
        deadlines = _deadlines(self.cfg)
        start = RoundStart(
            weights=state_from_numpy(self.weights),
            selected=participants,
            plan=plan,
            deadlines=deadlines,
            secagg=getattr(agg, "params", None),
            attempt=attempt,
        )
        self.log.info(
            "round_start", participants=participants, attempt=attempt, secure=agg.secure, lr=plan.lr
        )
        self._set_stage(agg.stage)
        await self._send(BROADCAST, start, round=r)
        await self._send_all(agg.start(), r)
        result = await self._drive(agg, r, participants, deadlines, stage_times)
        if result is None:
            reason = agg.failure or "aggregation failed"
            self.log.warning("round_aborted", reason=reason, attempt=attempt)
            await self._send(
                BROADCAST, RoundEnd(status="aborted", reason=reason[:500], attempt=attempt), round=r
            )
            return False
        self.weights = {
            name: (self.weights[name] + result.mean_delta[name]).astype(np.float32)
            for name in self.weights
        }
        if self.cfg.audit and result.unmasked_sum is not None:
            self._audit_dump(r, result)
        t_eval = self.clock()
        self._set_stage("evaluate")
        metrics = await self._evaluate(r)
        stage_times["evaluate"] = round(self.clock() - t_eval, 3)
        val = metrics.get("val")
        if (
            val
            and val.get("auc") is not None
            and (self.best is None or val["auc"] >= (self.best.get("metrics") or {}).get("auc", -1))
        ):
            self.best = {
                "round": r,
                "weights": {k: v.copy() for k, v in self.weights.items()},
                "threshold": val.get("threshold"),
                "metrics": val,
            }
        record = {
            "round": r,
            "attempt": attempt,
            "participants": participants,
            "survivors": result.survivors,
            "dropped": result.dropouts,
            "secure": agg.secure,
            "aggregate_verified": None,
            "metrics": {"train_loss": result.train_loss, **metrics},
            "best_round": (self.best or {}).get("round"),
            "seconds": round(self.clock() - t0, 3),
            "stage_seconds": stage_times,
        }
        self.records.append(record)
        # One atomic write holds the new weights AND the record: the round is applied once.
        self._checkpoint(r)
        with open(self.state_dir / ROUNDS_LOG, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        await self._send(BROADCAST, RoundEnd(status="completed", attempt=attempt), round=r)
        self.log.info(
            "round_end",
            survivors=result.survivors,
            dropped=result.dropouts,
            seconds=record["seconds"],
            val_auc=(val or {}).get("auc"),
            val_accuracy=(val or {}).get("accuracy"),
        )
        self._set_stage("round_end")
        return True

    async def _drive(
        self,
        agg: Aggregation,
        r: int,
        participants: list[str],
        deadlines: dict[str, float],
        stage_times: dict[str, float],
    ) -> AggregateResult | None:
        stage = agg.stage
        stage_start = self.clock()
        deadline = stage_start + deadlines.get(stage, 60.0)
        members = set(participants)
        while not agg.done:
            env = await self._next(deadline)
            if env is None:
                self.log.info("stage_deadline", stage=stage)
                outs = agg.close_stage()
                await self._send_all(outs, r)
            elif env.round != r:
                self.log.warning("wrong_round", sender=env.sender, got=env.round, type=env.type)
                continue
            elif env.sender not in members:
                self.log.warning("not_a_participant", sender=env.sender, type=env.type)
                continue
            else:
                try:
                    outs = agg.receive(env.sender, env.body)
                except AggregationError as exc:
                    self.log.warning(
                        "message_dropped", sender=env.sender, type=env.type, reason=str(exc)
                    )
                    continue
                except Exception as exc:  # a protocol machine must never take the node down
                    self.log.warning(
                        "message_rejected", sender=env.sender, type=env.type, reason=repr(exc)[:300]
                    )
                    continue
                await self._send_all(outs, r)
            if agg.stage != stage:
                stage_times[stage] = round(self.clock() - stage_start, 3)
                stage = agg.stage
                stage_start = self.clock()
                deadline = stage_start + deadlines.get(stage, 60.0)
                self._set_stage(stage)
        stage_times[stage] = round(self.clock() - stage_start, 3)
        if agg.failure:
            return None
        try:
            return agg.result()
        except AggregationError as exc:
            self.log.warning("aggregate_failed", reason=str(exc))
            return None

    async def _evaluate(self, r: int) -> dict[str, Any]:
        asked = set(self.online_envoys())
        if not asked:
            return {}
        req = EvaluateRequest(weights=state_from_numpy(self.weights), bins=self.cfg.eval.bins)
        await self._send(BROADCAST, req, round=r)
        bins = self.cfg.eval.bins
        neg = np.zeros(bins, dtype=np.int64)
        pos = np.zeros(bins, dtype=np.int64)
        loss_sum = 0.0
        answered: set[str] = set()
        deadline = self.clock() + self.cfg.deadlines.evaluate
        while answered != asked:
            env = await self._next(deadline)
            if env is None:
                break
            body = env.body
            if env.round == r and isinstance(body, SecAggUnmaskResponse):
                # The server unmasks as soon as t responses are in; the rest arrive late.
                self.log.debug("late_unmask_response", sender=env.sender)
                continue
            if env.round != r or not isinstance(body, EvaluateResult):
                self.log.warning(
                    "unexpected_message", sender=env.sender, type=env.type, round=env.round
                )
                continue
            if env.sender in answered:
                continue
            if len(body.hist_negative) != bins or len(body.hist_positive) != bins:
                self.log.warning("bad_histogram", sender=env.sender)
                continue
            if sum(body.hist_negative) + sum(body.hist_positive) != body.num_samples:
                self.log.warning("bad_histogram_count", sender=env.sender)
                continue
            answered.add(env.sender)
            asked.add(env.sender)  # a late joiner's split counts too
            neg += np.asarray(body.hist_negative, dtype=np.int64)
            pos += np.asarray(body.hist_positive, dtype=np.int64)
            loss_sum += body.loss_sum
        n = int(neg.sum() + pos.sum())
        if n == 0 or neg.sum() == 0 or pos.sum() == 0:
            return {"val": None, "evaluated_by": sorted(answered)}
        val = self.metrics_fn(neg, pos)
        val["loss"] = loss_sum / n
        val["num_samples"] = n
        return {"val": val, "evaluated_by": sorted(answered)}

    def _audit_dump(self, r: int, result: AggregateResult) -> None:
        folder = self.state_dir / "audit"
        folder.mkdir(parents=True, exist_ok=True)
        assert result.unmasked_sum is not None
        tmp = folder / f".round-{r}-sum.npy.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(result.unmasked_sum, dtype=np.uint32))
        tmp.replace(folder / f"round-{r}-sum.npy")
        atomic_write_bytes(
            folder / f"round-{r}-survivors.json", json.dumps(result.survivors).encode()
        )


def _deadlines(cfg: DirectorConfig) -> dict[str, float]:
    import msgspec

    return {k: float(v) for k, v in msgspec.structs.asdict(cfg.deadlines).items()}
