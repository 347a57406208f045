"""Plot test metrics over seeds for a few (rule, method) choices of `summarize.py` outputs.

One panel per metric (test AUC, accuracy, sensitivity, specificity): each seed a dot, the
mean a bar with its SD; the target and the acceptance floor of issue #15 as lines.

    .venv/bin/python benchmarks/accuracy/plot_seeds.py results/summary_base.json \\
        --pick "best-round:youden" --pick "swa-val:binormal" --out results/seeds_base.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

TARGETS = {
    "auc": (0.975, 0.965),
    "accuracy": (0.90, 0.88),
    "sensitivity": (0.95, None),
    "specificity": (0.80, None),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("summaries", type=Path, nargs="+", help="summarize.py JSON outputs")
    p.add_argument("--pick", action="append", required=True, help="RULE:METHOD (repeatable)")
    p.add_argument("--labels", default=None, help="comma list naming each summary")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    summaries = [json.loads(s.read_text()) for s in args.summaries]
    names = args.labels.split(",") if args.labels else [s.stem for s in args.summaries]
    series = []
    for name, summary in zip(names, summaries, strict=True):
        for pick in args.pick:
            rule, method = pick.split(":")
            row = summary["rules"][rule]
            per_seed = _per_seed(summary, rule, method)
            series.append((f"{name}\n{rule}\n{method}", row, per_seed))
    fig, axes = plt.subplots(1, 4, figsize=(4 * 4, 4.5))
    for ax, metric in zip(axes, ("auc", "accuracy", "sensitivity", "specificity"), strict=True):
        for i, (_label, _row, per_seed) in enumerate(series):
            values = np.asarray(per_seed[metric], float)
            ax.bar(
                i,
                values.mean(),
                yerr=values.std(ddof=1) if values.size > 1 else 0,
                alpha=0.4,
                capsize=4,
            )
            ax.scatter(np.full(values.size, i), values, color="k", s=12, zorder=3)
        target, floor = TARGETS[metric]
        ax.axhline(target, color="g", ls="--", lw=1, label="target")
        if floor:
            ax.axhline(floor, color="r", ls=":", lw=1, label="floor")
        ax.set_title(f"test {metric}")
        ax.set_xticks(range(len(series)), [s[0] for s in series], fontsize=6)
        lo = min(min(s[2][metric]) for s in series)
        ax.set_ylim(max(0.0, min(lo, target) - 0.03), 1.0)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"seeds {summaries[0]['seeds']}: model and threshold chosen on validation only")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    return 0


def _per_seed(summary: dict, rule: str, method: str) -> dict[str, list[float]]:
    row = summary["rules"][rule]
    m = row["methods"][method]
    return {
        "auc": row["test_auc"]["values"],
        "accuracy": m["test_accuracy"]["values"],
        "sensitivity": m["test_sensitivity"]["values"],
        "specificity": m["test_specificity"]["values"],
    }


if __name__ == "__main__":
    raise SystemExit(main())
