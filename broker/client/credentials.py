"""What a node needs to prove who it is to the bus: CurveZMQ keys or MQTT login + TLS files."""

from __future__ import annotations

from dataclasses import dataclass

from broker.keys import KeyFileError, check_z85_key, curve_public_key


def _check_optional_key(value: str | None, field: str) -> None:
    if value is not None:
        check_z85_key(value, field)


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
        _check_optional_key(self.curve_secret_key, "curve_secret_key")
        _check_optional_key(self.curve_public_key, "curve_public_key")
        _check_optional_key(self.broker_public_key, "broker_public_key")
        if (
            self.curve_secret_key is not None
            and self.curve_public_key is not None
            and curve_public_key(self.curve_secret_key) != self.curve_public_key
        ):
            raise KeyFileError("curve_public_key does not belong to curve_secret_key")

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
        return cls(
            curve_secret_key=secret_key,
            curve_public_key=curve_public_key(secret_key),
            broker_public_key=broker_public_key,
        )
