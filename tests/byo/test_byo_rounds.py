"""The documented package in a federation: secure rounds, three-class RGB evaluation, and what
the director shows (operator page, TensorBoard, model.json), in one process over the
in-memory bus. The same package in real processes from a clean environment is
test_custom_federation.py."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from crypto.signing import generate_signing_keypair
from node.config import DirectorConfig, EnvoyConfig, parse_config
from node.director import Director
from node.envoy import Envoy
from node.export import read_model_spec
from node.roundlog import read_records
from node.trainer import make_trainer
from node.ui.feed import public_view
from protocol.stages import Stage
from tests.byo.docexample import CLASSES, write_images, write_package
from tests.node.nodefakes import MemoryBroker

MODEL = {
    "factory": "hospital_ml:net",
    "options": {"width": 8},
    "num_classes": 3,
    "in_channels": 3,
    "image_size": 32,
    "classes": list(CLASSES),
}
DEADLINES = {
    "training": 120.0,
    "advertise_keys": 60.0,
    "share_keys": 60.0,
    "masked_input": 120.0,
    "consistency": 60.0,
    "unmask": 60.0,
    "evaluate": 60.0,
}


@pytest.fixture
def team(tmp_path, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(write_package(tmp_path)))
    yield write_images(tmp_path / "xrays", per_class={"train": 24, "val": 8, "test": 2})
    sys.modules.pop("hospital_ml", None)


def configs(tmp_path: Path, team: Path) -> tuple[DirectorConfig, list[EnvoyConfig]]:
    names = ["envoy-1", "envoy-2"]
    keydir = tmp_path / "keys"
    keydir.mkdir()
    for name in ["director", *names]:
        pair = generate_signing_keypair()
        (keydir / f"{name}.key").write_text(pair.private.hex())
        (keydir / f"{name}.pub").write_text(pair.public.hex())
    director = parse_config(
        {
            "federation": "byo",
            "bus_url": "zmq+tcp://127.0.0.1:1",
            "state_dir": "director",
            "rounds": 3,
            "min_envoys": 2,
            "target_envoys": 2,
            "wait_for_envoys_s": 30.0,
            "deadlines": DEADLINES,
            "train": {"local_epochs": 3, "batch_size": 12, "lr": 0.1},
            "lr_schedule": {"kind": "constant"},
            "model": {**MODEL, "init_seed": 3},
            "eval": {"bins": 100},
            "tracking": {"tensorboard": "tb"},
            "ui": {"bind": "127.0.0.1:0", "poll_s": 0.1},
            "insecure_no_auth": True,
            # Secure aggregation against a malicious director: the envoys insist on it.
            "signing_key": str(keydir / "director.key"),
            "envoy_signing_keys": {name: str(keydir / f"{name}.pub") for name in names},
        },
        DirectorConfig,
        source="director.toml",
        base=tmp_path,
    )
    envoys = [
        parse_config(
            {
                "node_id": f"envoy-{i + 1}",
                "federation": "byo",
                "bus_url": "zmq+tcp://127.0.0.1:1",
                "state_dir": f"envoy-{i + 1}",
                "heartbeat_s": 0.2,
                "model": MODEL,
                "data": {
                    "loader": "hospital_ml:folders",
                    "path": str(team),
                    "partition": {"scheme": "iid", "index": i, "count": 2},
                },
                "train": {"trainer": "hospital_ml:Trainer", "device": "cpu"},
                "insecure_no_auth": True,
                "signing_key": str(keydir / f"envoy-{i + 1}.key"),
                "director_signing_key": str(keydir / "director.pub"),
                "peer_signing_keys": {name: str(keydir / f"{name}.pub") for name in names},
            },
            EnvoyConfig,
            source="envoy.toml",
            base=tmp_path,
        )
        for i in range(2)
    ]
    return director, envoys


async def test_the_documented_package_federates_with_three_class_evaluation(tmp_path, team) -> None:
    director_cfg, envoy_cfgs = configs(tmp_path, team)
    broker = MemoryBroker()
    tasks = []
    for cfg in envoy_cfgs:
        trainer, model = make_trainer(cfg)
        envoy = Envoy(cfg, None, trainer, model=model)
        envoy.bus = envoy.endpoint.bus = broker.connect(cfg.node_id, envoy.will())
        tasks.append(asyncio.create_task(envoy.run()))
    director = Director(director_cfg, broker.connect("director"))
    pages: list[dict] = []

    async def watch_the_page() -> None:
        """What the operator page's API serves while the rounds run."""
        while director.monitor.url is None:
            await asyncio.sleep(0.05)
        url = director.monitor.url + "api/snapshot"
        while True:
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
            pages.append(json.loads(body))
            await asyncio.sleep(0.3)

    watcher = asyncio.create_task(watch_the_page())
    rc = await asyncio.wait_for(director.run(), 600)
    watcher.cancel()
    for task in tasks:
        await asyncio.wait_for(task, 30)  # they leave on the director's Shutdown
    assert rc == 0

    records = read_records(tmp_path / "director")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["secure"] and r["survivors"] == ["envoy-1", "envoy-2"] for r in records)
    val = records[-1]["metrics"]["val"]
    assert val["num_classes"] == 3 and val["classes"] == list(CLASSES)
    assert val["num_samples"] == 3 * 8  # both envoys' validation shares, summed
    assert [c["class"] for c in val["per_class"]] == list(CLASSES)
    assert sum(c["num_positive"] for c in val["per_class"]) == 24
    assert np.sum(val["confusion"]) == 24 and val["threshold"] is None
    # Colour tells the classes apart: three rounds of two envoys learn it.
    assert val["auc"] > 0.9, val

    # What the director showed: the page during the rounds, deadlines included ...
    # Sampled every 0.3 s, so which stages are caught depends on the machine's load; any
    # stage caught must carry its deadline, and waiting must not.
    stages = {(p["stage"], p["stage_deadline"] is not None) for p in pages}
    assert pages and all(p["federation"] == "byo" for p in pages)
    caught = {stage for stage, _ in stages} & {str(s) for s in Stage}
    assert all(has_deadline for stage, has_deadline in stages if stage in caught), stages
    assert not any(has_deadline for stage, has_deadline in stages if stage == "waiting"), stages
    # The page's last word, built the way the page builds it from what the director published.
    status, history = director.monitor.feed.snapshot()
    last = public_view(status, history, now=0.0)
    assert last["federation"] == "byo" and len(last["rounds"]) == 3
    assert [c["name"] for c in last["roc_latest"]["classes"]] == list(CLASSES)
    # ... TensorBoard curves per class, and the model description export needs.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"val/auc", "val/class/virus/auc", "train/loss"} <= set(tags)
    assert [e.step for e in events.Scalars("val/auc")] == [1, 2, 3]
    assert read_model_spec(tmp_path / "director") == director_cfg.model
    status = json.loads((tmp_path / "director" / "status.json").read_text())
    assert status["stage"] == "finished" and status["ui_url"].startswith("http://127.0.0.1:")
