"""structlog setup shared by every node process.

Every event carries `node`, `round` and `stage`: the node is bound once at start, round and
stage live in context variables that the director/envoy update as they move, so a log line from
deep inside a stage handler still says where in the protocol it happened.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.contextvars import bind_contextvars, merge_contextvars
from structlog.typing import FilteringBoundLogger


def _ensure_keys(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event.setdefault("node", "-")
    event.setdefault("round", None)
    event.setdefault("stage", "")
    return event


def setup_logging(
    node: str, *, level: str = "info", json: bool = True, stream: TextIO | None = None
) -> FilteringBoundLogger:
    """Configure structlog for this process and return a logger with `node` bound."""
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            merge_contextvars,
            _ensure_keys,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    bind_contextvars(node=node, round=None, stage="")
    logger: FilteringBoundLogger = structlog.get_logger()
    return logger


def set_round(round: int | None, stage: str = "") -> None:
    bind_contextvars(round=round, stage=stage)


def set_stage(stage: str) -> None:
    bind_contextvars(stage=stage)


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger().bind(**bound)
