"""Mosquitto as fedbus's real MQTT broker: its config, password and ACL files.

Everything Mosquitto enforces comes from fedbus's own sources of truth:

* the ACL file is generated from `broker.topics.ACL_RULES` (the rules the ZeroMQ broker
  evaluates too), so the two transports cannot drift apart;
* the password file uses Mosquitto 2's PBKDF2-SHA512 format (``$7$``), written here so no
  password ever travels on a command line (``mosquitto_passwd -b`` would put it in /proc);
* the packet size limit is fedbus's frame limit, so a frame the codec would refuse never
  costs the broker memory either.

`broker.server.mosquitto_process` runs the real ``mosquitto`` binary on these files for tests
and the demo; deployments run the same generated config under systemd
(configs/systemd/fedbus-mosquitto.service).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from broker.files import SECRET_MODE, atomic_write_text
from broker.mqtt_packets import PACKET_OVERHEAD_BYTES
from broker.server.core import DEFAULT_MAX_QUEUED_BYTES, DEFAULT_MAX_QUEUED_FRAMES
from broker.topics import ACL_RULES, ROLES, acl_allows, topic_matches, validate_id
from protocol.codec import DEFAULT_MAX_FRAME_BYTES

# PBKDF2-SHA512 as Mosquitto 2 writes it: "$7$<iterations>$<b64 salt>$<b64 hash>".
PASSWORD_SALT_BYTES = 12
# fedbus passwords are 256-bit random tokens, not human secrets: a slow KDF adds nothing to
# their strength and would only make every reconnect cost broker CPU. Mosquitto's own
# default is 101.
DEFAULT_PASSWORD_ITERATIONS = 1000


# --------------------------------------------------------------------------- passwords


def generate_password() -> str:
    """A fresh MQTT password: 256 bits, URL-safe text (no ':' that the passwd format splits on)."""
    return secrets.token_urlsafe(32)


def hash_password(
    password: str,
    *,
    iterations: int = DEFAULT_PASSWORD_ITERATIONS,
    salt: bytes | None = None,
) -> str:
    """The Mosquitto 2 ``$7$`` PBKDF2-SHA512 hash of `password`."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    if salt is None:
        salt = os.urandom(PASSWORD_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(hashed: str, password: str) -> bool:
    """Check `password` against a ``$7$`` (PBKDF2) or ``$6$`` (salted SHA-512) entry."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations = int(parts[2])
            salt = base64.b64decode(parts[3], validate=True)
            expected = base64.b64decode(parts[4], validate=True)
            actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
        elif len(parts) == 4 and parts[1] == "6":
            salt = base64.b64decode(parts[2], validate=True)
            expected = base64.b64decode(parts[3], validate=True)
            actual = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def render_passwd(
    passwords: Mapping[str, str],
    *,
    hashes: Mapping[str, str] | None = None,
    iterations: int = DEFAULT_PASSWORD_ITERATIONS,
) -> str:
    """A Mosquitto password_file for {username: clear-text password}, plus {username: hash}
    entries whose password only their owner ever saw (an envoy hashes its own)."""
    entries: dict[str, str] = {}
    for username, password in passwords.items():
        if not password or "\n" in password:
            raise ValueError(f"password of {username!r} is empty or spans lines")
        entries[username] = hash_password(password, iterations=iterations)
    for username, hashed in (hashes or {}).items():
        if username in entries:
            raise ValueError(f"{username!r} has both a password and a password hash")
        if not hashed.startswith(("$7$", "$6$")) or "\n" in hashed or ":" in hashed:
            raise ValueError(f"password hash of {username!r} is not a Mosquitto hash")
        entries[username] = hashed
    lines = []
    for username in sorted(entries):
        validate_id(username, field="MQTT username")
        lines.append(f"{username}:{entries[username]}")
    return "\n".join(lines) + "\n"


def parse_passwd(text: str, *, source: str = "password file") -> dict[str, str]:
    """{username: hash} of a password_file; a malformed line is an error naming the line."""
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        username, sep, hashed = line.partition(":")
        if not sep or not username or not hashed.startswith("$"):
            raise ValueError(f"{source} line {number}: expected 'username:$7$...'")
        entries[username] = hashed
    return entries


# --------------------------------------------------------------------------- ACL


# Mosquitto's acl_file has users and patterns but no roles; fedbus's rules are per role.
# Rules that mention the node's own id become `pattern` lines with %u (they apply to every
# user, as Mosquitto applies patterns); everything else becomes lines in a `user` block.
# Where a pattern would grant a user a permission its role does not have, that user's block
# starts with a `topic deny` line for that topic, which Mosquitto checks before patterns.

_MOSQUITTO_ACCESS = {"publish": "write", "subscribe": "read"}


def render_acl(*, federation: str, nodes: Mapping[str, str]) -> str:
    """The Mosquitto acl_file enforcing `broker.topics.ACL_RULES` for {node_id: role}.

    Mosquitto 2 does not check SUBSCRIBE against the ACL; it checks "read" on every message
    it delivers, so a subscription outside a node's rights is accepted but never delivers
    anything. Publishing outside them is dropped (QoS 1: the PUBACK says "not authorized").
    """
    validate_id(federation, field="federation")
    for node_id, role in nodes.items():
        validate_id(node_id, field="node id")
        if role not in ROLES:
            raise ValueError(f"node {node_id!r}: role {role!r} is not one of {ROLES}")

    pattern_rules = [r for r in ACL_RULES if "{node_id}" in r.pattern]
    user_rules = [r for r in ACL_RULES if "{node_id}" not in r.pattern]
    lines = [
        "# fedbus ACL, generated from broker/topics.py ACL_RULES by broker/server/mosquitto_files.py.",
        f"# federation {federation}; do not edit: run `fedbus provision` again instead.",
        "",
    ]
    for rule in pattern_rules:
        topic = rule.topic_pattern(federation=federation, node_id="%u")
        lines.append(f"pattern {_MOSQUITTO_ACCESS[rule.action]} {topic}")
    lines.append("")

    for node_id in sorted(nodes):
        role = nodes[node_id]
        denies: list[str] = []
        for rule in pattern_rules:
            topic = rule.topic_pattern(federation=federation, node_id=node_id)
            if not acl_allows(
                federation=federation,
                node_id=node_id,
                role=role,
                action=rule.action,
                topic=topic,
            ):
                # `topic deny` withdraws every access to the topic; that is exact only when
                # the role has no other right on it, which the caller's tests check.
                denies.append(topic)
        grants = [
            (_MOSQUITTO_ACCESS[r.action], r.topic_pattern(federation=federation, node_id=node_id))
            for r in user_rules
            if r.role == role
        ]
        lines.append(f"user {node_id}")
        lines.extend(f"topic deny {topic}" for topic in dict.fromkeys(denies))
        lines.extend(f"topic {access} {topic}" for access, topic in grants)
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class AclFile:
    """A parsed acl_file, evaluated the way Mosquitto 2's default ACL check does.

    Used by the tests to prove that the generated file and `acl_allows` let exactly the same
    frames through, without starting a broker per case.
    """

    patterns: tuple[tuple[str, str], ...]
    users: Mapping[str, tuple[tuple[str, str], ...]]

    @classmethod
    def parse(cls, text: str) -> AclFile:
        patterns: list[tuple[str, str]] = []
        users: dict[str, list[tuple[str, str]]] = {}
        user: str | None = None
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            if keyword == "user":
                user = rest.strip()
                users.setdefault(user, [])
                continue
            access, _, topic = rest.partition(" ")
            if keyword == "pattern":
                patterns.append((access, topic))
            elif keyword == "topic":
                users.setdefault(user or "", []).append((access, topic))
        return cls(tuple(patterns), {u: tuple(e) for u, e in users.items()})

    def allows(self, username: str, access: str, topic: str) -> bool:
        """Mosquitto 2 `acl_check_default`: user entries in order (deny wins), then patterns."""
        for entry_access, entry_topic in self.users.get(username, ()):
            if topic_matches(entry_topic, topic):
                if entry_access == "deny":
                    return False
                if entry_access in (access, "readwrite"):
                    return True
        if any(c in username for c in "+#/"):
            return False
        for entry_access, entry_topic in self.patterns:
            if topic_matches(entry_topic.replace("%u", username), topic) and (
                entry_access in (access, "readwrite")
            ):
                return True
        return False


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS listener: the CA that signs client certificates, and the server's."""

    ca: Path
    cert: Path
    key: Path
    # Certificates of removed nodes (PEM CRL signed by the CA): refused at the handshake.
    crl: Path | None = None


@dataclass(frozen=True)
class Listener:
    port: int
    address: str = "127.0.0.1"
    tls: TlsFiles | None = None


@dataclass(frozen=True)
class MosquittoConfig:
    listeners: tuple[Listener, ...]
    password_file: Path
    acl_file: Path
    data_dir: Path
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    # A node away or lagging (its persistent session queues for it) must not grow the broker
    # without bound: past either limit Mosquitto drops the newest frame for that client and
    # counts it ($SYS/broker/publish/messages/dropped). The same bounds as the ZeroMQ
    # broker's backlog; the byte limit must hold the largest frame.
    max_queued_messages: int = DEFAULT_MAX_QUEUED_FRAMES
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    log_dest: str = "stderr"
    # Set for a broker started as root (tests, containers): Mosquitto would otherwise switch
    # to the "mosquitto" user, which cannot read the 0600 password file.
    run_as_user: str | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)


def render_conf(config: MosquittoConfig) -> str:
    """mosquitto.conf text: every listener authenticates (password + ACL), none is anonymous."""
    if not config.listeners:
        raise ValueError("a Mosquitto config needs at least one listener")
    if config.max_frame_bytes <= 0:
        raise ValueError("max_frame_bytes must be positive")
    if config.max_queued_messages <= 0:
        raise ValueError("max_queued_messages must be positive (0 would mean unbounded)")
    if config.max_queued_bytes < config.max_frame_bytes:
        raise ValueError(
            f"max_queued_bytes ({config.max_queued_bytes}) must hold one frame of "
            f"max_frame_bytes ({config.max_frame_bytes}); 0 would mean unbounded"
        )
    out = [
        "# fedbus Mosquitto config, generated by broker/server/mosquitto_files.py. Do not edit by hand.",
        "per_listener_settings true",
        "",
        f"persistence true\npersistence_location {_dir(config.data_dir)}",
        "autosave_interval 60",
        f"log_dest {config.log_dest}",
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information",
        "connection_messages true",
        "log_timestamp true",
        "",
        "# The frame limit of fedbus's codec, so an oversized frame is refused at the door.",
        f"message_size_limit {config.max_frame_bytes}",
        f"max_packet_size {config.max_frame_bytes + PACKET_OVERHEAD_BYTES}",
        "# Per-client queues are bounded in messages and bytes; past them frames are dropped.",
        f"max_queued_messages {config.max_queued_messages}",
        f"max_queued_bytes {config.max_queued_bytes}",
        "max_inflight_messages 20",
        "persistent_client_expiration 1d",
        "set_tcp_nodelay true",
    ]
    if config.run_as_user:
        out.append(f"user {config.run_as_user}")
    out.extend(config.extra)
    for listener in config.listeners:
        out += [
            "",
            f"listener {listener.port} {listener.address}",
            "protocol mqtt",
            "allow_anonymous false",
            # A listener option: given before the first `listener` line it would make
            # Mosquitto open its default listener on port 1883 as well.
            "allow_zero_length_clientid false",
            # The client id is the authenticated name, whatever CONNECT says: a node can no
            # longer connect under another node's id and take over (and wipe) its session.
            "use_username_as_clientid true",
            f"password_file {config.password_file}",
            f"acl_file {config.acl_file}",
        ]
        if listener.tls is not None:
            out += [
                f"cafile {listener.tls.ca}",
                f"certfile {listener.tls.cert}",
                f"keyfile {listener.tls.key}",
                *([f"crlfile {listener.tls.crl}"] if listener.tls.crl else []),
                # A client certificate from the federation CA is the node's identity: its
                # common name is the username (so the ACL's %u and, above, the client id),
                # whatever username and password the client sends. A stolen password is of
                # no use without the node's private key, and a removed node's certificate
                # is on the CRL.
                "require_certificate true",
                "use_identity_as_username true",
                "tls_version tlsv1.2",
            ]
    return "\n".join(out) + "\n"


def _dir(path: Path) -> str:
    # Mosquitto concatenates persistence_location with the file name: it needs the slash.
    text = str(path)
    return text if text.endswith("/") else text + "/"


@dataclass(frozen=True)
class BrokerFiles:
    conf: Path
    password_file: Path
    acl_file: Path
    data_dir: Path


def write_broker_files(
    directory: Path,
    *,
    federation: str,
    nodes: Mapping[str, str],
    passwords: Mapping[str, str],
    listeners: tuple[Listener, ...],
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    data_dir: Path | None = None,
    run_as_user: str | None = None,
    install_dir: Path | None = None,
    password_hashes: Mapping[str, str] | None = None,
) -> BrokerFiles:
    """Write mosquitto.conf, passwd and acl into `directory`.

    `install_dir` is where the files will live on the broker host (the paths inside the
    conf); it defaults to `directory` itself. `password_hashes`: nodes whose clear-text
    password stays with them (envoys), by their Mosquitto hash.
    """
    missing = sorted(set(nodes) - set(passwords) - set(password_hashes or {}))
    if missing:
        raise ValueError(f"no MQTT password for node(s) {', '.join(missing)}")
    directory = Path(directory)
    home = Path(install_dir) if install_dir is not None else directory.resolve()
    data = Path(data_dir) if data_dir is not None else home / "mosquitto-data"
    config = MosquittoConfig(
        listeners=listeners,
        password_file=home / "mosquitto.passwd",
        acl_file=home / "mosquitto.acl",
        data_dir=data,
        max_frame_bytes=max_frame_bytes,
        run_as_user=run_as_user,
    )
    if install_dir is None:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
    # 0600 all three: the password hashes above all, and nothing here is for other users.
    for name, text in (
        ("mosquitto.passwd", render_passwd(passwords, hashes=password_hashes)),
        ("mosquitto.acl", render_acl(federation=federation, nodes=nodes)),
        ("mosquitto.conf", render_conf(config)),
    ):
        atomic_write_text(directory / name, text, mode=SECRET_MODE)
    return BrokerFiles(
        conf=directory / "mosquitto.conf",
        password_file=directory / "mosquitto.passwd",
        acl_file=directory / "mosquitto.acl",
        data_dir=data,
    )
