"""The director's state folder and its presence book, without a bus."""

from __future__ import annotations

import json
import math
import stat

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from node.presence import Envoys, select_participants
from node.state import FederationState, StateStore
from node.status import read_status
from protocol.messages import Presence


def weights(value: float) -> dict[str, np.ndarray]:
    return {"a": np.full((2, 2), value, np.float32)}


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_of_the_state_folder_is_private_and_reads_back(tmp_path):
    store = StateStore(tmp_path, federation="f")
    store.lock()
    state = FederationState(0, weights(1.0))
    store.save_checkpoint(state)
    for r, x in ((1, [1]), (2, [])):
        state.round = r
        state.records.append({"round": r, "x": x})
        store.save_checkpoint(state)
        store.append_record(state.records[-1])
    state.consider_best(2, {"auc": 0.9, "threshold": 0.4})
    store.save_checkpoint(state)
    store.write_status({"round": 2, "stage": "round_end"})
    store.write_audit(2, np.arange(5, dtype=np.uint32), ["envoy-1", "envoy-2"])
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "checkpoint.msgpack",
        "checkpoint.prev.msgpack",
        "director.lock",
        "rounds.jsonl",
        "status.json",
        "audit/round-2-sum.npy",
        "audit/round-2-survivors.json",
    }
    assert all(mode(p) == 0o600 for p in written)
    assert mode(tmp_path / "audit") == 0o700  # issue #11: nobody else may even list it
    status, records = read_status(tmp_path)
    assert status == {"round": 2, "stage": "round_end"} and records == state.records
    np.testing.assert_array_equal(np.load(tmp_path / "audit" / "round-2-sum.npy"), np.arange(5))
    assert json.loads((tmp_path / "audit" / "round-2-survivors.json").read_text()) == [
        "envoy-1",
        "envoy-2",
    ]
    ckpt = store.load()
    assert ckpt is not None and ckpt.federation == "f" and ckpt.last_record == {"round": 2, "x": []}
    back = FederationState.from_checkpoint(ckpt, store.load_records(ckpt))
    assert back.round == 2 and back.records == state.records
    assert back.best is not None and back.best.round == 2 and back.best.threshold == 0.4
    np.testing.assert_array_equal(back.weights["a"], weights(1.0)["a"])
    store.unlock()


def test_the_best_model_is_the_best_validation_auc_so_far_and_a_copy():
    state = FederationState(0, weights(1.0))
    state.consider_best(1, None)
    state.consider_best(1, {"accuracy": 0.9})  # no AUC: cannot rank
    assert state.best is None
    state.consider_best(1, {"auc": 0.8, "threshold": 0.3})
    state.weights = weights(2.0)
    state.consider_best(2, {"auc": 0.7, "threshold": 0.2})
    assert state.best is not None and state.best.round == 1
    state.consider_best(3, {"auc": 0.8, "threshold": 0.5})  # a tie: the later model
    assert state.best.round == 3 and state.best.threshold == 0.5
    state.weights["a"][:] = 9.0
    np.testing.assert_array_equal(state.best.weights["a"], weights(2.0)["a"])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def presence(online: bool, stage: str = "", role: str = "envoy") -> Presence:
    return Presence(online=online, role=role, heartbeat_s=1.0, stage=stage)


def test_an_envoy_is_online_while_heard_from_and_members_only():
    clock = Clock()
    envoys = Envoys(heartbeat_timeout_s=10.0, members={"envoy-1", "envoy-2"}, clock=clock)
    envoys.saw("envoy-1")
    envoys.saw("mallory")  # not a member: never an envoy
    assert envoys.online() == ["envoy-1"]
    assert envoys.update("mallory", presence(True)) is False
    assert envoys.update("envoy-1", presence(False, role="director")) is False
    assert envoys.update("envoy-1", presence(True, stage="training")) is False  # no change
    assert envoys.update("envoy-1", presence(False)) is True
    assert envoys.online() == []
    envoys.update("envoy-1", presence(True))
    clock.now += 10.5
    assert envoys.online() == []  # silent for longer than the timeout
    envoys.saw("envoy-1")
    assert envoys.online() == ["envoy-1"]
    (only,) = envoys.describe().values()
    assert only["online"] is True and only["last_seen_s"] == 0.0 and only["stage"] == ""


@given(
    n=st.integers(min_value=1, max_value=30),
    participation=st.floats(min_value=0.01, max_value=1.0),
    min_envoys=st.integers(min_value=1, max_value=5),
    target=st.integers(min_value=1, max_value=40),
    attempt=st.integers(min_value=0, max_value=3),
)
def test_selection_is_a_seeded_sample_of_the_right_size(
    n, participation, min_envoys, target, attempt
):
    online = [f"envoy-{i}" for i in range(n)]
    kw = {
        "seed": 7,
        "round": 3,
        "min_envoys": min_envoys,
        "target_envoys": max(target, min_envoys),
        "participation": participation,
    }
    chosen = select_participants(online, attempt=attempt, **kw)
    assert chosen == select_participants(online, attempt=attempt, **kw)
    assert chosen == sorted(set(chosen)) and set(chosen) <= set(online)
    # The participation fraction, at least min_envoys, at most target_envoys and all online.
    want = min(max(min_envoys, math.ceil(participation * n)), kw["target_envoys"], n)
    assert len(chosen) == want
