"""Checkpoints: checksummed, atomic, the previous one kept; a resumed director never applies a
round twice; disk errors and a second director end the director with exit code STATE."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import files
from node import checkpoint as ck
from node.checkpoint import (
    CheckpointError,
    encode_checkpoint,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from node.director import DirectorError
from node.errors import ExitCode
from node.roundlog import RoundLog, RoundLogError
from node.state import FederationState, StateError, StateStore
from tests.node.nodeharness import make_fed


def weights(value: float) -> dict[str, np.ndarray]:
    return {"a": np.full((2, 3), value, np.float32), "b": np.arange(4, dtype=np.float32) * value}


def leftovers(folder) -> list[str]:
    """Temporary files anywhere under `folder` (broker.files names them .NAME.PID.tmp...)."""
    return sorted(p.name for p in folder.rglob(".*") if ".tmp" in p.name)


def test_roundtrip(tmp_path):
    c = make_checkpoint(
        federation="f",
        round=3,
        weights=weights(1.5),
        best_round=2,
        best_weights=weights(0.5),
        best_threshold=0.42,
        best_metrics={"auc": 0.9},
        last_record={"round": 3, "survivors": ["a"]},
    )
    save_checkpoint(tmp_path, c)
    back = load_checkpoint(tmp_path)
    assert back is not None and back.round == 3 and back.best_round == 2
    assert back.best_threshold == 0.42 and back.last_record == {"round": 3, "survivors": ["a"]}
    for k, v in weights(1.5).items():
        np.testing.assert_array_equal(back.weights_numpy()[k], v)
    for k, v in weights(0.5).items():
        np.testing.assert_array_equal(back.best_weights_numpy()[k], v)


def test_the_server_optimisers_state_round_trips_exactly(tmp_path):
    moments = {"m/a": weights(0.1)["a"], "v/a": weights(1e-6)["a"]}
    c = make_checkpoint(
        federation="f", round=2, weights=weights(1.0), strategy="fedadam", strategy_state=moments
    )
    save_checkpoint(tmp_path, c)
    back = load_checkpoint(tmp_path)
    assert back.strategy is not None and back.strategy.name == "fedadam"
    state = back.strategy.state_numpy()
    assert sorted(state) == ["m/a", "v/a"]
    for k, v in moments.items():
        np.testing.assert_array_equal(state[k], v)
        assert state[k].dtype == np.float32
    # A stateless optimiser records its name and no state.
    plain = make_checkpoint(federation="f", round=2, weights=weights(1.0), strategy="fedavg")
    assert plain.strategy.name == "fedavg" and plain.strategy.state == {}


# Written by fedbus at 18f1a27 (format 2, before [strategy]): make_checkpoint(federation=
# "fedtest", round=1, weights={"conv.weight": 0.875 (2 x 3), "fc.bias": 0.75 (4)},
# last_record={"round": 1, "attempt": 0, "survivors": ["envoy-1", "envoy-2", "envoy-3"]}).
BEFORE_STRATEGIES = base64.b64decode(
    "hKZmb3JtYXSxZmVkYnVzLWNoZWNrcG9pbnSndmVyc2lvbgKmc2hhMjU2xCCm2BLhCZSsyX26a0SQoxvQn43HT2du"
    "gK+amKRhvJhFE6dwYXlsb2FkxOuIqmZlZGVyYXRpb26nZmVkdGVzdKVyb3VuZAGnd2VpZ2h0c4KrY29udi53ZWln"
    "aHSTozxmNJICA8QYAABgPwAAYD8AAGA/AABgPwAAYD8AAGA/p2ZjLmJpYXOTozxmNJEExBAAAEA/AABAPwAAQD8A"
    "AEA/qmJlc3Rfcm91bmTArGJlc3Rfd2VpZ2h0c8CuYmVzdF90aHJlc2hvbGTArGJlc3RfbWV0cmljc8CrbGFzdF9y"
    "ZWNvcmSDpXJvdW5kAadhdHRlbXB0AKlzdXJ2aXZvcnOTp2Vudm95LTGnZW52b3ktMqdlbnZveS0z"
)


async def test_a_checkpoint_from_before_server_optimisers_resumes_under_fedavgm(tmp_path):
    """It loads as plain FedAvg (no optimiser state) and a fedavgm federation continues it
    with fresh momentum: round 2 is one momentum step from round 1's weights."""
    fed = make_fed(tmp_path, 3, secure=False, rounds=2, strategy={"name": "fedavgm"})
    state_dir = tmp_path / "director"
    state_dir.mkdir()
    (state_dir / ck.CHECKPOINT_NAME).write_bytes(BEFORE_STRATEGIES)
    old = load_checkpoint(state_dir)
    assert old.round == 1 and old.strategy is None
    assert FederationState.from_checkpoint(old).strategy is None
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    assert await _run(fed, resume=True) == 0
    await fed.stop()
    assert [r["round"] for r in fed.records()] == [1, 2]  # round 1's record from the checkpoint
    now = load_checkpoint(state_dir)
    assert now.round == 2 and now.strategy.name == "fedavgm"
    tot = sum(t.num_samples for t in fed.trainers.values())
    target = sum(t.num_samples * t.target for t in fed.trainers.values()) / tot
    for k, v in old.weights_numpy().items():
        delta = 0.5 * (target - v.astype(np.float64))  # the momentum starts at 0: m = delta
        np.testing.assert_allclose(now.weights_numpy()[k], v + delta, rtol=1e-6)
        np.testing.assert_allclose(now.strategy.state_numpy()[f"momentum/{k}"], delta, rtol=1e-6)


def test_no_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path) is None


def test_each_save_keeps_the_checkpoint_before_it(tmp_path):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, make_checkpoint(federation="f", round=r, weights=weights(r)))
    assert load_checkpoint(tmp_path).round == 3
    prev = ck.decode_checkpoint((tmp_path / ck.PREVIOUS_NAME).read_bytes(), source="prev")
    assert prev.round == 2
    np.testing.assert_array_equal(prev.weights_numpy()["a"], weights(2)["a"])
    assert leftovers(tmp_path) == []


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_is_refused_never_loaded(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("ck")
    save_checkpoint(d, make_checkpoint(federation="f", round=1, weights=weights(1.0)))
    save_checkpoint(d, make_checkpoint(federation="f", round=2, weights=weights(2.0)))
    path = d / ck.CHECKPOINT_NAME
    raw = bytearray(path.read_bytes())
    i = data.draw(st.integers(0, len(raw) - 1), label="byte")
    raw[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(d)
    message = str(info.value)
    assert str(path) in message
    # The previous checkpoint is named, intact and untouched.
    assert "checkpoint.prev.msgpack, round 1) is intact" in message
    with pytest.raises(CheckpointError):
        load_checkpoint(d)  # the refusal changed nothing: it repeats
    # Moving the corrupt file aside resumes from the previous checkpoint.
    path.rename(d / "corrupt.msgpack")
    back = load_checkpoint(d)
    assert back.round == 1
    np.testing.assert_array_equal(back.weights_numpy()["b"], weights(1.0)["b"])


def test_a_torn_checkpoint_without_a_previous_one_says_so(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(federation="f", round=0, weights=weights(1.0)))
    path = tmp_path / ck.CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="no previous checkpoint") as info:
        load_checkpoint(tmp_path)
    assert str(path) in str(info.value) and "corrupt checkpoint" in str(info.value)


def test_other_format_versions_are_refused_by_name(tmp_path):
    path = tmp_path / ck.CHECKPOINT_NAME
    legacy = {"version": 1, "federation": "f", "round": 4, "weights": {}, "records": []}
    path.write_bytes(msgspec.msgpack.encode(legacy))
    with pytest.raises(CheckpointError, match=r"format 1 .*before checkpoints carried a checksum"):
        load_checkpoint(tmp_path)
    good = msgspec.msgpack.decode(
        encode_checkpoint(make_checkpoint(federation="f", round=1, weights=weights(1.0)))
    )
    good["version"] = 3
    path.write_bytes(msgspec.msgpack.encode(good))
    with pytest.raises(CheckpointError, match="format 3; this fedbus reads format 2 only"):
        load_checkpoint(tmp_path)


class FailingOs:
    """broker.files' os calls, failing like a full disk or a crash at one chosen step."""

    def __init__(self, fail_at: str, *, cut: int = 0, err: int = errno.ENOSPC) -> None:
        self.fail_at, self.cut, self.err = fail_at, cut, err
        self.real = (files.os.write, files.os.fsync, files.os.replace)
        self.written = 0

    def write(self, fd, data):
        if self.fail_at == "write" and self.written + len(data) > self.cut:
            n = max(self.cut - self.written, 0)
            self.real[0](fd, bytes(data[:n]))
            raise OSError(self.err, os.strerror(self.err))
        self.written += len(data)
        return self.real[0](fd, data)

    def fsync(self, fd):
        if self.fail_at == "fsync":
            raise OSError(self.err, os.strerror(self.err))
        return self.real[1](fd)

    def replace(self, a, b):
        if self.fail_at == "replace":
            raise OSError(self.err, os.strerror(self.err))
        return self.real[2](a, b)

    def __enter__(self):
        files.os.write, files.os.fsync, files.os.replace = self.write, self.fsync, self.replace
        return self

    def __exit__(self, *exc):
        files.os.write, files.os.fsync, files.os.replace = self.real


@settings(max_examples=25, deadline=None)
@given(
    frac=st.floats(min_value=0, max_value=0.999),
    fail_at=st.sampled_from(["write", "fsync", "replace"]),
)
def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(
    tmp_path_factory, frac, fail_at
):
    d = tmp_path_factory.mktemp("ck")
    save_checkpoint(d, make_checkpoint(federation="f", round=1, weights=weights(1.0)))
    new = make_checkpoint(federation="f", round=2, weights=weights(2.0))
    cut = int(frac * len(encode_checkpoint(new)))
    with FailingOs(fail_at, cut=cut), pytest.raises(OSError) as info:
        save_checkpoint(d, new)
    assert info.value.errno == errno.ENOSPC
    assert leftovers(d) == []
    back = load_checkpoint(d)
    assert back is not None and back.round == 1
    np.testing.assert_array_equal(back.weights_numpy()["a"], weights(1.0)["a"])
    # And the next save goes through.
    save_checkpoint(d, new)
    assert load_checkpoint(d).round == 2


def test_checkpoint_io_per_round_does_not_grow_with_the_rounds(tmp_path):
    store = StateStore(tmp_path, federation="f")
    state = FederationState(0, weights(1.0))
    sizes, log = [], b""
    record = {"survivors": ["envoy-1", "envoy-2"], "metrics": {"val": {"auc": 0.9}}}
    for r in range(1, 61):
        state.round = r
        state.records.append({"round": r, **record})
        store.save_checkpoint(state)
        store.append_record(state.records[-1])
        sizes.append((tmp_path / ck.CHECKPOINT_NAME).stat().st_size)
        now = (tmp_path / "rounds.jsonl").read_bytes()
        assert now.startswith(log) and now.count(b"\n") == r  # appended, never rewritten
        log = now
    # Only the round number's digits change the checkpoint's size.
    assert max(sizes) - min(sizes) <= 2


async def _run(fed, **kw):
    return await asyncio.wait_for(fed.director(**kw).run(), 120)


async def _completed(tmp_path, rounds: int):
    """A plain 3-envoy federation after `rounds` rounds (its envoys told to shut down)."""
    fed = make_fed(tmp_path, 3, secure=False, rounds=rounds)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    assert await _run(fed) == 0
    await fed.stop()
    return fed


async def _resume(fed, rounds: int):
    """Resume `fed`'s director for `rounds` rounds in all, with its envoys back."""
    fed.director_cfg = msgspec.structs.replace(fed.director_cfg, rounds=rounds)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    rc = await _run(fed, resume=True)
    await fed.stop()
    return rc


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

    real = StateStore.append_record

    def die_before_the_log(self, record):
        if record["round"] == 2:
            raise Killed  # the process dies after the checkpoint, before rounds.jsonl
        real(self, record)

    monkeypatch.setattr(StateStore, "append_record", die_before_the_log)
    with pytest.raises(Killed):
        await _run(fed)
    monkeypatch.setattr(StateStore, "append_record", real)
    assert [r["round"] for r in fed.records()] == [1]
    assert load_checkpoint(fed.director_cfg.state_dir).round == 2
    assert await _run(fed, resume=True) == 0
    await fed.stop()
    # Round 2's record came from the checkpoint; round 2 was not trained again.
    assert [r["round"] for r in fed.records()] == [1, 2, 3]
    assert all(t.calls == 3 for t in fed.trainers.values())
    assert load_checkpoint(fed.director_cfg.state_dir).round == 3


async def test_a_torn_log_line_is_cut_and_a_line_past_the_checkpoint_dropped(tmp_path):
    fed = await _completed(tmp_path, rounds=2)
    log = RoundLog(fed.director_cfg.state_dir)
    two = log.load()
    # A line for round 3 that no checkpoint holds, then a torn line (a crash mid-append).
    log.append({**two[-1], "round": 3})
    with open(log.path, "ab") as fh:
        fh.write(b'{"record": {"round": 4, "surv')
    assert await _resume(fed, rounds=3) == 0
    rec = fed.records()
    assert [r["round"] for r in rec] == [1, 2, 3]
    assert rec[:2] == two and rec[2]["attempt"] == 0 and rec[2] != {**two[-1], "round": 3}
    assert all(t.calls == 3 for t in fed.trainers.values())


async def test_a_damaged_log_line_stops_the_resume_with_a_clear_error(tmp_path):
    fed = await _completed(tmp_path, rounds=2)
    log = RoundLog(fed.director_cfg.state_dir)
    lines = log.path.read_bytes().splitlines(keepends=True)
    lines[0] = lines[0].replace(b'"round":1', b'"round":7')
    log.path.write_bytes(b"".join(lines))
    before = log.path.read_bytes()
    fed.director_cfg = msgspec.structs.replace(fed.director_cfg, rounds=3)
    with pytest.raises(RoundLogError, match=r"line 1 is damaged \(checksum mismatch") as info:
        await _run(fed, resume=True)
    assert info.value.exit_code is ExitCode.STATE
    assert log.path.read_bytes() == before  # refused, nothing changed


async def test_a_corrupt_checkpoint_on_resume_is_refused_and_the_previous_one_is_intact(tmp_path):
    fed = await _completed(tmp_path, rounds=3)
    state = fed.director_cfg.state_dir
    path = tmp_path / "director" / ck.CHECKPOINT_NAME
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # a bit flip in the tensor data
    path.write_bytes(bytes(raw))
    fed.director_cfg = msgspec.structs.replace(fed.director_cfg, rounds=4)
    with pytest.raises(CheckpointError, match="checksum mismatch") as info:
        await _run(fed, resume=True)
    assert "round 2) is intact" in str(info.value)
    assert info.value.exit_code is ExitCode.STATE
    path.rename(path.with_name("corrupt.msgpack"))
    back = load_checkpoint(state)
    assert back.round == 2
    # The director resumes from round 2's model, but these envoys trained round 3 already and
    # never train a round twice (issue #11's ledger): they refuse it by name, the round fails,
    # nothing is applied, and the round log is cut back to the checkpoint.
    # One attempt: every envoy refuses, whatever the attempt.
    fed.director_cfg = msgspec.structs.replace(fed.director_cfg, max_attempts=1)
    assert await _resume(fed, rounds=4) == ExitCode.ROUND_FAILED
    assert all(t.calls == 3 for t in fed.trainers.values())
    for envoy in fed.envoys.values():
        assert any(r == 3 and "never trained twice" in why for r, why in envoy.refused)
    assert [r["round"] for r in fed.records()] == [1, 2]
    assert load_checkpoint(state).round == 2


@pytest.mark.parametrize(
    ("err", "words"),
    [(errno.ENOSPC, "No space left on device (ENOSPC)"), (errno.EROFS, "(EROFS)")],
)
async def test_a_disk_error_during_a_checkpoint_ends_the_director_cleanly(tmp_path, err, words):
    fed = make_fed(tmp_path, 3, secure=False, rounds=3)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    real = StateStore.save_checkpoint

    def disk_full_at_round_2(self, state):
        if state.round == 2:
            with FailingOs("write", cut=1000, err=err):
                return real(self, state)
        return real(self, state)

    StateStore.save_checkpoint = disk_full_at_round_2  # type: ignore[method-assign]
    director = fed.director()
    try:
        with pytest.raises(StateError) as info:
            await asyncio.wait_for(director.run(), 120)
    finally:
        StateStore.save_checkpoint = real  # type: ignore[method-assign]
    message = str(info.value)
    assert info.value.exit_code is ExitCode.STATE
    assert "checkpoint.msgpack: cannot save the checkpoint of round 2" in message
    assert words in message and "--resume" in message
    folder = tmp_path / "director"
    assert leftovers(folder) == []
    assert load_checkpoint(folder).round == 1
    status = json.loads((folder / "status.json").read_text())
    assert status["stage"] == "failed" and status["reason"] == message
    # The lock went with the director: a new one resumes on the same folder.
    fed.director_cfg = msgspec.structs.replace(fed.director_cfg, rounds=3)
    assert await _run(fed, resume=True) == 0
    await fed.stop()
    assert [r["round"] for r in fed.records()] == [1, 2, 3]


async def test_a_second_director_on_the_same_state_folder_is_refused(tmp_path):
    fed = make_fed(tmp_path, 3, secure=False, rounds=2)
    for name in fed.envoy_cfgs:
        fed.start_envoy(name)
    first = asyncio.create_task(fed.director().run())
    while not (tmp_path / "director" / "status.json").exists():
        await asyncio.sleep(0.01)
    with pytest.raises(StateError, match=rf"in use by another director \(pid {os.getpid()} on "):
        await fed.director(resume=True).run()
    assert await asyncio.wait_for(first, 120) == 0  # the first one was not disturbed
    await fed.stop()
    assert [r["round"] for r in fed.records()] == [1, 2]
