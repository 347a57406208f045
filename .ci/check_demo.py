"""Check what `fedbus demo` left in its output folder, as a newcomer would look at it.

    python .ci/check_demo.py OUT --rounds R --envoys N

report.json: every round completed once, securely, with every envoy and metrics in range,
and final test metrics on the whole official test split; rounds.png and roc.png are PNG
images; every process wrote a log of JSON events carrying its node id. Standard library
only, so it runs under any interpreter. Exit status 0 when all holds, else 1 with the list of
what did not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEST_IMAGES = 624  # PneumoniaMNIST's official test split
METRICS = ("accuracy", "auc", "sensitivity", "specificity", "f1")


def _in_unit_interval(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0


def check_report(out: Path, rounds: int, envoys: int) -> list[str]:
    problems: list[str] = []
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"report.json: {exc}"]
    records = report.get("rounds", [])
    if [r.get("round") for r in records] != list(range(1, rounds + 1)):
        problems.append(f"rounds {[r.get('round') for r in records]}, expected 1..{rounds}")
    names = [f"envoy-{i + 1}" for i in range(envoys)]
    for r in records:
        where = f"round {r.get('round')}"
        if r.get("secure") is not True:
            problems.append(f"{where}: not secure-aggregated")
        if sorted(r.get("participants", [])) != names or r.get("dropped"):
            problems.append(
                f"{where}: participants {r.get('participants')}, dropped {r.get('dropped')}"
            )
        val = (r.get("metrics") or {}).get("val") or {}
        if not all(_in_unit_interval(val.get(k)) for k in ("accuracy", "auc")):
            problems.append(f"{where}: validation metrics {val}")
    test = (report.get("final") or {}).get("test") or {}
    if not all(_in_unit_interval(test.get(k)) for k in METRICS):
        problems.append(f"final.test metrics {test}")
    confusion = test.get("confusion")
    if sum(sum(row) for row in confusion or []) != TEST_IMAGES:
        problems.append(f"final.test confusion {confusion} does not cover {TEST_IMAGES} images")
    if _in_unit_interval(test.get("auc")) and test["auc"] <= 0.5:
        problems.append(f"final.test AUC {test['auc']}: no better than chance")
    return problems


def check_plots(out: Path) -> list[str]:
    problems = []
    for name in ("rounds.png", "roc.png"):
        try:
            head = (out / name).read_bytes()[: len(PNG_SIGNATURE)]
        except OSError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if head != PNG_SIGNATURE:
            problems.append(f"{name}: not a PNG image")
    return problems


def check_logs(out: Path, envoys: int) -> list[str]:
    problems = []
    for node in ["broker", "director", *(f"envoy-{i + 1}" for i in range(envoys))]:
        path = out / "logs" / f"{node}.log"
        try:
            lines = [line for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            problems.append(f"logs/{node}.log: {exc}")
            continue
        if not lines:
            problems.append(f"logs/{node}.log is empty")
        for number, line in enumerate(lines, 1):
            try:
                event = json.loads(line)
            except ValueError:
                problems.append(f"logs/{node}.log:{number}: not a JSON event: {line[:120]}")
                break
            if event.get("node") != node:
                problems.append(f"logs/{node}.log:{number}: node {event.get('node')!r}")
                break
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--envoys", type=int, required=True)
    args = p.parse_args(argv)
    problems = [
        *check_report(args.out, args.rounds, args.envoys),
        *check_plots(args.out),
        *check_logs(args.out, args.envoys),
    ]
    for problem in problems:
        print(f"check_demo: {args.out}: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_demo: {args.out}: report, plots and JSON logs as expected")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
