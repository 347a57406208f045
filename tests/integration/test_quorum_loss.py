"""Quorum loss with real processes (issue #16 point 5): the ZeroMQ broker daemon, `fedbus
director` and three light envoys (node.swarm); two of them die (kill -9 style: the connection
drops without a goodbye, so the broker publishes their last will) in round 2. The director must
end with ExitCode.QUORUM_LOST and say why in status.json, not wait for envoys forever.
"""

from __future__ import annotations

import json

import pytest

from broker.faults import FaultPlan
from node.demo.light import run_light_federation
from node.errors import ExitCode
from node.status import format_status
from tests.datafiles import PNEUMONIAMNIST

pytestmark = pytest.mark.slow

QUORUM_TIMEOUT_S = 3.0


def test_two_of_three_envoys_killed_end_the_director_with_quorum_lost(tmp_path):
    plan = (
        FaultPlan(seed=1)
        .crash("envoy-1", round=2, stage="training")
        .crash("envoy-2", round=2, stage="training")
    )
    run = run_light_federation(
        tmp_path / "run",
        data=PNEUMONIAMNIST,
        envoys=3,
        rounds=3,
        plan=plan,
        director_set={"min_envoys": 2, "quorum_timeout_s": QUORUM_TIMEOUT_S},
        timeout_s=600.0,
    )
    director_log = run.log("director")[-4000:]
    assert run.returncode == ExitCode.QUORUM_LOST, director_log
    # Round 1 completed with all three, secure and verified; round 2 never did.
    assert [r["round"] for r in run.records] == [1], director_log
    assert run.records[0]["survivors"] == ["envoy-1", "envoy-2", "envoy-3"]
    assert run.records[0]["aggregate_verified"] is True
    status = json.loads((run.fed.director_state / "status.json").read_text())
    assert status["stage"] == "quorum_lost"
    reason = status["reason"]
    assert "1 envoys online (envoy-3), fewer than min_envoys 2" in reason
    assert f"quorum_timeout_s {QUORUM_TIMEOUT_S:g}" in reason
    assert {n for n, e in status["envoys"].items() if not e["online"]} >= {"envoy-1", "envoy-2"}
    assert f"stopped: {reason}" in format_status(status, run.records)
    # The log says it too, as one event with the documented code.
    failed = [
        json.loads(line) for line in run.log("director").splitlines() if "quorum_lost" in line
    ]
    assert any(e.get("exit_code") == ExitCode.QUORUM_LOST for e in failed)
