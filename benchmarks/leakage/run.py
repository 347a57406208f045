"""Leakage table: every attack x every defence, on the untrained and on a trained model.

For each defence (none, cvb, precode) the model is built with the same seed. The "trained"
state is the best model of a federated run (`--trained-from DEFENSE=RUN_DIR`, a `fedbus
demo` output such as benchmarks/leakage/federated_accuracy.py writes), or, for a defence
without one, a short centralised training with the envoys' own `train_local` on the
PneumoniaMNIST train split, scored on the test split at the threshold chosen on validation.
Each attack (ig, dlg, idlg, adaptive) then attacks the same victims (16 test images,
fixed seed) through `node.attack.run`, exactly what `fedbus attack` does.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leakage/run.py \\
        --ig-iterations 100 --lbfgs-steps 5 --epochs 1 \\
        --out benchmarks/leakage/results/leakage.json

Writes the JSON (every summary plus the accuracy / AUC per defence), a PNG figure next to
it, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node.attack import SMOOTH_RELU, AttackConfig, run  # noqa: E402
from node.training.data import load_pneumoniamnist  # noqa: E402
from node.training.metrics import (  # noqa: E402
    binary_metrics,
    metrics_from_histograms,
    score_histograms,
)
from node.training.model import build_model  # noqa: E402
from node.training.train import predict_scores, train_local  # noqa: E402
from node.training.weights import get_weights  # noqa: E402
from protocol.messages import TrainPlan  # noqa: E402

DEFENSES = ("none", "cvb", "precode")
ATTACKS = ("ig", "adaptive", "dlg", "idlg")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data", default=os.environ.get("FEDBUS_DATA", str(ROOT.parent / "shared/data"))
    )
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ig-iterations", type=int, default=100, help="IG / adaptive iterations")
    p.add_argument("--lbfgs-steps", type=int, default=5, help="DLG / iDLG L-BFGS steps")
    p.add_argument("--epochs", type=int, default=1, help="centralised training epochs")
    p.add_argument("--kl-beta", type=float, default=0.01)
    p.add_argument("--defenses", default=",".join(DEFENSES))
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--states", default="untrained,trained")
    p.add_argument("--norm", choices=("batch", "group", "none"), default="group")
    p.add_argument(
        "--trained-from",
        action="append",
        default=[],
        metavar="DEFENSE=RUN_DIR",
        help="the trained state of DEFENSE: the best model of this federated run",
    )
    p.add_argument("--workers", type=int, default=1, help="attack processes per row")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--render", action="store_true", help="only redraw the figure and table from --out"
    )
    return p.parse_args(argv)


def train(defense: str, args: argparse.Namespace, ds: Any) -> tuple[dict[str, np.ndarray], dict]:
    """Short centralised training with the envoy's recipe; test metrics at the val threshold."""
    model = build_model("cnn", defense, seed=args.seed, norm=args.norm)
    plan = TrainPlan(
        local_epochs=args.epochs, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4,
        kl_beta=args.kl_beta,
    )  # fmt: skip
    started = time.monotonic()
    train_local(model, ds.train.images, ds.train.labels, plan, seed=args.seed)
    val = predict_scores(model, ds.val.images)
    neg, pos = score_histograms(val, ds.val.labels, 100)
    threshold = float(metrics_from_histograms(neg, pos)["threshold"])
    test = binary_metrics(predict_scores(model, ds.test.images), ds.test.labels, threshold)
    metrics = {
        "test_accuracy": float(test["accuracy"]),
        "test_auc": float(test["auc"]),
        "threshold_from_val": threshold,
        "train_seconds": time.monotonic() - started,
        "recipe": f"centralised, {args.epochs} epoch(s), SGD lr 0.05 momentum 0.9, batch 32, "
        f"kl_beta {args.kl_beta}, augmentation on",
    }
    return get_weights(model), metrics


def federated_metrics(run_dir: Path) -> dict[str, Any]:
    """Test metrics of a `fedbus demo` run (its best round, threshold from validation)."""
    report = json.loads((run_dir / "report.json").read_text())
    final = report["final"]
    return {
        "test_accuracy": float(final["test"]["accuracy"]),
        "test_auc": float(final["test"]["auc"]),
        "threshold_from_val": float(final["threshold"]),
        "train_seconds": float(report["seconds"]),
        "recipe": f"federated: fedbus demo, {report['envoys']} envoys, "
        f"{report['rounds_requested']} rounds, best round {final['best_round']} ({run_dir})",
    }


def figure(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = sorted({r["state"] for r in results}, key=lambda s: s != "untrained")
    fig, axes = plt.subplots(1, len(states), figsize=(6 * len(states), 3.6), squeeze=False)
    for ax, state in zip(axes[0], states, strict=True):
        rows = [r for r in results if r["state"] == state]
        attacks = list(dict.fromkeys(r["attack"] for r in rows))
        defenses = list(dict.fromkeys(r["defense"] for r in rows))
        width = 0.8 / len(defenses)
        for j, d in enumerate(defenses):
            vals = [
                next(r["summary"]["psnr"] for r in rows if r["attack"] == a and r["defense"] == d)
                for a in attacks
            ]
            xs = np.arange(len(attacks)) + j * width
            bars = ax.bar(xs, vals, width, label=f"defence {d}")
            for b, a in zip(bars, attacks, strict=True):
                s = next(r["summary"] for r in rows if r["attack"] == a and r["defense"] == d)
                ax.annotate(
                    f"{s['identified_count']}/{s['images']}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=6,
                )  # fmt: skip
        base = float(np.mean([r["summary"]["baseline_psnr"] for r in rows]))
        ax.axhline(base, color="k", ls="--", lw=1, label=f"dataset-mean baseline {base:.1f} dB")
        ax.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks)
        ax.set_ylabel("mean PSNR (dB); label: identified")
        ax.set_title(f"{state} model")
        ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| model | attack | defence | mean PSNR (dB) | SSIM | identified | chance p | baseline (dB) | labels |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        s = r["summary"]
        lines.append(
            f"| {r['state']} | {r['attack']} | {r['defense']} | {s['psnr']:.2f} | {s['ssim']:.3f} | "
            f"{s['identified_count']}/{s['images']} | {s['chance_p_value']:.3g} | "
            f"{s['baseline_psnr']:.2f} | {100 * s['label_accuracy']:.0f}% |"
        )
    if report.get("accuracy"):
        lines += ["", "| defence | test accuracy | test AUC | recipe |", "|---|---|---|---|"]
        for d, m in report["accuracy"].items():
            lines.append(
                f"| {d} | {m['test_accuracy']:.3f} | {m['test_auc']:.3f} | {m['recipe']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.out.read_text())
        figure(report["results"], args.out.with_suffix(".png"))
        print(markdown(report))
        return 0
    torch.set_num_threads(1)
    defenses = args.defenses.split(",")
    attacks = args.attacks.split(",")
    states = args.states.split(",")
    ds = load_pneumoniamnist(args.data)
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    accuracy: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights_of: dict[str, str | None] = {}
        federated = dict(item.split("=", 1) for item in args.trained_from)
        for d in defenses:
            if "trained" in states and d in federated:
                weights_of[d] = str(Path(federated[d]) / "director")  # its checkpoint
                accuracy[d] = federated_metrics(Path(federated[d]))
            elif "trained" in states:
                w, m = train(d, args, ds)
                accuracy[d] = m
                weights_of[d] = os.path.join(tmp, f"{d}.npz")
                np.savez(weights_of[d], **w)
                print(
                    f"trained {d}: acc {m['test_accuracy']:.3f} auc {m['test_auc']:.3f}", flush=True
                )
        for state in states:
            for d in defenses:
                for a in attacks:
                    same = [
                        r
                        for r in results
                        if (r["state"], r["defense"], r["attack"]) == (state, d, "ig")
                    ]
                    if a == "adaptive" and d == "none" and same:
                        # Without a bottleneck the adaptive attack matches every layer: it is
                        # IG, same seeds, same result; the row is copied, not rerun.
                        results.append({**same[0], "attack": a, "same_as": "ig"})
                        continue
                    iters = args.ig_iterations if a in ("ig", "adaptive") else args.lbfgs_steps
                    cfg = AttackConfig(
                        defense=d, attack=a, images=args.images, seed=args.seed,
                        data=args.data, iterations=iters, kl_beta=args.kl_beta,
                        norm=args.norm, workers=args.workers,
                        trained=weights_of[d] if state == "trained" else None,
                        out=os.path.join(tmp, f"{state}-{d}-{a}"), quiet=True,
                    )  # fmt: skip
                    report = run(cfg)
                    s = report["summary"]
                    results.append({"state": state, "defense": d, "attack": a, "summary": s})
                    print(
                        f"{state:9s} {a:8s} vs {d:7s}: PSNR {s['psnr']:6.2f} "
                        f"(baseline {s['baseline_psnr']:.2f}) identified {s['identified_count']}/"
                        f"{s['images']} labels {s['label_accuracy']:.2f} {s['seconds']:.0f}s",
                        flush=True,
                    )
                    write_report(args, argv, accuracy, results, started, final=False)
    write_report(args, argv, accuracy, results, started, final=True)
    return 0


def write_report(
    args: argparse.Namespace,
    argv: list[str] | None,
    accuracy: dict[str, dict[str, Any]],
    results: list[dict[str, Any]],
    started: float,
    *,
    final: bool,
) -> None:
    """Write the JSON (after every row, so a cut run keeps what it measured) and, at the
    end, the figure and the markdown table."""
    out = {
        "benchmark": "leakage",
        "complete": final,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leakage/run.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "settings": {
            "images": args.images,
            "seed": args.seed,
            "ig_iterations": args.ig_iterations,
            "lbfgs_steps": args.lbfgs_steps,
            "threat": "single gradient, batch 1",
            "norm": args.norm,
            "kl_beta": args.kl_beta,
            "smooth_relu_ig_adaptive": SMOOTH_RELU,
        },
        "accuracy": accuracy,
        "results": results,
        "seconds": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.out.with_name(f".{args.out.name}.tmp")
    tmp_json.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp_json, args.out)
    if final:
        figure(results, args.out.with_suffix(".png"))
        print(markdown(out))


if __name__ == "__main__":
    raise SystemExit(main())
