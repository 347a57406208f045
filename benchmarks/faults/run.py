"""The acceptance loop of issue #16: every shipped fault plan through `fedbus demo`.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/faults/run.py \
        --transports zmq,mqtt --timeout 600

For each transport: one fault-free run (the baseline), then one run per plan in
configs/faults, each `fedbus demo --envoys 5 --rounds 4 --audit --faults PLAN` with real
processes (broker, director, five envoys training the real model on PneumoniaMNIST). Then the
quorum-loss run: three envoys, two of them killed (-9 style, the plan's crash) in round 2,
min_envoys 2 and a short quorum_timeout_s; it must end non-zero (ExitCode.QUORUM_LOST)
within the bound.

Per run it records the exit code, each round's secure / verified flags, attempts, who was
dropped (and at which stage) against who the plan crashes or cuts off, and each round's wall
time against the baseline's median. Results: results/acceptance.json (appended run by run, so
a partial loop is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO))

from broker.faults import FaultPlan  # noqa: E402
from broker.files import atomic_write_text  # noqa: E402
from node.roundlog import read_records  # noqa: E402

PLANS = sorted((REPO / "configs" / "faults").glob("*.toml"))
QUORUM_PLAN = """# Two of three envoys die in round 2: below min_envoys for good.
seed = 1

[[crash]]
envoy = "envoy-1"
round = 2
stage = "training"

[[crash]]
envoy = "envoy-2"
round = 2
stage = "training"
"""


def demo(
    out: Path,
    *,
    transport: str,
    plan: Path | None,
    args: argparse.Namespace,
    envoys: int = 5,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    cmd = [
        str(REPO / ".venv" / "bin" / "fedbus"),
        "demo",
        "--envoys", str(envoys),
        "--rounds", str(args.rounds),
        "--audit",
        "--transport", transport,
        "--limit", str(args.limit),
        "--data", args.data,
        "--out", str(out),
        "--quiet",
        *(["--faults", str(plan)] if plan is not None else []),
        *extra,
    ]  # fmt: skip
    started = time.monotonic()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)  # the demo stops every process it started
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    wall = time.monotonic() - started
    # The demo's report holds the rounds with the audit's verdict (aggregate_verified); a demo
    # that failed writes none, and its director's round log is all there is.
    try:
        records = json.loads((out / "report.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        records = read_records(out / "director") if (out / "director").exists() else []
    status: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        status = json.loads((out / "director" / "status.json").read_text())
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return {
        "command": " ".join(c if c != cmd[0] else "fedbus" for c in cmd),
        "returncode": rc,  # None: killed at the timeout
        "wall_seconds": round(wall, 1),
        "reason": status.get("reason"),
        "records": [_round(r) for r in records],
        "director_events": _events(out / "logs" / "director.log"),
        "demo_output_tail": tail,
    }


def _events(log: Path) -> list[dict[str, Any]]:
    """The director's round-level events with their time, for the timeline of a run."""
    keep = {"round_start", "round_aborted", "round_failed", "presence", "quorum_lost", "failed",
            "director_failed", "waiting_for_envoys", "stage_deadline", "stage_closed_early"}  # fmt: skip
    out = []
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("event") in keep:
            out.append(
                {
                    k: ev.get(k)
                    for k in (
                        "timestamp",
                        "event",
                        "round",
                        "envoy",
                        "online",
                        "reason",
                        "exit_code",
                    )
                    if ev.get(k) is not None
                }
            )
    return out


def _round(rec: dict[str, Any]) -> dict[str, Any]:
    fates = rec.get("fates", {})
    return {
        "round": rec["round"],
        "attempt": rec.get("attempt", 0),
        "secure": rec.get("secure"),
        "verified": rec.get("aggregate_verified"),
        "survivors": len(rec["survivors"]),
        "dropped": {n: fates.get(n, {}).get("stage") for n in rec["dropped"]},
        "left": list(rec.get("left", [])),
        "seconds": rec["seconds"],
        # every attempt of the round (records before round_seconds existed: the last one)
        "round_seconds": rec.get("round_seconds", rec["seconds"]),
    }


def judge(run: dict[str, Any], plan: FaultPlan | None, base: list[float]) -> dict[str, Any]:
    """The issue's acceptance, per run: rc 0, every round secure and verified, nobody dropped
    that the plan did not crash or cut off, no round over twice the fault-free run's same
    round (round 1 includes the first model load and data, so rounds compare like for like)."""
    crashed = {c.envoy: c.round for c in plan.crashes} if plan else {}
    cut_off = {n for p in plan.partitions for n in p.nodes} if plan else set()
    unexplained = []
    for r in run["records"]:
        for name in [*r["dropped"], *r["left"]]:
            if not (name in cut_off or crashed.get(name, 1 << 30) <= r["round"]):
                unexplained.append((r["round"], name, r["dropped"].get(name, "left")))
    ratios = [
        round(r["round_seconds"] / base[r["round"] - 1], 2)
        for r in run["records"]
        if r["round"] <= len(base)
    ]
    return {
        "rounds_completed": len(run["records"]),
        "all_secure_and_verified": bool(run["records"])
        and all(r["secure"] and r["verified"] for r in run["records"]),
        "dropped_not_crashed": unexplained,
        "round_time_vs_fault_free": ratios,
        "max_ratio": max(ratios, default=None),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--transports", default="zmq,mqtt")
    p.add_argument("--plans", default="", help="comma-separated plan names (default: all)")
    p.add_argument("--rounds", type=int, default=4)
    # 0: every image, as the command (--limit 300 makes rounds of a few seconds, where
    # one re-send is a large share of the round).
    p.add_argument("--limit", type=int, default=0)
    p.add_argument(
        "--data", default=os.environ.get("FEDBUS_DATA", "../shared/data/pneumoniamnist.npz")
    )
    p.add_argument("--timeout", type=float, default=900.0, help="per demo run, seconds")
    p.add_argument("--quorum-timeout", type=float, default=20.0)
    p.add_argument("--skip-quorum", action="store_true")
    p.add_argument("--results", default="acceptance.json", help="file name under results/")
    p.add_argument("--work", default=str(REPO / "runs" / "acceptance"))
    args = p.parse_args()
    work = Path(args.work) / time.strftime("%H%M%S")
    out_json = RESULTS / args.results
    doc: dict[str, Any] = {"command": sys.argv, "load_average_start": os.getloadavg(), "runs": []}
    wanted = {n for n in args.plans.split(",") if n}
    plans = [q for q in PLANS if not wanted or q.stem in wanted]

    def save(entry: dict[str, Any]) -> None:
        doc["runs"].append(entry)
        doc["load_average_end"] = os.getloadavg()
        atomic_write_text(out_json, json.dumps(doc, indent=1))
        print(json.dumps({k: v for k, v in entry.items() if k != "demo_output_tail"}), flush=True)

    for transport in args.transports.split(","):
        base = demo(work / f"{transport}-fault-free", transport=transport, plan=None, args=args)
        base_s = [r["round_seconds"] for r in base["records"]]
        save({"transport": transport, "plan": None, **base, **judge(base, None, base_s)})
        for path in plans:
            plan = FaultPlan.load(path)
            run = demo(work / f"{transport}-{path.stem}", transport=transport, plan=path, args=args)
            save({"transport": transport, "plan": path.stem, **run, **judge(run, plan, base_s)})
    if not args.skip_quorum:
        plan_path = work / "quorum-loss.toml"
        plan_path.write_text(QUORUM_PLAN)
        bound = args.quorum_timeout
        run = demo(
            work / "quorum-loss",
            transport="zmq",
            plan=plan_path,
            args=args,
            envoys=3,
            extra=("--set", "min_envoys=2", "--set", f"quorum_timeout_s={bound}"),
        )
        save({"transport": "zmq", "plan": "quorum-loss", "quorum_timeout_s": bound, **run})


if __name__ == "__main__":
    main()
