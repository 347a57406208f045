"""Test metrics of real `fedbus demo` runs over seeds: mean, SD, per seed, and a plot.

Each argument is a demo output folder (its report.json): 5 envoys as separate processes
over the bus, secure aggregation, the model chosen by federated validation AUC and the
threshold by the configured operating-point method on the summed validation histograms;
the test split is only scored. The wall time of each run comes from the demo's report.

`--methods` also scores every operating-point method on the same runs: the best model's
summed validation histograms (rebuilt exactly from the ROC counts in the director's
checkpoint) pick each method's threshold, and the best model's test scores are read at
it: the methods side by side on the federation's own models, nothing retrained.

    .venv/bin/python benchmarks/accuracy/demo_seeds.py runs/acc_r20_s0 runs/acc_r20_s1 \\
        runs/acc_r20_s2 --out benchmarks/accuracy/results/demo_seeds.json \\
        --plot benchmarks/accuracy/results/demo_seeds.png --methods youden,binormal
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from plot_seeds import TARGETS
from summarize import seed_stats

from broker.files import atomic_write_text

METRICS = ("auc", "accuracy", "sensitivity", "specificity")


def validation_histograms(val: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The summed (negative, positive) validation histograms behind a recorded ROC."""
    bins = int(val["bins"])
    neg_tail = np.rint(np.asarray(val["roc_fpr"], np.float64) * val["num_negative"])
    pos_tail = np.rint(np.asarray(val["roc_tpr"], np.float64) * val["num_positive"])
    neg = (neg_tail[:-1] - neg_tail[1:]).astype(np.int64)
    pos = (pos_tail[:-1] - pos_tail[1:]).astype(np.int64)
    assert neg.size == pos.size == bins and neg.min() >= 0 and pos.min() >= 0
    return neg, pos


def compare_methods(run: Path, methods: list[str], data: Path) -> dict[str, Any]:
    """Each method's threshold on the best model's validation histograms, scored on test."""
    import torch

    from node.checkpoint import load_checkpoint
    from node.config import load_director_config
    from node.models import build_configured_model
    from node.training.data import load_pneumoniamnist
    from node.training.metrics import roc_auc
    from node.training.operating_point import choose_operating_point, metrics_at
    from node.training.train import predict_scores
    from node.training.weights import set_weights

    torch.set_num_threads(1)
    cfg = load_director_config(run / "kits" / "director" / "director.toml")
    ckpt = load_checkpoint(run / "director")
    assert ckpt is not None and ckpt.best_metrics is not None
    neg, pos = validation_histograms(ckpt.best_metrics)
    model = build_configured_model(cfg.model)
    weights = ckpt.best_weights_numpy()
    assert weights is not None
    set_weights(model, weights)
    test = load_pneumoniamnist(data).test
    scores = predict_scores(model, test.images)
    labels = np.asarray(test.labels, np.int64).reshape(-1)
    out: dict[str, Any] = {"test_auc": float(roc_auc(scores, labels))}
    for method in methods:
        name, _, target = method.partition("@")
        params = {"target": float(target)} if target else {}
        point = choose_operating_point(neg, pos, name, **params)
        m = metrics_at(scores, labels, point.threshold)
        out[method] = {
            "threshold": point.threshold,
            "val": {"sensitivity": point.sensitivity, "specificity": point.specificity},
            "test": {k: m[k] for k in ("accuracy", "sensitivity", "specificity")},
        }
    return out


def run_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of one demo run that the seed table needs."""
    final = report["final"]
    test, val = final["test"], final["val"]
    return {
        "seed": report["seed"],
        "rounds": report["rounds_requested"],
        "seconds": report["seconds"],
        "best_round": final["best_round"],
        "operating_point": final["operating_point"],
        "threshold": final["threshold"],
        "test": {
            **{k: test[k] for k in METRICS},
            "sensitivity_ci": test.get("sensitivity_ci"),
            "specificity_ci": test.get("specificity_ci"),
            "confusion": test["confusion"],
        },
        "val": {k: val[k] for k in METRICS},
    }


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "seeds": [r["seed"] for r in runs],
        "operating_point": sorted({r["operating_point"] for r in runs}),
        "test": {k: seed_stats([r["test"][k] for r in runs]) for k in METRICS},
        "val": {k: seed_stats([r["val"][k] for r in runs]) for k in METRICS},
        "seconds": seed_stats([r["seconds"] for r in runs]),
        "targets": {k: {"target": t, "floor": f} for k, (t, f) in TARGETS.items()},
        "runs": runs,
    }


def plot(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.8))
    for ax, metric in zip(axes, METRICS, strict=True):
        values = np.asarray(summary["test"][metric]["values"], float)
        sd = values.std(ddof=1) if values.size > 1 else 0.0
        ax.bar(0, values.mean(), yerr=sd, width=0.6, alpha=0.4, capsize=6)
        ax.scatter(np.zeros(values.size), values, color="k", s=14, zorder=3)
        for seed, v in zip(summary["seeds"], values, strict=True):
            ax.annotate(f"s{seed}", (0.05, v), fontsize=7)
        target, floor = TARGETS[metric]
        ax.axhline(target, color="g", ls="--", lw=1, label=f"target {target}")
        if floor:
            ax.axhline(floor, color="r", ls=":", lw=1, label=f"floor {floor}")
        ax.set_title(f"test {metric}: {values.mean():.3f} ± {sd:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_xlim(-0.8, 0.8)
        ax.set_ylim(max(0.0, min(values.min(), target) - 0.05), 1.0)
        ax.legend(fontsize=7, loc="lower right")
    rounds = sorted({r["rounds"] for r in summary["runs"]})
    fig.suptitle(
        f"fedbus demo, 5 envoys, SecAgg + CVB, {rounds} rounds, seeds {summary['seeds']}, "
        f"threshold: {', '.join(summary['operating_point'])} on validation",
        fontsize=9,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="demo output folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument(
        "--methods", default="", help="comma list, e.g. youden,binormal,sensitivity@0.95"
    )
    p.add_argument(
        "--data", type=Path, default=Path(os.environ.get("FEDBUS_DATA", "pneumoniamnist.npz"))
    )
    args = p.parse_args(argv)
    runs = [run_summary(json.loads((d / "report.json").read_text())) for d in args.runs]
    summary = summarize_runs(runs)
    methods = [m for m in args.methods.split(",") if m]
    if methods:
        per_run = [compare_methods(d, methods, args.data) for d in args.runs]
        summary["methods"] = {
            m: {
                k: seed_stats([r[m]["test"][k] for r in per_run])
                for k in ("accuracy", "sensitivity", "specificity")
            }
            for m in methods
        }
        summary["methods_per_run"] = per_run
        for m in methods:
            row = summary["methods"][m]
            print(m, "  ".join(f"{k} {v['mean']:.4f} ± {v['sd']:.4f}" for k, v in row.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(summary, indent=1))
    for k in METRICS:
        s = summary["test"][k]
        print(f"test {k}: {s['mean']:.4f} ± {s['sd']:.4f}  {s['values']}")
    if args.plot:
        plot(summary, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
