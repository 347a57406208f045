"""The `[ui]` section of the director's config and the bind policy of the operator page.

Kept apart from node.ui.server, which imports uvicorn: loading a director config must not need
the `ui` extra. See node.ui.server for the policy in words.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

import msgspec

from node.errors import ExitCode, FedbusError

__all__ = [
    "BIND_PATTERN",
    "UiConfig",
    "UiConfigError",
    "check_bind_policy",
    "is_loopback",
    "parse_bind",
]

BIND_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$"
PathStr = Annotated[str, msgspec.Meta(min_length=1)]


class UiConfigError(FedbusError):
    """A [ui] section that cannot be served safely; the message says which field."""

    exit_code = ExitCode.CONFIG


class UiConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    bind: Annotated[str, msgspec.Meta(pattern=BIND_PATTERN)]
    tls_cert: PathStr | None = None
    tls_key: PathStr | None = None
    username: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    password_file: PathStr | None = None
    allowed_hosts: list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9.:-]+$")]] = []
    poll_s: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 0.5


def parse_bind(bind: str) -> tuple[str, int]:
    """("127.0.0.1", 8080) from "127.0.0.1:8080"; IPv6 as "[::1]:8080"."""
    if not re.match(BIND_PATTERN, bind):
        raise UiConfigError(f"ui.bind {bind!r} is not HOST:PORT (IPv6 as [ADDRESS]:PORT)")
    host, _, port = bind.rpartition(":")
    number = int(port)
    if not 0 <= number <= 65535:
        raise UiConfigError(f"ui.bind {bind!r}: port {number} is not 0..65535")
    return host.strip("[]"), number


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_bind_policy(cfg: UiConfig) -> tuple[str, int]:
    """The (host, port) to bind, if the policy allows it; UiConfigError says why not."""
    host, port = parse_bind(cfg.bind)
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise UiConfigError("ui: tls_cert and tls_key go together; one of them is missing")
    if bool(cfg.username) != bool(cfg.password_file):
        raise UiConfigError("ui: username and password_file go together; one of them is missing")
    if not is_loopback(host) and not (cfg.tls_cert and cfg.username):
        raise UiConfigError(
            f"ui.bind {cfg.bind!r} is beyond loopback: the operator page is served there only "
            f"with TLS (tls_cert, tls_key) and credentials (username, password_file); bind "
            f"127.0.0.1 and use an SSH tunnel, or configure both"
        )
    return host, port
