"""`fedbus broker`: the ZeroMQ broker as a process. Loads no torch, only pyzmq and structlog.

Config: broker.toml (see `broker.server.config` and configs/broker.toml). Started through
`fedbus broker` (node.cli), which sets up the JSON logs and turns the errors raised here into
the documented exit statuses: ConfigError (a config or key file that cannot be used) and
ListenError (the address cannot be bound).
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import structlog

from broker.errors import BrokerError
from broker.files import PUBLIC_MODE, atomic_write_text
from broker.server.config import BrokerConfig
from broker.topics import validate_id
from protocol.configfile import ConfigError

__all__ = ["ListenError", "build_parser", "main"]

INSECURE_WARNING = (
    "--insecure-no-auth: the broker accepts ANY client and believes the node id and role it "
    "claims. Use this for local experiments only, never on a network."
)


class ListenError(BrokerError, OSError):
    """The broker cannot listen on its bind address (taken, not ours, not permitted)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbus broker",
        description="The fedbus ZeroMQ broker: CurveZMQ authentication, topic ACL, routing.",
    )
    parser.add_argument("--config", type=Path, help="broker TOML config (configs/broker.toml)")
    parser.add_argument("--bind", help="override the bind address, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--federation", help="override (or, without --config, set) the federation")
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="no CurveZMQ: accept any client and trust the identity it claims (local tests only)",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="once bound, write the zmq+tcp:// URL clients should use to this file (atomically)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the broker until SIGTERM/SIGINT; 0 after a clean stop."""
    parser = build_parser()
    args = parser.parse_args(argv)
    insecure = bool(args.insecure_no_auth)
    if args.config is None and not insecure:
        parser.error("--config is required (or --insecure-no-auth)")
    log = structlog.get_logger("broker").bind(node="broker")
    try:
        if args.config is not None:
            config = BrokerConfig.load(args.config, insecure=insecure)
        else:
            config = BrokerConfig(federation=args.federation or "fedbus")
        if args.federation:
            config.federation = validate_id(args.federation, field="--federation")
        if args.bind:
            config.bind = args.bind
        broker = config.build(insecure=insecure)
    except ConfigError:
        raise
    except ValueError as exc:
        source = args.config if args.config is not None else "command line"
        raise ConfigError(f"{source}: {exc}") from None
    if insecure:
        log.warning("insecure_no_auth", warning=INSECURE_WARNING)

    def on_signal(signum: int, _frame: object) -> None:
        broker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        broker.start()
    except OSError as exc:
        raise ListenError(str(exc)) from exc
    if args.ready_file is not None:
        atomic_write_text(args.ready_file, broker.url + "\n", mode=PUBLIC_MODE)
    # Join in slices so the main thread keeps running Python signal handlers.
    while not broker.join(0.5):
        pass
    if broker.error is not None:
        raise BrokerError(f"the broker stopped on an error: {broker.error}") from broker.error
    return 0
