"""`fedbus provision`: one startup kit per node of a federation, and the broker's.

    fedbus provision --federation NAME --envoys a,b,c --out kits/ [--transport zmq|mqtt]
                     [--broker-host H] [--port P] [--install-root /etc/fedbus]
                     [--state-root /var/lib/fedbus] [--remove x,y]

Kit layout (each folder is copied as a whole to its machine, under install-root/<name>):

    kits/roster.toml           public facts: nodes, roles, public keys, certificate hashes
    kits/ca/                   the federation TLS CA (its key never leaves the operator)
    kits/broker/               broker.toml (ZeroMQ daemon), broker.key, keys/<node>.pub,
                               mosquitto.conf, mosquitto.passwd, mosquitto.acl, tls/
    kits/director/             director.toml, signing.key, curve.key, mqtt.password, tls/,
                               envoys/<id>.sign.pub (every envoy: secure aggregation needs them)
    kits/<envoy>/              envoy.toml, signing.key, curve.key, mqtt.password, tls/,
                               director.sign.pub, peers/<id>.sign.pub

Every private key is written 0600, atomically, once: running provision again ADDS envoys (the
roster is the union of the old one and `--envoys`) and rewrites the public and derived files
(configs, peer lists, ACL, allow-list), never an existing secret. Settings an operator edited
in a node's config (its [data], training recipe, ...) are kept; only the fields provision
manages are rewritten. `--remove` takes envoys out: their client certificates go on the CA's
revocation list (broker/tls/crl.pem, enforced by Mosquitto), their kits move to removed/, and
the rewrite drops them from every allow-list, password file, ACL and peer list.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.credentials import generate_curve_keypair, read_key_file, write_secret_key
from broker.mosquitto import (
    Listener,
    TlsFiles,
    generate_password,
    write_broker_files,
    write_private,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.topics import validate_id
from crypto.signing import generate_signing_keypair, signing_public_key
from node.config import dump_toml

REPO = Path(__file__).resolve().parents[1]
DIRECTOR_TEMPLATE = REPO / "configs" / "director.toml"
DEFAULT_PORTS = {"zmq": 5555, "mqtt": 8883}
CA_DAYS = 3650
CERT_DAYS = 825


class ProvisionError(ValueError):
    """Bad arguments or an existing kit that cannot be extended; the message says which."""


# --------------------------------------------------------------------------- files


def write_public(path: Path, data: bytes | str) -> None:
    """A public file (certificate, public key, config): atomic, world-readable."""
    write_private(path, data, mode=0o644)


def _ensure_secret(path: Path, make: Any) -> bytes:
    """The secret at `path`, created by `make()` (bytes) only if it does not exist yet."""
    if path.exists():
        return path.read_bytes()
    data = make()
    write_private(path, data)
    return data


# --------------------------------------------------------------------------- TLS


def _new_ec_key() -> ec.EllipticCurvePrivateKey:
    # ECDSA P-256: what every TLS stack (OpenSSL under Mosquitto, Python's ssl) accepts.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{path}: expected an ECDSA private key")
    return key


def make_ca(federation: str, *, days: int = CA_DAYS) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a new federation CA."""
    key = _new_ec_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbus"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fedbus {federation} CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def issue_cert(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    *,
    common_name: str,
    server_names: Sequence[str] = (),
    client: bool = True,
    days: int = CERT_DAYS,
) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) signed by the CA: a server certificate when `server_names`
    (DNS names or IP addresses) are given, else a client certificate for `common_name`."""
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = _new_ec_key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbus"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if server_names:
        sans: list[x509.GeneralName] = []
        for name in dict.fromkeys(server_names):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if not client and not server_names:
        raise ValueError("a certificate is either for a server (server_names) or a client")
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def cert_fingerprint(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex()


# --------------------------------------------------------------------------- the kits


@dataclass
class NodeKeys:
    node_id: str
    role: str
    signing_public: str  # hex
    curve_public: str  # z85
    cert_sha256: str


@dataclass
class Plan:
    federation: str
    envoys: list[str]
    director_id: str
    out: Path
    transport: str
    broker_host: str
    port: int
    bind_address: str
    install_root: Path
    state_root: Path | None
    mosquitto_user: str | None
    rounds: int
    data_path: str
    max_frame_bytes: int
    remove: list[str] = field(default_factory=list)

    def kit(self, name: str) -> Path:
        return self.out / name

    def installed(self, name: str) -> Path:
        return self.install_root / name

    @property
    def bus_url(self) -> str:
        host = self.broker_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        scheme = "zmq+tcp" if self.transport == "zmq" else "mqtts"
        return f"{scheme}://{host}:{self.port}"

    def state_dir(self, name: str) -> str:
        return str(self.state_root / name) if self.state_root else "state"


def _load_roster(out: Path) -> dict[str, Any] | None:
    path = out / "roster.toml"
    if not path.exists():
        return None
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ProvisionError(f"{path}: not valid TOML: {exc}") from None


def _node_secrets(plan: Plan, name: str, role: str, ca: tuple[bytes, bytes]) -> NodeKeys:
    """Create (once) and return the public side of a node's keys."""
    kit = plan.kit(name)
    (kit / "tls").mkdir(parents=True, exist_ok=True)
    os.chmod(kit, 0o700)
    # Ed25519 signing key, hex text (node.wire.read_key_file reads it).
    seed = _ensure_secret(
        kit / "signing.key", lambda: (generate_signing_keypair().private.hex() + "\n").encode()
    )
    signing_public = signing_public_key(bytes.fromhex(seed.decode().strip())).hex()
    write_public(kit / "signing.pub", signing_public + "\n")
    # CurveZMQ key pair, Z85 text (broker.credentials format).
    if not (kit / "curve.key").exists():
        write_secret_key(kit / "curve.key", generate_curve_keypair().secret)
    import zmq

    curve_public = zmq.curve_public(
        read_key_file(kit / "curve.key", field="curve.key").encode("ascii")
    ).decode("ascii")
    write_public(kit / "curve.pub", curve_public + "\n")
    # MQTT password: 256 random bits.
    _ensure_secret(kit / "mqtt.password", lambda: (generate_password() + "\n").encode())
    # TLS client certificate from the federation CA.
    if not (kit / "tls" / "client.key").exists() or not (kit / "tls" / "client.crt").exists():
        key_pem, cert_pem = issue_cert(*ca, common_name=name)
        write_private(kit / "tls" / "client.key", key_pem)
        write_public(kit / "tls" / "client.crt", cert_pem)
    write_public(kit / "tls" / "ca.crt", ca[1])
    fingerprint = cert_fingerprint((kit / "tls" / "client.crt").read_bytes())
    return NodeKeys(name, role, signing_public, curve_public, fingerprint)


def _merge_config(path: Path, base: dict[str, Any], managed: dict[str, Any]) -> dict[str, Any]:
    """The existing config (or `base`) with every `managed` field set."""
    current = base
    if path.exists():
        try:
            with path.open("rb") as fh:
                current = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ProvisionError(f"{path}: not valid TOML (fix or delete it): {exc}") from None
    merged = dict(current)
    for key, value in managed.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            table = dict(merged[key])
            table.update(value)
            merged[key] = table
        else:
            merged[key] = value
    return merged


def _credentials_table(plan: Plan, name: str) -> dict[str, Any]:
    table: dict[str, Any] = {
        "curve_secret_key": "curve.key",
        "curve_public_key": "curve.pub",
        "broker_public_key": "broker.pub",
        "username": name,
        "password_file": "mqtt.password",
    }
    if plan.transport == "mqtt":
        table.update(tls_ca="tls/ca.crt", tls_cert="tls/client.crt", tls_key="tls/client.key")
    return table


def _director_template() -> dict[str, Any]:
    if DIRECTOR_TEMPLATE.exists():
        with DIRECTOR_TEMPLATE.open("rb") as fh:
            return tomllib.load(fh)
    return {}


def provision(plan: Plan) -> dict[str, NodeKeys]:
    """Write or extend every kit under `plan.out`; returns the public keys per node."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    roster = _load_roster(out)
    known: list[str] = []
    if roster is not None:
        if roster.get("federation") != plan.federation:
            raise ProvisionError(
                f"{out / 'roster.toml'} is federation {roster.get('federation')!r}, not "
                f"{plan.federation!r}: use another --out"
            )
        if roster.get("director") != plan.director_id:
            raise ProvisionError(
                f"{out / 'roster.toml'}: the director is {roster.get('director')!r}; "
                "it cannot change in an existing kit"
            )
        known = [n for n, v in roster.get("nodes", {}).items() if v.get("role") == "envoy"]
        plan.envoys = list(dict.fromkeys([*known, *plan.envoys]))
    unknown = [r for r in plan.remove if r not in known]
    if unknown:
        raise ProvisionError(f"--remove: {', '.join(unknown)} is not an envoy of this kit")
    plan.envoys = [e for e in plan.envoys if e not in plan.remove]
    if not plan.envoys:
        raise ProvisionError("a federation needs at least one envoy")
    names = [plan.director_id, *plan.envoys]
    if len(set(names)) != len(names):
        raise ProvisionError("node ids must be unique (the director's id included)")
    if "broker" in names or "ca" in names:
        raise ProvisionError('"broker" and "ca" are kit folder names; pick other node ids')

    # The CA, once.
    ca_dir = out / "ca"
    ca_dir.mkdir(exist_ok=True)
    os.chmod(ca_dir, 0o700)
    if not (ca_dir / "ca.key").exists():
        key_pem, cert_pem = make_ca(plan.federation)
        write_private(ca_dir / "ca.key", key_pem)
        write_public(ca_dir / "ca.crt", cert_pem)
    ca = ((ca_dir / "ca.key").read_bytes(), (ca_dir / "ca.crt").read_bytes())
    for name in plan.remove:
        _revoke(plan, name)

    keys: dict[str, NodeKeys] = {}
    for name in names:
        role = "director" if name == plan.director_id else "envoy"
        keys[name] = _node_secrets(plan, name, role, ca)

    _write_broker_kit(plan, keys, ca)
    broker_public = (plan.kit("broker") / "broker.pub").read_text()
    for name in names:
        write_public(plan.kit(name) / "broker.pub", broker_public)
    _write_director_kit(plan, keys)
    for index, name in enumerate(plan.envoys):
        _write_envoy_kit(plan, keys, name, index)
    _write_roster(plan, keys)
    return keys


def _revoke(plan: Plan, name: str) -> None:
    """Take an envoy out: its certificate goes on the CRL, its kit to removed/ (so that
    adding the same id again makes fresh keys), and the rewrite that follows drops it from
    the allow-list, password file, ACL and every peer list."""
    kit = plan.kit(name)
    revoked_path = plan.out / "ca" / "revoked.toml"
    entries = _load_revoked(revoked_path)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    if (kit / "tls" / "client.crt").exists():
        cert = x509.load_pem_x509_certificate((kit / "tls" / "client.crt").read_bytes())
        entries.append(
            {"node_id": name, "serial": format(cert.serial_number, "x"), "date": now.isoformat()}
        )
        lines = ["# Revoked client certificates (fedbus provision --remove). Do not edit.", ""]
        for entry in entries:
            lines += [
                "[[revoked]]",
                f'node_id = "{entry["node_id"]}"',
                f'serial = "{entry["serial"]}"',
                f'date = "{entry["date"]}"',
                "",
            ]
        write_public(revoked_path, "\n".join(lines))
    removed = plan.out / "removed"
    removed.mkdir(mode=0o700, exist_ok=True)
    kit.rename(removed / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}")
    for stale in [
        plan.kit("broker") / "keys" / f"{name}.pub",
        plan.kit(plan.director_id) / "envoys" / f"{name}.sign.pub",
        *(plan.kit(e) / "peers" / f"{name}.sign.pub" for e in plan.envoys),
    ]:
        stale.unlink(missing_ok=True)


def _load_revoked(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open("rb") as fh:
        return list(tomllib.load(fh).get("revoked", []))


def make_crl(
    ca_key_pem: bytes, ca_cert_pem: bytes, serials: Sequence[tuple[int, dt.datetime]]
) -> bytes:
    """A PEM CRL of the CA listing `serials` (serial, revocation date)."""
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        # The broker gets its CRL from the operator with every provision run, not from a
        # distribution point: an expired CRL would only lock every node out.
        .next_update(ca_cert.not_valid_after_utc)
    )
    for serial, when in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def _write_broker_kit(plan: Plan, keys: dict[str, NodeKeys], ca: tuple[bytes, bytes]) -> None:
    kit = plan.kit("broker")
    (kit / "keys").mkdir(parents=True, exist_ok=True)
    (kit / "tls").mkdir(exist_ok=True)
    os.chmod(kit, 0o700)
    if not (kit / "broker.key").exists():
        write_secret_key(kit / "broker.key", generate_curve_keypair().secret)
    import zmq

    public = zmq.curve_public(read_key_file(kit / "broker.key").encode("ascii")).decode("ascii")
    write_public(kit / "broker.pub", public + "\n")
    # The TLS server certificate names the host nodes dial, plus loopback for local checks.
    server_names = [plan.broker_host, "localhost", "127.0.0.1"]
    cert_path = kit / "tls" / "server.crt"
    if cert_path.exists() and not _cert_names_cover(cert_path.read_bytes(), server_names):
        cert_path.unlink()  # the broker moved: a new server certificate, same CA
    if not (kit / "tls" / "server.key").exists() or not cert_path.exists():
        key_pem, cert_pem = issue_cert(
            *ca, common_name=plan.broker_host, server_names=server_names, client=False
        )
        write_private(kit / "tls" / "server.key", key_pem)
        write_public(cert_path, cert_pem)
    write_public(kit / "tls" / "ca.crt", ca[1])
    revoked = [
        (int(e["serial"], 16), dt.datetime.fromisoformat(e["date"]))
        for e in _load_revoked(plan.out / "ca" / "revoked.toml")
    ]
    write_public(kit / "tls" / "crl.pem", make_crl(*ca, revoked))

    # ZeroMQ broker daemon config (broker/daemon.py format): the CurveZMQ allow-list.
    for name, node in keys.items():
        write_public(kit / "keys" / f"{name}.pub", node.curve_public + "\n")
    bind_host = plan.bind_address if ":" not in plan.bind_address else f"[{plan.bind_address}]"
    zmq_port = plan.port if plan.transport == "zmq" else DEFAULT_PORTS["zmq"]
    text = (
        "# fedbus ZeroMQ broker: `fedbus broker --config broker.toml`. Written by `fedbus "
        "provision`;\n# run provision again to add envoys (it rewrites this file).\n"
    )
    text += dump_toml(
        {
            "federation": plan.federation,
            "bind": f"tcp://{bind_host}:{zmq_port}",
            "secret_key_file": "broker.key",
            "max_frame_bytes": plan.max_frame_bytes,
        }
    )
    for name, node in keys.items():
        text += (
            f'\n[[allow]]\nnode_id = "{name}"\nrole = "{node.role}"\n'
            f'public_key_file = "keys/{name}.pub"\n'
        )
    write_public(kit / "broker.toml", text)

    # Mosquitto: a TLS listener for the nodes, passwords + the ACL generated from
    # broker/topics.py. Paths are where the kit will live on the broker host.
    mqtt_port = plan.port if plan.transport == "mqtt" else DEFAULT_PORTS["mqtt"]
    home = plan.installed("broker")
    passwords = {name: (plan.kit(name) / "mqtt.password").read_text().strip() for name in keys}
    write_broker_files(
        kit,
        federation=plan.federation,
        nodes={name: node.role for name, node in keys.items()},
        passwords=passwords,
        listeners=(
            Listener(
                port=mqtt_port,
                address=plan.bind_address,
                tls=TlsFiles(
                    ca=home / "tls" / "ca.crt",
                    cert=home / "tls" / "server.crt",
                    key=home / "tls" / "server.key",
                    crl=home / "tls" / "crl.pem",
                ),
            ),
        ),
        max_frame_bytes=plan.max_frame_bytes,
        data_dir=(plan.state_root / "broker" if plan.state_root else home / "mosquitto-data"),
        run_as_user=plan.mosquitto_user,
        install_dir=home,
    )
    if plan.state_root is None:
        (kit / "mosquitto-data").mkdir(mode=0o700, exist_ok=True)


def _cert_names_cover(cert_pem: bytes, names: Sequence[str]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    present = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    present |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return all(n in present for n in names)


def _write_director_kit(plan: Plan, keys: dict[str, NodeKeys]) -> None:
    name = plan.director_id
    kit = plan.kit(name)
    (kit / "envoys").mkdir(exist_ok=True)
    for envoy in plan.envoys:
        write_public(kit / "envoys" / f"{envoy}.sign.pub", keys[envoy].signing_public + "\n")
    n = len(plan.envoys)
    template = _director_template()
    template.pop("envoy_signing_keys", None)
    managed = {
        "federation": plan.federation,
        "node_id": name,
        "bus_url": plan.bus_url,
        "signing_key": "signing.key",
        "credentials": _credentials_table(plan, name),
        "envoy_signing_keys": {e: f"envoys/{e}.sign.pub" for e in plan.envoys},
        "target_envoys": max(n, 2),
        "max_frame_bytes": plan.max_frame_bytes,
    }
    path = kit / "director.toml"
    base = {
        **template,
        "state_dir": plan.state_dir(name),
        "rounds": plan.rounds,
        # Secure aggregation with n envoys: tolerate a third of them dropping out.
        "min_envoys": max(2, n - n // 3),
    }
    config = _merge_config(path, base, managed)
    # A fresh table, not a merge: an envoy no longer listed must not stay trusted.
    config["envoy_signing_keys"] = managed["envoy_signing_keys"]
    config["credentials"] = managed["credentials"]
    _write_config(path, config, "director")


def _write_envoy_kit(plan: Plan, keys: dict[str, NodeKeys], name: str, index: int) -> None:
    kit = plan.kit(name)
    (kit / "peers").mkdir(exist_ok=True)
    write_public(kit / "director.sign.pub", keys[plan.director_id].signing_public + "\n")
    for peer in plan.envoys:
        write_public(kit / "peers" / f"{peer}.sign.pub", keys[peer].signing_public + "\n")
    template = _director_template()
    model = dict(template.get("model", {}))
    model.pop("init_seed", None)
    base: dict[str, Any] = {
        "state_dir": plan.state_dir(name),
        # Edit [data] to point at this hospital's images; provision keeps your edits.
        "data": {
            "source": "pneumoniamnist",
            "path": plan.data_path,
            "partition": {"scheme": "dirichlet", "index": index, "count": len(plan.envoys)},
        },
        "model": model,
    }
    managed = {
        "node_id": name,
        "federation": plan.federation,
        "bus_url": plan.bus_url,
        "director_id": plan.director_id,
        "signing_key": "signing.key",
        "director_signing_key": "director.sign.pub",
        "peer_signing_keys": {p: f"peers/{p}.sign.pub" for p in plan.envoys},
        "credentials": _credentials_table(plan, name),
        "max_frame_bytes": plan.max_frame_bytes,
    }
    path = kit / "envoy.toml"
    config = _merge_config(path, base, managed)
    config["peer_signing_keys"] = managed["peer_signing_keys"]
    config["credentials"] = managed["credentials"]
    _write_config(path, config, "envoy")


def _write_config(path: Path, config: dict[str, Any], kind: str) -> None:
    from node.config import ConfigError, parse_config

    header = (
        f"# fedbus {kind} config, written by `fedbus provision`. Relative paths are relative "
        "to this file.\n# Running provision again rewrites the bus, key and peer fields and "
        "keeps the rest.\n"
    )
    text = header + dump_toml(config)
    # Validate before writing: a kit that the node would refuse must not be written.
    try:
        data = tomllib.loads(text)
        if kind == "director":
            from node.config import DirectorConfig as Kind
        else:
            from node.config import EnvoyConfig as Kind  # type: ignore[assignment]
        parse_config(data, Kind, source=str(path), base=path.resolve().parent)
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        raise ProvisionError(f"generated {kind} config is invalid: {exc}") from None
    write_public(path, text)


def _write_roster(plan: Plan, keys: dict[str, NodeKeys]) -> None:
    lines = [
        "# The federation's public facts, written by `fedbus provision` (no secrets here).",
        f'federation = "{plan.federation}"',
        f'director = "{plan.director_id}"',
        f'transport = "{plan.transport}"',
        f'bus_url = "{plan.bus_url}"',
        f'ca_sha256 = "{cert_fingerprint((plan.out / "ca" / "ca.crt").read_bytes())}"',
        "",
        "[broker]",
        f'host = "{plan.broker_host}"',
        f'curve_public_key = "{(plan.kit("broker") / "broker.pub").read_text().strip()}"',
        f'tls_cert_sha256 = "{cert_fingerprint((plan.kit("broker") / "tls" / "server.crt").read_bytes())}"',
        "",
    ]
    for name, node in keys.items():
        lines += [
            f'[nodes."{name}"]',
            f'role = "{node.role}"',
            f'signing_public_key = "{node.signing_public}"',
            f'curve_public_key = "{node.curve_public}"',
            f'tls_cert_sha256 = "{node.cert_sha256}"',
            "",
        ]
    write_public(plan.out / "roster.toml", "\n".join(lines))


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedbus provision",
        description="Keys, certificates, configs and broker ACLs: one startup kit per node.",
    )
    p.add_argument("--federation", required=True)
    p.add_argument("--envoys", default="", help="comma-separated envoy ids to add, e.g. a,b,c")
    p.add_argument(
        "--remove",
        default="",
        help="comma-separated envoy ids to take out (certificate revoked, keys dropped everywhere)",
    )
    p.add_argument("--out", required=True, type=Path, help="folder of the kits (created)")
    p.add_argument("--transport", choices=("zmq", "mqtt"), default="zmq")
    p.add_argument("--broker-host", default="127.0.0.1", help="host name the nodes dial")
    p.add_argument("--port", type=int, help="broker port (default 5555 zmq, 8883 mqtt)")
    p.add_argument("--bind-address", default="0.0.0.0", help="address the broker listens on")
    p.add_argument("--director-id", default="director")
    p.add_argument(
        "--install-root",
        type=Path,
        help="where kits live on their hosts (default: --out itself), e.g. /etc/fedbus",
    )
    p.add_argument(
        "--state-root",
        type=Path,
        help="node state dirs as STATE_ROOT/<node> (e.g. /var/lib/fedbus for systemd); "
        "default: 'state' inside each kit",
    )
    p.add_argument(
        "--mosquitto-user",
        default=None,
        help="the `user` Mosquitto switches to when started as root (systemd runs it as fedbus)",
    )
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument(
        "--data",
        default="data/pneumoniamnist.npz",
        help="the envoys' [data] path (each hospital edits its own)",
    )
    p.add_argument("--max-frame-bytes", type=int, default=64 * 1024 * 1024)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = _plan(args)
        keys = provision(plan)
    except (ProvisionError, ValueError) as exc:
        print(f"fedbus provision: error: {exc}", file=sys.stderr)
        return 2
    envoys = [k for k, v in keys.items() if v.role == "envoy"]
    print(
        f"federation {plan.federation}: kits for broker, {plan.director_id} and "
        f"{len(envoys)} envoys ({', '.join(envoys)}) in {plan.out} (bus {plan.bus_url})"
    )
    return 0


def _plan(args: argparse.Namespace) -> Plan:
    federation = validate_id(args.federation, field="--federation")
    envoys = [e.strip() for e in args.envoys.split(",") if e.strip()]
    remove = [e.strip() for e in args.remove.split(",") if e.strip()]
    if not envoys and not remove:
        raise ProvisionError("give --envoys to add (or --remove to take out) at least one envoy")
    if set(envoys) & set(remove):
        raise ProvisionError("an envoy cannot be added and removed in the same run")
    for envoy in envoys:
        validate_id(envoy, field="--envoys entry")
        if envoy == "broadcast":
            raise ProvisionError('--envoys: "broadcast" is reserved')
    director = validate_id(args.director_id, field="--director-id")
    port = args.port if args.port is not None else DEFAULT_PORTS[args.transport]
    if not 0 < port < 65536:
        raise ProvisionError(f"--port {port} is not a TCP port")
    if args.rounds < 1:
        raise ProvisionError("--rounds must be >= 1")
    if args.max_frame_bytes < 1024:
        raise ProvisionError("--max-frame-bytes must be at least 1024")
    out = args.out.resolve()
    host = args.broker_host
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ProvisionError(f"--broker-host {host!r} is not a host name or address")
    return Plan(
        federation=federation,
        envoys=list(dict.fromkeys(envoys)),
        director_id=director,
        out=out,
        transport=args.transport,
        broker_host=host,
        port=port,
        bind_address=args.bind_address,
        install_root=(args.install_root.resolve() if args.install_root else out),
        state_root=args.state_root,
        mosquitto_user=args.mosquitto_user,
        rounds=args.rounds,
        data_path=args.data,
        max_frame_bytes=args.max_frame_bytes,
        remove=remove,
    )


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
