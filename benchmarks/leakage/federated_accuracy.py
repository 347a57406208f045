"""Test accuracy / AUC per defence from one federated training recipe.

Runs `fedbus demo` once per defence (none, cvb, precode) with everything else equal (the
director's default config: 5 envoys, Dirichlet label skew, secure aggregation, seed 0) and
collects the test metrics each run reports at the threshold chosen on validation:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leakage/federated_accuracy.py \\
        --rounds 20 --out benchmarks/leakage/results/federated_accuracy.json

`--collect DEFENSE=RUN_DIR` reads a finished demo's report.json instead of running it (the
run must have used the same recipe; its director config is checked for the defence).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFENSES = ("none", "cvb", "precode")
METRICS = ("accuracy", "auc", "sensitivity", "specificity", "f1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/pneumoniamnist.npz"))
    p.add_argument("--envoys", type=int, default=5)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm", choices=("batch", "group", "none"), default="batch")
    p.add_argument("--defenses", default=",".join(DEFENSES))
    p.add_argument("--collect", action="append", default=[], metavar="DEFENSE=RUN_DIR")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the demos write")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def run_demo(defense: str, args: argparse.Namespace, out: Path) -> Path:
    cmd = [
        sys.executable, "-m", "node.cli", "demo", "--envoys", str(args.envoys),
        "--rounds", str(args.rounds), "--seed", str(args.seed), "--data", args.data,
        "--set", f"model.defense={defense}", "--set", f"model.norm={args.norm}",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def read_run(defense: str, run_dir: Path) -> dict[str, Any]:
    with open(run_dir / "configs" / "director.toml", "rb") as f:
        model = tomllib.load(f).get("model", {})
    if model.get("defense") != defense:
        raise SystemExit(f"{run_dir}: trained with defense {model.get('defense')!r}, not {defense}")
    report = json.loads((run_dir / "report.json").read_text())
    final = report["final"]
    return {
        "run": str(run_dir),
        "model": model,
        "rounds": report["rounds_requested"],
        "envoys": report["envoys"],
        "seconds": report["seconds"],
        "best_round": final["best_round"],
        "threshold": final["threshold"],
        "test": {k: final["test"][k] for k in METRICS if k in final["test"]},
        "val": {k: final["val"][k] for k in METRICS if k in final["val"]},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    collected = dict(item.split("=", 1) for item in args.collect)
    results: dict[str, Any] = {}
    for defense in args.defenses.split(","):
        if defense in collected:
            run_dir = Path(collected[defense])
        else:
            run_dir = run_demo(defense, args, args.runs / f"federated-{args.norm}-{defense}")
        results[defense] = read_run(defense, run_dir)
    summary = {}
    if "none" in results:
        base = results["none"]["test"]
        for defense, r in results.items():
            summary[defense] = {
                "accuracy_cost_points": 100 * (base["accuracy"] - r["test"]["accuracy"]),
                "auc_cost": base["auc"] - r["test"]["auc"],
            }
    recipe = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc = {"recipe": recipe, "defenses": results, "cost": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(doc, indent=2) + "\n")
    tmp_out.replace(args.out)
    print("| defence | test ACC | AUC | cost vs none (ACC points / AUC) |")
    print("|---|---|---|---|")
    for defense, r in results.items():
        c = summary.get(defense, {})
        print(
            f"| {defense} | {r['test']['accuracy']:.3f} | {r['test']['auc']:.3f} | "
            f"{c.get('accuracy_cost_points', float('nan')):+.1f} / {c.get('auc_cost', float('nan')):+.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
