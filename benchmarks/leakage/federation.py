"""In-process federations for the privacy measurements: defence cost, DP, trained weights.

The envoys' own code (PneumoniaMNIST loader, Dirichlet partitioner, ``train_local`` with
the director config's recipe, weighted FedAvg, federated histogram validation) without the
bus and secure aggregation, which change no number. One run = one federation of
``--envoys`` envoys over ``--rounds`` rounds; the best round (by validation AUC) and its
threshold (the config's ``[eval] operating_point``) are chosen on the summed validation
histograms, and the test split is read only to report them.

Per round it logs what the privacy work needs besides accuracy: the bottleneck's
signal-to-noise ratio (dB) on each envoy's training images, and under ``--dp-epsilon`` the
(epsilon, delta) each envoy's accountant has spent.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leakage/federation.py --defense cvb \\
        --seed 0 --out runs/fed/cvb-s0.json --save-weights runs/fed/cvb-s0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leakage/federation.py --defense cvb \\
        --norm group --dp-epsilon 3 --out runs/fed/dp3.json

DP (``--dp-epsilon E``): each envoy calibrates its noise multiplier so that its records
spend at most E (at ``--dp-delta``) over all rounds, given its own sampling rate
(``--dp-batch`` expected records per step) and steps; per-record clipping at
``--dp-clip``; no class weights (they would be a statistic of the private labels); the
model must not use batch norm. Each DP envoy reports FedAvg weight 1 (the envoy's public
``sample_weight`` default), not its record count. ``--dp-mode distributed``: one step a
round over all of an envoy's records (q = 1), each envoy adding 1/t of the noise variance
(``--dp-honest`` t, default every envoy), so that the sum carries the full noise; the
accountant composes that full noise (the guarantee holds under secure aggregation with t
honest survivors).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gradient_leakage.bottleneck import bottleneck_snr_db  # noqa: E402
from node.config import load_director_config, model_kwargs  # noqa: E402
from node.director import train_plan_for_round  # noqa: E402
from node.training.data import load_pneumoniamnist  # noqa: E402
from node.training.metrics import binary_metrics  # noqa: E402
from node.training.model import build_model  # noqa: E402
from node.training.operating_point import validation_metrics_at  # noqa: E402
from node.training.partition import select_partition  # noqa: E402
from node.training.privacy import (  # noqa: E402
    DPConfig,
    PrivacyAccountant,
    calibrate_noise,
)
from node.training.train import evaluate, predict_scores, train_local  # noqa: E402
from node.training.weights import get_weights, set_weights, weighted_average  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data", default=os.environ.get("FEDBUS_DATA", str(ROOT.parent / "shared/data"))
    )
    p.add_argument("--config", default=str(ROOT / "configs" / "director.toml"))
    p.add_argument("--defense", default=None, help="default: the config's")
    p.add_argument("--norm", default=None, help="default: the config's")
    p.add_argument("--width", type=int, default=None, help="default: the config's")
    p.add_argument("--envoys", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=None, help="default: the config's")
    p.add_argument("--seed", type=int, default=0, help="partition, training and init seed")
    p.add_argument("--bins", type=int, default=100)
    p.add_argument("--dp-epsilon", type=float, default=None)
    p.add_argument("--dp-delta", type=float, default=1e-5)
    p.add_argument("--dp-clip", type=float, default=1.0)
    p.add_argument("--dp-batch", type=int, default=128, help="expected records per DP step")
    p.add_argument(
        "--dp-lr", type=float, default=None, help="DP learning rate (default: the plan's)"
    )
    p.add_argument("--dp-accountant", choices=("rdp", "prv"), default="rdp")
    p.add_argument(
        "--dp-mode",
        choices=("local", "distributed"),
        default="local",
        help="distributed: one full-batch step a round, each envoy adding 1/t of the noise "
        "variance (sound only under secure aggregation with t honest survivors)",
    )
    p.add_argument("--dp-honest", type=int, default=None, help="t (default: all envoys)")
    p.add_argument(
        "--dp-published-counts",
        action="store_true",
        help="each DP envoy publishes its record count as its sample_weight (default: 1)",
    )
    p.add_argument("--save-weights", type=Path, default=None, help="folder: weights per round")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def shares(ds: Any, envoys: int, alpha: float, seed: int) -> list[tuple[Any, Any]]:
    """Each envoy's (train, val) split, cut as node/envoy.py cuts it."""
    out = []
    for i in range(envoys):
        tr = select_partition(
            ds.train.labels, scheme="dirichlet", num_envoys=envoys, index=i, seed=seed, alpha=alpha
        )
        va = select_partition(
            ds.val.labels,
            scheme="dirichlet",
            num_envoys=envoys,
            index=i,
            seed=seed + 1,
            alpha=alpha,
        )
        out.append((ds.train.subset(tr), ds.val.subset(va)))
    return out


def snr_on(model: torch.nn.Module, images: np.ndarray) -> float:
    """The bottleneck's SNR (dB) on up to 256 of an envoy's images, training mode."""
    was = model.training
    model.train()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(torch.from_numpy(images[:256].astype(np.float32) / 255.0)[:, None])
        return bottleneck_snr_db(model)
    finally:
        model.train(was)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    cfg = load_director_config(args.config)
    rounds = args.rounds or cfg.rounds
    kwargs = model_kwargs(cfg.model)
    if args.defense:
        kwargs["defense"] = args.defense
    if args.norm:
        kwargs["norm"] = args.norm
    if args.width:
        kwargs["width"] = args.width
    ds = load_pneumoniamnist(args.data)
    parts = shares(ds, args.envoys, args.alpha, args.seed)
    model = build_model(**kwargs, seed=args.seed)
    global_w = get_weights(model)
    dp_configs: list[DPConfig | None] = [None] * args.envoys
    accountants = [PrivacyAccountant(args.dp_accountant) for _ in range(args.envoys)]
    if args.dp_epsilon is not None:
        distributed = args.dp_mode == "distributed"
        honest = (args.dp_honest or args.envoys) if distributed else 1
        for i, (train, _) in enumerate(parts):
            # Distributed: every record is in the one step of every round (q = 1).
            q = 1.0 if distributed else min(1.0, args.dp_batch / len(train))
            steps = (1 if distributed else max(1, round(cfg.train.local_epochs / q))) * rounds
            sigma = calibrate_noise(
                args.dp_epsilon, delta=args.dp_delta, sample_rate=q, steps=steps,
                accountant=args.dp_accountant,
            )  # fmt: skip
            dp_configs[i] = DPConfig(
                noise_multiplier=sigma, max_grad_norm=args.dp_clip, sample_rate=q,
                delta=args.dp_delta, accountant=args.dp_accountant, mode=args.dp_mode,
                honest_envoys=honest,
            )  # fmt: skip
    if args.save_weights:
        args.save_weights.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for r in range(1, rounds + 1):
        plan = train_plan_for_round(cfg, r)
        if args.dp_epsilon is not None and args.dp_lr is not None:
            plan = msgspec.structs.replace(plan, lr=args.dp_lr * plan.lr / cfg.train.lr)
        updates, counts, losses, snrs, seconds = [], [], [], [], []
        for i, (train, _) in enumerate(parts):
            set_weights(model, global_w)
            snrs.append(snr_on(model, train.images))
            res = train_local(
                model, train.images, train.labels, plan,
                seed=args.seed * 100_003 + r * 101 + i, privacy=dp_configs[i],
            )  # fmt: skip
            if dp_configs[i] is not None:
                accountants[i].record(res.spend)
            updates.append(get_weights(model))
            # A DP envoy reports a public weight (its default 1), never its record count.
            published = dp_configs[i] is None or args.dp_published_counts
            counts.append(res.num_samples if published else 1)
            losses.append(res.loss)
            seconds.append(res.seconds)
        global_w = weighted_average(updates, counts)
        set_weights(model, global_w)
        neg = np.zeros(args.bins, np.int64)
        pos = np.zeros(args.bins, np.int64)
        for _, val in parts:
            ev = evaluate(model, val.images, val.labels, args.bins)
            neg += ev.hist_negative
            pos += ev.hist_positive
        val = validation_metrics_at(neg, pos, cfg.eval.operating_point)
        test_scores = predict_scores(model, ds.test.images)
        test = binary_metrics(test_scores, ds.test.labels, val["threshold"])
        row = {
            "round": r,
            "lr": plan.lr,
            "train_loss": float(np.average(losses, weights=counts)),
            "val_auc": float(val["auc"]),
            "val_threshold": float(val["threshold"]),
            "test_accuracy": float(test["accuracy"]),
            "test_auc": float(test["auc"]),
            "bottleneck_snr_db": [round(s, 3) for s in snrs],
            "seconds_per_envoy": [round(s, 2) for s in seconds],
        }
        if args.dp_epsilon is not None:
            row["epsilon"] = [round(a.epsilon(args.dp_delta), 4) for a in accountants]
        history.append(row)
        print(json.dumps(row), flush=True)
        if args.save_weights:
            np.savez(args.save_weights / f"round{r:03d}.npz", **global_w)
        if best is None or float(val["auc"]) >= best["val_auc"]:
            best = {"round": r, "val_auc": float(val["auc"]), "val": val, "test": test}
    assert best is not None
    out = {
        "benchmark": "leakage/federation",
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leakage/federation.py "
        + " ".join(sys.argv[1:]),
        "model": kwargs,
        "seed": args.seed,
        "envoys": args.envoys,
        "rounds": rounds,
        "envoy_train_sizes": [len(t) for t, _ in parts],
        "selected_round": best["round"],
        "selection": "max federated validation AUC (ties: the later round); threshold: the "
        f"config's operating point ({cfg.eval.operating_point}) on the validation histograms",
        "val": {k: _plain(best["val"][k]) for k in ("auc", "threshold", "accuracy")},
        "test": {
            k: _plain(best["test"][k]) for k in ("accuracy", "auc", "sensitivity", "specificity")
        },
        "rounds_log": history,
        "seconds": time.perf_counter() - started,
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
    }
    if args.dp_epsilon is not None:
        out["dp"] = {
            "target_epsilon": args.dp_epsilon,
            "delta": args.dp_delta,
            "accountant": args.dp_accountant,
            "clip": args.dp_clip,
            "expected_batch": args.dp_batch,
            "mode": args.dp_mode,
            "honest_envoys": dp_configs[0].honest_envoys if dp_configs[0] else None,
            "fedavg_weights": "record counts, published as sample_weight"
            if args.dp_published_counts
            else "1 per envoy (the envoy's default sample_weight)",
            "noise_multipliers": [c.noise_multiplier for c in dp_configs if c is not None],
            "sample_rates": [c.sample_rate for c in dp_configs if c is not None],
            "epsilon_spent": [a.epsilon(args.dp_delta) for a in accountants],
            "accountant_history": [a.history for a in accountants],
        }
    return out


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def main(argv: list[str] | None = None) -> int:
    from broker.files import atomic_write_text

    args = parse_args(argv)
    result = run(args)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    t = result["test"]
    print(
        f"selected round {result['selected_round']}: test ACC {t['accuracy']:.4f} AUC {t['auc']:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
