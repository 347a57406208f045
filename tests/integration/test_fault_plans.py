"""The shipped fault plans (configs/faults/*.toml) as whole federations with real processes:
the ZeroMQ broker daemon, `fedbus director`, and seven light envoys (node.swarm), three
rounds, --audit, the plan's own seed (and a second one where it changes what happens). Lost
frames are re-requested (node.retransmit), so no envoy is missing that the plan did not crash
or cut off.

The plans' timelines are written for the 20-round demo; here they are compressed tenfold
(partitions and broker restarts land inside the three rounds) and start with the first round.
Whatever the plan does, every round must complete, secure, with its aggregate verified bit
for bit, and only an envoy the plan crashes or cuts off may be missing from a round.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.faults import FaultPlan
from node.demo.light import run_light_federation, scaled
from protocol.stages import CRASH_STAGES
from tests.datafiles import PNEUMONIAMNIST, REPO

pytestmark = pytest.mark.slow

PLANS = sorted((REPO / "configs" / "faults").glob("*.toml"))
# Seven, not the demo's five: the crash plan takes three envoys out over three rounds, and
# under the envoys' default policy (issue #11) a SecAgg round of three tolerates no dropout.
ENVOYS = 7
ROUNDS = 3
TIME_SCALE = 0.1
# Short stages: a light round takes about a second, and a lost message costs its stage.
DEADLINES = {f"deadlines.{stage}": 5.0 for stage in CRASH_STAGES} | {
    "deadlines.masked_input": 8.0,
    "deadlines.evaluate": 5.0,
    # A light round's stages answer in tens of milliseconds: a lost frame is re-sent sooner.
    "retry.first_s": 0.5,
}
# The processes need a few seconds (the director builds the model with torch) before round 1.
PLAN_LEAD_S = 4.0

# A second seed only where it changes what happens (which frames a crash or cut-off hits);
# one seed elsewhere keeps the suite short.
SECOND_SEED = {"dropouts"}
# Through Mosquitto as well where the transport changes what a fault does: lost frames are
# re-sent by the director and the envoys above MQTT's own QoS 1, and a broker restart drops
# the MQTT sessions.
ALSO_MQTT = {"lossy-links", "broker-restart"}


def _cases():
    for path in PLANS:
        seed = FaultPlan.load(path).seed
        seeds = (seed, seed + 100) if path.stem in SECOND_SEED else (seed,)
        for s in seeds:
            yield pytest.param(path, s, "zmq", id=f"{path.stem}-seed{s}")
        if path.stem in ALSO_MQTT:
            yield pytest.param(path, seed, "mqtt", id=f"{path.stem}-seed{seed}-mqtt")


def test_every_plan_is_covered():
    assert {p.stem for p in PLANS} == {
        "broker-restart",
        "chaos",
        "dropouts",
        "lossy-links",
        "partition",
    }


@pytest.mark.parametrize(("path", "seed", "transport"), list(_cases()))
def test_shipped_fault_plan_federation_is_secure_and_verified(
    tmp_path: Path, path, seed, transport
):
    plan = scaled(FaultPlan.load(path), TIME_SCALE, seed=seed)
    run = run_light_federation(
        tmp_path / "run",
        data=PNEUMONIAMNIST,
        envoys=ENVOYS,
        rounds=ROUNDS,
        transport=transport,
        plan=plan,
        train_seconds=0.5,
        director_set=DEADLINES,
        timeout_s=600.0,
        plan_lead_s=PLAN_LEAD_S,
    )
    director_log = run.log("director")[-4000:]
    assert run.returncode == 0, director_log
    records = run.records
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1)), director_log
    for rec in records:
        assert rec["secure"] is True
        assert rec["aggregate_verified"] is True, rec["round"]
        crashed = {c.envoy for c in plan.crashes if c.round <= rec["round"]}
        cut_off = {n for p in plan.partitions for n in p.nodes}
        missing = set(rec["dropped"]) | set(rec["left"])
        assert missing <= crashed | cut_off, (rec["round"], rec["fates"])
        # Every participant has a named fate.
        assert set(rec["fates"]) == set(rec["participants"])
