"""The director: drives the rounds of one federation over the bus.

A round (docs/architecture.md, "One round, file by file"): select participants among online envoys (node.presence),
broadcast RoundStart, drive one `Aggregation` (node.aggregation) with a deadline per stage,
apply the weighted FedAvg, ask the online envoys to score the new model on their validation
splits through a second SecAgg session (the director learns only the summed histograms),
turn them into ROC/AUC and the configured operating point ([eval]), keep the best model by
validation, checkpoint atomically and record the round (node.state). The SecAgg
parameters of every session, with their failure probabilities, are logged
(`secagg_parameters`); the envoys check them against their own policy.

Everything from the bus is untrusted: `Endpoint` refuses malformed, forged, misaddressed and
replayed frames, the bounded `Inbox` drops (and counts) what one sender floods, the round
loop drops wrong-round, wrong-type and non-participant messages with a log line, and an
unmasked sum outside the update format is refused (`aggregate_out_of_range`), not applied.
None of it can stop the director.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any

import msgspec
import numpy as np

from broker.client import Bus
from broker.keys import read_key_file
from broker.topics import Topics
from node.aggregation import (
    AggregateResult,
    Aggregation,
    AggregationError,
    Driven,
    OutOfRangeAggregate,
    PlainAggregation,
    SecureAggregation,
    SecureEvaluation,
    analysis_of,
    params_for,
)
from node.config import DirectorConfig
from node.endpoint import Endpoint, subscribe_ready
from node.errors import ExitCode, FedbusError
from node.inbox import Inbox
from node.logs import get_logger, set_round, set_stage
from node.modelcheck import ModelGate, model_summary
from node.monitoring import Monitor
from node.presence import Envoys, select_participants
from node.retransmit import RetrySchedule, StageRequests, resend_plan
from node.state import FederationState, StateStore
from node.strategy import Strategy, build_strategy, is_buffer_name
from node.training.histograms import (
    EvaluationError,
    check_vector,
    metrics_from_vector,
    vector_samples,
)
from protocol.codec import Codec
from protocol.events import BROADCAST, Outgoing
from protocol.messages import (
    Body,
    Envelope,
    EnvoyStatus,
    EvaluateRequest,
    EvaluateResult,
    Presence,
    RoundDeclined,
    RoundEnd,
    RoundStart,
    Shutdown,
    StatusReply,
    StatusRequest,
    TrainPlan,
)
from protocol.secagg.common import EVALUATE
from protocol.secagg.messages import SECAGG_MESSAGES, SecAggParams
from protocol.secagg.params import ParameterError
from protocol.secagg.transitions import State
from protocol.secagg.update import Layout, secagg_session
from protocol.stages import Stage
from protocol.tensors import state_from_numpy


class DirectorError(FedbusError, RuntimeError):
    """The director cannot run on this state folder (the message says what to do)."""

    exit_code = ExitCode.STATE


class QuorumLost(FedbusError, RuntimeError):
    """Fewer than min_envoys stayed online for longer than quorum_timeout_s."""

    exit_code = ExitCode.QUORUM_LOST


# While a stage waits, how often the director looks whether everybody it still waits for is
# gone (heartbeat loss has no event of its own; a last will also wakes the wait at once).
_PRESENCE_POLL_S = 0.2
# How often a stage that waits looks whether an awaited envoy came back online (to re-send
# it the stage's requests at once rather than at the next scheduled re-send).
_RETURN_POLL_S = 1.0
# How long the director waits, at the end, for the envoys to leave after its Shutdown.
_GOODBYE_S = 10.0


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
        prox_mu=t.prox_mu,
    )


def initial_weights(cfg: DirectorConfig) -> dict[str, np.ndarray]:
    """Seeded initial global model (imports torch: only called when no weights are given)."""
    from node.models import initial_model_weights

    return initial_model_weights(cfg.model)


def validation_metrics(cfg: DirectorConfig, histograms: np.ndarray) -> dict[str, Any]:
    """The metrics of the summed histogram vector (node.training.histograms), JSON-ready."""
    m = metrics_from_vector(
        histograms,
        cfg.model.num_classes,
        cfg.eval.bins,
        class_names=cfg.model.classes,
        operating_point=cfg.eval.operating_point,
        target_sensitivity=cfg.eval.target_sensitivity,
    )
    return {k: _jsonable(v) for k, v in m.items()}


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
        metrics_fn: Callable[[np.ndarray], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.resume = resume
        self.topics = Topics(cfg.federation)
        self.store = StateStore(cfg.state_dir, federation=cfg.federation)
        self.clock = clock
        self.metrics_fn = metrics_fn or functools.partial(validation_metrics, cfg)
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
        self.envoys = Envoys(
            heartbeat_timeout_s=cfg.heartbeat_timeout_s, members=self.envoy_keys, clock=clock
        )
        self.inbox = Inbox(
            per_sender=cfg.inbox_per_sender,
            limit=cfg.inbox_per_sender * max(cfg.target_envoys, len(self.envoy_keys), 1),
        )
        self.round = 0
        self.stage: str = "starting"
        self.state = FederationState(0, {})
        self.layout: Layout | None = None
        self.strategy: Strategy | None = None  # the server optimiser, once the weights are known
        self._readers: list[asyncio.Task[None]] = []
        self._first_round = True
        self.failure: str | None = None  # why the director stopped early (status.json)
        self._departure = asyncio.Event()  # an envoy's presence went offline
        self.monitor = Monitor(cfg)
        self.model_gate: ModelGate | None = None  # set once the weights are known
        self.stage_deadline: float | None = None  # wall clock, for the operator page

    # -- state --------------------------------------------------------------------------------

    def _restore(self) -> int:
        """Load or create the federation's state; the first round to run."""
        ckpt = self.store.load()
        if ckpt is not None and not self.resume:
            raise DirectorError(
                f"{self.store.state_dir} already holds a checkpoint (round {ckpt.round}); "
                "pass --resume to continue it, or use an empty state_dir"
            )
        if ckpt is None:
            if self.store.round_log.path.exists():
                raise DirectorError(
                    f"{self.store.round_log.path}: a round log without a checkpoint (a "
                    "federation's history whose model is gone); use an empty state_dir"
                )
            weights = self._given_weights
            self.state = FederationState(
                0, weights if weights is not None else initial_weights(self.cfg)
            )
            self.layout = Layout.of(self.state.weights)
            self._start_strategy()
            self.store.save_checkpoint(self.state)
            return 1
        if ckpt.federation != self.cfg.federation:
            raise DirectorError(
                f"{self.store.state_dir}: checkpoint is of federation {ckpt.federation!r}, "
                f"not {self.cfg.federation!r}"
            )
        # A crash may sit between the checkpoint and the round log: the checkpoint wins.
        self.state = FederationState.from_checkpoint(ckpt, self.store.load_records(ckpt))
        self.layout = Layout.of(self.state.weights)
        self._start_strategy()
        self.log.info("resumed", last_completed_round=ckpt.round)
        return ckpt.round + 1

    def _start_strategy(self) -> None:
        """The configured server optimiser, continuing the state the checkpoint carries.

        State kept by another optimiser than the configured one cannot be continued (Adam's
        moments are no momentum buffer): refused, rather than silently dropped. A checkpoint
        without state (a new federation, plain FedAvg, or one written before optimisers were
        configurable) starts the optimiser afresh.
        """
        cfg = self.cfg.strategy
        weights = self.state.weights
        strategy = build_strategy(cfg, buffers=[n for n in weights if is_buffer_name(n)])
        kept, was = self.state.strategy_state, self.state.strategy
        where = self.store.state_dir
        if kept and was != cfg.name:
            raise DirectorError(
                f"{where}: the checkpoint carries the state of server optimiser {was!r}, "
                f"which [strategy] name = {cfg.name!r} cannot continue: set name = {was!r} "
                "to resume this federation, or start a new state_dir"
            )
        try:
            strategy.load_state(kept, weights)
        except ValueError as exc:
            raise DirectorError(
                f"{where}: the checkpoint's {cfg.name} state does not fit its weights ({exc}); "
                "start a new state_dir"
            ) from None
        self.strategy = strategy
        self.state.strategy = cfg.name
        self.log.info(
            "strategy",
            name=cfg.name,
            server_lr=getattr(strategy, "server_lr", None),
            continued=bool(kept),
            prox_mu=self.cfg.train.prox_mu,
        )

    def _set_stage(self, stage: str, seconds: float | None = None) -> None:
        """Enter `stage`, which closes in `seconds` (None: no deadline)."""
        self.stage = stage
        self.stage_deadline = time.time() + seconds if seconds is not None else None
        set_stage(stage)
        self._write_status()

    def _write_status(self) -> None:
        status = self.status()
        self.store.write_status(status)
        self.monitor.publish_status(status)

    def online_envoys(self) -> list[str]:
        online = self.envoys.online()
        return self.model_gate.admitted(online) if self.model_gate else online

    def status(self) -> dict[str, Any]:
        envoys = self.envoys.describe()
        for name in self.model_gate.refused if self.model_gate else ():
            if name in envoys:
                envoys[name].update(online=False, refused="model mismatch")
        return {
            "federation": self.cfg.federation,
            "round": self.round,
            "stage": self.stage,
            "stage_deadline": self.stage_deadline,
            "rounds_total": self.cfg.rounds,
            "rounds_completed": len(self.state.records),
            "secure": not self.cfg.insecure_plain_aggregation,
            "updated": time.time(),
            "envoys": envoys,
            **({"reason": self.failure} if self.failure else {}),
            **self.monitor.status_fields(),
        }

    # -- bus ----------------------------------------------------------------------------------

    async def _read(self, sub: AsyncIterator[bytes], owner: str | None = None) -> None:
        async for frame in sub:
            # On presence/<id> only <id> may publish (broker ACL): the sender must be <id>.
            env = self.endpoint.accept(frame, topic_owner=owner)
            if env is None:
                continue
            self.envoys.saw(env.sender)
            body = env.body
            if isinstance(body, Presence):
                await self._presence(env.sender, body)
            elif isinstance(body, StatusRequest):
                await self._answer_status(env.sender)
            else:
                self.inbox.put(env)

    async def _presence(self, sender: str, body: Presence) -> None:
        if self.envoys.update(sender, body):
            self.log.info("presence", envoy=sender, online=body.online)
            if not body.online:
                self._departure.set()
            self._write_status()
        if self.model_gate is not None and body.online:
            mismatch = self.model_gate.check(sender, body.model)
            if mismatch is not None:
                self.log.error(
                    "model_mismatch",
                    envoy=sender,
                    envoy_model=body.model,
                    model=mismatch.fingerprint,
                )
                self._write_status()
                await self._send(sender, mismatch, round=self.round)

    async def _answer_status(self, sender: str) -> None:
        reply = StatusReply(
            round=self.round,
            stage=self.stage[:64],
            rounds_total=self.cfg.rounds,
            envoys={
                k: EnvoyStatus(online=v["online"], last_seen_s=v["last_seen_s"], stage=v["stage"])
                for k, v in self.envoys.describe().items()
            },
        )
        await self._send(sender, reply, round=self.round)

    async def _send(self, recipient: str, body: Body, *, round: int) -> None:
        topic = self.topics.broadcast if recipient == BROADCAST else self.topics.envoy(recipient)
        await self.endpoint.send(topic, round=round, recipient=recipient, body=body)

    async def _send_all(self, outs: list[Outgoing], round: int) -> None:
        for out in outs:
            await self._send(out.recipient, out.body, round=round)

    async def _next(
        self, deadline: float, stop: Callable[[], bool] | None = None
    ) -> Envelope | None:
        """The next message; None once `deadline` passes or, with `stop`, as soon as it says
        there is nobody left worth waiting for (checked on every presence change, and at
        least every _PRESENCE_POLL_S, since heartbeat loss has no event of its own)."""
        while True:
            with contextlib.suppress(asyncio.QueueEmpty):
                return self.inbox.get_nowait()
            if stop is not None and stop():
                return None
            timeout = deadline - self.clock()
            if timeout <= 0:
                return None
            if stop is None:
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(self.inbox.get(), timeout)
                return None
            self._departure.clear()
            getter = asyncio.ensure_future(self.inbox.get())
            departed = asyncio.ensure_future(self._departure.wait())
            await asyncio.wait(
                (getter, departed),
                timeout=min(timeout, _PRESENCE_POLL_S),
                return_when=asyncio.FIRST_COMPLETED,
            )
            departed.cancel()
            if not getter.cancel():  # it already holds a message
                return getter.result()

    def _all_gone(self, names: Collection[str]) -> bool:
        if not names:
            return False
        online = set(self.online_envoys())
        return not any(name in online for name in names)

    # -- rounds -------------------------------------------------------------------------------

    def _default_aggregation(self, *, round: int, participants: list[str]) -> Aggregation:
        assert self.layout is not None
        if self.cfg.insecure_plain_aggregation:
            return PlainAggregation(participants, self.layout, self.cfg.min_envoys)
        return SecureAggregation.for_round(
            round=round,
            participants=participants,
            layout=self.layout,
            min_survivors=self.cfg.min_envoys,
            cfg=self.cfg.secagg,
            client_signing_keys=self.envoy_keys or None,
            federation=self.cfg.federation,
        )

    def _log_parameters(self, params: SecAggParams | None, n: int, purpose: str) -> None:
        """(k, t) of a session and their failure probabilities under the configured fractions."""
        if params is None:
            return
        a = analysis_of(self.cfg.secagg, params, n)
        self.log.info(
            "secagg_parameters",
            purpose=purpose,
            n=n,
            graph=params.graph,
            k=a.k,
            t=a.t,
            corrupt=a.corrupt,
            dropouts=a.dropouts,
            p_security=a.p_security,
            p_correctness=a.p_correctness,
        )

    async def _wait_for_envoys(self) -> list[str]:
        """Online envoys to choose from; before the first round, wait for target_envoys.

        QuorumLost once fewer than min_envoys have been online for quorum_timeout_s.
        """
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
            if len(online) < self.cfg.min_envoys and waited >= self.cfg.quorum_timeout_s:
                raise QuorumLost(
                    f"quorum lost: {len(online)} envoys online "
                    f"({', '.join(online) or 'none'}), fewer than min_envoys "
                    f"{self.cfg.min_envoys}, for {waited:.0f} s (quorum_timeout_s "
                    f"{self.cfg.quorum_timeout_s:g})"
                )
            if waited - last_log >= 10:
                last_log = waited
                self.log.info("waiting_for_envoys", online=online, need=self.cfg.min_envoys)
            self._write_status()
            await asyncio.sleep(0.2)

    def _select(self, online: list[str], round: int, attempt: int) -> list[str]:
        return select_participants(
            online,
            seed=self.cfg.seed,
            round=round,
            attempt=attempt,
            min_envoys=self.cfg.min_envoys,
            target_envoys=self.cfg.target_envoys,
            participation=self.cfg.participation,
        )

    async def run(self) -> int:
        """Run the federation's rounds: ExitCode.OK, or ROUND_FAILED when a round failed every
        attempt. A FedbusError ends it with its exit code, the reason in status.json: QuorumLost,
        or the state folder's (locked by another director, a corrupt checkpoint or round log,
        a full disk or read-only folder while saving)."""
        self.store.lock()  # before anything is written: the folder may be another's
        try:
            return await self._run()
        except FedbusError as exc:
            self.failure = str(exc)
            stage = "quorum_lost" if isinstance(exc, QuorumLost) else "failed"
            self.log.error(stage, reason=self.failure, exit_code=int(exc.exit_code))
            self._set_stage(stage)
            raise
        finally:
            self.store.unlock()

    async def _run(self) -> int:
        first = self._restore()
        self.model_gate = ModelGate(model_summary(self.cfg.model, self.state.weights))
        try:
            await self.monitor.start(self.state.records, first)
            return await self._run_rounds(first)
        finally:
            await self.monitor.close()

    async def _run_rounds(self, first: int) -> int:
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
                if not await self._run_attempts(r):
                    self.failure = f"round {r} failed {self.cfg.max_attempts} attempts"
                    self.log.error("round_failed", round=r, attempts=self.cfg.max_attempts)
                    self._set_stage("failed")
                    return ExitCode.ROUND_FAILED
            self.round = self.cfg.rounds
            self._set_stage("finished")
            await self._shut_down_envoys()
            best = self.state.best
            self.log.info(
                "finished", rounds=self.cfg.rounds, best_round=best.round if best else None
            )
            return ExitCode.OK
        finally:
            for task in self._readers:
                task.cancel()
            for task in self._readers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _shut_down_envoys(self) -> None:
        """Tell the envoys the federation is over. An envoy acknowledges by leaving (its
        presence goes offline); one still online is told again on the retry schedule, for at
        most _GOODBYE_S, so a lost Shutdown does not leave a hospital's envoy waiting."""
        body = Shutdown(reason="federation finished")
        await self._send(BROADCAST, body, round=self.round)
        start = self.clock()
        retry = self._retry_schedule(start, _GOODBYE_S)
        while (staying := self.online_envoys()) and self.clock() - start < _GOODBYE_S:
            if self.clock() >= retry.due:
                retry = retry.resent(self.clock())
                self.log.info("shutdown_resent", to=staying, resends=retry.resends)
                for name in staying:
                    await self._send(name, body, round=self.round)
            await asyncio.sleep(_PRESENCE_POLL_S)

    async def _run_attempts(self, r: int) -> bool:
        """Round `r`, retried with fresh participants until it completes; False if it never did."""
        first_start = self.clock()
        for attempt in range(self.cfg.max_attempts):
            online = await self._wait_for_envoys()
            self._first_round = False
            if await self._round(r, attempt, self._select(online, r, attempt), first_start):
                return True
        return False

    async def _round(
        self, r: int, attempt: int, participants: list[str], first_start: float
    ) -> bool:
        """One attempt of round `r` (`first_start`: when its first attempt began)."""
        self.round = r
        set_round(r, "round_start")
        t0 = self.clock()
        stage_times: dict[str, float] = {}
        agg = self.aggregation_factory(round=secagg_session(r, attempt), participants=participants)
        deadlines = _deadlines(self.cfg)
        opening = await self._start_round(r, attempt, participants, agg, deadlines)
        missed: set[str] = set()
        declined: dict[str, str] = {}
        await self._drive(
            agg,
            r,
            participants,
            deadlines,
            stage_times,
            missed,
            opening=opening,
            session=secagg_session(r, attempt),
            declined=declined,
        )
        result = self._result(agg)
        if result is None:
            reason = agg.failure or "aggregation failed"
            self.log.warning("round_aborted", reason=reason, attempt=attempt)
            aborted = RoundEnd(status="aborted", reason=reason[:500], attempt=attempt)
            await self._send(BROADCAST, aborted, round=r)
            return False
        self._apply(r, result)
        t_eval = self.clock()
        self._set_stage(Stage.EVALUATE, self.cfg.deadlines.evaluate)
        metrics = await self._evaluate(r, attempt)
        stage_times[Stage.EVALUATE] = round(self.clock() - t_eval, 3)
        val = metrics.get("val")
        self.state.consider_best(r, val)
        fates = participant_fates(
            participants,
            survivors=result.survivors,
            stopped_at=agg.stopped_at,
            missed=missed,
            online=self.online_envoys(),
            declined=declined,
        )
        record = {
            "round": r,
            "attempt": attempt,
            "participants": participants,
            "survivors": result.survivors,
            "dropped": result.dropouts,
            "left": sorted(u for u, f in fates.items() if f["fate"] == "left"),
            "fates": fates,
            "secure": agg.secure,
            "aggregate_verified": None,
            "metrics": {"train_loss": result.train_loss, **metrics},
            "best_round": self.state.best.round if self.state.best else None,
            "seconds": round(self.clock() - t0, 3),  # this attempt
            # the whole round, failed attempts and the waits between them included
            "round_seconds": round(self.clock() - first_start, 3),
            "stage_seconds": stage_times,
        }
        self._commit(r, record)
        await self._send(BROADCAST, RoundEnd(status="completed", attempt=attempt), round=r)
        self.log.info(
            "round_end",
            survivors=result.survivors,
            dropped=result.dropouts,
            left=record["left"],
            seconds=record["seconds"],
            val_auc=(val or {}).get("auc"),
            val_accuracy=(val or {}).get("accuracy"),
        )
        self._set_stage("round_end")
        return True

    def _result(self, agg: Aggregation) -> AggregateResult | None:
        """The aggregation's result, or None (logged) if it has none or it is out of range."""
        if agg.failure:
            return None
        try:
            return agg.result()
        except OutOfRangeAggregate as exc:
            self.log.error("aggregate_out_of_range", reason=str(exc))
            return None
        except AggregationError as exc:
            self.log.warning("aggregate_failed", reason=str(exc))
            return None

    async def _start_round(
        self,
        r: int,
        attempt: int,
        participants: list[str],
        agg: Aggregation,
        deadlines: dict[str, float],
    ) -> list[Outgoing]:
        """Send the round's opening messages (RoundStart first); they are what the first
        stage re-sends to a participant that does not answer."""
        plan = train_plan_for_round(self.cfg, r)
        start = RoundStart(
            weights=state_from_numpy(self.state.weights),
            selected=participants,
            plan=plan,
            deadlines=deadlines,
            secagg=agg.params,
            attempt=attempt,
            update_norm=self.cfg.secagg.update_norm,
        )
        self.log.info(
            "round_start", participants=participants, attempt=attempt, secure=agg.secure, lr=plan.lr
        )
        self._log_parameters(agg.params, len(participants), "train")
        self._set_stage(agg.stage, deadlines.get(agg.stage))
        opening = [Outgoing(BROADCAST, start), *agg.start()]
        await self._send_all(opening, r)
        return opening

    def _apply(self, r: int, result: AggregateResult) -> None:
        """The round's mean update onto the global model through the server optimiser (BN
        running statistics take the plain mean), and, with --audit, its raw sum."""
        assert self.strategy is not None
        self.state.weights = self.strategy.apply(self.state.weights, result.mean_delta)
        self.state.strategy_state = self.strategy.state()
        if self.cfg.audit and result.unmasked_sum is not None:
            self.store.write_audit(r, result.unmasked_sum, result.survivors)

    def _commit(self, r: int, record: dict[str, Any]) -> None:
        self.state.round = r
        self.state.records.append(record)
        # The checkpoint (new weights + this record) first, then the log line: a crash in
        # between is repaired from the checkpoint on resume, so the round is applied once.
        self.store.save_checkpoint(self.state)
        self.store.append_record(record)
        self.monitor.publish_record(record)

    async def _drive(
        self,
        agg: Driven,
        r: int,
        participants: list[str],
        deadlines: dict[str, float],
        stage_times: dict[str, float],
        missed: set[str] | None = None,
        *,
        opening: list[Outgoing] | None = None,
        session: int,
        declined: dict[str, str] | None = None,
    ) -> None:
        """Feed `agg` (an Aggregation or SecureEvaluation) until it is done, a deadline per
        stage; its result or failure is the caller's to read. `missed` gets every participant
        a stage closed without.

        A participant that has not answered is sent the stage's requests again (`opening`
        for the first stage: what the caller already sent), on the schedule of the [retry]
        config and at once when it comes back online (node.retransmit): a lost frame costs
        a retry, not the stage. A participant that declines the session (RoundDeclined,
        matched to `session`; the reason goes into `declined`) is not waited for: a stage
        whose awaited participants are all gone or declined closes at once."""
        stage: State = agg.stage
        stage_start = self.clock()
        deadline = stage_start + deadlines.get(stage, 60.0)
        members = set(participants)
        declined = {} if declined is None else declined

        def awaited() -> list[str]:
            return [u for u in agg.awaiting() if u not in declined]

        def nobody_to_wait_for() -> bool:
            """Every participant the stage awaits declined or is gone, and waiting longer
            could not save the attempt. One that is only silent (heartbeat lost: a
            partition, a broker restart), not gone (its goodbye or last will), is waited
            for while closing without it would fail the attempt for lack of answers: after
            its envoys signed a survivor set, a failed attempt fails the whole round."""
            names = awaited()
            if not names:
                return bool(agg.awaiting())  # all declined
            if not self._all_gone(names):
                return False
            if all(self.envoys.said_offline(u) for u in names) or not agg.short_of_threshold():
                return True
            if stage not in waited_for_return:
                waited_for_return.add(stage)
                self.log.info("stage_waits_for_return", stage=stage, silent=sorted(names))
            return False

        waited_for_return: set[State] = set()

        requests = StageRequests(opening or ())
        retry = self._retry_schedule(stage_start, deadline - stage_start)
        reachable = self._reachable(awaited())
        while not agg.done:
            # Wake at least once a second to notice an awaited envoy that is back online.
            until = min(deadline, retry.due, self.clock() + _RETURN_POLL_S)
            env = await self._next(until, nobody_to_wait_for)
            outs: list[Outgoing] = []
            if env is not None and isinstance(env.body, RoundDeclined) and env.sender in members:
                if self._declines(env, session):
                    declined[env.sender] = env.body.reason
                    self.log.warning("round_declined", envoy=env.sender, reason=env.body.reason)
                continue  # if nobody is left to wait for, the next _next says so at once
            if env is None:
                now = self.clock()
                if now < deadline and not nobody_to_wait_for():
                    now_reachable = self._reachable(awaited())
                    if now >= retry.due:
                        targets, retry = now_reachable, retry.resent(now)
                    else:
                        targets = now_reachable - reachable  # back after a partition
                    reachable = now_reachable
                    await self._resend(requests, sorted(targets), r, stage, retry.resends)
                    continue
                waited_for = sorted(agg.awaiting())
                if now >= deadline:
                    self.log.info("stage_deadline", stage=stage, missing=waited_for)
                else:
                    self.log.info("stage_closed_early", stage=stage, gone=waited_for)
                if missed is not None:
                    missed.update(waited_for)
                outs = agg.close_stage()
                await self._send_all(outs, r)
            elif env.round != r:
                self.log.warning("wrong_round", sender=env.sender, got=env.round, type=env.type)
                continue
            elif env.sender not in members:
                self.log.warning("not_a_participant", sender=env.sender, type=env.type)
                continue
            elif _other_session(env, getattr(agg, "session", None)):
                # e.g. the unmask responses that arrive after the sum was recovered
                self.log.debug("other_session", sender=env.sender, type=env.type)
                continue
            else:
                outs = self._receive(agg, env)
                await self._send_all(outs, r)
                retry = retry.answered(self.clock())
            if agg.stage != stage:
                stage_times[stage] = round(self.clock() - stage_start, 3)
                stage = agg.stage
                stage_start = self.clock()
                deadline = stage_start + deadlines.get(stage, 60.0)
                requests = StageRequests(outs)
                retry = self._retry_schedule(stage_start, deadline - stage_start)
                reachable = self._reachable(awaited())
                self._set_stage(stage, deadline - self.clock())
            else:
                requests.add(outs)
        stage_times[stage] = round(self.clock() - stage_start, 3)

    @staticmethod
    def _declines(env: Envelope, session: int) -> bool:
        """Whether a RoundDeclined is about `session` (a late one of another try is not)."""
        body = env.body
        assert isinstance(body, RoundDeclined)
        return secagg_session(env.round, body.attempt, body.purpose) == session

    def _retry_schedule(self, opened_at: float, span: float) -> RetrySchedule:
        """The re-send schedule of a stage of `span` seconds: [retry], with waits of at most a
        quarter of the stage, so a re-send that is lost too (a broker restart) still leaves
        room for more before the deadline."""
        max_s = min(self.cfg.retry.max_s, span / 4)
        return RetrySchedule(min(self.cfg.retry.first_s, max_s), max_s, opened_at)

    def _reachable(self, names: Collection[str]) -> set[str]:
        return set(names) & set(self.online_envoys())

    async def _resend(
        self, requests: StageRequests, names: list[str], r: int, stage: str, resends: int
    ) -> None:
        """The stage's requests again, to each of `names` on its own topic."""
        outs = resend_plan(requests, names)
        if not outs:
            return
        self.log.info("stage_resent", stage=stage, to=names, resends=resends, frames=len(outs))
        await self._send_all(outs, r)

    def _receive(self, agg: Driven, env: Envelope) -> list[Outgoing]:
        """One participant's message into the aggregation; refusals are logged, not raised."""
        try:
            outs = agg.receive(env.sender, env.body)
        except Exception as exc:  # a protocol machine must never take the node down
            self.log.warning(
                "message_rejected", sender=env.sender, type=env.type, reason=repr(exc)[:300]
            )
            return []
        for refusal in agg.take_refusals():
            # An answer sent again (node.retransmit) or after its stage closed is expected on
            # a lossy bus; anything else is worth a warning.
            expected = refusal.reason == "duplicate" or refusal.reason.startswith("server is")
            (self.log.info if expected else self.log.warning)(
                "message_dropped", sender=refusal.sender, type=refusal.type, reason=refusal.reason
            )
        return outs

    async def _evaluate(self, r: int, attempt: int) -> dict[str, Any]:
        """Federated validation of the round's new model: the online envoys' histograms,
        summed by a SecAgg session (in the clear only under insecure_plain_aggregation)."""
        asked = sorted(self.online_envoys())
        if not asked:
            return {}
        if self.cfg.insecure_plain_aggregation:
            return await self._evaluate_plain(r, attempt, asked)
        bins = self.cfg.eval.bins
        try:
            params = params_for(self.cfg.secagg, len(asked))
        except ParameterError as exc:
            self.log.warning("evaluation_skipped", reason=str(exc), envoys=len(asked))
            return {"val": None, "evaluated_by": []}
        agg = SecureEvaluation(
            round=secagg_session(r, attempt, EVALUATE),
            participants=asked,
            num_classes=self.cfg.model.num_classes,
            bins=bins,
            params=params,
            client_signing_keys=self.envoy_keys or None,
            federation=self.cfg.federation,
        )
        req = EvaluateRequest(
            weights=state_from_numpy(self.state.weights),
            bins=bins,
            secagg=params,
            selected=asked,
            attempt=attempt,
        )
        self._log_parameters(params, len(asked), EVALUATE)
        opening = [Outgoing(BROADCAST, req)]
        await self._send_all(opening, r)
        deadlines = _deadlines(self.cfg)
        # The envoys score the model while they exchange keys: that stage takes the time.
        deadlines[Stage.MASKED_INPUT] = float(self.cfg.deadlines.evaluate)
        await self._drive(
            agg,
            r,
            asked,
            deadlines,
            {},
            opening=opening,
            session=secagg_session(r, attempt, EVALUATE),
        )
        if agg.failure:
            self.log.warning("evaluation_failed", reason=agg.failure)
            return {"val": None, "evaluated_by": []}
        try:
            total = agg.result()
        except OutOfRangeAggregate as exc:
            self.log.error("aggregate_out_of_range", reason=str(exc), purpose=EVALUATE)
            return {"val": None, "evaluated_by": []}
        except AggregationError as exc:
            self.log.warning("evaluation_failed", reason=str(exc))
            return {"val": None, "evaluated_by": []}
        return self._val_metrics(total.histograms, total.loss_sum, sorted(agg.server.survivors))

    def _val_metrics(
        self, total: np.ndarray | None, loss_sum: float, evaluated_by: list[str]
    ) -> dict[str, Any]:
        """The metrics of the summed histogram vector (None without images of both kinds)."""
        classes, bins = self.cfg.model.num_classes, self.cfg.eval.bins
        n = vector_samples(total, classes, bins) if total is not None else 0
        val = self.metrics_fn(total) if total is not None and n else None
        if val is None or val.get("auc") is None or not np.isfinite(val["auc"]):
            return {"val": None, "evaluated_by": evaluated_by}
        val["loss"] = loss_sum / n
        val["num_samples"] = n
        return {"val": val, "evaluated_by": evaluated_by}

    async def _evaluate_plain(self, r: int, attempt: int, asked_list: list[str]) -> dict[str, Any]:
        """insecure_plain_aggregation: each envoy's histograms in the clear."""
        asked = set(asked_list)
        req = EvaluateRequest(
            weights=state_from_numpy(self.state.weights), bins=self.cfg.eval.bins, attempt=attempt
        )
        requests = StageRequests([Outgoing(BROADCAST, req)])
        await self._send(BROADCAST, req, round=r)
        total: np.ndarray | None = None
        loss_sum = 0.0
        answered: set[str] = set()
        deadline = self.clock() + self.cfg.deadlines.evaluate
        retry = self._retry_schedule(self.clock(), self.cfg.deadlines.evaluate)
        while answered != asked:
            env = await self._next(
                min(deadline, retry.due), lambda: self._all_gone(asked - answered)
            )
            if env is None:
                now = self.clock()
                if now < deadline and not self._all_gone(asked - answered):
                    retry = retry.resent(now)
                    targets = sorted(self._reachable(asked - answered))
                    await self._resend(requests, targets, r, EVALUATE, retry.resends)
                    continue
                break
            body = env.body
            if isinstance(body, RoundDeclined) and env.sender in asked:
                if self._declines(env, secagg_session(r, attempt, EVALUATE)):
                    self.log.warning("round_declined", envoy=env.sender, reason=body.reason)
                    asked.discard(env.sender)
                continue
            if env.round != r or not isinstance(body, EvaluateResult):
                self.log.warning(
                    "unexpected_message", sender=env.sender, type=env.type, round=env.round
                )
                continue
            if env.sender in answered:
                continue
            if self.model_gate is not None and env.sender in self.model_gate.refused:
                # Another model's scores would be read as this one's (class order and all).
                self.log.warning("evaluation_of_refused_envoy", sender=env.sender)
                continue
            vector = np.asarray(body.histograms, dtype=np.int64)
            try:
                counted = check_vector(vector, self.cfg.model.num_classes, self.cfg.eval.bins)
            except EvaluationError as exc:
                self.log.warning("bad_histogram", sender=env.sender, reason=str(exc))
                continue
            if counted != body.num_samples:
                self.log.warning("bad_histogram_count", sender=env.sender)
                continue
            answered.add(env.sender)
            asked.add(env.sender)  # a late joiner's split counts too
            retry = retry.answered(self.clock())
            total = vector if total is None else total + vector
            loss_sum += body.loss_sum
        return self._val_metrics(total, loss_sum, sorted(answered))


def _other_session(env: Envelope, session: int | None) -> bool:
    """A SecAgg message of another session than the one being driven."""
    return (
        session is not None
        and isinstance(env.body, SECAGG_MESSAGES)
        and getattr(env.body, "round", session) != session
    )


def participant_fates(
    participants: Collection[str],
    *,
    survivors: Collection[str],
    stopped_at: Callable[[str], str | None],
    missed: Collection[str],
    online: Collection[str],
    declined: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """What became of each participant of a completed round, for its record.

    * survivor: its update is in the sum and it stayed to the end (an envoy whose unmask
      response was not needed, because t others answered first, is still a survivor);
    * dropped at `stage`: its update is not in the sum; `stage` is the first it did not answer;
    * left at `stage`: its update is in the sum (it sent its masked input), but a later stage
      closed without it, or it was gone by the end of the round.

    A participant that declined the round (its own policy or ledger refused it) is dropped,
    with its reason under "declined".
    """
    survivors = set(survivors)
    online = set(online)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(participants):
        stage = stopped_at(name)
        stage = None if stage is None else str(stage)
        if name not in survivors:
            out[name] = {"fate": "dropped", "stage": stage}
            if declined and name in declined:
                out[name]["declined"] = declined[name]
        elif stage is not None and (name in missed or name not in online):
            out[name] = {"fate": "left", "stage": stage}
        else:
            out[name] = {"fate": "survivor"}
    return out


def _deadlines(cfg: DirectorConfig) -> dict[str, float]:
    """Seconds per stage, keyed by the stage names (RoundStart.deadlines)."""
    return {k: float(v) for k, v in msgspec.structs.asdict(cfg.deadlines).items()}
