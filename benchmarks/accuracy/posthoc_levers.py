"""The levers that need no retraining, measured on a finished simulation's saved rounds.

Input: a `simulate_fedavg.py --out RUN.json --save-weights DIR` run. For the same
federation (same partition, rebuilt from the run's recipe) this evaluates candidate final
models:

* ``round-R``: the global model of round R (every round);
* ``swa-K``: the uniform average of the last K global models with BatchNorm statistics
  recomputed through the secure path: each envoy's `batchnorm_moments` on its own training
  images, quantised with the secure-aggregation encoder (weight = its image count), summed
  as the unmasked aggregate would be, decoded, and turned into running statistics by
  `running_stats_from_moments` (K = 1 is the final model, recalibrated);
* ``swaraw-K``: the same average keeping the averaged running statistics (no recompute);
* ``ens-K``: the ensemble (mean probability) of the last K global models;

each without and with flip test-time augmentation. For each candidate: federated
validation (summed per-class histograms: AUC, log loss), every operating-point method of
node/training/operating_point.py on those histograms with its leave-one-envoy-out transfer
score, and the test metrics at each method's threshold with Wilson intervals. Nothing here
chooses anything: `summarize.py` applies validation-only selection rules across seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/accuracy/posthoc_levers.py \\
        runs/base_s0.json runs/base_s0 --out benchmarks/accuracy/results/posthoc_base_s0.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from simulate_fedavg import federated_shares, model_from_recipe  # noqa: E402

from broker.files import atomic_write_text  # noqa: E402
from crypto.quantize import QuantizationRange, decode_weighted_sum, encode_weighted_update  # noqa: E402
from node.aggregation import SAMPLE_CAP  # noqa: E402
from node.training.averaging import average_weights  # noqa: E402
from node.training.batchnorm import (  # noqa: E402
    MOMENTS_CLIP,
    BatchNormLayout,
    batchnorm_moments,
    running_stats_from_moments,
)
from node.training.data import load_pneumoniamnist  # noqa: E402
from node.training.metrics import roc_auc, score_histograms  # noqa: E402
from node.training.operating_point import (  # noqa: E402
    METHODS,
    choose_operating_point,
    held_out_confusion,
    metrics_at,
)
from node.training.train import predict_logits  # noqa: E402
from node.training.weights import set_weights  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path, help="the simulation's result JSON")
    p.add_argument("weights", type=Path, help="its --save-weights folder")
    p.add_argument(
        "--data", default=os.environ.get("FEDBUS_DATA", str(ROOT.parent / "shared/data"))
    )
    p.add_argument("--ks", default="2,3,4,5,6,8,10", help="window sizes for swa and ensembles")
    p.add_argument("--targets", default="0.95,0.97", help="sensitivity targets to evaluate")
    p.add_argument("--bins", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def secure_batchnorm(
    model: torch.nn.Module, weights: dict[str, np.ndarray], trains: list[Any], seed: int
) -> dict[str, np.ndarray]:
    """`weights` with BatchNorm statistics recomputed as the federation would, SecAgg arithmetic included."""
    set_weights(model, weights)
    layout = BatchNormLayout.of(model)
    qrange = QuantizationRange(clip=MOMENTS_CLIP, max_summands=len(trains))
    rng = np.random.default_rng(seed)
    total = np.zeros(layout.size + 1, np.uint64)
    for train in trains:
        vector, n = batchnorm_moments(model, train.images)
        total += encode_weighted_update(
            vector, n, sample_cap=SAMPLE_CAP, qrange=qrange, rng=rng
        ).astype(np.uint64)
    total32 = (total % 2**32).astype(np.uint32)  # what unmasking the masked sum returns
    pooled, _ = decode_weighted_sum(
        total32, sample_cap=SAMPLE_CAP, qrange=qrange, summands=len(trains)
    )
    return running_stats_from_moments(weights, layout, pooled)


@torch.no_grad()
def probabilities(
    model: torch.nn.Module, weights: dict[str, np.ndarray], images: np.ndarray, tta: bool
) -> np.ndarray:
    set_weights(model, weights)
    logits = predict_logits(model, images, flip_tta=tta)
    return torch.softmax(logits.double(), dim=1)[:, 1].numpy()


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def assess(
    val_p: list[np.ndarray],
    val_y: list[np.ndarray],
    test_p: np.ndarray,
    test_y: np.ndarray,
    bins: int,
    targets: list[float],
) -> dict[str, Any]:
    """Federated validation figures and, per operating-point method, validation and test."""
    per_envoy = [score_histograms(p, y, bins) for p, y in zip(val_p, val_y, strict=True)]
    neg = sum(h[0] for h in per_envoy)
    pos = sum(h[1] for h in per_envoy)
    all_p, all_y = np.concatenate(val_p), np.concatenate(val_y)
    out: dict[str, Any] = {
        "val_auc_hist": float(_hist_auc(neg, pos)),
        "val_auc": roc_auc(all_p, all_y),
        "val_loss": log_loss(all_p, all_y),
        "test_auc": roc_auc(test_p, test_y),
        "test_loss": log_loss(test_p, test_y),
        "methods": {},
    }
    runs: list[tuple[str, str, dict[str, float]]] = []
    for method in METHODS:
        if method == "sensitivity":
            runs += [(f"sensitivity@{t:g}", method, {"target": t}) for t in targets]
        else:
            runs.append((method, method, {}))
    for label, method, params in runs:
        op = choose_operating_point(neg, pos, method, **params)
        test = metrics_at(test_p, test_y, op.threshold)
        loeo = held_out_confusion(per_envoy, method, **params)
        out["methods"][label] = {
            "threshold": op.threshold,
            "val": {
                "sensitivity": op.sensitivity,
                "specificity": op.specificity,
                "sensitivity_ci": list(op.sensitivity_ci),
                "specificity_ci": list(op.specificity_ci),
            },
            "loeo": {
                k: loeo[k]
                for k in ("sensitivity", "specificity", "balanced_accuracy", "threshold_logit_sd")
            },
            "test": {
                k: test[k]
                for k in (
                    "accuracy",
                    "sensitivity",
                    "specificity",
                    "balanced_accuracy",
                    "sensitivity_ci",
                    "specificity_ci",
                )
            },
        }
    return out


def _hist_auc(neg: np.ndarray, pos: np.ndarray) -> float:
    below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    return float(np.sum(pos * (below + 0.5 * neg)) / (neg.sum() * pos.sum()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run = json.loads(args.run.read_text())
    recipe = run["recipe"]
    ds = load_pneumoniamnist(args.data)
    shares = federated_shares(ds, recipe["envoys"], recipe["alpha"], recipe["seed"])
    trains = [t for t, _ in shares]
    vals = [v for _, v in shares]
    val_y = [np.asarray(v.labels, np.int64).reshape(-1) for v in vals]
    test_y = np.asarray(ds.test.labels, np.int64).reshape(-1)
    files = sorted(args.weights.glob("round-*.npz"))
    if not files:
        raise SystemExit(f"no round-*.npz in {args.weights}")
    rounds = [dict(np.load(f)) for f in files]
    model = model_from_recipe(recipe)
    ks = [int(k) for k in args.ks.split(",") if int(k) <= len(rounds)]
    targets = [float(t) for t in args.targets.split(",")]

    def predict(weights: dict[str, np.ndarray], tta: bool) -> tuple[list[np.ndarray], np.ndarray]:
        return (
            [probabilities(model, weights, v.images, tta) for v in vals],
            probabilities(model, weights, ds.test.images, tta),
        )

    candidates: dict[str, dict[str, Any]] = {}
    cache: dict[tuple[int, bool], tuple[list[np.ndarray], np.ndarray]] = {}
    tags = {False: "", True: "+tta"}
    for r, w in enumerate(rounds, start=1):
        for tta, sfx in tags.items():
            cache[r, tta] = predict(w, tta)
            candidates[f"round-{r}{sfx}"] = assess(
                *_pair(cache[r, tta], val_y, test_y), args.bins, targets
            )
    print(f"rounds done at {time.perf_counter() - started:.0f} s", flush=True)
    last = len(rounds)
    for k in [1, *ks]:
        avg = average_weights(rounds[-k:])
        # One secure batch-norm pass per window, shared by both evaluations.
        recal = secure_batchnorm(model, avg, trains, seed=recipe["seed"] * 7919 + k)
        for tta, sfx in tags.items():
            candidates[f"swa-{k}{sfx}"] = assess(
                *_pair(predict(recal, tta), val_y, test_y), args.bins, targets
            )
            if k == 1:
                continue
            candidates[f"swaraw-{k}{sfx}"] = assess(
                *_pair(predict(avg, tta), val_y, test_y), args.bins, targets
            )
            members = [cache[r, tta] for r in range(last - k + 1, last + 1)]
            val_mean = [np.mean([m[0][e] for m in members], 0) for e in range(len(vals))]
            test_mean = np.mean([m[1] for m in members], 0)
            candidates[f"ens-{k}{sfx}"] = assess(
                *_pair((val_mean, test_mean), val_y, test_y), args.bins, targets
            )
        print(f"window {k} done at {time.perf_counter() - started:.0f} s", flush=True)
    out = {
        "run": str(args.run),
        "recipe": recipe,
        "rounds": len(rounds),
        "ks": ks,
        "methods": sorted(next(iter(candidates.values()))["methods"]),
        "candidates": candidates,
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, separators=(",", ":"), default=_json_default))
    return 0


def _pair(
    pred: tuple[list[np.ndarray], np.ndarray], val_y: list[np.ndarray], test_y: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    return pred[0], val_y, pred[1], test_y


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    raise SystemExit(main())
