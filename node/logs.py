"""structlog setup shared by every fedbus process, the broker daemon included.

`fedbus` configures logging once, before it runs a command (node.cli): JSON lines on stderr,
at the level of `--log-level`, else `$FEDBUS_LOG_LEVEL`, else info. Every event carries
`node`, `round` and `stage`: the node is bound as soon as the command knows it (the broker
at start, a director or an envoy once its config is read), round and stage live in context
variables that the director/envoy update as they move, so a log line from deep inside a
stage handler still says where in the protocol it happened. Records of the standard library's
`logging` (asyncio, aiomqtt, uvicorn) go through the same renderer, so a node's log is JSON
from its first line to its last.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.contextvars import bind_contextvars, merge_contextvars
from structlog.typing import FilteringBoundLogger

__all__ = [
    "LEVELS",
    "LOG_LEVEL_ENV",
    "configure_logging",
    "configured_level",
    "get_logger",
    "resolve_level",
    "set_node",
    "set_round",
    "set_stage",
    "setup_logging",
]

LOG_LEVEL_ENV = "FEDBUS_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_LEVEL = "info"
# The level of this process's last configure_logging: `fedbus demo` starts its nodes with it.
_configured_level = DEFAULT_LEVEL


def _ensure_keys(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event.setdefault("node", "-")
    event.setdefault("round", None)
    event.setdefault("stage", "")
    return event


def resolve_level(flag: str | None, environ: MutableMapping[str, str] | None = None) -> str:
    """The log level to use: the flag, else $FEDBUS_LOG_LEVEL, else info (lower case).

    ValueError names where a level that is not one of LEVELS came from."""
    env = os.environ if environ is None else environ
    for origin, value in (("--log-level", flag), (f"${LOG_LEVEL_ENV}", env.get(LOG_LEVEL_ENV))):
        if value:
            level = value.strip().lower()
            if level not in LEVELS:
                raise ValueError(f"{origin} {value!r}: expected one of {', '.join(LEVELS)}")
            return level
    return DEFAULT_LEVEL


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time of the write, not at configuration
    (a test's capture, a redirection made later, a closed stream replaced since)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(
    level: str = DEFAULT_LEVEL, *, json: bool = True, stream: TextIO | None = None
) -> None:
    """Configure structlog and the standard library's logging for this process."""
    global _configured_level
    lvl = logging.getLevelNamesMapping()[level.upper()]
    _configured_level = level.lower()
    out: Any = stream if stream is not None else _CurrentStderr()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        merge_contextvars,
        _ensure_keys,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)


def configured_level() -> str:
    """The level this process logs at (what configure_logging was last given)."""
    return _configured_level


def set_node(node: str) -> None:
    """Bind the node id every later event of this process carries."""
    bind_contextvars(node=node, round=None, stage="")


def setup_logging(
    node: str, *, level: str = DEFAULT_LEVEL, json: bool = True, stream: TextIO | None = None
) -> FilteringBoundLogger:
    """configure_logging and set_node in one call; a logger for this process."""
    configure_logging(level, json=json, stream=stream)
    set_node(node)
    logger: FilteringBoundLogger = structlog.get_logger()
    return logger


def set_round(round: int | None, stage: str = "") -> None:
    bind_contextvars(round=round, stage=stage)


def set_stage(stage: str) -> None:
    bind_contextvars(stage=stage)


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger().bind(**bound)
