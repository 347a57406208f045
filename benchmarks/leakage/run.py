"""The leakage table: attack x threat x defence x {round 1, trained}, on the deployed model.

Every cell is one `fedbus attack` run (``node.attack.run``) on the same victims (``--images``
reported victims of the PneumoniaMNIST test split, seed ``--seed``), with the deployed
recipe of ``configs/director.toml``: its model (batch norm) with the cell's defence, its
KL weight, its training plan for the attacked round. "round1" attacks the public initial
weights; "trained" a federated checkpoint (``--trained-from DEFENCE=WEIGHTS``: a director
state folder or an .npz, e.g. benchmarks/leakage/federation.py's ``--save-weights``
output, with ``--trained-round``). The stress test (``stress`` rows: one image's gradient
on the untrained group-norm sibling, no defence) shows that the attack works where the
literature says it does.

Cells are written to the JSON as they finish and a rerun skips the cells already there,
so a cut run resumes. ``--render`` redraws the figure and prints the Markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leakage/run.py --plan core \\
        --out benchmarks/leakage/results/deployed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node.attack import AttackConfig, run  # noqa: E402


@dataclass(frozen=True)
class Cell:
    state: str  # round1 | trained | stress
    threat: str
    defense: str
    attack: str
    iterations: int
    options: dict[str, Any] = field(default_factory=dict)  # AttackConfig fields and extras
    label: str = ""

    @property
    def key(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.state}/{self.threat}/{self.defense}/{self.attack}" + (
            f"/{extra}" if extra else ""
        )


# Iteration counts per cell. Victim envoys hold ENVOY_IMAGES images each (one local step at
# batch 8): on the deployed batch-norm model an envoy's batch is attacked as one (no
# batching across envoys), about 0.1 CPU-s per iteration for 8 images, so a 48-victim cell
# at 500 iterations is about 300-600 CPU-s on a quiet core; the stress test batches its
# single-image victims (about 23 ms per victim and iteration).
ENVOY_IMAGES = 8
# The noise multiplier of a typical envoy of the epsilon-3 federation (940 records, 128
# expected per step, 7 steps a round, 20 rounds, delta 1e-5: node.training.privacy's
# calibrate_noise gives 2.69); the IG row under DP attacks an envoy training with it.
SIGMA_EPSILON_3 = 2.69
IG_ITERS = 500
# Cells whose reconstruction GIF is kept (the default command's cell, its control, the oracle).
HEADLINE = ("round1/update/cvb/ig", "round1/update/none/ig", "round1/update/cvb/oracle")
EOT_SAMPLES = 2


def plan(name: str, trained: bool, iters: int = IG_ITERS) -> list[Cell]:
    """The cells of a table. ``core``: what decides the targets; ``full``: every attack x
    threat x defence x state that fits 2 cores in about 2 hours (14,400 CPU-s).
    ``iters``: the optimisation steps of every update cell (EOT splits them over its
    noise samples); a cell already in the results keeps the count it ran with."""
    stress = [Cell("stress", "gradient", "none", "ig", 1000, {"norm": "group"}, "stress test")]
    states = ["round1", *(["trained"] if trained else [])]
    core = []
    for state in states:
        core += [
            Cell(state, "update", "none", "ig", iters, label="control: no defence"),
            Cell(state, "update", "cvb", "ig", iters),
            Cell(state, "update", "cvb", "oracle", iters, label="upper bound: noise known"),
        ]
    if name == "core":
        return stress + core
    if name != "full":
        raise SystemExit(f"--plan must be core or full, got {name!r}")
    full = list(core)
    for state in states:
        full += [
            Cell(state, "update", "cvb", "ig", iters, {"smooth_relu": 0.0}, "exact ReLU"),
            Cell(state, "update", "cvb", "adaptive", iters),
            Cell(state, "update", "cvb", "eot", iters // EOT_SAMPLES, {"samples": EOT_SAMPLES}),
            Cell(state, "update", "cvb", "joint", iters),
            Cell(state, "update", "cvb", "two-stage", iters),
            Cell(state, "update+bn", "none", "ig", iters),
            Cell(state, "update+bn", "cvb", "ig", iters),
            Cell(state, "aggregate", "none", "ig", iters, {"envoys": 3}),
            Cell(state, "aggregate", "cvb", "ig", iters, {"envoys": 3}),
        ]
    # Under DP (group norm: DP refuses batch norm), beside the same model without DP.
    full += [
        Cell("round1", "update", "cvb", "ig", iters, {"norm": "group"}, "group norm, no DP"),
        Cell(
            "round1", "update", "cvb", "ig", iters,
            {"norm": "group", "dp_noise": SIGMA_EPSILON_3}, "DP-SGD at epsilon 3",
        ),
    ]  # fmt: skip
    return stress + full


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data", default=os.environ.get("FEDBUS_DATA", str(ROOT.parent / "shared/data"))
    )
    p.add_argument("--config", default=None, help="director config (default configs/director.toml)")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan", default="core", help="core | full")
    p.add_argument(
        "--trained-from",
        action="append",
        default=[],
        metavar="DEFENSE=WEIGHTS",
        help="the trained state of DEFENSE: a director state folder or an .npz",
    )
    p.add_argument("--trained-round", type=int, default=None, help="the round those weights start")
    p.add_argument("--only", default=None, help="comma list of substrings: run matching cells")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--iterations", type=int, default=IG_ITERS, help="steps of each update cell's attack"
    )
    p.add_argument(
        "--cells",
        type=Path,
        default=None,
        help="folder for each cell's grid.png (and results.json; the GIF of the headline "
        "cells); default: cells/ beside --out",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--render", action="store_true", help="only redraw the figure and table")
    return p.parse_args(argv)


def config_of(
    cell: Cell, args: argparse.Namespace, trained: dict[str, str], out: str
) -> AttackConfig:
    options = dict(cell.options)
    fields = {k: options.pop(k) for k in list(options) if k in AttackConfig.__dataclass_fields__}
    return AttackConfig(
        attack=cell.attack,
        threat=cell.threat,
        defense=cell.defense,
        images=args.images,
        envoy_images=ENVOY_IMAGES,
        seed=args.seed,
        data=args.data,
        config=args.config,
        iterations=cell.iterations,
        trained=trained[cell.defense] if cell.state == "trained" else None,
        round=args.trained_round if cell.state == "trained" else None,
        workers=args.workers,
        out=out,
        quiet=True,
        extra=options,
        **fields,
    )


def shrink_animation(
    src: Path,
    dst: Path,
    *,
    images: int,
    every: int = 2,
    size: int = 28,
    scale: int = 4,
    gap: int = 2,
) -> None:
    """The first ``images`` columns (the first victim envoy) of an attack's GIF, every
    ``every``-th frame and the last: a committable animation of one envoy's victims. The
    geometry is ``gradient_leakage.figures.tile``'s: tiles of ``size`` px, ``gap`` px apart,
    upscaled ``scale`` times."""
    from PIL import Image, ImageSequence

    with Image.open(src) as gif:
        frames = [f.convert("L") for f in ImageSequence.Iterator(gif)]
        duration = gif.info.get("duration", 120)
    width, height = frames[0].size
    crop = min(width, scale * (images * (size + gap) - gap))
    kept = frames[::every] + ([frames[-1]] if (len(frames) - 1) % every else [])
    out = [f.crop((0, 0, crop, height)) for f in kept]
    tmp = dst.with_name(f".{dst.name}.tmp.gif")
    out[0].save(tmp, save_all=True, append_images=out[1:], duration=duration, loop=0)
    os.replace(tmp, dst)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| state | threat | defence | attack | iters | PSNR (dB) | baseline | SSIM | top-1 MSE / NCC | top-5 MSE / NCC | median rank MSE / NCC (chance) | at chance | labels | SNR (dB) | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        s = r["summary"]
        n = s["images"]
        name = r["attack"] + (f" ({r['label']})" if r.get("label") else "")
        snr = s.get("bottleneck_snr_db")
        lines.append(
            f"| {r['state']} | {r['threat']} | {r['defense']} | {name} | {s['iterations']} | "
            f"{s['psnr']:.2f} | {s['baseline_psnr']:.2f} | {s['ssim']:.3f} | "
            f"{s['top1_mse_count']}/{n} / {s['top1_ncc_count']}/{n} | "
            f"{s['top5_mse_count']}/{n} / {s['top5_ncc_count']}/{n} | "
            f"{s['median_rank_mse']:.0f} / {s['median_rank_ncc']:.0f} ({s['median_rank_chance']:.0f}) | "
            f"{'yes' if s['at_chance'] else '**no**'} | {100 * s['label_accuracy']:.0f}% | "
            f"{'' if snr is None or snr != snr else f'{snr:.1f}'} | {s.get('cpu_seconds', 0):.0f} |"
        )
    return "\n".join(lines)


# Tick-label suffixes that tell apart the cells sharing state, threat, defence and attack.
SHORT_LABELS = {
    "exact ReLU": "\nexact ReLU",
    "group norm, no DP": "\ngroup norm",
    "DP-SGD at epsilon 3": "\nDP eps 3",
}


def figure(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.62 * len(results)), 4.4))
    xs = np.arange(len(results))
    psnrs = [r["summary"]["psnr"] for r in results]
    bases = [r["summary"]["baseline_psnr"] for r in results]
    colors = ["tab:red" if not r["summary"]["at_chance"] else "tab:blue" for r in results]
    ax.bar(xs, psnrs, color=colors)
    ax.plot(xs, bases, "k_", markersize=14, label="dataset-mean baseline")
    for x, r in zip(xs, results, strict=True):
        s = r["summary"]
        ax.annotate(
            f"{s['top1_mse_count']}/{s['images']}",
            (x, s["psnr"]),
            ha="center",
            va="bottom",
            fontsize=6,
        )
    ax.set_xticks(
        xs,
        [
            f"{r['state']}\n{r['threat']}\n{r['defense']}\n{r['attack']}"
            + SHORT_LABELS.get(r.get("label", ""), "")
            for r in results
        ],
        fontsize=5,
    )
    ax.set_ylabel("mean PSNR (dB); label: top-1 identified")
    ax.set_title("red: identification above chance")
    ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from broker.files import atomic_write_text

    args = parse_args(argv)
    if args.render:
        report = json.loads(args.out.read_text())
        figure(report["results"], args.out.with_suffix(".png"))
        print(markdown(report))
        return 0
    torch.set_num_threads(1)
    trained = dict(item.split("=", 1) for item in args.trained_from)
    cells = plan(args.plan, trained=bool(trained), iters=args.iterations)
    if args.only:
        wanted = args.only.split(",")
        cells = [c for c in cells if any(w in c.key for w in wanted)]
    missing = {c.defense for c in cells if c.state == "trained"} - set(trained)
    if missing:
        raise SystemExit(f"trained cells need --trained-from for {sorted(missing)}")
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"results": []}
    done = {r["key"] for r in report["results"]}
    started = time.monotonic()
    cells_dir = args.cells or args.out.parent / "cells"
    for cell in cells:
        if cell.key in done:
            continue
        folder = cells_dir / cell.key.replace("/", "_").replace("=", "-").replace(",", "_")
        cfg = config_of(cell, args, trained, str(folder))
        result = run(cfg)
        gif = folder / "reconstruction.gif"
        if cell.key in HEADLINE and gif.is_file():
            shrink_animation(gif, folder / "reconstruction-envoy1.gif", images=ENVOY_IMAGES)
        gif.unlink(missing_ok=True)  # 48 victims x 40 frames: about 12 MB
        s = result["summary"]
        report["results"].append(
            {
                "key": cell.key,
                "state": cell.state,
                "threat": cell.threat,
                "defense": cell.defense,
                "attack": cell.attack,
                "label": cell.label,
                "options": cell.options,
                "deployment": result["config"]["deployment"],
                "summary": s,
                "images": result["images"],
            }
        )
        print(
            f"{cell.key}: PSNR {s['psnr']:.2f} (baseline {s['baseline_psnr']:.2f}) top-1 "
            f"{s['top1_mse_count']}/{s['images']} median rank {s['median_rank_mse']:.0f} "
            f"{'at chance' if s['at_chance'] else 'ABOVE CHANCE'} {s['cpu_seconds']:.0f} CPU-s",
            flush=True,
        )
        report.update(
            benchmark="leakage",
            command="OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leakage/run.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            machine={
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
            },
            settings={"images": args.images, "seed": args.seed, "plan": args.plan},
        )
        report["seconds_this_run"] = time.monotonic() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    if report["results"]:
        figure(report["results"], args.out.with_suffix(".png"))
        print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
