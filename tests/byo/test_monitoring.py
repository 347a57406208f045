"""What the director shows besides the bus, across a restart: TensorBoard curves without
repeats, the page's rounds, model.json; and a page that cannot be served stops it early."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import msgspec
import pytest

from node.export import read_model_spec
from node.ui.config import UiConfig, UiConfigError
from tests.node.nodeharness import make_fed


async def run(fed) -> tuple[int, object]:
    for name in fed.envoy_cfgs:
        if name not in fed.tasks or fed.tasks[name].done():
            fed.start_envoy(name)
    director = fed.director(resume=(fed.tmp / "director" / "checkpoint.msgpack").exists())
    rc = await asyncio.wait_for(director.run(), 120)
    return rc, director


async def test_a_resumed_director_continues_its_curves_and_its_page(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fed = make_fed(
        tmp_path, 2, rounds=2, tracking={"tensorboard": str(tmp_path / "tb")}, secure=True
    )
    rc, _ = await run(fed)
    assert rc == 0
    fed.director_cfg = msgspec.structs.replace(fed.director_cfg, rounds=4)
    rc, director = await run(fed)
    await fed.stop()
    assert rc == 0
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("val/auc")]
    assert steps == [1, 2, 3, 4]  # one curve, each round once, across both runs
    status, records = director.monitor.feed.snapshot()
    assert [r["round"] for r in records] == [1, 2, 3, 4]  # the page had rounds 1-2 on resume
    assert status["stage"] == "finished" and status["stage_deadline"] is None
    assert read_model_spec(tmp_path / "director") == fed.director_cfg.model


async def test_a_page_that_cannot_be_served_stops_the_director_before_any_round(tmp_path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        fed = make_fed(tmp_path, 2, rounds=1, ui={"bind": f"127.0.0.1:{port}"})
        with pytest.raises(UiConfigError, match=f"ui.bind 127.0.0.1:{port}: cannot listen"):
            await asyncio.wait_for(fed.director().run(), 60)
        await fed.stop()
    finally:
        taken.close()
    assert no_round_logged(tmp_path / "director")
    assert UiConfigError("x").exit_code == 3


async def test_a_public_bind_without_protection_is_refused_at_start(tmp_path) -> None:
    fed = make_fed(tmp_path, 2, rounds=1, ui={"bind": "0.0.0.0:0"})
    with pytest.raises(UiConfigError, match="beyond loopback"):
        await asyncio.wait_for(fed.director().run(), 60)
    await fed.stop()
    assert isinstance(fed.director_cfg.ui, UiConfig)
    assert no_round_logged(tmp_path / "director")


def no_round_logged(state_dir: Path) -> bool:
    """The round log is append-only and created with the first record: absent or empty."""
    log = state_dir / "rounds.jsonl"
    return not log.exists() or not log.read_text()
