"""In-process FedAvg on PneumoniaMNIST: the envoys' own training code, minus the bus.

Same data loader, partitioner (train split with `seed`, validation split with `seed + 1`,
as node/envoy.py does), local training, weight averaging and histogram metrics as the real
federation; what is missing is only the transport and secure aggregation, which change
no number (SecAgg's quantisation error is far below float32 training noise).

Each round: the global weights go to every envoy, each trains `local_epochs` on its share,
the director takes the sample-weighted average. Then the federated validation: every envoy
scores the global model on its validation share and returns per-class histograms, which
are summed. The model is chosen by validation AUC (all rounds), the decision threshold by
Youden's J on the same validation histograms; the test split is only read to report the
chosen model at that threshold (and, for the record, every round's test figures, which
played no part in any choice).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/accuracy/simulate_fedavg.py \\
        --defense cvb --out benchmarks/accuracy/results/cvb.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.files import atomic_write_text  # noqa: E402
from node.strategy import StrategyConfig, build_strategy, is_buffer_name  # noqa: E402
from node.training.data import load_pneumoniamnist  # noqa: E402
from node.training.metrics import binary_metrics, metrics_from_histograms  # noqa: E402
from node.training.model import build_model  # noqa: E402
from node.training.partition import select_partition  # noqa: E402
from node.training.train import evaluate, predict_scores, round_lr, train_local  # noqa: E402
from node.training.weights import get_weights, set_weights, subtract, weighted_average  # noqa: E402
from protocol.messages import TrainPlan  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data", default=os.environ.get("FEDBUS_DATA", str(ROOT.parent / "shared/data"))
    )
    p.add_argument("--envoys", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="partition and training seed")
    p.add_argument("--init-seed", type=int, default=None, help="initial weights (default: --seed)")
    p.add_argument("--arch", default="cnn")
    p.add_argument(
        "--defense", default="cvb", help="one or a comma list, run side by side: none,cvb"
    )
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=2, help="convolutions per stage of the CNN")
    p.add_argument("--norm", default="batch")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--kl-beta", type=float, default=0.01)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--class-weighting", default="balanced", choices=["balanced", "none"])
    p.add_argument("--max-grad-norm", type=float, default=5.0)
    p.add_argument("--augment-strength", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--prox-mu", type=float, default=0.0, help="FedProx proximal weight")
    p.add_argument(
        "--strategy", default="fedavg", choices=["fedavg", "fedavgm", "fedadam", "fedyogi"]
    )
    p.add_argument("--server-lr", type=float, default=None)
    p.add_argument("--server-momentum", type=float, default=0.9)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--tau", type=float, default=1e-3)
    p.add_argument("--flip-tta", action="store_true", help="flip test-time augmentation in eval")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--final-lr-fraction", type=float, default=0.05)
    p.add_argument(
        "--hold-rounds", type=int, default=0, help="last rounds at the final lr (an SWA tail)"
    )
    p.add_argument("--bins", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", action="store_true", help="one process per defence")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    p.add_argument(
        "--save-weights",
        type=Path,
        default=None,
        help="folder for every round's global weights (round-RRR.npz), for post-hoc levers",
    )
    return p.parse_args(argv)


def federated_shares(ds: Any, envoys: int, alpha: float, seed: int) -> list[tuple[Any, Any]]:
    """(train, validation) of each envoy, partitioned as node/envoy.py does."""
    shares = []
    for i in range(envoys):
        tr = select_partition(
            ds.train.labels,
            scheme="dirichlet",
            num_envoys=envoys,
            index=i,
            seed=seed,
            alpha=alpha,
        )
        va = select_partition(
            ds.val.labels,
            scheme="dirichlet",
            num_envoys=envoys,
            index=i,
            seed=seed + 1,
            alpha=alpha,
        )
        shares.append((ds.train.subset(tr), ds.val.subset(va)))
    return shares


def model_from_recipe(recipe: Any) -> torch.nn.Module:
    """The run's model at its initial weights (`recipe`: these args, or their JSON dict)."""
    get = recipe.get if isinstance(recipe, dict) else lambda k, d=None: getattr(recipe, k, d)
    init_seed = get("init_seed")
    return build_model(
        get("arch", "cnn"),
        get("defense", "cvb"),
        get("image_size", 28),
        width=get("width", 32),
        depth=get("depth", 2),
        norm=get("norm", "batch"),
        dropout=get("dropout", 0.0),
        seed=get("seed", 0) if init_seed is None else init_seed,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    ds = load_pneumoniamnist(args.data)
    shares = federated_shares(ds, args.envoys, args.alpha, args.seed)

    def new_model():
        return model_from_recipe(args)

    model = new_model()
    global_w = get_weights(model)
    strategy = build_strategy(
        StrategyConfig(
            name=args.strategy,
            server_lr=args.server_lr,
            momentum=args.server_momentum,
            beta1=args.beta1,
            beta2=args.beta2,
            tau=args.tau,
        ),
        buffers=[n for n in global_w if is_buffer_name(n)],
    )
    rounds: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    best_w = None
    started = time.perf_counter()
    train_seconds: list[float] = []
    for r in range(args.rounds):
        lr = round_lr(
            args.lr,
            r,
            args.rounds,
            schedule=args.schedule,
            final_fraction=args.final_lr_fraction,
            hold_rounds=args.hold_rounds,
        )
        plan = TrainPlan(
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            lr=lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            kl_beta=args.kl_beta,
            augment=not args.no_augment,
        )
        updates, counts, losses = [], [], []
        for i, (train, _) in enumerate(shares):
            set_weights(model, global_w)
            res = train_local(
                model,
                train.images,
                train.labels,
                plan,
                seed=args.seed * 100_003 + r * 101 + i,
                class_weighting=args.class_weighting,
                flip=not args.no_flip,
                max_grad_norm=args.max_grad_norm,
                augment_strength=args.augment_strength,
                label_smoothing=args.label_smoothing,
                prox_mu=args.prox_mu,
            )
            train_seconds.append(res.seconds)
            updates.append(subtract(get_weights(model), global_w))
            counts.append(res.num_samples)
            losses.append(res.loss)
        # What secure aggregation yields (the sample-weighted mean delta), then the server step.
        global_w = strategy.apply(global_w, weighted_average(updates, counts))
        set_weights(model, global_w)
        if args.save_weights is not None:
            args.save_weights.mkdir(parents=True, exist_ok=True)
            np.savez(args.save_weights / f"round-{r + 1:03d}.npz", **global_w)
        neg = np.zeros(args.bins, np.int64)
        pos = np.zeros(args.bins, np.int64)
        val_loss = 0.0
        for _, val in shares:
            ev = evaluate(model, val.images, val.labels, args.bins, flip_tta=args.flip_tta)
            neg += ev.hist_negative
            pos += ev.hist_positive
            val_loss += ev.loss_sum
        val = metrics_from_histograms(neg, pos)
        test_scores = predict_scores(model, ds.test.images, flip_tta=args.flip_tta)
        test = binary_metrics(test_scores, ds.test.labels, val["threshold"])
        row = {
            "defense": args.defense,
            "round": r + 1,
            "lr": lr,
            "train_loss": float(np.average(losses, weights=counts)),
            "val_loss": val_loss / len(ds.val),
            "val_auc": val["auc"],
            "val_threshold": val["threshold"],
            "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "test_accuracy": test["accuracy"],
            "test_auc": test["auc"],
            "test_accuracy_at_0.5": binary_metrics(test_scores, ds.test.labels, 0.5)["accuracy"],
        }
        rounds.append(row)
        print(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
            flush=True,
        )
        # Model selection on validation only: AUC, then lower validation loss.
        key = (round(val["auc"], 6), -row["val_loss"])
        if best is None or key >= best["key"]:
            best = {"key": key, "round": r + 1, "val": val, "test": test}
            best_w = global_w
    assert best is not None and best_w is not None
    val, test = best["val"], best["test"]
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "recipe": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("out", "data", "save_weights")
        },
        "params": n_params,
        "selected_round": best["round"],
        "selection": "max federated validation AUC (ties: lower validation loss); threshold: Youden J on validation",
        "val": {
            k: val[k]
            for k in (
                "auc",
                "threshold",
                "accuracy",
                "balanced_accuracy",
                "sensitivity",
                "specificity",
            )
        },
        "test": {
            k: test[k]
            for k in (
                "accuracy",
                "auc",
                "sensitivity",
                "specificity",
                "f1",
                "confusion",
                "threshold",
            )
        },
        "final_round_test": {k: rounds[-1][k] for k in ("test_accuracy", "test_auc")},
        "rounds": rounds,
        "seconds_total": time.perf_counter() - started,
        "seconds_per_envoy_round": {
            "mean": float(np.mean(train_seconds)),
            "max": float(np.max(train_seconds)),
        },
        "envoy_train_sizes": [len(t) for t, _ in shares],
        "envoy_train_pneumonia_fraction": [round(float(t.labels.mean()), 3) for t, _ in shares],
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    defenses = [d.strip() for d in args.defense.split(",") if d.strip()]
    runs = {}
    jobs = [argparse.Namespace(**{**vars(args), "defense": d}) for d in defenses]
    if args.parallel and len(jobs) > 1:
        # One process per defence, same time window: a shared, loaded machine slows both
        # alike, so their timings stay comparable, and the wall time halves on 2 cores.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(len(jobs), mp_context=ctx) as pool:
            results = list(pool.map(run, jobs))
    else:
        results = [run(job) for job in jobs]
    for defense, one in zip(defenses, results, strict=True):
        runs[defense] = one
        summary = {k: one[k] for k in ("selected_round", "val", "test", "final_round_test")}
        print(json.dumps({"defense": defense, **summary}, indent=1), flush=True)
    if len(runs) == 1:
        result = runs[defenses[0]]
    else:
        result = {
            "summary": {
                d: {
                    "test_accuracy": r["test"]["accuracy"],
                    "test_auc": r["test"]["auc"],
                    "selected_round": r["selected_round"],
                    "val_auc": r["val"]["auc"],
                }
                for d, r in runs.items()
            },
            "runs": runs,
        }
        if "none" in runs:
            base = runs["none"]["test"]
            result["accuracy_cost_vs_none"] = {
                d: {
                    "accuracy_points": 100 * (base["accuracy"] - r["test"]["accuracy"]),
                    "auc_points": 100 * (base["auc"] - r["test"]["auc"]),
                }
                for d, r in runs.items()
                if d != "none"
            }
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
