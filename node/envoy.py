"""The envoy: one hospital's node. Trains on local data, sends only masked updates.

The envoy, not the director, holds the security policy ([policy] of its config, secure by
default): on RoundStart (when selected) it checks the announced SecAgg parameters against
that policy and its ledger (node.ledger: one training, one signed survivor set and one
evaluation per round, rounds only forward), builds the round's `Contribution`
(node.contribution) and sends what it starts with at once (the SecAgg keys), so key exchange
overlaps local training. Training runs in a worker thread, from a fresh CSPRNG seed each
round (node.training.seeds), so heartbeats and the protocol keep flowing; its update is kept,
so a later attempt of the same round reuses it through a fresh SecAgg session. Whatever the
policy refuses is logged (`round_refused`) and nothing of it is sent.

After a completed round the director asks for an evaluation of the round's model: the envoy
scores it once, and its validation histograms travel through a second SecAgg session of
purpose "evaluate" (protocol.secagg.evaluation); that model must be the next round's.

Fault hooks: a fault plan's `[[crash]]` makes the process exit at once (os._exit, as under
kill -9) when it enters a stage, before that stage's message leaves; link faults are applied
by wrapping the bus in broker.faults.FaultyBus (see node.cli).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from broker.client import Bus, Will
from broker.files import SECRET_MODE, atomic_path, private_dir
from broker.keys import read_key_file
from broker.topics import Topics
from node.config import EnvoyConfig
from node.contribution import (
    Contribution,
    LocalUpdate,
    PlainContribution,
    RoundRefused,
    SecureContribution,
    SecureEvaluation,
    contribution_for,
)
from node.endpoint import Endpoint, subscribe_ready
from node.errors import FedbusError
from node.ledger import RoundLedger
from node.logs import get_logger, set_round, set_stage
from node.modelcheck import fingerprint, mismatch_error
from node.retransmit import Answers, message_key
from node.trainer import Trainer
from node.training.histograms import EvaluationError, histogram_vector
from node.training.seeds import reproducible_seed, secret_seed
from protocol.base import Message
from protocol.codec import Codec
from protocol.events import Outgoing
from protocol.messages import (
    Envelope,
    EvaluateRequest,
    EvaluateResult,
    ModelMismatch,
    ModelSummary,
    Presence,
    RoundDeclined,
    RoundEnd,
    RoundStart,
    Shutdown,
    TrainPlan,
)
from protocol.secagg.common import EVALUATE, TRAIN
from protocol.secagg.update import Layout, UpdateNotFinite, update_norm
from protocol.stages import Stage
from protocol.tensors import TensorError, state_digest, state_to_numpy

# What the envoy reports (Presence.stage) between rounds and after its contribution.
IDLE = "idle"
DONE = "done"


@dataclass(frozen=True)
class KeptUpdate:
    """The update of the latest round trained, kept for later attempts of that round."""

    round: int
    weights: str  # state_digest of the model it was trained on
    update: LocalUpdate


class CrashPlan(Protocol):
    """Where a fault plan stops this envoy (broker.faults.FaultPlan is one)."""

    def crash_point(self, node_id: str, round: int, stage: str) -> bool: ...


class Envoy:
    def __init__(
        self,
        cfg: EnvoyConfig,
        bus: Bus | None,
        trainer: Trainer,
        *,
        fault_plan: CrashPlan | None = None,
        exit_fn: Callable[[int], Any] = os._exit,
        codec: Codec | None = None,
        model: ModelSummary | None = None,
    ) -> None:
        self.cfg = cfg
        # The summary of the model this envoy trains (node.modelcheck); announced at join.
        self.model = model
        self.model_fingerprint = fingerprint(model) if model is not None else ""
        self.failure: FedbusError | None = None
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
        self.policy = cfg.policy
        self.client_policy = cfg.policy.client_policy()
        self.ledger = RoundLedger.load(cfg.state_dir)
        self.stage = IDLE
        self.round: int | None = None
        self.attempt = 0
        self._round_task: asyncio.Task[None] | None = None
        # SecAgg session number -> the contribution its messages go to (training and
        # evaluation run as different sessions).
        self._sessions: dict[int, Contribution] = {}
        self._contribution: Contribution | None = None
        self._contribution_round: int | None = None
        self._kept: KeptUpdate | None = None
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.rounds_trained = 0
        self.evaluations = 0
        # (round, why) of the latest refused requests of the director
        self.refused: collections.deque[tuple[int, str]] = collections.deque(maxlen=256)
        # The latest opening messages (RoundStart, EvaluateRequest) by content, with what was
        # sent in answer: the director sends one again when it has no answer (node.retransmit).
        self._opened: collections.OrderedDict[bytes, Answers] = collections.OrderedDict()
        self.answered_again = 0  # director messages answered again from `Answers`

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
            online=online,
            role="envoy",
            heartbeat_s=self.cfg.heartbeat_s,
            stage=self.stage[:64],
            model=self.model_fingerprint,
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

    def _crash_point(self, round: int, stage: Stage) -> None:
        plan = self.fault_plan
        if plan is not None and plan.crash_point(self.cfg.node_id, round, stage):
            self.log.warning("fault_plan_crash", round=round, stage=stage)
            self.exit_fn(137)

    # -- main loop ----------------------------------------------------------------------------

    async def run(self) -> int:
        if self.bus is None:
            raise FedbusError("envoy has no bus: attach() it before run()")
        subs = [
            await subscribe_ready(self.bus, self.topics.broadcast),
            await subscribe_ready(self.bus, self.topics.envoy(self.cfg.node_id)),
        ]
        readers = [asyncio.create_task(self._read(sub)) for sub in subs]
        heartbeat = asyncio.create_task(self._heartbeat())
        self.log.info("envoy_started")
        opted_in = [name for name in INSECURE_POLICY if getattr(self.policy, name)]
        if opted_in:
            # The hospital's own choice, but never a quiet one.
            self.log.warning("insecure_policy", opted_in=opted_in)
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
        if self.failure is not None:
            raise self.failure
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

    async def _dispatch(self, env: Envelope) -> None:
        body = env.body
        if isinstance(body, RoundStart | EvaluateRequest):
            answers = await self._open(env.round, body)
            if answers is None:
                return  # seen before: answered again
            if isinstance(body, RoundStart):
                self._on_round_start(env.round, body, answers)
            else:
                task = asyncio.create_task(self._evaluate(env.round, body, answers))
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
            self._set_stage(IDLE)
        elif isinstance(body, Shutdown):
            self.log.info("shutdown", reason=body.reason)
            self._cancel_round()
            self.stop()
        elif isinstance(body, ModelMismatch):
            self._model_refused(body)
        else:
            await self._on_round_message(env.round, body)

    async def _open(self, round: int, body: RoundStart | EvaluateRequest) -> Answers | None:
        """The `Answers` of the session `body` opens; None if it was seen before, in which case
        whatever was sent for it is sent again (the director did not get it)."""
        key = message_key(round, body)
        seen = self._opened.get(key)
        if seen is not None:
            await self._answer_again(round, seen, key, body)
            return None
        answers = Answers()
        answers.opened(key)
        self._opened[key] = answers
        while len(self._opened) > _OPENINGS_KEPT:
            self._opened.popitem(last=False)
        return answers

    async def _answer_again(self, round: int, answers: Answers, key: bytes, body: Message) -> None:
        """A director message that arrived before: send its answer again, unchanged (nothing,
        if it has none yet: its answer is still being computed, or the policy refused it)."""
        again = answers.replay(key) or []
        self.log.info("answered_again", type=type(body).__name__, frames=len(again))
        for out in again:
            await self.endpoint.send(
                self.topics.director, round=round, recipient=self.cfg.director_id, body=out
            )
        self.answered_again += 1

    def _refuse(self, round: int, reason: str) -> None:
        """The policy refused a request of the director: log it; nothing of it is sent."""
        self.refused.append((round, reason))
        self.log.warning("round_refused", round=round, reason=reason)

    async def _decline(
        self, round: int, attempt: int, purpose: str, reason: str, answers: Answers
    ) -> None:
        """Refuse a session this envoy was asked into, and say so (RoundDeclined), so the
        director stops waiting for it; the same request again is declined again."""
        self._refuse(round, reason)
        body = RoundDeclined(attempt=attempt, purpose=purpose, reason=reason[:500])
        with contextlib.suppress(Exception):  # the refusal holds whether or not it arrives
            await self.endpoint.send(
                self.topics.director, round=round, recipient=self.cfg.director_id, body=body
            )
            answers.sent(body)

    def _model_refused(self, body: ModelMismatch) -> None:
        """The director builds another model: a config error here, named, and the end."""
        if self.model is None or body.fingerprint == self.model_fingerprint:
            self.log.warning("model_mismatch_ignored", announced=self.model_fingerprint)
            return
        self.failure = mismatch_error(self.model, body.model)
        self.log.error("model_mismatch", reason=str(self.failure))
        self._cancel_round()
        self.stop()

    # -- rounds -------------------------------------------------------------------------------

    def _cancel_round(self) -> None:
        if self._round_task is not None and not self._round_task.done():
            self._round_task.cancel()
        self._round_task = None
        if self._contribution is not None and self._contribution.session is not None:
            self._sessions.pop(self._contribution.session, None)
        self._contribution = None
        self._contribution_round = None

    def _on_round_start(self, round: int, body: RoundStart, answers: Answers) -> None:
        if self.cfg.node_id not in body.selected:
            self.log.info("not_selected", round=round)
            return
        # A new RoundStart supersedes whatever round was running (e.g. after a director restart).
        self._cancel_round()
        self._sessions = {
            s: c for s, c in self._sessions.items() if getattr(c, "round", -1) >= round - 1
        }
        self.round = round
        self.attempt = body.attempt
        set_round(round, Stage.TRAINING)
        self._round_task = asyncio.create_task(self._run_round(round, body, answers))

    def _start_contribution(
        self, round: int, rs: RoundStart, weights: dict[str, np.ndarray], digest: str
    ) -> Contribution:
        """The round's contribution; RoundRefused (the reason) if the policy or the ledger
        refuses it."""
        kept = self._kept is not None and (self._kept.round, self._kept.weights) == (round, digest)
        reason = self.ledger.refuse_round(round, digest, kept=kept)
        if not reason:
            reason = self._refuse_plan(rs.plan)
        if reason:
            raise RoundRefused(reason)
        contribution = contribution_for(
            rs,
            round=round,
            node_id=self.cfg.node_id,
            director_id=self.cfg.director_id,
            layout=Layout.of(weights),
            signing_key=self.signing_key,
            peer_signing_keys=self.peer_signing_keys,
            federation=self.cfg.federation,
            policy=self.client_policy,
            max_update_norm=self.policy.max_update_norm,
            allow_plain=self.policy.insecure_plain_updates,
            guard=self.ledger,
            audit=functools.partial(self._audit, round) if self.cfg.audit else None,
        )
        if isinstance(contribution, SecureContribution):
            v = contribution.verdict
            self.log.info(
                "secagg_accepted",
                n=v.n,
                k=v.k,
                t=v.t,
                min_threshold=v.min_threshold,
                min_partners=v.min_partners,
                corrupt=v.corrupt,
                p_security=v.p_security,
                attempt=rs.attempt,
            )
        self.ledger.begin(round, digest)
        return contribution

    def _refuse_plan(self, plan: TrainPlan) -> str:
        """Why this envoy will not train as `plan` says ("" if it will): the plan is the
        director's choice, the hospital's hardware and training are not."""
        if plan.local_epochs > self.policy.max_local_epochs:
            return (
                f"the round asks for {plan.local_epochs} local epochs; this envoy's policy "
                f"allows at most {self.policy.max_local_epochs} (policy.max_local_epochs)"
            )
        if plan.prox_mu > self.policy.max_prox_mu:
            return (
                f"the round asks for FedProx prox_mu {plan.prox_mu:g}; this envoy's policy "
                f"allows at most {self.policy.max_prox_mu:g} (policy.max_prox_mu)"
            )
        if plan.prox_mu and self.cfg.train.privacy is not None:
            # Checked here, before the envoy joins the round, not as a failed training run
            # that would leave its partners waiting for an update that never comes.
            return (
                f"the round asks for FedProx prox_mu {plan.prox_mu:g}; this envoy trains with "
                "differential privacy (train.privacy), whose DP-SGD takes no proximal term: "
                "the director's [train] prox_mu must be 0 for it"
            )
        return ""

    async def _run_round(self, round: int, rs: RoundStart, answers: Answers) -> None:
        set_round(round, Stage.TRAINING)
        try:
            weights = {k: np.array(v) for k, v in state_to_numpy(rs.weights).items()}
        except TensorError as exc:
            self.log.warning("bad_weights", reason=str(exc))
            return
        digest = state_digest(weights)
        self._crash_point(round, Stage.TRAINING)
        try:
            contribution = self._start_contribution(round, rs, weights, digest)
        except RoundRefused as exc:
            await self._decline(round, rs.attempt, TRAIN, str(exc), answers)
            self._set_stage(IDLE)
            return
        contribution.answers = answers
        self._contribution, self._contribution_round = contribution, round
        if contribution.session is not None:
            self._sessions[contribution.session] = contribution
        await self._emit(round, contribution, contribution.start())
        self._set_stage(Stage.TRAINING)
        update = await self._local_update(round, digest, weights, rs)
        if update is None or self._contribution is not contribution:
            return  # training failed, or the round was superseded meanwhile
        self._set_stage(Stage.MASKED_INPUT)
        assert isinstance(contribution, SecureContribution | PlainContribution)
        try:
            outs = contribution.submit(update)
        except UpdateNotFinite as exc:
            self.log.error("update_not_finite", error=type(exc).__name__, reason=str(exc))
            self._set_stage(IDLE)
            return
        await self._emit(round, contribution, outs)
        self._after(contribution)

    async def _local_update(
        self, round: int, digest: str, weights: dict[str, np.ndarray], rs: RoundStart
    ) -> LocalUpdate | None:
        """The round's update: the one kept from an earlier attempt, else trained now (once)."""
        kept = self._kept
        if kept is not None and (kept.round, kept.weights) == (round, digest):
            self.log.info("update_reused", attempt=rs.attempt)
            return kept.update
        update = await self._train(round, weights, rs)
        if update is None:
            return None
        try:
            norm = update_norm(update.delta)
        except UpdateNotFinite as exc:
            # A broken training run is this envoy's error, not a silent dropout.
            self.log.error("update_not_finite", error=type(exc).__name__, reason=str(exc))
            return None
        if norm > rs.update_norm:
            self.log.info("update_clipped", norm=norm, bound=rs.update_norm)
        self._kept = KeptUpdate(round, digest, update)
        self.ledger.trained(round)
        return update

    def _seed(self, round: int) -> int:
        if self.policy.insecure_reproducible_seeds:
            return reproducible_seed(self.cfg.seed, round)
        return secret_seed()

    async def _train(
        self, round: int, weights: dict[str, np.ndarray], rs: RoundStart
    ) -> LocalUpdate | None:
        privacy = self.cfg.train.privacy
        if privacy is not None and privacy.mode == "distributed" and rs.secagg is None:
            # Its share of the noise only protects an envoy inside a secure aggregate of
            # enough honest envoys; sent in the clear, the update would be far from private.
            self.log.error(
                "training_refused",
                reason="train.privacy mode 'distributed' needs secure aggregation, and this "
                "round is plain (insecure_plain_aggregation)",
            )
            return None
        t0 = time.monotonic()
        try:
            new, num_samples, loss = await asyncio.to_thread(
                self.trainer.train, weights, rs.plan, seed=self._seed(round)
            )
        except Exception as exc:
            self.log.error("training_failed", reason=repr(exc)[:300])
            return None
        self.rounds_trained += 1
        delta = {k: (new[k].astype(np.float64) - weights[k]).astype(np.float32) for k in weights}
        self.log.info(
            "trained", samples=num_samples, loss=loss, seconds=round_(time.monotonic() - t0)
        )
        return LocalUpdate(
            delta=delta, num_samples=num_samples, train_loss=loss, rounding_seed=secret_seed()
        )

    def _audit(self, round: int, vector: np.ndarray) -> None:
        """--audit: keep the quantised update, so the launcher can check the director's sum."""
        path = private_dir(Path(self.cfg.state_dir) / "audit") / f"round-{round}.npy"
        with atomic_path(path, mode=SECRET_MODE) as tmp:
            np.save(tmp, np.asarray(vector, dtype=np.uint32))

    async def _on_round_message(self, round: int, body: Message) -> None:
        session = getattr(body, "round", None)
        contribution = self._sessions.get(session) if isinstance(session, int) else None
        if contribution is None or contribution.round != round:
            self.log.info("not_in_round", type=type(body).__name__, round=round)
            return
        key = message_key(round, body)
        if contribution.answers.replay(key) is not None:
            await self._answer_again(round, contribution.answers, key, body)
            return
        contribution.answers.opened(key)
        stage = contribution.entered_on(body)
        if stage is not None:
            self._crash_point(round, stage)
            self._set_stage(stage)
        out = contribution.receive(self.cfg.director_id, body)
        for refusal in contribution.take_refusals():
            self.log.debug("message_refused", type=refusal.type, reason=refusal.reason)
        await self._emit(round, contribution, out)
        self._after(contribution)

    def _after(self, contribution: Contribution) -> None:
        if contribution is not self._contribution:
            return  # the evaluation session does not change the round's stage
        if contribution.aborted:
            self.log.warning("contribution_aborted")
            self._set_stage(IDLE)
        elif contribution.done:
            self._set_stage(DONE)

    async def _emit(self, round: int, contribution: Contribution, outs: list[Outgoing]) -> None:
        for out in outs:
            stage = contribution.sent_in(out.body)
            if stage is not None:
                self._crash_point(round, stage)
            await self.endpoint.send(
                self.topics.director,
                round=round,
                recipient=self.cfg.director_id,
                body=out.body,
            )
            contribution.answers.sent(out.body)

    # -- evaluation ---------------------------------------------------------------------------

    async def _evaluate(self, round: int, req: EvaluateRequest, answers: Answers) -> None:
        """Score the round's model once, and send the histograms through secure aggregation."""
        try:
            weights = {k: np.array(v) for k, v in state_to_numpy(req.weights).items()}
        except TensorError as exc:
            self.log.warning("bad_weights", reason=str(exc))
            return
        digest = state_digest(weights)
        reason = self.ledger.refuse_evaluation(round, digest)
        if not reason and req.secagg is None and not self.policy.insecure_plain_updates:
            reason = (
                "the director asks for plain validation histograms; this envoy's policy "
                "requires secure aggregation (policy.insecure_plain_updates is off)"
            )
        if req.secagg is not None and self.cfg.node_id not in req.selected:
            self.log.info("not_selected_for_evaluation", round=round)
            return
        if reason:
            await self._decline(round, req.attempt, EVALUATE, reason, answers)
            return
        contribution: SecureEvaluation | None = None
        if req.secagg is not None:
            try:
                contribution = SecureEvaluation(
                    node_id=self.cfg.node_id,
                    director_id=self.cfg.director_id,
                    federation=self.cfg.federation,
                    round=round,
                    attempt=req.attempt,
                    params=req.secagg,
                    participants=req.selected,
                    num_classes=self.cfg.model.num_classes,
                    bins=req.bins,
                    signing_key=self.signing_key,
                    peer_signing_keys=self.peer_signing_keys,
                    policy=self.client_policy,
                )
            except RoundRefused as exc:
                await self._decline(round, req.attempt, EVALUATE, str(exc), answers)
                return
        # Once per round, whatever happens next: recorded before anything leaves.
        self.ledger.evaluating(round, digest)
        if contribution is not None:
            assert contribution.session is not None
            contribution.answers = answers
            self._sessions[contribution.session] = contribution
            await self._emit(round, contribution, contribution.start())
        try:
            pred = await asyncio.to_thread(self.trainer.evaluate, weights)
            classes = self.cfg.model.num_classes
            if np.ndim(pred.probabilities) != 2 or np.shape(pred.probabilities)[1] != classes:
                raise EvaluationError(
                    f"the trainer's probabilities have shape {list(np.shape(pred.probabilities))}"
                    f", [model] num_classes is {classes}"
                )
            histograms = histogram_vector(pred.probabilities, pred.labels, req.bins)
        except Exception as exc:
            self.log.warning("evaluate_failed", reason=repr(exc)[:300])
            return
        self.evaluations += 1
        if contribution is not None:
            try:
                outs = contribution.submit(histograms, float(pred.loss_sum))
            except ValueError as exc:
                self.log.error("evaluation_not_encodable", reason=str(exc))
                return
            await self._emit(round, contribution, outs)
            return
        body = EvaluateResult(
            num_samples=len(pred.labels),
            loss_sum=float(pred.loss_sum),
            histograms=histograms.tolist(),
        )
        await self.endpoint.send(
            self.topics.director, round=round, recipient=self.cfg.director_id, body=body
        )
        answers.sent(body)


# How many opening messages (RoundStart, EvaluateRequest) the envoy remembers for answering
# again: the director only re-sends those of the round it is driving.
_OPENINGS_KEPT = 8

# The envoy's opt-outs of its own protections (node.config.PolicyConfig).
INSECURE_POLICY = ("insecure_plain_updates", "insecure_reproducible_seeds")


def round_(x: float) -> float:
    return round(x, 3)
