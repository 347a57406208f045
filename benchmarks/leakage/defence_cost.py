"""Accuracy cost of a defence over paired seeds, with a paired confidence interval.

Each seed is one federation per defence with everything else equal (partition, training
seeds, initial-weight seed): either one file of ``benchmarks/accuracy/simulate_fedavg.py
--defense none,cvb --seed S --init-seed S`` (both runs in it), or two files of
``benchmarks/leakage/federation.py --defense D --seed S`` (paired here by seed). The cost per seed is the difference of the test
metric of the model chosen on validation (test AUC, and test accuracy at the validation-
chosen threshold); its mean over seeds comes with a Student-t interval on the paired
differences, which removes what the seed does to both runs alike.

    .venv/bin/python benchmarks/leakage/defence_cost.py runs/defence-cost/seed*.json \\
        --out benchmarks/leakage/results/defence_cost.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METRICS = ("auc", "accuracy")


def paired_interval(differences: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of paired differences with its two-sided Student-t interval."""
    from scipy.stats import t

    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "sd": math.nan, "n": n}
    sd = float(d.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": n}


def load_pair(path: Path, defence: str, baseline: str) -> tuple[dict[str, float], dict[str, float]]:
    runs = json.loads(path.read_text())["runs"]
    if baseline not in runs or defence not in runs:
        raise SystemExit(f"{path}: needs runs of both {baseline} and {defence}")
    return runs[baseline]["test"], runs[defence]["test"]


def federation_pairs(
    files: list[Path], defence: str, baseline: str
) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """(label, baseline test, defence test) per seed from federation.py outputs."""
    by_seed: dict[int, dict[str, tuple[Path, dict[str, float]]]] = {}
    for f in files:
        doc = json.loads(f.read_text())
        runs = by_seed.setdefault(int(doc["seed"]), {})
        d = doc["model"]["defense"]
        if d in runs:
            raise SystemExit(f"{f}: a second {d} run of seed {doc['seed']} ({runs[d][0]})")
        runs[d] = (f, doc["test"])
    out = []
    for seed, runs in sorted(by_seed.items()):
        if baseline not in runs or defence not in runs:
            raise SystemExit(f"seed {seed}: needs runs of both {baseline} and {defence}")
        label = f"seed {seed}: {runs[baseline][0].name} vs {runs[defence][0].name}"
        out.append((label, runs[baseline][1], runs[defence][1]))
    return out


def pairs(
    files: list[Path], defence: str, baseline: str
) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """(label, baseline test, defence test) per seed, from either kind of file."""
    if all("runs" in json.loads(f.read_text()) for f in files):
        return [(f.name, *load_pair(f, defence, baseline)) for f in files]
    return federation_pairs(files, defence, baseline)


def summarise(files: list[Path], defence: str, baseline: str) -> dict[str, Any]:
    seeds = []
    for f, base, ours in pairs(files, defence, baseline):
        seeds.append(
            {
                "file": str(f),
                baseline: {m: float(base[m]) for m in METRICS},
                defence: {m: float(ours[m]) for m in METRICS},
                # cost = baseline - defence: positive means the defence loses
                "cost": {m: float(base[m]) - float(ours[m]) for m in METRICS},
            }
        )
    intervals = {m: paired_interval([s["cost"][m] for s in seeds]) for m in METRICS}
    return {
        "defence": defence,
        "baseline": baseline,
        "seeds": seeds,
        "cost": intervals,
        "targets": {"auc": 0.01, "accuracy": 0.01},
        "meets_target": {m: bool(intervals[m]["mean"] <= 0.01) for m in METRICS},
        "reading": "cost = baseline - defence on the test split (model and threshold chosen on "
        "validation); 95% Student-t interval on the paired differences",
    }


def markdown(doc: dict[str, Any]) -> str:
    d, b = doc["defence"], doc["baseline"]
    lines = [
        f"| seed file | {b} AUC | {d} AUC | {b} ACC | {d} ACC |",
        "|---|---|---|---|---|",
    ]
    for s in doc["seeds"]:
        lines.append(
            f"| {s['file']} | {s[b]['auc']:.4f} | {s[d]['auc']:.4f} | "
            f"{s[b]['accuracy']:.4f} | {s[d]['accuracy']:.4f} |"
        )
    lines.append("")
    for m in METRICS:
        c = doc["cost"][m]
        lines.append(
            f"{m} cost ({b} - {d}) over {c['n']} paired seeds: {c['mean']:+.4f} "
            f"(95% CI {c['low']:+.4f} to {c['high']:+.4f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from broker.files import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--defence", default="cvb")
    p.add_argument("--baseline", default="none")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    doc = summarise(sorted(args.files), args.defence, args.baseline)
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
