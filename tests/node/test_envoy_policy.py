"""Issue #11 at the envoy: the real Envoy class against a scripted malicious director.

Points 2 (downgrade), 3 (re-training differencing), 8 (evaluation oracle), 9 (predictable
noise) and 10 (non-finite updates, out-of-range aggregates, the director's inbox) of the
issue. Each test lets the director do what the issue showed and asserts that every envoy
refuses, and that nothing the director collects is an update or a per-envoy result.
"""

from __future__ import annotations

import asyncio
import math
import stat

import msgspec
import numpy as np
import pytest
from structlog.testing import capture_logs

from crypto.quantize import quantize
from node.checkpoint import load_checkpoint
from node.config import EnvoyConfig, PrivacySettings, parse_config
from node.contribution import SecureContribution
from node.training.seeds import reproducible_seed
from protocol.configfile import ConfigError
from protocol.messages import (
    EvaluateRequest,
    EvaluateResult,
    Presence,
    RoundDeclined,
    TrainPlan,
)
from protocol.secagg.common import EVALUATE
from protocol.secagg.messages import (
    SecAggAdvertiseKeys,
    SecAggMaskedInput,
    SecAggParams,
    SecAggUnmaskResponse,
)
from protocol.secagg.server import SecAggServer
from protocol.secagg.update import SAMPLE_CAP, secagg_session
from protocol.tensors import state_from_numpy
from tests.node.hostile_director import ScriptedDirector
from tests.node.nodeharness import FED, initial, make_fed

# n = 4 on the complete graph: the default policy (C = 1) accepts t >= 3.
SECURE = SecAggParams(graph="complete", k=3, t=3, clip=1.0, malicious=True)


async def started(tmp_path, n: int = 4, **kw):
    fed = make_fed(tmp_path, n, secure=True, **kw)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    await asyncio.sleep(0.1)  # subscribed
    return fed


def secagg_traffic(director: ScriptedDirector) -> list:
    """What the envoys sent besides presence and their refusals (RoundDeclined carries the
    policy's reason and nothing of the envoy's keys, data or update)."""
    return [e for e in director.received if not isinstance(e.body, Presence | RoundDeclined)]


def declines(director: ScriptedDirector) -> dict[str, str]:
    return {e.sender: e.body.reason for e in director.received if isinstance(e.body, RoundDeclined)}


# -- 2: downgrades are the envoy's choice, not the director's ----------------------------------


@pytest.mark.parametrize("downgrade", ["semi-honest", "plain"])
async def test_2_a_downgraded_round_start_is_refused_and_nothing_is_sent(tmp_path, downgrade):
    """`malicious = false` would switch the roster-key check off (the director could put its
    own keys next to a victim's); `secagg = None` asks for the raw update and sample count."""
    fed = await started(tmp_path)
    params = (
        SecAggParams(graph="complete", k=3, t=4, clip=1.0, malicious=False)
        if downgrade == "semi-honest"
        else None
    )
    async with ScriptedDirector(fed) as director:
        await director.send(director.round_start(params=params), round=1)
        await director.settle(1.0)
        assert secagg_traffic(director) == []  # no keys, no update: nothing at all
        # Each envoy said why it declined, so an honest director need not wait for it.
        said = declines(director)
    await fed.stop()
    assert set(said) == set(fed.envoys)
    assert all(said[name] == envoy.refused[-1][1] for name, envoy in fed.envoys.items())
    for envoy in fed.envoys.values():
        ((round, why),) = envoy.refused
        assert round == 1
        assert ("malicious" in why) if downgrade == "semi-honest" else ("plain" in why)
    assert all(t.calls == 0 for t in fed.trainers.values())  # not even trained


async def test_2_an_envoys_own_insecure_opt_in_is_logged_as_a_warning(tmp_path):
    fed = make_fed(tmp_path, 2, secure=False)  # each envoy opts into plain updates itself
    with capture_logs() as logs:
        fed.start_envoy("envoy-1")
        while not any(e["event"] == "envoy_started" for e in logs):
            await asyncio.sleep(0.02)
    await fed.stop()
    (warning,) = [e for e in logs if e["event"] == "insecure_policy"]
    assert warning["log_level"] == "warning"
    assert warning["opted_in"] == ["insecure_plain_updates"]


async def test_2_an_update_norm_above_the_policy_is_refused(tmp_path):
    fed = await started(tmp_path)
    async with ScriptedDirector(fed) as director:
        start = director.round_start(params=SECURE, update_norm=1e6)
        await director.send(start, round=1)
        await director.settle(1.0)
        assert secagg_traffic(director) == []
    await fed.stop()
    assert all("max_update_norm" in e.refused[0][1] for e in fed.envoys.values())


async def test_2_a_plan_beyond_the_envoys_epoch_bound_is_refused(tmp_path):
    """The training plan is the director's; tying a hospital's hardware up for 1000 epochs
    is not. Within the bound the same round trains."""
    fed = await started(tmp_path)
    greedy = TrainPlan(local_epochs=11, batch_size=4, lr=0.1)
    async with ScriptedDirector(fed) as director:
        await director.send(director.round_start(params=SECURE, plan=greedy), round=1)
        await director.settle(1.0)
        assert secagg_traffic(director) == []
        fair = TrainPlan(local_epochs=10, batch_size=4, lr=0.1)
        await director.send(director.round_start(params=SECURE, plan=fair), round=2)
        while len(director.of_type(SecAggAdvertiseKeys)) < len(fed.envoys):
            await asyncio.sleep(0.05)
    await fed.stop()
    assert all("policy.max_local_epochs" in e.refused[0][1] for e in fed.envoys.values())
    assert all(t.calls == 1 for t in fed.trainers.values())


async def test_2_a_prox_mu_beyond_the_envoys_bound_is_refused(tmp_path):
    """FedProx's mu is the director's to ask for and the hospital's to bound: past it, nothing
    is sent (not even keys); at the bound the round trains."""
    fed = await started(tmp_path)
    pinned = TrainPlan(local_epochs=1, batch_size=4, lr=0.1, prox_mu=1.5)
    async with ScriptedDirector(fed) as director:
        await director.send(director.round_start(params=SECURE, plan=pinned), round=1)
        await director.settle(1.0)
        assert secagg_traffic(director) == []
        fair = TrainPlan(local_epochs=1, batch_size=4, lr=0.1, prox_mu=1.0)
        await director.send(director.round_start(params=SECURE, plan=fair), round=2)
        while len(director.of_type(SecAggAdvertiseKeys)) < len(fed.envoys):
            await asyncio.sleep(0.05)
    await fed.stop()
    for envoy in fed.envoys.values():
        ((round, why),) = envoy.refused
        assert round == 1 and "prox_mu 1.5" in why and "policy.max_prox_mu" in why
    assert all(t.calls == 1 for t in fed.trainers.values())


async def test_2_an_envoy_training_with_dp_refuses_prox_mu_before_joining(tmp_path):
    """DP-SGD takes no proximal term: the envoy says so and stays out of the round, rather
    than joining it and failing in training (its partners would wait for its update)."""
    fed = make_fed(tmp_path, 2, secure=False)
    private = PrivacySettings(noise_multiplier=1.0)
    for name, cfg in fed.envoy_cfgs.items():
        model = msgspec.structs.replace(cfg.model, norm="group")
        train = msgspec.structs.replace(cfg.train, privacy=private)
        fed.envoy_cfgs[name] = msgspec.structs.replace(cfg, model=model, train=train)
        fed.start_envoy(name)
    await asyncio.sleep(0.1)
    plan = TrainPlan(local_epochs=1, batch_size=4, lr=0.1, prox_mu=0.01)
    with capture_logs() as logs:
        async with ScriptedDirector(fed) as director:
            await director.send(director.round_start(params=None, plan=plan), round=1)
            await director.settle(1.0)
            assert secagg_traffic(director) == []
    await fed.stop()
    refusals = [e for e in logs if e["event"] == "round_refused"]
    assert len(refusals) == 2
    assert all("differential privacy" in e["reason"] for e in refusals)
    assert all("train.privacy" in e["reason"] for e in refusals)
    assert all(t.calls == 0 for t in fed.trainers.values())


# -- 3: one training, one survivor set per round ----------------------------------------------


async def test_3_a_second_attempt_cannot_be_differenced_against_the_first(tmp_path):
    """Attempt 0 unmasks all four envoys; attempt 1 of the same round throws envoy-4's masked
    input away, so sum(attempt 0) - sum(attempt 1) would be envoy-4's update (on the old code
    exactly: the retraining used the same seed). Envoys that signed a survivor set in round 1
    stay out of its later attempts, and nobody trains twice."""
    fed = await started(tmp_path)
    names = sorted(fed.envoy_cfgs)
    keys = {k: v for k, v in director_keys(fed).items()}
    async with ScriptedDirector(fed) as director:
        await director.send(director.round_start(params=SECURE, attempt=0), round=1)
        first = SecAggServer(
            secagg_session(1, 0), SECURE, names, layout_length(), keys, federation=FED
        )
        await director.run_secagg(first, 1)
        assert first.result is not None and first.survivors == frozenset(names)
        await director.send(director.round_start(params=SECURE, attempt=1), round=1)
        second = SecAggServer(
            secagg_session(1, 1), SECURE, names, layout_length(), keys, federation=FED
        )
        await director.run_secagg(second, 1, ignore_masked_from=["envoy-4"], stage_timeout=1.5)
        assert second.result is None and second.aborted
        # Nothing of the second attempt left any envoy: no keys, no masked input.
        assert director.of_type(SecAggAdvertiseKeys, session=secagg_session(1, 1)) == []
    await fed.stop()
    assert all(t.calls == 1 for t in fed.trainers.values())
    assert all("earlier attempt" in e.refused[-1][1] for e in fed.envoys.values())


async def test_3_an_attempt_that_never_reached_the_signatures_reuses_the_update(tmp_path):
    """Attempt 0 stops after the masked inputs (the director drops everyone there); attempt 1
    runs a fresh SecAgg session with the update trained once, and completes."""
    fed = await started(tmp_path)
    names = sorted(fed.envoy_cfgs)
    keys = director_keys(fed)
    async with ScriptedDirector(fed) as director:
        await director.send(director.round_start(params=SECURE, attempt=0), round=1)
        first = SecAggServer(
            secagg_session(1, 0), SECURE, names, layout_length(), keys, federation=FED
        )
        await director.run_secagg(first, 1, ignore_masked_from=names, stage_timeout=1.5)
        assert first.aborted
        await director.send(director.round_start(params=SECURE, attempt=1), round=1)
        second = SecAggServer(
            secagg_session(1, 1), SECURE, names, layout_length(), keys, federation=FED
        )
        await director.run_secagg(second, 1)
        assert second.result is not None and second.survivors == frozenset(names)
        # Fresh keys in the new session: nothing of attempt 0 is reused but the update.
        old = {
            e.sender: e.body.keys
            for e in director.of_type(SecAggAdvertiseKeys, session=first.round)
        }
        new = {
            e.sender: e.body.keys
            for e in director.of_type(SecAggAdvertiseKeys, session=second.round)
        }
        assert all(old[u].c_public != new[u].c_public for u in names)
    await fed.stop()
    assert all(t.calls == 1 for t in fed.trainers.values())
    # --audit kept each envoy's quantised update: for its owner's eyes only.
    for name in names:
        folder = tmp_path / name / "audit"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert [stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()] == [0o600]


async def test_3_a_model_already_trained_is_not_trained_again_under_a_new_round(tmp_path):
    """Round 1 unmasks all four envoys; the director then "moves on" to round 2 (and later
    round 3) without moving the model, leaving envoy-4 out: sum(round 1) - sum(round 2) would
    be envoy-4's update up to the others' retraining noise. Nobody trains a model twice."""
    fed = await started(tmp_path)
    names = sorted(fed.envoy_cfgs)
    keys = director_keys(fed)
    async with ScriptedDirector(fed) as director:
        await director.send(director.round_start(params=SECURE), round=1)
        first = SecAggServer(
            secagg_session(1, 0), SECURE, names, layout_length(), keys, federation=FED
        )
        await director.run_secagg(first, 1)
        assert first.result is not None and first.survivors == frozenset(names)
        moved = {k: v + 0.5 for k, v in initial().items()}
        for r, weights in ((2, None), (3, moved), (4, None)):
            # Round 3 trains a new model; rounds 2 and 4 bring back the model of round 1.
            await director.send(
                director.round_start(params=SECURE, selected=names[:3], weights=weights),
                round=r,
            )
            await director.settle(1.0)
        assert director.of_type(SecAggAdvertiseKeys, session=secagg_session(2, 0)) == []
        assert director.of_type(SecAggAdvertiseKeys, session=secagg_session(4, 0)) == []
    await fed.stop()
    trained = {name: t.calls for name, t in fed.trainers.items()}
    assert trained == {"envoy-1": 2, "envoy-2": 2, "envoy-3": 2, "envoy-4": 1}, trained
    for name in names[:3]:
        reasons = [reason for _, reason in fed.envoys[name].refused]
        assert sum("already trained" in reason for reason in reasons) == 2, reasons


# -- 8: the evaluation oracle -------------------------------------------------------------------


async def test_8_an_evaluation_in_the_clear_is_refused(tmp_path):
    """Old code: every envoy scored any weights, any number of times, and answered its own
    histograms with its exact validation size and class counts."""
    fed = await started(tmp_path)
    async with ScriptedDirector(fed) as director:
        probe = {k: v + 3.0 for k, v in initial().items()}
        for _ in range(3):
            await director.send(EvaluateRequest(weights=state_from_numpy(probe), bins=20), round=1)
        await director.settle(1.0)
        assert director.of_type(EvaluateResult) == []
    await fed.stop()
    assert all(t.evaluations == 0 for t in fed.trainers.values())
    assert all("plain validation" in e.refused[0][1] for e in fed.envoys.values())


async def test_8_an_envoy_evaluates_once_per_round_and_only_the_model_it_trains_next(tmp_path):
    fed = await started(tmp_path)
    names = sorted(fed.envoy_cfgs)
    async with ScriptedDirector(fed) as director:
        model = {k: v + 1.0 for k, v in initial().items()}
        request = EvaluateRequest(
            weights=state_from_numpy(model), bins=20, secagg=SECURE, selected=names
        )
        await director.send(request, round=1)
        session = secagg_session(1, 0, EVALUATE)
        adverts = await director.wait_for(SecAggAdvertiseKeys, 4, session=session)
        assert len(adverts) == 4  # the histograms go into a SecAgg session of their own
        # The same round again, with another model: refused.
        other = EvaluateRequest(
            weights=state_from_numpy(initial()), bins=20, secagg=SECURE, selected=names
        )
        await director.send(other, round=1)
        await director.settle(0.5)
        # Round 2 must train the model evaluated after round 1, not another one.
        await director.send(director.round_start(params=SECURE, weights=initial()), round=2)
        await director.settle(1.0)
        assert director.of_type(SecAggAdvertiseKeys, session=secagg_session(2, 0)) == []
        assert director.of_type(EvaluateResult) == []
    await fed.stop()
    assert all(t.evaluations == 1 for t in fed.trainers.values())
    for envoy in fed.envoys.values():
        reasons = [why for _r, why in envoy.refused]
        assert any("already evaluated" in why for why in reasons)
        assert any("evaluated one model" in why for why in reasons)


async def test_8_the_director_learns_only_the_summed_histograms(tmp_path):
    """A whole federation: the validation metrics come from the evaluation SecAgg session."""
    fed = make_fed(tmp_path, 4, secure=True, rounds=1)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    director = fed.director()
    rc = await asyncio.wait_for(director.run(), 120)
    await fed.stop()
    assert rc == 0
    (rec,) = fed.records()
    assert rec["metrics"]["val"]["num_samples"] == 4 * 40
    assert rec["metrics"]["evaluated_by"] == sorted(fed.envoy_cfgs)
    frames = [f for sender, _t, f in fed.broker.log if sender.startswith("envoy")]
    codec = director.endpoint.codec
    assert not any(isinstance(codec.decode(f).body, EvaluateResult) for f in frames)


# -- 9: predictable noise -----------------------------------------------------------------------


async def test_9_training_seeds_are_fresh_secrets_each_run(tmp_path):
    """Old code: seed = f(config seed, round), never set by provisioning: the director could
    regenerate the bottleneck's noise bit for bit. Two envoys with identical configs now
    train the same round from seeds nobody can predict."""
    seeds = []
    for run in ("a", "b"):
        fed = await started(tmp_path / run, n=4)
        async with ScriptedDirector(fed) as director:
            await director.send(director.round_start(params=SECURE), round=1)
            await director.wait_for(SecAggAdvertiseKeys, 4)
            await director.settle(0.5)
        await fed.stop()
        seeds.append({name: t.seeds for name, t in fed.trainers.items()})
    every = [s for run in seeds for per_envoy in run.values() for s in per_envoy]
    assert len(every) == 8 and len(set(every)) == 8
    assert all(s != reproducible_seed(0, 1) for s in every)
    assert all(0 <= s < 2**63 for s in every)


def test_9_fixed_seeds_are_refused_on_a_real_network(tmp_path):
    base = {
        "node_id": "envoy-1",
        "federation": FED,
        "state_dir": "state",
        "data": {"path": "x.npz"},
        "policy": {"insecure_reproducible_seeds": True},
    }
    with pytest.raises(ConfigError, match="insecure_reproducible_seeds"):
        parse_config(
            {**base, "bus_url": "mqtts://broker.hospital.example:8883"},
            EnvoyConfig,
            source="envoy.toml",
            base=tmp_path,
        )
    local = parse_config(
        {**base, "bus_url": "zmq+tcp://127.0.0.1:5555"}, EnvoyConfig, source="t", base=tmp_path
    )
    assert local.policy.insecure_reproducible_seeds


# -- 10: robustness of the sum ------------------------------------------------------------------


async def test_10_a_tiny_claimed_weight_is_refused_not_applied(tmp_path, monkeypatch):
    """envoy-4 masks a vector whose weight cancels the others' down to two samples and whose
    deltas are as large as the range allows: the mean would blow up ~1000-fold. The director
    refuses the aggregate with a named error and the model stays as it was."""
    fed = make_fed(tmp_path, 4, secure=True, rounds=1, max_attempts=1)
    honest = sum(fed.trainers[f"envoy-{i}"].num_samples for i in (1, 2, 3))
    submit = SecureContribution.submit

    def hostile_submit(self, update):
        if self.client.node_id != "envoy-4":
            return submit(self, update)
        c = self.qrange.clip
        payload = np.full(self.layout.vector_length, 0.5 * c)
        payload[-1] = (2 - honest) / SAMPLE_CAP * c  # cancels the honest weights but 2
        vector = quantize(payload, self.qrange, rng=np.random.default_rng(0))
        return self.client.set_input(vector)

    monkeypatch.setattr(SecureContribution, "submit", hostile_submit)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    with capture_logs() as logs:
        rc = await asyncio.wait_for(fed.director().run(), 120)
    await fed.stop()
    assert rc != 0
    events = [e for e in logs if e["event"] == "aggregate_out_of_range"]
    assert events and events[0]["log_level"] == "error"
    assert "below one sample" in events[0]["reason"]
    ckpt = load_checkpoint(fed.director_cfg.state_dir)
    assert ckpt.round == 0
    for k, v in ckpt.weights_numpy().items():
        np.testing.assert_array_equal(v, initial()[k])


async def test_10_a_non_finite_update_is_a_named_envoy_error(tmp_path):
    fed = make_fed(tmp_path, 4, secure=True)
    fed.trainers["envoy-2"].target = math.nan
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    await asyncio.sleep(0.1)
    with capture_logs() as logs:
        async with ScriptedDirector(fed) as director:
            await director.send(director.round_start(params=SECURE), round=1)
            await director.wait_for(SecAggAdvertiseKeys, 4)
            await director.settle(1.0)
            assert director.of_type(SecAggMaskedInput) == []  # (no shares forwarded yet)
    await fed.stop()
    (event,) = [e for e in logs if e["event"] == "update_not_finite"]
    assert event["log_level"] == "error" and event["error"] == "UpdateNotFinite"


async def test_10_the_directors_inbox_is_bounded_per_sender(tmp_path):
    """One envoy floods the director with valid, signed frames while it waits for envoys."""
    fed = make_fed(tmp_path, 3, secure=True, wait_for_envoys_s=30.0)
    director = fed.director()
    run = asyncio.create_task(director.run())
    await asyncio.sleep(0.2)
    envoy = fed.start_envoy("envoy-1")
    await asyncio.sleep(0.1)
    flood = SecAggUnmaskResponse(round=1, self_mask_shares={}, key_shares={})
    for _ in range(500):
        await envoy.endpoint.send(envoy.topics.director, round=1, recipient="director", body=flood)
    await asyncio.sleep(0.2)
    queued = director.inbox.qsize()
    run.cancel()
    await fed.stop()
    assert queued <= director.cfg.inbox_per_sender
    assert director.inbox.dropped["envoy-1"] >= 500 - director.cfg.inbox_per_sender


# -- helpers ------------------------------------------------------------------------------------


def director_keys(fed) -> dict[str, bytes]:
    from broker.keys import read_key_file

    return {k: read_key_file(v) for k, v in fed.director_cfg.envoy_signing_keys.items()}


def layout_length() -> int:
    from protocol.secagg.update import Layout

    return Layout.of(initial()).vector_length
