"""Accuracy under record-level DP beside the non-private runs: a table, a JSON and a plot.

Takes ``federation.py`` outputs (DP runs at several epsilons, in local and distributed
mode, and the non-private runs they are compared with), reads for each the round chosen
on validation and its test metrics, and writes ``--out`` (JSON), the Markdown table to
stdout, and ``--out`` with ``.png``: test AUC against epsilon per mode, with the
non-private runs as horizontal lines, and each run's validation AUC per round.

    .venv/bin/python benchmarks/leakage/dp_accuracy.py runs/dp/*.json \\
        --out benchmarks/leakage/results/dp_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def summarise_run(path: Path) -> dict[str, Any]:
    """One federation: its privacy setting, the chosen round and what it scores."""
    doc = json.loads(path.read_text())
    dp = doc.get("dp")
    row: dict[str, Any] = {
        "file": path.name,
        "model": doc["model"],
        "rounds": doc["rounds"],
        "mode": dp["mode"] if dp else "non-private",
        "target_epsilon": dp["target_epsilon"] if dp else math.inf,
        "epsilon_spent": max(dp["epsilon_spent"]) if dp else math.inf,
        "noise_multipliers": dp["noise_multipliers"] if dp else [],
        "selected_round": doc["selected_round"],
        "val_auc": doc["val"]["auc"],
        "test": doc["test"],
        "val_auc_per_round": [r["val_auc"] for r in doc["rounds_log"]],
        "lr": doc["rounds_log"][0]["lr"],
        "command": doc["command"],
    }
    return row


def order(row: dict[str, Any]) -> tuple[int, float, int]:
    modes = {"non-private": 0, "distributed": 1, "local": 2}
    return (modes.get(row["mode"], 3), row["target_epsilon"], -row["model"]["width"])


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | model | mode | epsilon (target / spent, max over envoys) | noise sigma | "
        "first-round lr | chosen round | val AUC | test AUC | test ACC | sensitivity | "
        "specificity |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["model"]
        model = f"width {m['width']}, {m['norm']} norm, {m['defense']}"
        if r["mode"] == "non-private":
            eps, sigma = "-", "-"
        else:
            eps = f"{r['target_epsilon']:g} / {r['epsilon_spent']:.2f}"
            s = r["noise_multipliers"]
            sigma = f"{min(s):.2f}" if max(s) - min(s) < 0.005 else f"{min(s):.2f}-{max(s):.2f}"
        t = r["test"]
        lines.append(
            f"| {r['file']} | {model} | {r['mode']} | {eps} | {sigma} | {r['lr']:g} | "
            f"{r['selected_round']} / {r['rounds']} | {r['val_auc']:.3f} | {t['auc']:.3f} | "
            f"{t['accuracy']:.3f} | {t['sensitivity']:.3f} | {t['specificity']:.3f} |"
        )
    return "\n".join(lines)


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from broker.files import atomic_write_bytes

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, marker in (("distributed", "o"), ("local", "s")):
        pts = sorted((r["target_epsilon"], r["test"]["auc"]) for r in rows if r["mode"] == mode)
        if pts:
            left.plot(*zip(*pts, strict=True), marker=marker, label=f"DP, {mode} mode")
    for r in rows:
        if r["mode"] == "non-private":
            m = r["model"]
            left.axhline(
                r["test"]["auc"],
                ls="--" if m["width"] != 32 else ":",
                color="grey" if m["width"] != 32 else "black",
                label=f"non-private, width {m['width']} {m['norm']} norm",
            )
    left.axhline(0.5, color="red", lw=0.8, label="chance")
    left.set_xscale("log")
    left.set_xlabel("epsilon (delta 1e-5), 20 rounds")
    left.set_ylabel("test AUC (round chosen on validation)")
    left.set_ylim(0.4, 1.0)
    left.legend(fontsize=7, loc="lower right")
    left.set_title("Accuracy under record-level DP")
    for r in rows:
        eps = "" if r["mode"] == "non-private" else f" eps {r['target_epsilon']:g}"
        label = f"{r['mode']}{eps}, width {r['model']['width']}"
        right.plot(range(1, len(r["val_auc_per_round"]) + 1), r["val_auc_per_round"], label=label)
    right.set_xlabel("round")
    right.set_ylabel("federated validation AUC")
    right.set_ylim(0.4, 1.0)
    right.legend(fontsize=6, loc="lower right")
    right.set_title("Validation AUC per round")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    from broker.files import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows = sorted((summarise_run(f) for f in args.files), key=order)
    doc = {
        "benchmark": "leakage/dp_accuracy",
        "reading": "each run's round and threshold chosen on the federated validation "
        "histograms; the test split only reports them",
        "runs": rows,
    }
    atomic_write_text(args.out, json.dumps(doc, indent=1, default=str) + "\n")
    figure(rows, args.out.with_suffix(".png"))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
