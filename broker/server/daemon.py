"""`fedbus broker`: the ZeroMQ broker as a process. Loads no torch, only pyzmq and structlog.

Config: broker.toml (see `broker.server.config` and configs/broker.toml).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from broker.files import PUBLIC_MODE, atomic_write_text
from broker.server.config import BrokerConfig
from broker.topics import validate_id
from protocol.configfile import ConfigError

INSECURE_WARNING = (
    "WARNING: --insecure-no-auth: the broker accepts ANY client and believes the node id and "
    "role it claims. Use this for local experiments only, never on a network."
)
# Exit statuses (the README's table; node.errors.ExitCode holds the same numbers for every
# command, but the broker must not import node/).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


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
    args = build_parser().parse_args(argv)
    insecure = bool(args.insecure_no_auth)
    try:
        if args.config is not None:
            config = BrokerConfig.load(args.config, insecure=insecure)
        elif insecure:
            config = BrokerConfig(federation=args.federation or "fedbus")
        else:
            print("fedbus broker: --config is required (or --insecure-no-auth)", file=sys.stderr)
            return EXIT_USAGE
        if args.federation:
            config.federation = validate_id(args.federation, field="--federation")
        if args.bind:
            config.bind = args.bind
        broker = config.build(insecure=insecure)
    except (ConfigError, ValueError) as exc:
        print(f"fedbus broker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)

    def on_signal(signum: int, _frame: object) -> None:
        broker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        broker.start()
    except OSError as exc:
        print(f"fedbus broker: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"fedbus broker listening on {broker.url}", flush=True)
    if args.ready_file is not None:
        atomic_write_text(args.ready_file, broker.url + "\n", mode=PUBLIC_MODE)
    # Join in slices so the main thread keeps running Python signal handlers.
    while not broker.join(0.5):
        pass
    return EXIT_FAILURE if broker.error is not None else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
