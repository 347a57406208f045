"""Malformed, forged, replayed, wrong-type and wrong-round frames: logged, dropped, harmless.

A hostile flood runs on every topic for the whole federation run (in-memory bus); the rounds
must complete exactly as without it, and each kind of frame must be refused for its reason.
"""

from __future__ import annotations

import asyncio
import os
import random

import msgpack
import numpy as np

from broker.keys import read_key_file
from broker.topics import Topics
from crypto.signing import generate_signing_keypair
from node.checkpoint import load_checkpoint
from node.endpoint import Endpoint
from protocol.codec import Codec
from protocol.messages import EvaluateResult, PlainUpdate, Presence, RoundStart, TrainPlan
from protocol.secagg.messages import AdvertisedKeys, SecAggAdvertiseKeys
from protocol.tensors import from_numpy
from tests.node.nodeharness import FED, expected_weights, make_fed


def hostile_frames(fed, round_hint: int) -> list[tuple[str, bytes]]:
    """(topic, frame) pairs of every hostile kind."""
    topics = Topics(FED)
    codec = Codec(1 << 20)
    rng = random.Random(round_hint)
    out: list[tuple[str, bytes]] = []
    key1 = read_key_file(fed.envoy_cfgs["envoy-1"].signing_key)
    dkey = read_key_file(fed.director_cfg.signing_key)
    as_envoy = Endpoint(None, node_id="envoy-1", federation=FED, codec=codec, signing_key=key1)
    forger = Endpoint(
        None,
        node_id="envoy-2",
        federation=FED,
        codec=codec,
        signing_key=generate_signing_keypair().private,
    )
    as_director_forged = Endpoint(
        None,
        node_id="director",
        federation=FED,
        codec=codec,
        signing_key=generate_signing_keypair().private,
    )
    as_director = Endpoint(None, node_id="director", federation=FED, codec=codec, signing_key=dkey)
    w = {"conv.weight": from_numpy(np.ones((2, 3), np.float32))}
    for topic in (
        topics.director,
        topics.broadcast,
        topics.envoy("envoy-1"),
        topics.presence("envoy-3"),
    ):
        out.append((topic, os.urandom(rng.randrange(0, 300))))  # random bytes
        real = as_envoy.seal(
            round=round_hint,
            recipient="director",
            body=Presence(online=True, role="envoy", heartbeat_s=1.0),
        )
        out.append((topic, real[: rng.randrange(1, len(real))]))  # truncated
        out.append((topic, b"\x92" + bytes(1 << 20)))  # oversized (the nodes here refuse > 512 KiB)
        out.append(
            (topic, msgpack.packb({"version": 1, "federation": FED, "body": {"type": "Nope"}}))
        )
    # Well-formed, signed by the real envoy-1, but the wrong type / round / content.
    out.append(
        (
            topics.director,
            as_envoy.seal(
                round=round_hint,
                recipient="director",
                body=RoundStart(
                    weights=w,
                    selected=["envoy-1"],
                    plan=TrainPlan(local_epochs=1, batch_size=1, lr=0.1),
                    deadlines={"x": 1.0},
                ),
            ),
        )
    )
    out.append(
        (
            topics.director,
            as_envoy.seal(
                round=round_hint + 7,
                recipient="director",
                body=SecAggAdvertiseKeys(
                    round=round_hint + 7,
                    keys=AdvertisedKeys(c_public=b"\x01" * 32, s_public=b"\x02" * 32),
                ),
            ),
        )
    )
    out.append(
        (
            topics.director,
            as_envoy.seal(
                round=round_hint,
                recipient="director",
                body=PlainUpdate(
                    delta={"conv.weight": from_numpy(np.full((9,), np.nan, np.float32))},
                    num_samples=10,
                    train_loss=0.0,
                ),
            ),
        )
    )
    out.append(
        (
            topics.director,
            as_envoy.seal(
                round=round_hint,
                recipient="director",
                body=EvaluateResult(num_samples=5, loss_sum=0.0, histograms=[5, 0]),
            ),
        )
    )
    # Forged: envoy-2's name, someone else's key; the director's name, someone else's key.
    out.append(
        (
            topics.director,
            forger.seal(
                round=round_hint,
                recipient="director",
                body=Presence(online=False, role="envoy", heartbeat_s=1.0),
            ),
        )
    )
    out.append(
        (
            topics.broadcast,
            as_director_forged.seal(
                round=round_hint,
                recipient="*",
                body=RoundStart(
                    weights=w,
                    selected=["envoy-1", "envoy-2"],
                    plan=TrainPlan(local_epochs=1, batch_size=1, lr=0.1),
                    deadlines={},
                ),
            ),
        )
    )
    # Genuinely signed by envoy-2, but on envoy-3's presence topic (bus identity mismatch).
    key2 = read_key_file(fed.envoy_cfgs["envoy-2"].signing_key)
    as_envoy2 = Endpoint(None, node_id="envoy-2", federation=FED, codec=codec, signing_key=key2)
    out.append(
        (
            topics.presence("envoy-3"),
            as_envoy2.seal(
                round=round_hint,
                recipient="director",
                body=Presence(online=False, role="envoy", heartbeat_s=1.0),
            ),
        )
    )
    # Genuinely signed by the director but addressed to someone else.
    out.append(
        (
            topics.envoy("envoy-1"),
            as_director.seal(
                round=round_hint,
                recipient="envoy-9",
                body=Presence(online=True, role="director", heartbeat_s=1.0),
            ),
        )
    )
    return out


async def flood(fed, stop: asyncio.Event) -> int:
    sent = 0
    i = 0
    variants = [hostile_frames(fed, r) for r in (1, 2, 3)]
    while not stop.is_set() and i < 40:
        i += 1
        for topic, frame in variants[i % 3]:
            fed.broker.inject(topic, frame)
            sent += 1
        # Replays of real frames seen on the bus so far (duplicate message ids).
        latest = {topic: frame for sender, topic, frame in fed.broker.log if sender != "<injected>"}
        for topic, frame in latest.items():
            fed.broker.inject(topic, frame)
        await asyncio.sleep(0.05)
    return sent


async def test_hostile_flood_is_refused_and_rounds_complete(tmp_path):
    fed = make_fed(tmp_path, 3, secure=True, rounds=2)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    director = fed.director()
    stop = asyncio.Event()
    flooder = asyncio.create_task(flood(fed, stop))
    rc = await asyncio.wait_for(director.run(), 120)
    stop.set()
    sent = await flooder
    await fed.stop()
    assert rc == 0 and sent > 50
    rec = fed.records()
    assert [r["round"] for r in rec] == [1, 2]
    assert all(r["dropped"] == [] and r["secure"] for r in rec)
    refused = director.endpoint.stats.refused
    reasons = " | ".join(refused)
    for why in (
        "invalid frame",
        "frame of",
        "bad signature",
        "duplicate message id",
        "does not own",
    ):
        assert why in reasons, (why, refused)
    for name, envoy in fed.envoys.items():
        er = " | ".join(envoy.endpoint.stats.refused)
        for why in ("invalid frame", "bad signature", "duplicate message id"):
            assert why in er, (why, envoy.endpoint.stats.refused)
        # Only envoy-1's own topic carried the misaddressed frame.
        assert ("addressed to" in er) == (name == "envoy-1")
    # The aggregate is exactly what three honest envoys give (no hostile frame got in).
    total = np.load(tmp_path / "director" / "audit" / "round-1-sum.npy")
    parts = [np.load(tmp_path / n / "audit" / "round-1.npy") for n in fed.envoy_cfgs]
    assert np.array_equal(total, np.sum(parts, axis=0, dtype=np.uint32))
    # And the model is exactly two rounds of FedAvg of the three honest updates (up to the
    # fixed-point quantisation): nothing hostile reached the weights.
    ckpt = load_checkpoint(fed.director_cfg.state_dir)
    assert ckpt.round == 2
    want = expected_weights(fed, [r["survivors"] for r in rec])
    assert all(r["survivors"] == ["envoy-1", "envoy-2", "envoy-3"] for r in rec)
    for k, v in ckpt.weights_numpy().items():
        np.testing.assert_allclose(v, want[k], rtol=0, atol=2e-6)
