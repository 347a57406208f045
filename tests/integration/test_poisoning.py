"""Poisoning envoys against the real director, broker and secure aggregation (issue #16
point 5; the guard itself is issue #11's: the envoy clips its update to the round's L2 bound
and names a non-finite update, the director refuses an out-of-range aggregate).

Light federations (node.demo.light): four envoys, one of them poisoning its update, two
rounds, ZeroMQ, --audit. The assertions are on what a hospital would see: exit code, fates,
the named events, and the global model read back from the director's checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node.checkpoint import PREVIOUS_NAME, decode_checkpoint, load_checkpoint
from node.demo.light import run_light_federation
from node.errors import ExitCode
from tests.datafiles import PNEUMONIAMNIST

pytestmark = pytest.mark.slow

ENVOYS = 4
ROUNDS = 2
POISONER = "envoy-3"
UPDATE_NORM = 50.0  # well above an honest synthetic update (~10), far below +1e6 per weight


def _events(log: str, name: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        if f'"{name}"' in line:
            ev = json.loads(line)
            if ev.get("event") == name:
                out.append(ev)
    return out


def _run(tmp_path: Path, poison: str, *, rounds: int = ROUNDS, **director_set: float | int):
    return run_light_federation(
        tmp_path / "run",
        data=PNEUMONIAMNIST,
        envoys=ENVOYS,
        rounds=rounds,
        poison={POISONER: poison},
        director_set={"secagg.update_norm": UPDATE_NORM, **director_set},
        timeout_s=600.0,
    )


def _weights(run) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The global model after the last round and after the one before (checkpoints)."""
    state = run.fed.director_state
    last = load_checkpoint(state)
    prev = decode_checkpoint((state / PREVIOUS_NAME).read_bytes(), source="prev")
    assert (prev.round, last.round) == (ROUNDS - 1, ROUNDS)
    return last.weights_numpy(), prev.weights_numpy()


def test_a_nan_update_is_a_named_envoy_error_and_the_round_goes_on(tmp_path):
    # The poisoner sends no masked input, so masked_input closes at its deadline: one round,
    # and a deadline short for a light round (about a second) but not racing one.
    run = _run(tmp_path, "nan", rounds=1, **{"deadlines.masked_input": 10.0})
    director_log = run.log("director")[-4000:]
    assert run.returncode == 0, director_log
    (rec,) = run.records
    assert rec["secure"] and rec["aggregate_verified"]
    # The poisoner's update is in no sum; the honest three are.
    assert rec["survivors"] == ["envoy-1", "envoy-2", "envoy-4"]
    assert rec["fates"][POISONER] == {"fate": "dropped", "stage": "masked_input"}
    errors = _events(run.log("swarm-1"), "update_not_finite")
    assert [(e["node"], e["round"]) for e in errors] == [(POISONER, 1)]
    weights = load_checkpoint(run.fed.director_state).weights_numpy()
    assert all(np.isfinite(w).all() for w in weights.values())


def test_a_huge_update_is_clipped_to_the_rounds_bound(tmp_path):
    run = _run(tmp_path, "add:1e6")
    director_log = run.log("director")[-4000:]
    assert run.returncode == 0, director_log
    for rec in run.records:
        assert rec["secure"] and rec["aggregate_verified"], rec["round"]
        assert rec["fates"][POISONER]["fate"] == "survivor"  # clipped, not refused
    clipped = _events(run.log("swarm-1"), "update_clipped")
    assert {e["node"] for e in clipped} == {POISONER}
    assert all(e["norm"] > 1e6 and e["bound"] == UPDATE_NORM for e in clipped)
    # The mean of updates of norm <= B has norm <= B: the round's step on the global model.
    last, prev = _weights(run)
    step = np.sqrt(sum(float(np.sum((last[k] - prev[k]).astype(np.float64) ** 2)) for k in last))
    assert step <= UPDATE_NORM * 1.001, step
    assert step > 0.0


def test_a_crafted_masked_vector_makes_the_director_refuse_the_aggregate(tmp_path):
    # The poisoner masks every update word at the quantiser's largest level (node.swarm.CRAFTED):
    # no envoy-side check sees it, secure aggregation hides whose it is, and the mean of the
    # unmasked sum is far longer than the round's bound allows.
    # One attempt: envoys that signed a survivor set sit out the round's later attempts
    # (issue #11), so a retry would only wait out its advertise_keys deadline.
    run = _run(tmp_path, "masked:max", rounds=1, max_attempts=1)
    director_log = run.log("director")
    assert run.returncode == ExitCode.ROUND_FAILED, director_log[-4000:]
    (refused,) = _events(director_log, "aggregate_out_of_range")
    assert "above the round's bound 50" in refused["reason"], refused
    assert [e["reason"] for e in _events(director_log, "round_aborted")] == ["aggregation failed"]
    # Never applied: no round completed, the checkpoint still holds the initial model.
    assert run.records == []
    assert load_checkpoint(run.fed.director_state).round == 0
