"""broker.toml: the ZeroMQ broker daemon's config, as a msgspec schema (like node/config.py).

    federation = "demo"
    bind = "tcp://0.0.0.0:5555"
    secret_key_file = "keys/broker.key"     # Z85 CurveZMQ secret key of the broker
    max_frame_bytes = 67108864
    sndhwm = 1000                           # frames in a subscriber's transport pipe
    max_queued_bytes = 268435456            # then a backlog of this many bytes ...
    max_queued_frames = 100000              # ... and frames; past it frames drop (counted)
    io_threads = 1
    [heartbeat]
    interval_s = 1.0
    timeout_s = 5.0                         # a silent session is closed, its will published
    [[allow]]                               # one per node: who may connect, and as what
    node_id = "director"
    role = "director"
    public_key = "<40 Z85 chars>"           # or public_key_file = "keys/director.pub"

`BrokerFile` is the document (validated in one pass by `protocol.configfile.convert_config`;
`fedbus provision` builds one and writes it with `dump_toml`); `BrokerConfig` is what the
daemon runs with: the same settings with the key files read. Relative paths are relative to
the config file. Every error is a `ConfigError` naming the file and the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from broker.files import read_toml
from broker.keys import KeyFileError, check_z85_key, read_key_file
from broker.server.core import DEFAULT_MAX_QUEUED_BYTES, DEFAULT_MAX_QUEUED_FRAMES, NodeIdentity
from broker.server.zmq_broker import ZmqBroker
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.configfile import ConfigError, convert_config

__all__ = ["AllowEntry", "BrokerConfig", "BrokerFile", "Heartbeat"]

NodeId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
PathStr = Annotated[str, msgspec.Meta(min_length=1)]
Z85Key = Annotated[str, msgspec.Meta(min_length=40, max_length=40)]
BindAddress = Annotated[str, msgspec.Meta(pattern=r"^(tcp|ipc)://.+$")]


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Heartbeat(_Table, frozen=True):
    interval_s: PosFloat = 1.0  # clients ping this often
    timeout_s: PosFloat = 5.0  # a session silent this long is closed; its will fires

    def __post_init__(self) -> None:
        if self.timeout_s <= self.interval_s:
            raise ValueError("heartbeat.timeout_s must be larger than heartbeat.interval_s")


class AllowEntry(_Table, frozen=True):
    """One node that may connect: its id, its role and its CurveZMQ public key."""

    node_id: NodeId
    role: Literal["director", "envoy"]
    public_key: Z85Key | None = None
    public_key_file: PathStr | None = None

    def __post_init__(self) -> None:
        if (self.public_key is None) == (self.public_key_file is None):
            raise ValueError("give public_key or public_key_file (one of them)")


class BrokerFile(_Table, frozen=True):
    """broker.toml as written."""

    federation: NodeId
    bind: BindAddress = "tcp://127.0.0.1:5555"
    secret_key_file: PathStr | None = None
    max_frame_bytes: PosInt = DEFAULT_MAX_FRAME_BYTES
    sndhwm: PosInt = 1000  # frames in a subscriber's transport pipe before its backlog
    max_queued_bytes: PosInt = DEFAULT_MAX_QUEUED_BYTES  # a lagging subscriber's backlog ...
    max_queued_frames: PosInt = DEFAULT_MAX_QUEUED_FRAMES  # ... past which frames drop
    io_threads: PosInt = 1
    heartbeat: Heartbeat = msgspec.field(default_factory=Heartbeat)
    allow: tuple[AllowEntry, ...] = ()


@dataclass
class BrokerConfig:
    """The daemon's settings with every key read: what `build()` turns into a ZmqBroker."""

    federation: str
    bind: str = "tcp://127.0.0.1:5555"
    secret_key: str | None = None
    allow: dict[str, NodeIdentity] = field(default_factory=dict)
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    heartbeat_ivl_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    sndhwm: int = 1000
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    max_queued_frames: int = DEFAULT_MAX_QUEUED_FRAMES
    io_threads: int = 1

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, insecure: bool = False) -> BrokerConfig:
        path = Path(path)
        return cls.from_dict(read_toml(path), source=str(path), base=path.parent, insecure=insecure)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "<dict>",
        base: Path | None = None,
        insecure: bool = False,
    ) -> BrokerConfig:
        """Validate `data` as broker.toml and read its keys (none with `insecure`)."""
        doc = convert_config(data, BrokerFile, source=source)
        config = cls(
            federation=doc.federation,
            bind=doc.bind,
            max_frame_bytes=doc.max_frame_bytes,
            heartbeat_ivl_s=doc.heartbeat.interval_s,
            heartbeat_timeout_s=doc.heartbeat.timeout_s,
            sndhwm=doc.sndhwm,
            max_queued_bytes=doc.max_queued_bytes,
            max_queued_frames=doc.max_queued_frames,
            io_threads=doc.io_threads,
        )
        if not insecure:
            keys = _Keys(source, base or Path.cwd())
            config.secret_key = keys.secret(doc.secret_key_file)
            config.allow = keys.allow_list(doc.allow)
        return config

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
                max_queued_bytes=self.max_queued_bytes,
                max_queued_frames=self.max_queued_frames,
                io_threads=self.io_threads,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class _Keys:
    """Reads the key files a broker.toml names, errors naming the file and the field."""

    source: str
    base: Path

    def _fail(self, where: str, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {why}")

    def _read(self, relative: str, where: str) -> str:
        try:
            return read_key_file(self.base / relative, encoding="z85", field=where)
        except KeyFileError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None

    def secret(self, key_file: str | None) -> str:
        if key_file is None:
            raise self._fail("secret_key_file", "required (or run with --insecure-no-auth)")
        return self._read(key_file, "secret_key_file")

    def allow_list(self, entries: tuple[AllowEntry, ...]) -> dict[str, NodeIdentity]:
        if not entries:
            raise self._fail("allow", "at least one [[allow]] entry is required")
        allow: dict[str, NodeIdentity] = {}
        for i, entry in enumerate(entries):
            where = f"allow[{i}]"
            if entry.public_key_file is not None:
                public = self._read(entry.public_key_file, f"{where}.public_key_file")
            else:
                assert entry.public_key is not None
                try:
                    public = check_z85_key(entry.public_key, f"{where}.public_key")
                except KeyFileError as exc:
                    raise ConfigError(f"{self.source}: {exc}") from None
            if public in allow:
                raise self._fail(f"{where}.public_key", f"already given to {allow[public].node_id}")
            allow[public] = NodeIdentity(entry.node_id, entry.role)
        return allow
