"""Helpers for integration tests: real processes, the real ZeroMQ broker, real PneumoniaMNIST.

Runs are small (a few hundred images, a narrow CNN, one local epoch) so each test stays in the
tens of seconds on two shared cores; the acceptance-size run is the demo itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.datafiles import PNEUMONIAMNIST

REPO = Path(__file__).resolve().parents[2]
DATA = PNEUMONIAMNIST

# A small, fast recipe: what changes is the amount of work, not the code paths.
SMALL = [
    "--limit",
    "600",
    "--set",
    "model.width=8",
    "--set",
    "train.local_epochs=1",
    "--set",
    "train.batch_size=64",
    "--set",
    "deadlines.advertise_keys=30.0",
    "--set",
    "deadlines.share_keys=30.0",
    "--set",
    "deadlines.consistency=30.0",
    "--set",
    "deadlines.unmask=30.0",
    "--set",
    "deadlines.masked_input=240.0",
    "--set",
    "deadlines.evaluate=60.0",
]


def small_set() -> dict[str, Any]:
    """The same recipe as `Options.director_set` (for tests that drive `Federation`)."""
    from node.demo.cli import parse_set_value

    out = {}
    it = iter(SMALL[2:])
    for flag, kv in zip(it, it, strict=True):
        assert flag == "--set"
        k, v = kv.split("=", 1)
        out[k] = parse_set_value(v)
    return out


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return e


def start_demo(out: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node.cli",
            "demo",
            "--data",
            str(DATA),
            "--out",
            str(out),
            "--quiet",
            *args,
        ],
        cwd=str(REPO),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(
    predicate, *, what: str, proc: subprocess.Popen[bytes] | None = None, poll: float = 0.05
):
    """Poll until predicate() is truthy; fail (not hang) if the process under test exits."""
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(
                f"process exited ({proc.returncode}) while waiting for {what}:\n{out}"
            )
        time.sleep(poll)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def records(state_dir: Path) -> list[dict[str, Any]]:
    from node.status import read_records

    return read_records(state_dir)
