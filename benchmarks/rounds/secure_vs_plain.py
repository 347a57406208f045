"""Secure vs plain round wall time, side by side in one run (target, docs/architecture.md: <= 1.2 x).

Each configuration is a real `fedbus demo` federation (broker, director and envoys as
separate processes over loopback, CurveZMQ + Ed25519), same data, partition, seeds and
recipe; the only difference is `--insecure-plain-aggregation`. The runs alternate
(plain, secure, plain, secure, ...) so load drift on a shared machine hits both alike.
A round's seconds are the director's, from RoundStart to the end of federated evaluation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rounds/secure_vs_plain.py \
        --pairs 2 --envoys 5 --rounds 3 --out benchmarks/rounds/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node.demo.cli import parse_set_value  # noqa: E402
from node.demo.launcher import Federation, Options  # noqa: E402
from node.status import read_records  # noqa: E402


def one_run(out: Path, args: argparse.Namespace, plain: bool) -> list[dict]:
    sets = {k: parse_set_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    opts = Options(
        envoys=args.envoys,
        rounds=args.rounds,
        data=args.data,
        out=str(out),
        limit=args.limit,
        seed=args.seed,
        insecure_plain=plain,
        director_set=sets,
        quiet=True,
    )
    fed = Federation(opts)
    fed.resolve_data()
    fed.prepare()
    try:
        fed.start_all()
        rc = fed.procs["director"].popen.wait(3600)
        if rc != 0:
            raise SystemExit(f"director failed ({rc}); see {fed.procs['director'].log}")
    finally:
        fed.stop_all()
    return read_records(fed.director_state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data", default=os.environ.get("FEDBUS_DATA", str(ROOT.parent / "shared/data"))
    )
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--envoys", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    results: dict[str, list] = {"plain": [], "secure": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for mode in ("plain", "secure"):
                t0 = time.monotonic()
                recs = one_run(Path(tmp) / f"{mode}-{i}", args, plain=(mode == "plain"))
                results[mode].append(
                    {
                        "wall_s": round(time.monotonic() - t0, 1),
                        "rounds": [
                            {
                                "round": r["round"],
                                "seconds": r["seconds"],
                                "stages": r["stage_seconds"],
                            }
                            for r in recs
                        ],
                    }
                )
                print(mode, i, [r["seconds"] for r in recs], flush=True)
    summary = {}
    for mode, runs in results.items():
        secs = [r["seconds"] for run in runs for r in run["rounds"]]
        summary[mode] = {
            "median_round_s": statistics.median(secs),
            "mean_round_s": statistics.fmean(secs),
        }
    summary["ratio_median"] = (
        summary["secure"]["median_round_s"] / summary["plain"]["median_round_s"]
    )
    summary["ratio_mean"] = summary["secure"]["mean_round_s"] / summary["plain"]["mean_round_s"]
    secagg_stages = [
        sum(
            v
            for k, v in r["stages"].items()
            if k in ("advertise_keys", "share_keys", "consistency", "unmask")
        )
        for run in results["secure"]
        for r in run["rounds"]
    ]
    summary["secure_key_and_unmask_stages_median_s"] = statistics.median(secagg_stages)
    doc = {
        "command": " ".join(sys.argv),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_end": os.getloadavg(),
        },
        "config": vars(args) | {"out": str(args.out), "data": str(args.data)},
        "summary": summary,
        "runs": results,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
