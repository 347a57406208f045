"""Memory of the manifest loader while it streams N and 10 N DICOM files, side by side.

For each file count the script writes that many synthetic 12-bit DICOM radiographs
(tests/dicomfiles.py) and a manifest, then runs a fresh Python process per mode that reads
every item once and samples its resident set size (VmRSS) after each item:

* ``stream``: node.training.manifest.ManifestDataset, as an envoy trains from it;
* ``hold``: the same decoded items appended to a list, as a loader that keeps the data set
  in memory does (the control: it shows the measurement sees memory that grows);
* ``train``: one epoch of the envoy's training step (node.training.train.train_local, batch
  8, the bundled CNN at width 8 and 64 px) reading the dataset batch by batch, RSS sampled
  after every step: what an envoy with a `[data] loader` does each round.

Growth = peak RSS - RSS after the first `--warmup` items (imports, first allocations and
torch's thread pools are in the baseline). Flat memory means the stream's growth does not
scale with the count while the control's does.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/manifest/memory.py \
        --files 50,500 --out benchmarks/manifest/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_files(folder: Path, count: int, source_size: int) -> tuple[Path, int]:
    """`count` DICOM files and their manifest; returns (manifest, bytes on disk)."""
    sys.path.insert(0, str(REPO))
    from tests.dicomfiles import synthetic_xray, write_dicom

    lines = ["path,label,patient_id,split"]
    total = 0
    for i in range(count):
        path = write_dicom(
            folder / f"img{i:05d}.dcm", synthetic_xray(source_size, i), patient_id=f"P{i}"
        )
        total += path.stat().st_size
        lines.append(f"{path.name},{'PNEUMONIA' if i % 2 else 'NORMAL'},P{i},train")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, total


def child(manifest: Path, size: int, mode: str, warmup: int) -> dict[str, float]:
    """Read every item of the manifest once in this process; RSS statistics as a dict."""
    import torch

    torch.set_num_threads(1)
    from node.training.manifest import ImageSpec, ManifestDataset, read_manifest

    m = read_manifest(manifest)
    dataset = ManifestDataset(m.split("train"), ImageSpec(size=size), m.classes)
    if mode == "train":
        return train_child(dataset, warmup)
    kept: list[torch.Tensor] = []
    baseline = peak = 0
    started = time.perf_counter()
    for i in range(len(dataset)):
        image, _ = dataset[i]
        if mode == "hold":
            kept.append(image)
        rss = rss_bytes()
        if i + 1 == warmup:
            baseline = peak = rss
        peak = max(peak, rss)
    return {
        "items": len(dataset),
        "rss_baseline_mib": baseline / 2**20,
        "rss_peak_mib": peak / 2**20,
        "growth_mib": (peak - baseline) / 2**20,
        "seconds": time.perf_counter() - started,
    }


def train_child(dataset: object, warmup: int) -> dict[str, float]:
    """One epoch of train_local streaming `dataset`; RSS after every step."""
    from node.training.model import build_model
    from node.training.train import train_local
    from protocol.messages import TrainPlan

    model = build_model("cnn", "cvb", 64, width=8, seed=0)
    plan = TrainPlan(local_epochs=1, batch_size=8, lr=0.01)
    samples = {"baseline": 0, "peak": 0}

    def step(done: int, total: int, loss: float) -> None:
        rss = rss_bytes()
        if done * plan.batch_size >= warmup and not samples["baseline"]:
            samples["baseline"] = samples["peak"] = rss
        samples["peak"] = max(samples["peak"], rss)

    started = time.perf_counter()
    result = train_local(model, dataset, None, plan, seed=0, progress=step)
    return {
        "items": result.num_samples,
        "steps": result.steps,
        "rss_baseline_mib": samples["baseline"] / 2**20,
        "rss_peak_mib": samples["peak"] / 2**20,
        "growth_mib": (samples["peak"] - samples["baseline"]) / 2**20,
        "seconds": time.perf_counter() - started,
    }


def run(
    counts: list[int], size: int, source_size: int, warmup: int, modes: list[str]
) -> dict[str, object]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedbus-manifest-") as tmp:
        for count in counts:
            folder = Path(tmp) / str(count)
            manifest, on_disk = write_files(folder, count, source_size)
            for mode in modes:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(manifest),
                        "--size",
                        str(size),
                        "--mode",
                        mode,
                        "--warmup",
                        str(warmup),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row.update(files=count, mode=mode, mib_on_disk=on_disk / 2**20)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {
        "what": "RSS growth while reading every item of a DICOM manifest once (stream, hold) "
        "and while one epoch of train_local streams it (train)",
        "size": size,
        "source_size": source_size,
        "warmup_items": warmup,
        "rows": rows,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", default="50,500", help="comma-separated file counts")
    p.add_argument("--size", type=int, default=224, help="model input side")
    p.add_argument("--source-size", type=int, default=1024, help="side of the DICOM images")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--modes", default="stream,hold,train", help="comma-separated modes")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument(
        "--mode", choices=("stream", "hold", "train"), default="stream", help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(child(args.child, args.size, args.mode, args.warmup)))
        return 0
    counts = [int(c) for c in args.files.split(",")]
    result = run(counts, args.size, args.source_size, args.warmup, args.modes.split(","))
    if args.out:
        sys.path.insert(0, str(REPO))
        from broker.files import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
