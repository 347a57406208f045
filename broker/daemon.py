"""`fedbus broker`: the ZeroMQ broker as a process. Loads no torch, only pyzmq and structlog.

Config (TOML, see configs/broker.toml); relative paths are relative to the config file:

    federation = "demo"
    bind = "tcp://0.0.0.0:5555"
    secret_key_file = "keys/broker.key"     # Z85 CurveZMQ secret key of the broker
    max_frame_bytes = 67108864
    [heartbeat]
    interval_s = 1.0
    timeout_s = 5.0                         # a silent session is closed, its will published
    [[allow]]                               # one per node: who may connect, and as what
    node_id = "director"
    role = "director"
    public_key = "<40 Z85 chars>"           # or public_key_file = "keys/director.pub"
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.credentials import read_key_file
from broker.topics import ROLES, validate_id
from broker.zmq_broker import DEFAULT_MAX_FRAME_BYTES, NodeIdentity, ZmqBroker

INSECURE_WARNING = (
    "WARNING: --insecure-no-auth: the broker accepts ANY client and believes the node id and "
    "role it claims. Use this for local experiments only, never on a network."
)


class ConfigError(ValueError):
    """A broker config that cannot be used; the message names the file and the field."""


@dataclass
class BrokerConfig:
    federation: str
    bind: str = "tcp://127.0.0.1:5555"
    secret_key: str | None = None
    allow: dict[str, NodeIdentity] = field(default_factory=dict)
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    heartbeat_ivl_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    sndhwm: int = 1000
    io_threads: int = 1

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, insecure: bool = False) -> BrokerConfig:
        path = Path(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        return cls.from_dict(data, source=str(path), base=path.parent, insecure=insecure)

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        *,
        source: str = "<dict>",
        base: Path | None = None,
        insecure: bool = False,
    ) -> BrokerConfig:
        base = base or Path.cwd()

        def fail(fld: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: {fld}: {why}")

        known = {
            "federation",
            "bind",
            "secret_key_file",
            "max_frame_bytes",
            "heartbeat",
            "allow",
            "sndhwm",
            "io_threads",
        }
        for key in data:
            if key not in known:
                raise fail(key, f"unknown field (expected one of {sorted(known)})")
        federation = data.get("federation")
        if not isinstance(federation, str):
            raise fail("federation", "required, a string")
        try:
            validate_id(federation, field="federation")
        except ValueError as exc:
            raise fail("federation", str(exc)) from None
        bind = data.get("bind", cls.bind)
        if not isinstance(bind, str) or not bind.startswith(("tcp://", "ipc://")):
            raise fail("bind", "must be a string like tcp://0.0.0.0:5555")

        def positive(fld: str, value: Any, kind: type) -> Any:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise fail(fld, "must be a number")
            if kind is int and not isinstance(value, int):
                raise fail(fld, "must be an integer")
            if value <= 0:
                raise fail(fld, "must be positive")
            return kind(value)

        max_frame = positive(
            "max_frame_bytes", data.get("max_frame_bytes", DEFAULT_MAX_FRAME_BYTES), int
        )
        sndhwm = positive("sndhwm", data.get("sndhwm", 1000), int)
        io_threads = positive("io_threads", data.get("io_threads", 1), int)
        hb = data.get("heartbeat", {})
        if not isinstance(hb, dict):
            raise fail("heartbeat", "must be a table")
        for key in hb:
            if key not in ("interval_s", "timeout_s"):
                raise fail(f"heartbeat.{key}", "unknown field (interval_s, timeout_s)")
        ivl = positive("heartbeat.interval_s", hb.get("interval_s", 1.0), float)
        timeout = positive("heartbeat.timeout_s", hb.get("timeout_s", 5.0), float)
        if timeout <= ivl:
            raise fail("heartbeat.timeout_s", "must be larger than heartbeat.interval_s")

        secret = None
        allow: dict[str, NodeIdentity] = {}
        if not insecure:
            key_file = data.get("secret_key_file")
            if not isinstance(key_file, str):
                raise fail("secret_key_file", "required (or run with --insecure-no-auth)")
            try:
                secret = read_key_file(base / key_file, field="secret_key_file")
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from None
            entries = data.get("allow")
            if not isinstance(entries, list) or not entries:
                raise fail("allow", "at least one [[allow]] entry is required")
            for i, entry in enumerate(entries):
                where = f"allow[{i}]"
                if not isinstance(entry, dict):
                    raise fail(where, "must be a table")
                for key in entry:
                    if key not in ("node_id", "role", "public_key", "public_key_file"):
                        raise fail(f"{where}.{key}", "unknown field")
                node_id = entry.get("node_id")
                try:
                    validate_id(node_id, field="node_id")  # type: ignore[arg-type]
                except ValueError as exc:
                    raise fail(f"{where}.node_id", str(exc)) from None
                role = entry.get("role")
                if role not in ROLES:
                    raise fail(f"{where}.role", f"must be one of {list(ROLES)}")
                if "public_key" in entry and "public_key_file" in entry:
                    raise fail(where, "give public_key or public_key_file, not both")
                if "public_key_file" in entry:
                    try:
                        public = read_key_file(
                            base / str(entry["public_key_file"]), field=f"{where}.public_key_file"
                        )
                    except ValueError as exc:
                        raise ConfigError(f"{source}: {exc}") from None
                else:
                    public = entry.get("public_key")
                    if not isinstance(public, str) or len(public) != 40:
                        raise fail(f"{where}.public_key", "must be a 40-character Z85 key")
                if public in allow:
                    raise fail(f"{where}.public_key", f"already given to {allow[public].node_id}")
                allow[public] = NodeIdentity(node_id, role)  # type: ignore[arg-type]
        return cls(
            federation=federation,
            bind=bind,
            secret_key=secret,
            allow=allow,
            max_frame_bytes=max_frame,
            heartbeat_ivl_s=ivl,
            heartbeat_timeout_s=timeout,
            sndhwm=sndhwm,
            io_threads=io_threads,
        )

    def build(self, *, insecure: bool = False) -> ZmqBroker:
        try:
            return ZmqBroker(
                self.bind,
                federation=self.federation,
                allow=None if insecure else self.allow,
                secret_key=None if insecure else self.secret_key,
                insecure_no_auth=insecure,
                max_frame_bytes=self.max_frame_bytes,
                heartbeat_ivl_s=self.heartbeat_ivl_s,
                heartbeat_timeout_s=self.heartbeat_timeout_s,
                sndhwm=self.sndhwm,
                io_threads=self.io_threads,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


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
            return 2
        if args.federation:
            config.federation = validate_id(args.federation, field="--federation")
        if args.bind:
            config.bind = args.bind
        broker = config.build(insecure=insecure)
    except (ConfigError, ValueError) as exc:
        print(f"fedbus broker: {exc}", file=sys.stderr)
        return 2
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
        return 1
    print(f"fedbus broker listening on {broker.url}", flush=True)
    if args.ready_file is not None:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(broker.url + "\n")
        os.replace(tmp, args.ready_file)
    # Join in slices so the main thread keeps running Python signal handlers.
    while not broker.join(0.5):
        pass
    return 1 if broker.error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
