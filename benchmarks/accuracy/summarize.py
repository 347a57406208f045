"""Across seeds: apply validation-only selection rules to `posthoc_levers.py` outputs, report test.

A selection rule picks one candidate model per run using validation figures only:

* ``best-round``: the round with the highest federated validation AUC (ties: lower
  validation loss), the federation's rule so far;
* ``final``: the last round;
* ``swa-K`` / ``ens-K`` / ``swaraw-K``: the fixed window K (see posthoc_levers.py);
* ``swa-val`` / ``ens-val``: the window K whose model has the best validation criterion;

each as is and with flip TTA (``+tta``), and ``...+tta-val`` letting validation decide
whether to use TTA. For every rule and operating-point method the table gives the mean and
sample SD over runs of test AUC, accuracy, sensitivity and specificity, and, to choose by,
the validation AUC and loss and the leave-one-envoy-out balanced accuracy of the method.

    .venv/bin/python benchmarks/accuracy/summarize.py results/posthoc_base_s*.json \\
        --out results/summary_base.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from broker.files import atomic_write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("posthoc", type=Path, nargs="+")
    p.add_argument(
        "--criterion",
        choices=["auc", "loss"],
        default="auc",
        help="validation figure that picks rounds and windows (ties: the other)",
    )
    p.add_argument("--methods", default=None, help="comma list (default: every method)")
    p.add_argument("--rules", default=None, help="comma list of rules to print (default: all)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _key(c: dict[str, Any], criterion: str) -> tuple[float, float]:
    auc, loss = round(c["val_auc_hist"], 6), c["val_loss"]
    return (auc, -loss) if criterion == "auc" else (-loss, auc)


def _best(cands: dict[str, Any], names: list[str], criterion: str) -> str:
    return max(names, key=lambda n: _key(cands[n], criterion))


def rules_for(post: dict[str, Any], criterion: str) -> dict[str, str]:
    """Rule name -> the candidate it picks in this run (validation only)."""
    cands = post["candidates"]
    rounds = post["rounds"]
    out: dict[str, str] = {}
    for sfx in ("", "+tta"):
        out[f"best-round{sfx}"] = _best(
            cands, [f"round-{r}{sfx}" for r in range(1, rounds + 1)], criterion
        )
        out[f"final{sfx}"] = f"round-{rounds}{sfx}"
        for k in [1, *post["ks"]]:
            out[f"swa-{k}{sfx}"] = f"swa-{k}{sfx}"
            if k > 1:
                out[f"ens-{k}{sfx}"] = f"ens-{k}{sfx}"
                out[f"swaraw-{k}{sfx}"] = f"swaraw-{k}{sfx}"
        out[f"swa-val{sfx}"] = _best(cands, [f"swa-{k}{sfx}" for k in [1, *post["ks"]]], criterion)
        out[f"ens-val{sfx}"] = _best(cands, [f"ens-{k}{sfx}" for k in post["ks"]], criterion)
    for base in ("best-round", "final", "swa-val", "ens-val"):
        out[f"{base}+tta-val"] = _best(cands, [out[base], out[f"{base}+tta"]], criterion)
    return out


def seed_stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    if arr.size == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    return {
        "mean": float(arr.mean()),
        "sd": float(arr.std(ddof=1)) if arr.size > 1 else math.nan,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": int(arr.size),
        "values": arr.tolist(),
    }


def summarize(posts: list[dict[str, Any]], criterion: str) -> dict[str, Any]:
    chosen = [rules_for(p, criterion) for p in posts]
    methods = posts[0]["methods"]
    table: dict[str, Any] = {}
    for rule in chosen[0]:
        row: dict[str, Any] = {"picked": [c[rule] for c in chosen]}
        cands = [p["candidates"][c[rule]] for p, c in zip(posts, chosen, strict=True)]
        row["test_auc"] = seed_stats([c["test_auc"] for c in cands])
        row["val_auc"] = seed_stats([c["val_auc_hist"] for c in cands])
        row["val_loss"] = seed_stats([c["val_loss"] for c in cands])
        row["methods"] = {}
        for m in methods:
            ms = [c["methods"][m] for c in cands]
            row["methods"][m] = {
                "threshold": [x["threshold"] for x in ms],
                **{
                    f"test_{k}": seed_stats([x["test"][k] for x in ms])
                    for k in ("accuracy", "sensitivity", "specificity", "balanced_accuracy")
                },
                **{
                    f"val_{k}": seed_stats([x["val"][k] for x in ms])
                    for k in ("sensitivity", "specificity")
                },
                **{
                    f"loeo_{k}": seed_stats([x["loeo"][k] for x in ms])
                    for k in (
                        "balanced_accuracy",
                        "sensitivity",
                        "specificity",
                        "threshold_logit_sd",
                    )
                },
            }
        table[rule] = row
    return {
        "runs": [p["run"] for p in posts],
        "seeds": [p["recipe"]["seed"] for p in posts],
        "criterion": criterion,
        "rules": table,
    }


def _fmt(s: dict[str, float], digits: int = 3) -> str:
    if s["n"] == 0:
        return "-"
    sd = "" if math.isnan(s["sd"]) else f"±{s['sd']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{sd}"


def print_table(summary: dict[str, Any], methods: list[str], rules: list[str] | None) -> None:
    print(f"seeds {summary['seeds']}, selection by validation {summary['criterion']}")
    header = "rule | method | val AUC | val loss | LOEO bal.acc | test AUC | test ACC | test sens | test spec"
    print(header)
    for rule, row in summary["rules"].items():
        if rules and rule not in rules:
            continue
        for m in methods:
            r = row["methods"][m]
            print(
                " | ".join(
                    [
                        rule,
                        m,
                        _fmt(row["val_auc"], 4),
                        _fmt(row["val_loss"]),
                        _fmt(r["loeo_balanced_accuracy"]),
                        _fmt(row["test_auc"], 4),
                        _fmt(r["test_accuracy"]),
                        _fmt(r["test_sensitivity"]),
                        _fmt(r["test_specificity"]),
                    ]
                )
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    posts = [json.loads(p.read_text()) for p in args.posthoc]
    summary = summarize(posts, args.criterion)
    methods = args.methods.split(",") if args.methods else posts[0]["methods"]
    print_table(summary, methods, args.rules.split(",") if args.rules else None)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
