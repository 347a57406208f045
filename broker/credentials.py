"""What a node needs to prove who it is to the bus: CurveZMQ keys or MQTT login + TLS files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.utils.z85

_Z85_KEY_LEN = 40  # 32 bytes in Z85


def _check_z85_key(value: str | None, field: str) -> None:
    if value is None:
        return
    if not isinstance(value, str) or len(value) != _Z85_KEY_LEN:
        raise ValueError(f"{field} must be a 40-character Z85 CurveZMQ key")
    try:
        raw = zmq.utils.z85.decode(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError, KeyError) as exc:
        raise ValueError(f"{field} is not valid Z85: {exc}") from None
    if len(raw) != 32:
        raise ValueError(f"{field} does not decode to 32 bytes")


@dataclass(frozen=True)
class Credentials:
    """Credentials for one node. Fill the zmq half, the mqtt half, or both.

    zmq: `curve_secret_key` / `curve_public_key` are this node's CurveZMQ pair and
    `broker_public_key` pins the broker (all Z85 text, as `zmq.curve_keypair()` makes them).
    mqtt: `username` (the node id, which the `%u` ACL patterns rely on), `password`, and the
    TLS file paths for mqtts://.
    """

    curve_secret_key: str | None = None
    curve_public_key: str | None = None
    broker_public_key: str | None = None
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        _check_z85_key(self.curve_secret_key, "curve_secret_key")
        _check_z85_key(self.curve_public_key, "curve_public_key")
        _check_z85_key(self.broker_public_key, "broker_public_key")
        if self.curve_secret_key is not None and self.curve_public_key is not None:
            derived = zmq.curve_public(self.curve_secret_key.encode("ascii")).decode("ascii")
            if derived != self.curve_public_key:
                raise ValueError("curve_public_key does not belong to curve_secret_key")

    def __repr__(self) -> str:
        # Never print secrets into logs.
        return (
            f"Credentials(curve_public_key={self.curve_public_key!r}, "
            f"broker_public_key={self.broker_public_key!r}, username={self.username!r}, "
            f"tls_ca={self.tls_ca!r}, tls_cert={self.tls_cert!r}, tls_key={self.tls_key!r})"
        )

    @property
    def has_curve(self) -> bool:
        return bool(self.curve_secret_key and self.curve_public_key and self.broker_public_key)

    @classmethod
    def for_curve(cls, *, secret_key: str, broker_public_key: str) -> Credentials:
        """Build zmq credentials from a secret key alone (the public key is derived)."""
        public = zmq.curve_public(secret_key.encode("ascii")).decode("ascii")
        return cls(
            curve_secret_key=secret_key,
            curve_public_key=public,
            broker_public_key=broker_public_key,
        )


@dataclass(frozen=True)
class CurveKeyPair:
    public: str
    secret: str


def generate_curve_keypair() -> CurveKeyPair:
    public, secret = zmq.curve_keypair()
    return CurveKeyPair(public=public.decode("ascii"), secret=secret.decode("ascii"))


def write_secret_key(path: str | os.PathLike[str], secret: str) -> None:
    """Write a Z85 secret key file readable by its owner only, atomically."""
    _check_z85_key(secret, "secret key")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (secret + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_key_file(path: str | os.PathLike[str], *, field: str = "key file") -> str:
    """Read a Z85 key written by `write_secret_key` (or a bare 40-character line)."""
    path = Path(path)
    try:
        text = path.read_text("ascii").strip()
    except OSError as exc:
        raise ValueError(f"{field} {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{field} {path}: not a Z85 text key") from None
    try:
        _check_z85_key(text, f"{field} {path}")
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return text
