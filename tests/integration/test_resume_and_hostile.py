"""Real processes over the real ZeroMQ broker: director kill -9 + --resume, hostile frames."""

from __future__ import annotations

import asyncio
import os
import random
import time

import msgpack
import pytest

from broker.client.connect import connect
from broker.client.credentials import Credentials
from broker.keys import read_key_file
from broker.topics import Topics
from node.checkpoint import load_checkpoint
from node.demo.launcher import Federation, Options
from node.demo.report import audit_rounds
from node.endpoint import Endpoint
from protocol.codec import Codec
from protocol.messages import EvaluateResult, PlainUpdate, RoundStart, TrainPlan
from protocol.secagg.messages import AdvertisedKeys, SecAggAdvertiseKeys
from protocol.tensors import from_numpy
from tests.integration.fedprocs import DATA, records, small_set, wait_for

pytestmark = pytest.mark.slow


def federation(tmp_path, envoys: int, rounds: int, **extra) -> Federation:
    opts = Options(
        envoys=envoys,
        rounds=rounds,
        data=str(DATA),
        out=str(tmp_path / "run"),
        audit=True,
        limit=600,
        director_set={**small_set(), **extra},
        quiet=True,
    )
    fed = Federation(opts)
    fed.resolve_data()
    fed.prepare()
    return fed


def test_kill9_director_then_resume_applies_no_round_twice(tmp_path):
    fed = federation(tmp_path, 3, 4)
    try:
        fed.start_all()
        director = fed.procs["director"]
        wait_for(lambda: len(records(fed.director_state)) >= 1, what="round 1", proc=director.popen)
        # Kill it in the middle of round 2 (or 3): whatever it was doing is lost.
        wait_for(
            lambda: (st := _status(fed)) and st["round"] >= 2 and st["stage"] != "round_end",
            what="round 2 under way",
            proc=director.popen,
            poll=0.01,
        )
        fed.kill("director")
        done = [r["round"] for r in records(fed.director_state)]
        ckpt = load_checkpoint(fed.director_state)
        assert ckpt.round == done[-1]
        restarted = fed.start_director(resume=True)
        assert restarted.popen.wait(600) == 0, restarted.log.read_text()[-3000:]
        for name in fed.names:  # they were told to shut down
            assert fed.procs[name].popen.wait(60) == 0
    finally:
        fed.stop_all()
    recs = records(fed.director_state)
    assert [r["round"] for r in recs] == [1, 2, 3, 4]
    assert load_checkpoint(fed.director_state).round == 4
    assert load_checkpoint(fed.director_state).last_record == recs[-1]
    # Every aggregate that was applied is still verifiable bit for bit after the restart.
    audited = audit_rounds(fed, recs)
    assert all(r["aggregate_verified"] for r in audited)
    log = fed.procs["director"].log.read_text()
    assert '"resumed"' in log and f'"last_completed_round": {done[-1]}' in log


def _status(fed):
    from tests.integration.fedprocs import read_json

    return read_json(fed.director_state / "status.json")


def hostile(
    codec: Codec, endpoint: Endpoint, rng: random.Random, round: int, recipient: str
) -> list[bytes]:
    w = {"w": from_numpy(__import__("numpy").ones(3, "float32"))}
    good = endpoint.seal(
        round=round,
        recipient=recipient,
        body=EvaluateResult(num_samples=1, loss_sum=0.0, histograms=[1, 0]),
    )
    return [
        os.urandom(rng.randrange(1, 400)),  # random bytes
        good[: rng.randrange(1, len(good) - 1)],  # truncated
        b"\x96" + bytes(codec.max_frame_bytes + 10),  # oversized
        msgpack.packb({"version": 1, "body": {"type": "SecAggAdvertiseKeys"}}),  # wrong shape
        # Well-formed and signed, but the wrong type / round / content for where it lands.
        endpoint.seal(
            round=round,
            recipient=recipient,
            body=RoundStart(
                weights=w,
                selected=["envoy-1"],
                plan=TrainPlan(local_epochs=1, batch_size=1, lr=0.1),
                deadlines={},
            ),
        ),
        endpoint.seal(
            round=round + 5,
            recipient=recipient,
            body=SecAggAdvertiseKeys(
                round=round + 5, keys=AdvertisedKeys(c_public=b"\x01" * 32, s_public=b"\x02" * 32)
            ),
        ),
        endpoint.seal(
            round=round,
            recipient=recipient,
            body=PlainUpdate(delta=w, num_samples=3, train_loss=0.0),
        ),
        good,
        good,  # a replay
    ]


async def _flood(
    fed: Federation, who: str, role: str, topics: list[str], stop_when, max_frame, signer=None
):
    recipient = "*" if role == "director" else "director"
    creds = Credentials.for_curve(
        secret_key=read_key_file(fed.kit(who) / "curve.key", encoding="z85"),
        broker_public_key=read_key_file(fed.kit(who) / "broker.pub", encoding="z85"),
    )
    bus = await connect(fed.broker_url, node_id=who, role=role, credentials=creds)
    codec = Codec(max_frame)
    ep = Endpoint(
        bus,
        node_id=who,
        federation="demo",
        codec=codec,
        signing_key=read_key_file(fed.kit(signer or who) / "signing.key"),
    )
    rng = random.Random(5)
    sent = 0
    try:
        r = 0
        # A bounded burst: enough to hit every stage of a round or two, not a load test.
        while not stop_when() and r < 40:
            r += 1
            for topic in topics:
                for frame in hostile(codec, ep, rng, 1 + r % 3, recipient):
                    await bus.publish(topic, frame)
                    sent += 1
            await asyncio.sleep(0.1)
    finally:
        await bus.close()
    return sent


def test_hostile_frames_to_director_and_envoys_are_refused(tmp_path):
    # envoy-3's identity is the attacker's: a member of the federation, but not running.
    fed = federation(tmp_path, 3, 2, min_envoys=2, wait_for_envoys_s=5.0, max_frame_bytes=1 << 20)
    fed.opts.envoy_set["max_frame_bytes"] = 1 << 20
    try:
        fed.started_at = time.time()
        fed.start_broker()
        fed.write_configs()
        for name in ("envoy-1", "envoy-2"):
            fed.start_envoy(name)
        for name in ("envoy-1", "envoy-2"):
            wait_for(
                lambda n=name: '"envoy_started"' in fed.procs[n].log.read_text(),
                what=f"{name} up",
                proc=fed.procs[name].popen,
            )
        # Phase 1: the envoys get garbage from a client holding the director's bus identity
        # (but not the director's signing key: its frames are signed with envoy-3's).
        t = Topics("demo")
        deadline = time.monotonic() + 3.0
        sent = asyncio.run(
            _flood(
                fed,
                "director",
                "director",
                [t.broadcast, t.envoy("envoy-1"), t.envoy("envoy-2")],
                lambda: time.monotonic() > deadline,
                1 << 20,
                signer="envoy-3",
            )
        )
        assert sent > 20
        for name in ("envoy-1", "envoy-2"):
            elog = fed.procs[name].log.read_text()
            for why in ("invalid frame", "over the limit", "bad signature from 'director'"):
                assert why in elog, (name, why)
            assert fed.procs[name].popen.poll() is None  # still running
        # Phase 2: the real director runs while envoy-3 keeps throwing frames at it.
        director = fed.start_director()
        done = {"flag": False}

        async def phase2():
            # Flood only once the director is subscribed and running rounds: frames published
            # before it subscribes reach nobody, and a loaded machine can take long to start it.
            while '"round_start"' not in director.log.read_text():
                assert director.popen.poll() is None, director.log.read_text()[-3000:]
                await asyncio.sleep(0.2)
            flood = asyncio.create_task(
                _flood(fed, "envoy-3", "envoy", [t.director], lambda: done["flag"], 1 << 20)
            )
            while director.popen.poll() is None:
                await asyncio.sleep(0.2)
            done["flag"] = True
            return await flood

        assert asyncio.run(phase2()) > 20
        assert director.popen.returncode == 0, director.log.read_text()[-3000:]
    finally:
        fed.stop_all()
    recs = records(fed.director_state)
    assert [r["round"] for r in recs] == [1, 2]
    assert all(r["survivors"] == ["envoy-1", "envoy-2"] for r in recs)
    assert all(r["aggregate_verified"] for r in audit_rounds(fed, recs))
    dlog = fed.procs["director"].log.read_text()
    for why in ("invalid frame", "over the limit", "duplicate message id"):
        assert why in dlog, why
    assert "not_a_participant" in dlog or "wrong_round" in dlog or "message_dropped" in dlog
