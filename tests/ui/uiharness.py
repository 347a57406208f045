"""Serve the operator page for real (uvicorn on a free loopback port) from a test thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from node.training.metrics import metrics_from_histograms
from node.ui.feed import OperatorFeed
from node.ui.server import OperatorPage, UiConfig


@contextmanager
def serving(feed: OperatorFeed, cfg: UiConfig | None = None) -> Iterator[OperatorPage]:
    """The page served in its own event loop thread until the block ends."""
    page = OperatorPage(feed, cfg or UiConfig(bind="127.0.0.1:0", poll_s=0.1))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(page.serve())
        except BaseException as exc:  # reported to the test below
            failure.append(exc)

    thread = threading.Thread(target=run, name="operator-page", daemon=True)
    thread.start()
    while not page.started:
        if not thread.is_alive():
            raise failure[0] if failure else AssertionError("the page stopped before serving")
        time.sleep(0.02)
    try:
        yield page
    finally:
        page.stop()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the operator page did not stop"
    if failure:
        raise failure[0]


def val_metrics(seed: int, separation: float = 40.0, bins: int = 100) -> dict[str, Any]:
    """Validation metrics as the director computes them, from summed score histograms."""
    rng = np.random.default_rng(seed)
    neg = np.bincount(np.clip(rng.normal(30, 12, 300).astype(int), 0, bins - 1), minlength=bins)
    centre = 30 + separation
    pos = np.bincount(np.clip(rng.normal(centre, 12, 500).astype(int), 0, bins - 1), minlength=bins)
    val = metrics_from_histograms(neg, pos)
    val.update(loss=0.5, num_samples=800)
    return val


def round_record(r: int, *, dropped: list[str] | None = None, separation: float = 40.0) -> dict:
    participants = ["envoy-1", "envoy-2", "envoy-3"]
    dropped = dropped or []
    return {
        "round": r,
        "attempt": 0,
        "participants": participants,
        "survivors": [p for p in participants if p not in dropped],
        "dropped": dropped,
        "secure": True,
        "aggregate_verified": None,
        "metrics": {"train_loss": 0.5 / r, "val": val_metrics(r, separation)},
        "best_round": r,
        "seconds": 12.5,
        "stage_seconds": {"training": 8.0},
    }


def director_status(
    round: int, stage: str, *, online: dict[str, bool], deadline: float | None = None
) -> dict:
    now = time.time()
    return {
        "federation": "pneumonia",
        "round": round,
        "stage": stage,
        "rounds_total": 5,
        "rounds_completed": round - 1,
        "secure": True,
        "updated": now,
        "stage_deadline": deadline,
        "envoys": {
            name: {"online": up, "last_seen_s": 0.5, "last_seen": now - 0.5, "stage": stage}
            for name, up in online.items()
        },
    }
