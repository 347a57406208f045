"""Seconds of one envoy's local round (940 images, the mean 5-envoy share) on one core.

Side by side in one run: every defence with the same recipe, plus the load average, since
the build machine's 2 cores are shared and a loaded run is slower than an idle one.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/accuracy/time_local_round.py \\
        --out benchmarks/accuracy/results/local_round_seconds.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node.training.data import load_pneumoniamnist  # noqa: E402
from node.training.model import build_model  # noqa: E402
from node.training.train import train_local  # noqa: E402
from protocol.messages import TrainPlan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--data", default=os.environ.get("FEDBUS_DATA", str(ROOT.parent / "shared/data"))
    )
    p.add_argument("--images", type=int, default=940)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ds = load_pneumoniamnist(args.data)
    idx = np.random.default_rng(0).choice(len(ds.train), args.images, replace=False)
    plan = TrainPlan(local_epochs=1, batch_size=32, lr=0.05, weight_decay=5e-4, kl_beta=0.01)
    out: dict[str, object] = {
        "images": args.images,
        "plan": {"local_epochs": 1, "batch_size": 32, "augment": True},
        "width": args.width,
        "threads": 1,
        "loadavg_before": os.getloadavg(),
        "seconds": {},
    }
    for defense in ("none", "cvb", "precode"):
        model = build_model("cnn", defense, 28, width=args.width, seed=0)
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            train_local(model, ds.train.images[idx], ds.train.labels[idx], plan, seed=r)
            times.append(time.perf_counter() - t0)
        out["seconds"][defense] = {"min": min(times), "median": float(np.median(times))}
        print(defense, out["seconds"][defense], flush=True)
    out["loadavg_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
