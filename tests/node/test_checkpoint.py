"""Checkpoints: atomic on disk, and a resumed director never applies a round twice."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import files
from node import checkpoint as ck
from node.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint
from node.director import DirectorError
from node.state import StateStore
from tests.node.nodeharness import make_fed


def weights(value: float) -> dict[str, np.ndarray]:
    return {"a": np.full((2, 3), value, np.float32), "b": np.arange(4, dtype=np.float32) * value}


def test_roundtrip(tmp_path):
    c = make_checkpoint(
        federation="f",
        round=3,
        weights=weights(1.5),
        best_round=2,
        best_weights=weights(0.5),
        best_threshold=0.42,
        best_metrics={"auc": 0.9},
        records=[{"round": 1}, {"round": 2}, {"round": 3}],
    )
    save_checkpoint(tmp_path, c)
    back = load_checkpoint(tmp_path)
    assert back is not None and back.round == 3 and back.best_round == 2
    assert back.best_threshold == 0.42 and back.records[-1] == {"round": 3}
    for k, v in weights(1.5).items():
        np.testing.assert_array_equal(back.weights_numpy()[k], v)
    for k, v in weights(0.5).items():
        np.testing.assert_array_equal(back.best_weights_numpy()[k], v)


def test_no_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path) is None


@settings(max_examples=25, deadline=None)
@given(
    frac=st.floats(min_value=0, max_value=0.999),
    fail_at=st.sampled_from(["write", "fsync", "replace"]),
)
def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path_factory, frac, fail_at):
    d = tmp_path_factory.mktemp("ck")
    save_checkpoint(d, make_checkpoint(federation="f", round=1, weights=weights(1.0)))
    new = make_checkpoint(federation="f", round=2, weights=weights(2.0))
    import msgspec

    cut = int(frac * len(msgspec.msgpack.encode(new)))

    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace
    written = [0]

    def write(fd, data):
        # Dies part way through the data, like a kill -9 during the write.
        if fail_at == "write" and written[0] + len(data) > cut:
            n = max(cut - written[0], 0)
            real_write(fd, bytes(data[:n]))
            raise OSError("killed")
        written[0] += len(data)
        return real_write(fd, data)

    def fsync(fd):
        if fail_at == "fsync":
            raise OSError("killed")
        return real_fsync(fd)

    def replace(a, b):
        if fail_at == "replace":
            raise OSError("killed")
        return real_replace(a, b)

    # The checkpoint is written by broker.files: make its write, fsync or rename die.
    files.os.write, files.os.fsync, files.os.replace = write, fsync, replace  # type: ignore[assignment]
    try:
        with pytest.raises(OSError, match="killed"):
            save_checkpoint(d, new)
    finally:
        files.os.write, files.os.fsync, files.os.replace = real_write, real_fsync, real_replace
    back = load_checkpoint(d)
    assert back is not None and back.round == 1
    np.testing.assert_array_equal(back.weights_numpy()["a"], weights(1.0)["a"])
    # And the next save goes through.
    save_checkpoint(d, new)
    assert load_checkpoint(d).round == 2


def test_a_torn_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(federation="f", round=1, weights=weights(1.0)))
    path = tmp_path / ck.CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(tmp_path)


async def _run(fed, **kw):
    return await asyncio.wait_for(fed.director(**kw).run(), 120)


async def test_resume_continues_after_the_last_completed_round(tmp_path):
    fed = make_fed(tmp_path, 3, secure=False, rounds=2)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    assert await _run(fed) == 0
    w2 = load_checkpoint(fed.director_cfg.state_dir).weights_numpy()
    # Without --resume a director refuses to overwrite the federation's state.
    with pytest.raises(DirectorError, match="--resume"):
        await _run(fed)
    await fed.stop()
    import msgspec

    fed.director_cfg = msgspec.structs.replace(fed.director_cfg, rounds=4)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    assert await _run(fed, resume=True) == 0
    await fed.stop()
    rec = fed.records()
    assert [r["round"] for r in rec] == [1, 2, 3, 4]
    # Each envoy trained exactly 4 times: rounds 1-2 were not re-run.
    assert all(t.calls == 4 for t in fed.trainers.values())
    # Round 3 started from round 2's weights: the closed form of two more FedAvg steps.
    ckpt = load_checkpoint(fed.director_cfg.state_dir)
    tot = sum(t.num_samples for t in fed.trainers.values())
    target = sum(t.num_samples * t.target for t in fed.trainers.values()) / tot
    for k, v in w2.items():
        want = target + (v - target) * 0.25
        np.testing.assert_allclose(ckpt.weights_numpy()[k], want, rtol=1e-5)


async def test_kill_between_checkpoint_and_log_does_not_repeat_the_round(tmp_path, monkeypatch):
    fed = make_fed(tmp_path, 3, secure=False, rounds=3)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)

    class Killed(BaseException):
        pass

    real = StateStore.save_checkpoint

    def checkpoint_then_die(self, state):
        real(self, state)
        if state.round == 2:
            raise Killed  # the process dies after the checkpoint, before rounds.jsonl

    monkeypatch.setattr(StateStore, "save_checkpoint", checkpoint_then_die)
    with pytest.raises(Killed):
        await _run(fed)
    monkeypatch.setattr(StateStore, "save_checkpoint", real)
    assert [r["round"] for r in fed.records()] == [1]
    assert await _run(fed, resume=True) == 0
    await fed.stop()
    assert [r["round"] for r in fed.records()] == [1, 2, 3]
    assert all(t.calls == 3 for t in fed.trainers.values())
    assert load_checkpoint(fed.director_cfg.state_dir).round == 3
