"""Scale and soak: many light envoys through one broker, with the real director and broker.

Every envoy is the production Envoy with its own bus connection (CurveZMQ or MQTT over TLS),
keys, SecAgg client and state folder; only training is synthetic (node.swarm), and up to
`--per-process` envoys share an OS process. The director is `fedbus director` with a tiny
real model (1574 weights), the broker the ZeroMQ daemon or Mosquitto, all on loopback, every
round secure (malicious-director SecAgg+) and audited bit for bit.

    # 50, 100 and 200 envoys, both transports, 3 rounds each
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/scale/run.py scale \
        --envoys 50,100,200 --transports zmq,mqtt --rounds 3
    # 200 rounds at 5 % message loss on every envoy's link
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/scale/run.py soak \
        --envoys 10 --rounds 200 --drop 0.05

Per run it samples, every second, the resident memory (VmRSS) and open file descriptors of
the director, the broker and the swarm processes, and reads afterwards: rounds completed and
verified, round seconds, and every drop anywhere (the broker's counted drops: ZeroMQ's
`broker_stopped` stats, Mosquitto's "Outgoing messages are being dropped" notices; the
clients' `subscription_full_dropping` events). Results: results/*.json and *.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.faults import FaultPlan  # noqa: E402
from node.demo.launcher import DIRECTOR, Federation  # noqa: E402
from node.demo.light import LightRun, run_light_federation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Generous stage deadlines: two shared cores carry hundreds of envoys' SecAgg work.
SCALE_DEADLINES = {f"deadlines.{s}": 300.0 for s in (
    "training", "advertise_keys", "share_keys", "masked_input", "consistency", "unmask", "evaluate"
)}  # fmt: skip


def _proc_stats(pid: int) -> tuple[int, int] | None:
    """(resident bytes, open file descriptors) of a live process."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None
    return rss, fds


def _watch(fed: Federation) -> dict[str, Any]:
    sample: dict[str, Any] = {"t": time.time()}
    for name, proc in fed.procs.items():
        if proc.popen.poll() is None:
            stats = _proc_stats(proc.pid)
            if stats is not None:
                sample[name] = {"rss": stats[0], "fds": stats[1]}
    try:
        status = json.loads((fed.director_state / "status.json").read_text())
        sample["round"] = status.get("round")
        sample["stage"] = status.get("stage")
        sample["completed"] = status.get("rounds_completed")
    except (OSError, ValueError):
        pass
    return sample


def _drops(run: LightRun) -> dict[str, int]:
    """Every frame dropped anywhere, from the logs."""
    out = {"broker": 0, "clients": 0}
    broker_log = run.log("broker")
    if run.fed.opts.transport == "zmq":
        for line in broker_log.splitlines():
            if "broker_stopped" in line or "broker_stats" in line:
                m = re.search(r'"?dropped"?[=:]\s*(\d+)', line)
                if m:
                    out["broker"] = max(out["broker"], int(m.group(1)))
        out["broker_backlogged"] = max(
            (int(m.group(1)) for m in re.finditer(r'"?backlogged"?[=:]\s*(\d+)', broker_log)),
            default=0,
        )
    else:
        out["broker"] = broker_log.count("Outgoing messages are being dropped")
    for name in run.fed.procs:
        if name == DIRECTOR or name.startswith("swarm-"):
            out["clients"] += run.log(name).count("subscription_full_dropping")
    return out


def _peak(samples: list[dict[str, Any]], name: str, key: str) -> int | None:
    values = [s[name][key] for s in samples if name in s]
    return max(values) if values else None


def _summary(run: LightRun, n: int, transport: str) -> dict[str, Any]:
    records = run.records
    seconds = [r["seconds"] for r in records]
    swarm_rss = [sum(v["rss"] for k, v in s.items() if k.startswith("swarm-")) for s in run.samples]
    return {
        "transport": transport,
        "envoys": n,
        "returncode": run.returncode,
        "rounds_completed": len(records),
        "all_secure_and_verified": bool(records)
        and all(r["secure"] and r["aggregate_verified"] is True for r in records),
        "survivors_per_round": [len(r["survivors"]) for r in records],
        "dropped_per_round": [len(r["dropped"]) for r in records],
        "round_seconds": seconds,
        "round_seconds_median": statistics.median(seconds) if seconds else None,
        "stage_seconds": [r.get("stage_seconds", {}) for r in records],
        "wall_seconds": round(run.seconds, 1),
        "drops": _drops(run),
        "director_peak_rss": _peak(run.samples, DIRECTOR, "rss"),
        "broker_peak_rss": _peak(run.samples, "broker", "rss"),
        "director_peak_fds": _peak(run.samples, DIRECTOR, "fds"),
        "broker_peak_fds": _peak(run.samples, "broker", "fds"),
        "swarm_peak_rss_total": max(swarm_rss) if swarm_rss else None,
    }


def _machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def scale(args: argparse.Namespace) -> None:
    out_json = RESULTS / "scale.json"
    results: list[dict[str, Any]] = []
    if out_json.exists() and args.resume:
        results = json.loads(out_json.read_text())["runs"]
    done = {(r["transport"], r["envoys"]) for r in results}
    for transport in args.transports.split(","):
        for n in (int(x) for x in args.envoys.split(",")):
            if (transport, n) in done:
                continue
            print(f"scale: {transport} {n} envoys", flush=True)
            run = run_light_federation(
                Path(args.work) / f"scale-{transport}-{n}",
                data=args.data,
                envoys=n,
                rounds=args.rounds,
                transport=transport,
                # A loaded machine can stall a process hosting 50 envoys for seconds: the
                # presence timeout must not mistake that for envoys leaving.
                director_set={
                    **SCALE_DEADLINES,
                    "quorum_timeout_s": 1800.0,
                    "heartbeat_timeout_s": 60.0,
                },
                timeout_s=args.timeout,
                per_process=args.per_process,
                swarm_log_level="warning",
                watch=_watch,
            )
            summary = _summary(run, n, transport)
            summary["samples"] = run.samples
            results.append(summary)
            print(json.dumps({k: v for k, v in summary.items() if k != "samples"}), flush=True)
            _write(out_json, {"machine": _machine(), "command": sys.argv, "runs": results})
    _plot_scale(results, RESULTS / "scale.png")


def soak(args: argparse.Namespace) -> None:
    plan = (
        FaultPlan(seed=args.seed)
        .link("*", drop=args.drop)
        # The director's own link stays clean until lost stage messages are re-requested
        # (issue #16 point 1): one lost broadcast would cost every envoy that stage.
        .link(DIRECTOR, drop=args.director_drop)
    )
    deadlines = {f"deadlines.{s}": args.stage_deadline for s in (
        "advertise_keys", "share_keys", "masked_input", "consistency", "unmask", "evaluate"
    )}  # fmt: skip
    run = run_light_federation(
        Path(args.work) / f"soak-{args.transport}-{args.envoys}",
        data=args.data,
        envoys=args.envoys,
        rounds=args.rounds,
        transport=args.transport,
        plan=plan,
        director_set={**deadlines, "max_attempts": 10, "quorum_timeout_s": 600.0},
        timeout_s=args.timeout,
        per_process=args.per_process,
        swarm_log_level="warning",
        watch=_watch,
        watch_every_s=2.0,
    )
    summary = _summary(run, args.envoys, args.transport)
    summary.update(
        drop=args.drop,
        director_drop=args.director_drop,
        attempts=[r.get("attempt", 0) for r in run.records],
        flatness=_flatness(run.samples),
        samples=run.samples,
    )
    _write(RESULTS / "soak.json", {"machine": _machine(), "command": sys.argv, **summary})
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}), flush=True)
    _plot_soak(summary, RESULTS / "soak.png")


def _flatness(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per process: RSS and fds over the first and the last fifth of the rounds, and the
    least-squares slope of RSS per completed round over the second half of the run."""
    out: dict[str, Any] = {}
    rounds = [s.get("completed") or 0 for s in samples]
    total = max(rounds, default=0)
    if total < 10:
        return out
    names = sorted({k for s in samples for k in s if isinstance(s.get(k), dict)})
    for name in names:
        points = [(s.get("completed") or 0, s[name]) for s in samples if name in s]
        first = [p for r, p in points if total * 0.1 <= r < total * 0.3]
        last = [p for r, p in points if r >= total * 0.8]
        half = [(r, p["rss"]) for r, p in points if r >= total / 2]
        slope = None
        if len(half) > 2:
            mx = statistics.fmean(r for r, _ in half)
            my = statistics.fmean(v for _, v in half)
            den = sum((r - mx) ** 2 for r, _ in half)
            slope = sum((r - mx) * (v - my) for r, v in half) / den if den else None
        if first and last:
            out[name] = {
                "rss_mean_rounds_10_30pct": statistics.fmean(p["rss"] for p in first),
                "rss_mean_last_20pct": statistics.fmean(p["rss"] for p in last),
                "fds_max_rounds_10_30pct": max(p["fds"] for p in first),
                "fds_max_last_20pct": max(p["fds"] for p in last),
                "rss_bytes_per_round_second_half": slope,
            }
    return out


def _write(path: Path, doc: dict[str, Any]) -> None:
    from broker.files import atomic_write_text

    atomic_write_text(path, json.dumps(doc, indent=1))


def _plot_scale(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from broker.files import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for transport, marker in (("zmq", "o"), ("mqtt", "s")):
        runs = sorted(
            (r for r in results if r["transport"] == transport), key=lambda r: r["envoys"]
        )
        if not runs:
            continue
        ns = [r["envoys"] for r in runs]
        ax1.plot(ns, [r["round_seconds_median"] for r in runs], marker + "-", label=transport)
        ax2.plot(
            ns, [r["director_peak_rss"] / 2**20 for r in runs], marker + "-",
            label=f"director ({transport})",
        )  # fmt: skip
        ax2.plot(
            ns, [r["broker_peak_rss"] / 2**20 for r in runs], marker + "--",
            label=f"broker ({transport})",
        )  # fmt: skip
    ax1.set_xlabel("envoys")
    ax1.set_ylabel("round wall time, median (s)")
    ax1.set_title("round time (2 shared cores)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.set_xlabel("envoys")
    ax2.set_ylabel("peak resident memory (MiB)")
    ax2.set_title("director and broker memory")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _plot_soak(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from broker.files import atomic_path

    samples = summary["samples"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in ((DIRECTOR, "-"), ("broker", "--"), ("swarm-1", ":")):
        pts = [(s.get("completed") or 0, s[name]) for s in samples if name in s]
        if not pts:
            continue
        ax1.plot([r for r, _ in pts], [p["rss"] / 2**20 for _, p in pts], style, label=name)
        ax2.plot([r for r, _ in pts], [p["fds"] for _, p in pts], style, label=name)
    ax1.set_xlabel("rounds completed")
    ax1.set_ylabel("resident memory (MiB)")
    ax1.set_title(f"soak: {summary['envoys']} envoys, {summary['drop']:.0%} loss")
    ax2.set_xlabel("rounds completed")
    ax2.set_ylabel("open file descriptors")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    for name in ("scale", "soak"):
        s = sub.add_parser(name)
        s.add_argument(
            "--data", default=os.environ.get("FEDBUS_DATA", "../shared/data/pneumoniamnist.npz")
        )
        s.add_argument("--work", default=str(ROOT / "runs" / "scale"), help="run folders")
        s.add_argument("--per-process", type=int, default=50, help="light envoys per process")
        s.add_argument("--timeout", type=float, default=7200.0)
    sc = sub.choices["scale"]
    sc.add_argument("--envoys", default="50,100,200")
    sc.add_argument("--transports", default="zmq,mqtt")
    sc.add_argument("--rounds", type=int, default=3)
    sc.add_argument("--resume", action="store_true", help="keep runs already in scale.json")
    so = sub.choices["soak"]
    so.add_argument("--envoys", type=int, default=10)
    so.add_argument("--rounds", type=int, default=200)
    so.add_argument("--transport", default="zmq")
    so.add_argument("--drop", type=float, default=0.05)
    so.add_argument("--director-drop", type=float, default=0.0)
    so.add_argument("--stage-deadline", type=float, default=2.0)
    so.add_argument("--seed", type=int, default=5)
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    scale(args) if args.mode == "scale" else soak(args)


if __name__ == "__main__":
    main()
