"""Shared bits of the SecAgg benchmarks: quiet logs, machine facts, atomic JSON results."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import structlog

RESULTS = Path(__file__).resolve().parent / "results"


def quiet() -> None:
    # The state machines log refusals (duplicates) at debug level; a benchmark provokes many.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def machine() -> dict[str, Any]:
    import cryptography
    import numpy

    return {
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "load_avg_1_5_15_min_at_end": os.getloadavg(),
        "cryptography": cryptography.__version__,
        "numpy": numpy.__version__,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
