"""Director and envoy round logic over the in-memory bus (production node code, fake trainer)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from structlog.testing import capture_logs

from node.checkpoint import load_checkpoint
from node.director import QuorumLost
from node.errors import ExitCode
from node.status import format_status
from protocol.codec import Codec
from protocol.secagg.messages import SecAggMaskedInput
from protocol.stages import CRASH_STAGES
from tests.node.nodeharness import expected_after_one_round, expected_weights, make_fed


async def run_director(fed, **kw) -> int:
    return await asyncio.wait_for(fed.director(**kw).run(), 120)


async def test_plain_rounds_complete_and_average_exactly(tmp_path):
    fed = make_fed(tmp_path, 3, secure=False, rounds=1)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    rc = await run_director(fed)
    await fed.stop()
    assert rc == 0
    rec = fed.records()
    assert [r["round"] for r in rec] == [1]
    assert rec[0]["secure"] is False
    assert rec[0]["dropped"] == []
    assert rec[0]["survivors"] == ["envoy-1", "envoy-2", "envoy-3"]
    ckpt = load_checkpoint(fed.director_cfg.state_dir)
    want = expected_after_one_round(fed, rec[0]["survivors"])
    for k, v in ckpt.weights_numpy().items():
        np.testing.assert_allclose(v, want[k], rtol=1e-6)
    val = rec[0]["metrics"]["val"]
    assert val["num_samples"] == 120
    assert 0.5 < val["auc"] <= 1.0
    assert rec[0]["metrics"]["train_loss"] == pytest.approx((100 * 1 + 200 * 2 + 300 * 3) / 600)


async def test_secure_rounds_match_plain_average(tmp_path):
    fed = make_fed(tmp_path, 4, secure=True, rounds=2)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    rc = await run_director(fed)
    await fed.stop()
    assert rc == 0
    rec = fed.records()
    everyone = list(fed.envoy_cfgs)
    assert [r["round"] for r in rec] == [1, 2]
    assert all(r["secure"] for r in rec)
    assert all(r["dropped"] == [] and r["survivors"] == everyone for r in rec)
    assert all(r["fates"] == {n: {"fate": "survivor"} for n in everyone} for r in rec)
    # Audit files: the director's unmasked sum is the sum of the envoys' quantised inputs.
    for r in (1, 2):
        total = np.load(tmp_path / "director" / "audit" / f"round-{r}-sum.npy")
        parts = [np.load(tmp_path / n / "audit" / f"round-{r}.npy") for n in fed.envoy_cfgs]
        assert np.array_equal(total, np.sum(parts, axis=0, dtype=np.uint32))
    ckpt_dir = tmp_path / "director"
    assert json.loads((ckpt_dir / "status.json").read_text())["stage"] == "finished"
    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.round == 2 and ckpt.last_record == rec[-1]
    # Two rounds of weighted FedAvg in closed form, up to the fixed-point quantisation
    # (clip 1, 4 summands: a step of 2^-29 on sample-weighted values of about 1e-2).
    want = expected_weights(fed, [everyone, everyone])
    for k, v in ckpt.weights_numpy().items():
        np.testing.assert_allclose(v, want[k], rtol=0, atol=2e-6)
    # And the mean training loss is the sample-weighted mean of the envoys' losses.
    losses = {n: fed.trainers[n].target for n in everyone}
    weights = {n: fed.trainers[n].num_samples for n in everyone}
    mean_loss = sum(weights[n] * losses[n] for n in everyone) / sum(weights.values())
    for r in rec:
        assert r["metrics"]["train_loss"] == pytest.approx(mean_loss, abs=1e-5)


class CrashAt:
    def __init__(self, envoy: str, round: int, stage: str) -> None:
        self.point = (envoy, round, stage)

    def crash_point(self, node: str, round: int, stage: str) -> bool:
        return (node, round, stage) == self.point


# Where envoy-2 ends up when it crashes entering each stage (malicious mode, so consistency
# runs): the first SecAgg stage it did not answer, and whether its update is in the sum.
CRASHES = {
    # Keys go out at RoundStart, before training: a crash at training never advertises them.
    "training": ("dropped", "advertise_keys"),
    "advertise_keys": ("dropped", "advertise_keys"),
    "share_keys": ("dropped", "share_keys"),
    "masked_input": ("dropped", "masked_input"),
    "consistency": ("left", "consistency"),
    "unmask": ("left", "unmask"),
}


@pytest.mark.parametrize("stage", list(CRASHES))
async def test_secure_round_survives_a_crash_at_any_stage(tmp_path, stage):
    assert set(CRASHES) == set(CRASH_STAGES)
    # Deadlines far beyond the test's run time: the round must not wait for them, since the
    # crashed envoy's last will ends the wait for it at once.
    fed = make_fed(
        tmp_path,
        4,
        secure=True,
        rounds=1,
        deadlines={s: 600.0 for s in CRASH_STAGES},
    )
    for name in fed.envoy_cfgs:
        fed.start_envoy(name, CrashAt("envoy-2", 1, stage))
    with capture_logs() as logs:
        rc = await run_director(fed)
    await fed.stop()
    assert rc == 0
    assert fed.crashed == [("envoy-2", 137)]
    (rec,) = fed.records()
    fate, at = CRASHES[stage]
    others = ["envoy-1", "envoy-3", "envoy-4"]
    assert rec["fates"] == {
        "envoy-2": {"fate": fate, "stage": at},
        **{n: {"fate": "survivor"} for n in others},
    }
    in_sum = others if fate == "dropped" else ["envoy-1", "envoy-2", *others[1:]]
    assert rec["survivors"] == in_sum
    assert rec["dropped"] == (["envoy-2"] if fate == "dropped" else [])
    assert rec["left"] == (["envoy-2"] if fate == "left" else [])
    # The aggregate is exactly the FedAvg of the updates in the sum.
    want = expected_weights(fed, [in_sum])
    ckpt = load_checkpoint(fed.director_cfg.state_dir)
    for k, v in ckpt.weights_numpy().items():
        np.testing.assert_allclose(v, want[k], rtol=0, atol=2e-6)
    # No stage ran into its deadline; the one that waited for envoy-2 closed when it left
    # (unmask needs only t of the responses, so it never waits for the crashed envoy).
    events = [e for e in logs if e["event"] in ("stage_deadline", "stage_closed_early")]
    if stage == "unmask":
        assert events == []
    else:
        assert [(e["event"], e["stage"], e["gone"]) for e in events] == [
            ("stage_closed_early", at, ["envoy-2"])
        ]
    # It was not asked to evaluate either.
    assert "envoy-2" not in rec["metrics"]["evaluated_by"]


async def test_an_envoy_gone_silent_is_dropped_when_its_heartbeat_times_out(tmp_path):
    # Four envoys: under the envoys' default policy three tolerate no dropout (issue #11).
    fed = make_fed(
        tmp_path,
        4,
        secure=True,
        rounds=1,
        deadlines={s: 600.0 for s in CRASH_STAGES},
        heartbeat_timeout_s=1.0,
    )
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    silent = fed.envoys["envoy-3"].bus
    real_publish = silent.publish
    codec = Codec(1 << 19)

    async def lose_the_link_at_the_masked_input(topic, frame, *, retain=False):
        if isinstance(codec.decode(frame).body, SecAggMaskedInput):
            silent.muted = True  # no masked input, no heartbeats, and no last will
        await real_publish(topic, frame, retain=retain)

    silent.publish = lose_the_link_at_the_masked_input
    with capture_logs() as logs:
        rc = await run_director(fed)
    await fed.stop()
    assert rc == 0
    (rec,) = fed.records()
    assert rec["fates"]["envoy-3"] == {"fate": "dropped", "stage": "masked_input"}
    assert rec["survivors"] == ["envoy-1", "envoy-2", "envoy-4"]
    events = [e for e in logs if e["event"] in ("stage_deadline", "stage_closed_early")]
    assert [(e["event"], e["stage"], e["gone"]) for e in events] == [
        ("stage_closed_early", "masked_input", ["envoy-3"])
    ]


def two_of_four_crash(tmp_path, *, rounds: int, quorum_timeout_s: float):
    """Four envoys (min_envoys 3); envoy-2 and envoy-3 die entering training in round 1
    (before they trained: a restarted envoy never trains a round twice, issue #11)."""
    fed = make_fed(
        tmp_path,
        4,
        secure=True,
        rounds=rounds,
        min_envoys=3,
        deadlines={s: 600.0 for s in CRASH_STAGES},
        quorum_timeout_s=quorum_timeout_s,
    )
    for name in fed.envoy_cfgs:
        plan = CrashAt(name, 1, "training") if name in ("envoy-2", "envoy-3") else None
        fed.start_envoy(name, plan)
    return fed


async def test_quorum_loss_ends_the_director_with_its_exit_code_and_reason(tmp_path):
    fed = two_of_four_crash(tmp_path, rounds=2, quorum_timeout_s=1.0)
    director = fed.director()
    with pytest.raises(QuorumLost) as info:
        await asyncio.wait_for(director.run(), 120)
    await fed.stop()
    assert info.value.exit_code is ExitCode.QUORUM_LOST
    assert sorted(fed.crashed) == [("envoy-2", 137), ("envoy-3", 137)]
    message = str(info.value)
    assert "2 envoys online (envoy-1, envoy-4), fewer than min_envoys 3" in message
    status = json.loads((tmp_path / "director" / "status.json").read_text())
    assert status["stage"] == "quorum_lost" and status["reason"] == message
    assert f"stopped: {message}" in format_status(status, [])  # what `fedbus status` shows
    assert status["envoys"]["envoy-2"]["online"] is False
    assert fed.records() == []  # round 1 never completed


async def test_an_envoy_back_before_the_quorum_bound_lets_the_round_complete(tmp_path):
    fed = two_of_four_crash(tmp_path, rounds=1, quorum_timeout_s=600.0)
    task = asyncio.create_task(fed.director().run())
    while len(fed.crashed) < 2:
        await asyncio.sleep(0.01)
    status = tmp_path / "director" / "status.json"
    while json.loads(status.read_text())["stage"] != "waiting":
        await asyncio.sleep(0.01)
    fed.start_envoy("envoy-2")  # restarted, without the crash this time
    assert await asyncio.wait_for(task, 120) == 0
    await fed.stop()
    (rec,) = fed.records()
    assert rec["attempt"] == 1 and rec["survivors"] == ["envoy-1", "envoy-2", "envoy-4"]
    # The round's time counts the failed attempt and the wait for the quorum too.
    assert rec["round_seconds"] > rec["seconds"]


class CrashAll:
    """Every envoy but `spared` exits entering training in round 1."""

    def __init__(self, spared: str) -> None:
        self.spared = spared

    def crash_point(self, node: str, round: int, stage: str) -> bool:
        return node != self.spared and (round, stage) == (1, "training")


async def test_a_round_that_fails_every_attempt_exits_round_failed(tmp_path):
    fed = make_fed(tmp_path, 3, secure=True, rounds=2, max_attempts=1, deadlines={"training": 1.0})
    for name in fed.envoy_cfgs:
        fed.start_envoy(name, CrashAll("envoy-1"))
    rc = await run_director(fed)
    await fed.stop()
    assert rc == ExitCode.ROUND_FAILED == 5
    assert fed.records() == []  # nothing was aggregated from the lone survivor
    assert json.loads((tmp_path / "director" / "status.json").read_text())["stage"] == "failed"


async def test_late_abort_of_an_earlier_attempt_does_not_cancel_the_retry(tmp_path):
    """Reordered frames: RoundEnd(aborted, attempt 0) arrives after RoundStart(attempt 1)."""
    from broker.keys import read_key_file
    from broker.topics import Topics
    from node.endpoint import Endpoint
    from protocol.codec import Codec
    from protocol.messages import PlainUpdate, RoundEnd, RoundStart, TrainPlan
    from protocol.tensors import state_from_numpy
    from tests.node.nodeharness import FED, initial

    fed = make_fed(tmp_path, 2, secure=False, rounds=1)
    fed.trainers["envoy-1"].delay_s = 0.3
    envoy = fed.start_envoy("envoy-1")
    await asyncio.sleep(0.05)
    t = Topics(FED)
    director = Endpoint(
        fed.broker.connect("director"),
        node_id="director",
        federation=FED,
        codec=Codec(),
        signing_key=read_key_file(fed.director_cfg.signing_key),
    )
    updates = director.bus.subscribe(t.director)
    start = RoundStart(
        weights=state_from_numpy(initial()),
        selected=["envoy-1", "envoy-2"],
        plan=TrainPlan(local_epochs=1, batch_size=1, lr=0.1),
        deadlines={"training": 5.0},
        attempt=1,
    )
    await director.send(t.broadcast, round=1, recipient="*", body=start)
    while envoy._round_task is None:  # until the envoy has taken the RoundStart
        await asyncio.sleep(0.01)
    task = envoy._round_task
    assert envoy.attempt == 1
    late = RoundEnd(status="aborted", reason="attempt 0 failed", attempt=0)
    await director.send(t.broadcast, round=1, recipient="*", body=late)
    await asyncio.wait([task])  # ends either way: trained, or cancelled by the abort
    assert not task.cancelled()
    codec = Codec()
    async for frame in updates:
        env = codec.decode(frame)
        if isinstance(env.body, PlainUpdate):
            break
    assert env.round == 1 and env.sender == "envoy-1"
    # The matching abort does cancel.
    await director.send(t.broadcast, round=1, recipient="*", body=start)
    await director.send(
        t.broadcast, round=1, recipient="*", body=RoundEnd(status="aborted", attempt=1)
    )
    await asyncio.sleep(0.6)
    assert envoy._round_task is None
    sent = [codec.decode(f).body for sender, _t, f in fed.broker.log if sender == "envoy-1"]
    # The same RoundStart again is answered again (node.retransmit), with the same update:
    # one update was computed and sent, the second frame repeats it.
    updates_sent = [b for b in sent if isinstance(b, PlainUpdate)]
    assert len(updates_sent) == 2 and updates_sent[0] == updates_sent[1]
    assert envoy.answered_again == 1
    await fed.stop()


async def test_an_envoy_whose_policy_refuses_the_round_declines_and_is_not_waited_for(tmp_path):
    """envoy-4's policy allows one local epoch, the director asks for two: envoy-4 declines
    (RoundDeclined, its reason named), and the round goes on at once without it although
    every stage deadline is ten minutes."""
    import msgspec

    fed = make_fed(
        tmp_path,
        4,
        secure=True,
        rounds=2,
        deadlines={s: 600.0 for s in CRASH_STAGES},
        train={"local_epochs": 2},
    )
    cfg = fed.envoy_cfgs["envoy-4"]
    fed.envoy_cfgs["envoy-4"] = msgspec.structs.replace(
        cfg, policy=msgspec.structs.replace(cfg.policy, max_local_epochs=1)
    )
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    with capture_logs() as logs:
        rc = await run_director(fed)
    await fed.stop()
    assert rc == 0
    others = ["envoy-1", "envoy-2", "envoy-3"]
    for rec in fed.records():
        assert rec["survivors"] == others and rec["dropped"] == ["envoy-4"]
        fate = rec["fates"]["envoy-4"]
        assert fate["fate"] == "dropped" and fate["stage"] == "advertise_keys"
        assert "policy.max_local_epochs" in fate["declined"]
    assert fed.trainers["envoy-4"].calls == 0
    assert not [e for e in logs if e["event"] == "stage_deadline"]
    declines = [e for e in logs if e["event"] == "round_declined"]
    assert [e["envoy"] for e in declines] == ["envoy-4", "envoy-4"]
    want = expected_weights(fed, [others, others])
    for k, v in load_checkpoint(fed.director_cfg.state_dir).weights_numpy().items():
        np.testing.assert_allclose(v, want[k], rtol=0, atol=2e-6)
