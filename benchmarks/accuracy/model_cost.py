"""Compute cost of the model sizes and input resolutions an edge envoy could run.

For each (image size, width, depth): parameters, multiply-accumulates of one forward pass
(counted by hooks on the convolutions and linear layers), and seconds of one envoy's local
round (`--images` real training images, 1 epoch, batch 32, augmentation on, CVB, one
thread). Configurations are timed round-robin (`--repeats` passes over all of them), so a
shared machine's load falls on every configuration alike; the ratio to the default model
(28 px, width 32, depth 2) in the same pass is the figure to trust.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/accuracy/model_cost.py \\
        --out benchmarks/accuracy/results/model_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.files import atomic_write_text  # noqa: E402
from node.training.data import load_pneumoniamnist  # noqa: E402
from node.training.model import build_model  # noqa: E402
from node.training.train import train_local  # noqa: E402
from protocol.messages import TrainPlan  # noqa: E402

DEFAULT = (28, 32, 2)


def forward_macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates of one image's forward pass (convolutions and linear layers)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total += int(out[0].numel() * k)

    def linear_hook(m: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += int(m.in_features * m.out_features)

    hooks = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    model.eval()
    with torch.no_grad():
        model(torch.rand(1, 1, size, size))
    for h in hooks:
        h.remove()
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data", default=os.environ.get("FEDBUS_DATA", str(ROOT.parent / "shared/data"))
    )
    p.add_argument("--images", type=int, default=940)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--configs",
        default="28x32x2,28x16x2,28x24x2,28x48x2,28x64x2,28x32x1,28x32x3,56x16x2,56x24x2,56x32x2,64x16x2,64x32x2",
        help="comma list of SIZExWIDTHxDEPTH",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ds = load_pneumoniamnist(args.data)
    idx = np.random.default_rng(0).choice(len(ds.train), args.images, replace=False)
    images, labels = ds.train.images[idx], ds.train.labels[idx]
    plan = TrainPlan(local_epochs=1, batch_size=32, lr=0.01, weight_decay=5e-4, kl_beta=0.01)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    if DEFAULT not in configs:
        configs.insert(0, DEFAULT)
    rows: dict[str, dict[str, Any]] = {}
    for size, width, depth in configs:
        model = build_model("cnn", "cvb", size, width=width, depth=depth, seed=0)
        rows[f"{size}x{width}x{depth}"] = {
            "image_size": size,
            "width": width,
            "depth": depth,
            "params": sum(q.numel() for q in model.parameters()),
            "forward_macs": forward_macs(model, size),
            "seconds": [],
            "ratio_to_default": [],
        }
    load_before = os.getloadavg()
    for rep in range(args.repeats):
        times = {}
        for size, width, depth in configs:
            model = build_model("cnn", "cvb", size, width=width, depth=depth, seed=0)
            res = train_local(model, images, labels, plan, seed=rep)
            times[f"{size}x{width}x{depth}"] = res.seconds
        base = times["x".join(map(str, DEFAULT))]
        for key, seconds in times.items():
            rows[key]["seconds"].append(seconds)
            rows[key]["ratio_to_default"].append(seconds / base)
        print(json.dumps({k: round(v, 2) for k, v in times.items()}), flush=True)
    for row in rows.values():
        row["seconds_min"] = min(row["seconds"])
        row["ratio_median"] = float(np.median(row["ratio_to_default"]))
    out = {
        "images": args.images,
        "plan": "1 epoch, batch 32, augment, CVB, 1 thread",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
        "configs": rows,
    }
    for key, row in rows.items():
        print(
            f"{key}: {row['params']:>9,d} params {row['forward_macs'] / 1e6:7.1f} MMAC "
            f"{row['seconds_min']:6.1f} s  x{row['ratio_median']:.2f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
