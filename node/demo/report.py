"""What the demo reports once the director is done: the audit, the final evaluation on the
test split, report.json and the plots.

The launcher holds the public test split (a real deployment reports federated validation
only): the best model by validation, with its validation threshold, is scored on it once, at
the end. With --audit every secure round is checked bit for bit: the director's unmasked sum
must equal the sum of the survivors' quantised updates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from broker.files import PUBLIC_MODE, atomic_path, atomic_write_text
from node.demo.launcher import DIRECTOR, DemoError, Federation

REPORT = "report.json"
# Per-round validation metrics keep their summary numbers; the ROC curve points go to the plot.
_CURVE_KEYS = ("roc_fpr", "roc_tpr")


# -- audit ------------------------------------------------------------------------------------


def audit_rounds(fed: Federation, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with aggregate_verified set on every secure round."""
    out = []
    for rec in records:
        rec = dict(rec)
        if rec.get("secure"):
            rec["aggregate_verified"] = _round_verified(fed, rec["round"])
        out.append(rec)
    return out


def _round_verified(fed: Federation, r: int) -> bool:
    """Unmasked sum == sum of the survivors' quantised inputs, mod 2^32."""
    folder = fed.director_state / "audit"
    try:
        total = np.load(folder / f"round-{r}-sum.npy")
        survivors = json.loads((folder / f"round-{r}-survivors.json").read_text())
        acc = np.zeros_like(total, dtype=np.uint32)
        for name in survivors:
            part = np.load(fed.envoy_state(name) / "audit" / f"round-{r}.npy")
            if part.shape != total.shape or part.dtype != np.uint32:
                return False
            acc += part  # uint32 arithmetic wraps mod 2^32, as the masking does
    except (OSError, ValueError):
        return False
    return bool(np.array_equal(acc, total))


# -- final evaluation ---------------------------------------------------------------------------


def final_evaluation(fed: Federation) -> dict[str, Any]:
    """The best-by-validation model and threshold, scored on the test split: PneumoniaMNIST's,
    or the one a team's loader returns ("test"); without one, `test` is None."""
    import torch

    from node.checkpoint import load_checkpoint
    from node.config import load_director_config
    from node.models import build_configured_model
    from node.training.weights import set_weights

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cfg = load_director_config(fed.config(DIRECTOR))
    ckpt = load_checkpoint(fed.director_state)
    if ckpt is None:
        raise DemoError("the director left no checkpoint")
    weights = ckpt.best_weights_numpy() or ckpt.weights_numpy()
    binary = cfg.model.num_classes == 2
    threshold = (
        (ckpt.best_threshold if ckpt.best_threshold is not None else 0.5) if binary else None
    )
    model = build_configured_model(cfg.model)
    set_weights(model, weights)
    val = {k: _plain(v) for k, v in (ckpt.best_metrics or {}).items()}
    out: dict[str, Any] = {
        "best_round": ckpt.best_round,
        "last_round": ckpt.round,
        "threshold": threshold,
        "operating_point": cfg.eval.operating_point if binary else "argmax",
        "test": None,
        "val": val,
    }
    predicted = _test_predictions(fed, model)
    if predicted is None:
        return out
    probabilities, labels = predicted
    out["test"], out["_test_roc"] = _test_metrics(
        probabilities, labels, threshold, class_names=cfg.model.classes
    )
    return out


def _test_predictions(fed: Federation, model: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(class probabilities, labels) of the test split, None when there is none."""
    import torch

    from node.config import load_envoy_config
    from node.localdata import call_loader
    from node.training.data import load_pneumoniamnist
    from node.training.train import predict_dataset, predict_logits

    if fed.custom_loader:
        splits = call_loader(load_envoy_config(fed.config(fed.names[0])).data)
        if "test" not in splits:
            return None
        logits, labels = predict_dataset(model, splits["test"])
    else:
        assert fed.data_path is not None
        test = load_pneumoniamnist(fed.data_path).test
        logits, labels = predict_logits(model, test.images), test.labels
    probabilities = torch.softmax(logits.double(), dim=1).numpy()
    return probabilities, np.asarray(labels, np.int64)


def _test_metrics(
    probabilities: np.ndarray,
    labels: np.ndarray,
    threshold: float | None,
    *,
    class_names: list[str] | None,
) -> tuple[dict[str, Any], tuple[list[float], list[float]]]:
    """Test metrics and the test ROC (the micro-average one for more than two classes)."""
    from node.training.histograms import histogram_vector, metrics_from_vector
    from node.training.metrics import roc_auc, roc_from_histograms, score_histograms
    from node.training.operating_point import metrics_at

    fine = 1000  # bins of the plotted curves and of the multi-class AUCs: all but exact
    classes = probabilities.shape[1]
    if classes == 2:
        assert threshold is not None
        scores = probabilities[:, 1]
        test = {k: _plain(v) for k, v in metrics_at(scores, labels, threshold).items()}
        test["auc"] = float(roc_auc(scores, labels))
        test["threshold"] = float(threshold)
        fpr, tpr = roc_from_histograms(*score_histograms(scores, labels, fine))
        roc = (fpr.tolist(), tpr.tolist())
    else:
        vector = histogram_vector(probabilities, labels, fine)
        full = metrics_from_vector(vector, classes, fine, class_names)
        roc = (full["roc_fpr"], full["roc_tpr"])
        test = {k: _plain(v) for k, v in _without_curves(full).items()}
    test["num_samples"] = len(labels)
    return test, roc


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


# -- plots ------------------------------------------------------------------------------------


def write_plots(out: Path, rounds: list[dict[str, Any]], final: dict[str, Any]) -> list[str]:
    """rounds.png (validation per round) and roc.png (test and validation ROC); the names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _plot_rounds(plt, out / "rounds.png", rounds, final)
    _plot_roc(plt, out / "roc.png", final)
    return ["rounds.png", "roc.png"]


def _plot_rounds(plt: Any, path: Path, rounds: list[dict[str, Any]], final: dict[str, Any]) -> None:
    xs = [r["round"] for r in rounds]
    vals = [((r.get("metrics") or {}).get("val") or {}) for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [v.get("accuracy", np.nan) for v in vals], "o-", label="val accuracy")
    ax.plot(xs, [v.get("auc", np.nan) for v in vals], "s-", label="val AUC")
    if final.get("best_round") is not None:
        ax.axvline(final["best_round"], color="grey", ls=":", label="best by validation")
    ax.set_xlabel("round")
    ax.set_ylim(0.4, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("federated validation per round")
    fig.tight_layout()
    _save(plt, fig, path)


def _plot_roc(plt: Any, path: Path, final: dict[str, Any]) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    t = final["test"]
    if t is not None:
        fpr, tpr = final["_test_roc"]
        micro = " micro-average" if t.get("num_classes", 2) > 2 else ""
        ax.plot(fpr, tpr, label=f"test{micro} (AUC {t['auc']:.3f})")
    if final["val"].get("roc_fpr"):
        ax.plot(
            final["val"]["roc_fpr"],
            final["val"]["roc_tpr"],
            "--",
            label=f"validation (AUC {final['val'].get('auc', float('nan')):.3f})",
        )
    if t is not None and final["threshold"] is not None:
        ax.plot(
            1 - t["specificity"],
            t["sensitivity"],
            "ko",
            label=f"threshold {final['threshold']:.2f}",
        )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right")
    ax.set_title(f"ROC, model of round {final.get('best_round')}")
    fig.tight_layout()
    _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> None:
    with atomic_path(path, mode=PUBLIC_MODE) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


# -- report.json ------------------------------------------------------------------------------


def _without_curves(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in metrics.items() if k not in _CURVE_KEYS}
    if isinstance(out.get("per_class"), list):
        out["per_class"] = [_without_curves(c) for c in out["per_class"]]
    return out


def _round_summary(rec: dict[str, Any]) -> dict[str, Any]:
    metrics = dict(rec.get("metrics") or {})
    if metrics.get("val"):
        metrics["val"] = _without_curves(metrics["val"])
    return {
        "round": rec["round"],
        "participants": rec["participants"],
        "survivors": rec["survivors"],
        "dropped": rec["dropped"],
        # In the sum, but gone before the round's end (after its masked input).
        "left": rec.get("left", []),
        # Every participant: survivor, dropped at a stage, or left at a stage.
        "fates": rec.get("fates", {}),
        "secure": rec["secure"],
        "aggregate_verified": rec.get("aggregate_verified"),
        "attempt": rec.get("attempt", 0),
        "metrics": metrics,
        "seconds": rec["seconds"],
        "stage_seconds": rec.get("stage_seconds", {}),
    }


def build_report(
    fed: Federation, rounds: list[dict[str, Any]], final: dict[str, Any], seconds: float
) -> dict[str, Any]:
    opts = fed.opts
    return {
        "envoys": opts.envoys,
        "rounds_requested": opts.rounds,
        "data": str(fed.data_path) if fed.data_path else "the envoys' own data.loader",
        "seed": opts.seed,
        "partition": {"scheme": opts.partition, "alpha": opts.alpha, "seed": opts.seed},
        "faults": opts.faults,
        "audit": opts.audit,
        "seconds": round(seconds, 1),
        "rounds": [_round_summary(r) for r in rounds],
        "privacy": privacy_report(fed),
        "final": {
            "best_round": final["best_round"],
            "threshold": final["threshold"],
            "operating_point": final["operating_point"],
            "test": final["test"],
            "val": _without_curves(final["val"]),
        },
    }


def privacy_report(fed: Federation) -> dict[str, Any] | None:
    """Each DP envoy's privacy ledger ([train.privacy], node.training.privacy): the
    accountant's (epsilon, delta) after every round it trained, and the worst epsilon of
    them all (the federation's guarantee is per envoy, each for its own records). None
    when no envoy trains with DP."""
    from node.training.privacy import LEDGER_NAME, read_ledger

    envoys: dict[str, Any] = {}
    for name in fed.names:
        ledger = read_ledger(fed.envoy_state(name) / LEDGER_NAME)
        if ledger is not None:
            envoys[name] = {
                k: ledger[k]
                for k in (
                    "epsilon", "own_epsilon", "delta", "accountant", "mode", "honest_envoys",
                    "noise_multiplier", "max_grad_norm", "rounds",
                )
            }  # fmt: skip
    if not envoys:
        return None
    return {
        "max_epsilon": max(e["epsilon"] for e in envoys.values()),
        "delta": max(e["delta"] for e in envoys.values()),
        "envoys": envoys,
    }


def write_report(out: Path, report: dict[str, Any]) -> Path:
    return atomic_write_text(out / REPORT, json.dumps(report, indent=1), mode=PUBLIC_MODE)
