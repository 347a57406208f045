"""Director and envoy round logic over the in-memory bus (production node code, fake trainer)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from node.checkpoint import load_checkpoint
from node.errors import ExitCode
from tests.node.nodeharness import expected_after_one_round, make_fed


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
    assert [r["round"] for r in rec] == [1, 2]
    assert all(r["secure"] for r in rec)
    assert all(r["dropped"] == [] for r in rec)
    # Audit files: the director's unmasked sum is the sum of the envoys' quantised inputs.
    for r in (1, 2):
        total = np.load(tmp_path / "director" / "audit" / f"round-{r}-sum.npy")
        parts = [np.load(tmp_path / n / "audit" / f"round-{r}.npy") for n in fed.envoy_cfgs]
        assert np.array_equal(total, np.sum(parts, axis=0, dtype=np.uint32))
    # The round-1 aggregate is FedAvg up to the quantisation error (first record's weights).
    ckpt_dir = tmp_path / "director"
    assert json.loads((ckpt_dir / "status.json").read_text())["stage"] == "finished"
    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.round == 2 and len(ckpt.records) == 2


class CrashAt:
    def __init__(self, envoy: str, round: int, stage: str) -> None:
        self.point = (envoy, round, stage)

    def crash_point(self, node: str, round: int, stage: str) -> bool:
        return (node, round, stage) == self.point


@pytest.mark.parametrize("stage", ["training", "share_keys", "masked_input", "unmask"])
async def test_secure_round_survives_a_crash_at_any_stage(tmp_path, stage):
    fed = make_fed(
        tmp_path,
        4,
        secure=True,
        rounds=1,
        deadlines={"advertise_keys": 1.0, "share_keys": 1.0, "masked_input": 1.0, "unmask": 1.0},
    )
    for name in fed.envoy_cfgs:
        fed.start_envoy(name, CrashAt("envoy-2", 1, stage))
    rc = await run_director(fed)
    await fed.stop()
    assert rc == 0
    assert fed.crashed == [("envoy-2", 137)]
    (rec,) = fed.records()
    if stage == "unmask":
        # It sent its masked input: its update is in the sum, the others unmask for it.
        assert rec["dropped"] == []
    else:
        assert rec["dropped"] == ["envoy-2"]
        want = expected_after_one_round(fed, rec["survivors"])
        ckpt = load_checkpoint(fed.director_cfg.state_dir)
        for k, v in ckpt.weights_numpy().items():
            np.testing.assert_allclose(v, want[k], atol=1e-5)


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
    sent = [f for sender, _t, f in fed.broker.log if sender == "envoy-1"]
    assert sum(isinstance(codec.decode(f).body, PlainUpdate) for f in sent) == 1
    await fed.stop()
