"""`fedbus provision`: one startup kit per node of a federation, and the broker's.

    fedbus provision --federation NAME --envoys a,b,c --public-keys DIR|FILE ... --out kits/
                     [--transport zmq|mqtt] [--broker-host H] [--port P]
                     [--install-root /etc/fedbus] [--state-root /var/lib/fedbus] [--remove x,y]

Envoys make their own keys (`fedbus envoy init`, node.identity) and hand over only their
public half, `<id>.public.toml`: provisioning never holds, makes or re-makes an envoy's
secret. A new envoy without such a file is an error, so is one whose public keys differ from
the roster's (an identity is replaced only by removing the envoy and adding it again).

Kit layout (each folder is copied as a whole to its machine, under install-root/<name>):

    kits/roster.toml           public facts: nodes, roles, public keys, certificate hashes
    kits/ca/                   the federation TLS CA (its key never leaves the operator)
    kits/broker/               broker.toml (ZeroMQ daemon), broker.key, keys/<node>.pub,
                               mosquitto.conf, mosquitto.passwd, mosquitto.acl, tls/
    kits/director/             director.toml, signing.key, curve.key, mqtt.password, tls/,
                               envoys/<id>.sign.pub (every envoy: secure aggregation needs them)
    kits/<envoy>/              envoy.toml, tls/client.crt (from its request), tls/ca.crt,
                               broker.pub, director.sign.pub, peers/<id>.sign.pub: public files
                               only, to add to the envoy's own folder (where `envoy init` put
                               its keys, which envoy.toml names)

The director's, broker's and CA's secrets are written 0600, atomically, once; a secret that
went missing from an existing kit is an error, never silently replaced. Running provision
again ADDS envoys (the roster is the union of the old one and `--envoys`) and rewrites the
public and derived files (configs, peer lists, ACL, allow-list). Settings an operator edited
in a node's config (its [data], training recipe, ...) are kept; only the fields provision
manages are rewritten. `--remove` takes envoys out: their client certificates go on the CA's
revocation list (broker/tls/crl.pem, enforced by Mosquitto), their kits move to removed/, and
the rewrite drops them from every allow-list, password file, ACL and peer list.

`fedbus demo` builds its federation with `provision(Plan(...))` too, then `update_config` for
its own settings: there is one way to make keys, configs and broker files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from broker.files import (
    PRIVATE_DIR_MODE,
    PUBLIC_MODE,
    SECRET_MODE,
    atomic_write_bytes,
    private_dir,
    read_toml,
)
from broker.keys import curve_public_key, generate_curve_keypair, read_key_file, write_key_file
from broker.server.config import AllowEntry, BrokerFile, Heartbeat
from broker.server.mosquitto_files import (
    Listener,
    TlsFiles,
    generate_password,
    write_broker_files,
)
from broker.topics import validate_id
from crypto.signing import generate_signing_keypair, signing_public_key
from node.config import DirectorConfig, EnvoyConfig, parse_config
from node.errors import ExitCode, FedbusError
from node.identity import IdentityError, PublicIdentity, read_public_identity
from node.pki import (
    CsrError,
    cert_fingerprint,
    cert_matches_request,
    cert_names_cover,
    cert_serial,
    issue_cert,
    issue_cert_for_csr,
    make_ca,
    make_crl,
)
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.configfile import ConfigError, dump_toml, parse_toml

# The configs fedbus ships: the repository's configs/ folder, installed as node/configs.
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
DIRECTOR_TEMPLATE = SHIPPED_CONFIGS / "director.toml"
DEFAULT_PORTS = {"zmq": 5555, "mqtt": 8883}
# Kit folders hold secrets: only their owner may list or enter them.
KIT_DIR_MODE = PRIVATE_DIR_MODE

NodeKind = Literal["director", "envoy"]
DataSourceKind = Literal["pneumoniamnist", "image_folder"]
_SCHEMAS: dict[NodeKind, type[DirectorConfig] | type[EnvoyConfig]] = {
    "director": DirectorConfig,
    "envoy": EnvoyConfig,
}


class ProvisionError(FedbusError, ValueError):
    """Bad arguments or an existing kit that cannot be extended; the message says which."""

    exit_code = ExitCode.USAGE


# --------------------------------------------------------------------------- files


def _write_public(path: Path, data: str | bytes) -> None:
    """A public file (certificate, public key, config): atomic, world-readable."""
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data, mode=PUBLIC_MODE)


def _ensure_secret(path: Path, make: Callable[[], bytes], *, existing_kit: bool) -> bytes:
    """The secret at `path`, created by `make()` only the first time; in a kit that exists
    already a missing secret is an error (a new one would be a new identity)."""
    if path.exists():
        return path.read_bytes()
    if existing_kit:
        raise ProvisionError(
            f"{path} is missing from an existing kit: provision never makes a new identity "
            "silently; restore it from a backup (or remove the node and add it again)"
        )
    data = make()
    atomic_write_bytes(path, data, mode=SECRET_MODE)
    return data


def _kit_dir(path: Path) -> Path:
    return private_dir(path)


def _read_toml_if_present(path: Path) -> dict[str, Any] | None:
    return read_toml(path) if path.exists() else None


# --------------------------------------------------------------------------- the plan


@dataclass
class NodeKeys:
    node_id: str
    role: NodeKind
    signing_public: str  # hex
    curve_public: str  # z85
    cert_sha256: str
    # Envoys: their MQTT password's hash and their certificate request (the secrets stay
    # with them); the director's password is in its kit.
    mqtt_password_hash: str = ""
    tls_csr: str = ""


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
    # What the envoys' [data] path holds: "pneumoniamnist" (the .npz) or "image_folder".
    data_source: DataSourceKind = "pneumoniamnist"
    remove: list[str] = field(default_factory=list)
    # The ZeroMQ broker's heartbeat (broker.toml [heartbeat]); the daemon's defaults unless set.
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    # The public halves of the envoys' identities (`fedbus envoy init`), by node id.
    public_keys: dict[str, PublicIdentity] = field(default_factory=dict)

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


def provision(plan: Plan) -> dict[str, NodeKeys]:
    """Write or extend every kit under `plan.out`; returns the public keys per node."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_toml_if_present(out / "roster.toml")
    names = _settle_roster(plan)
    existing = previous is not None
    ca = _ensure_ca(plan, existing_kit=existing)
    for name in plan.remove:
        _revoke(plan, name)
    known = (previous or {}).get("nodes", {})
    keys: dict[str, NodeKeys] = {}
    for name in names:
        if name == plan.director_id:
            keys[name] = _director_secrets(plan, name, ca, existing_kit=existing)
        else:
            keys[name] = _envoy_public(plan, name, ca, known.get(name))

    _write_broker_kit(plan, keys, ca, existing_kit=existing)
    broker_public = (plan.kit("broker") / "broker.pub").read_text()
    for name in names:
        _write_public(plan.kit(name) / "broker.pub", broker_public)
    _write_director_kit(plan, keys)
    for index, name in enumerate(plan.envoys):
        _write_envoy_kit(plan, keys, name, index)
    _write_roster(plan, keys)
    return keys


def _settle_roster(plan: Plan) -> list[str]:
    """The nodes of the federation after this run (the old roster, plus, minus); checks."""
    roster_path = plan.out / "roster.toml"
    roster = _read_toml_if_present(roster_path)
    known: list[str] = []
    if roster is not None:
        if roster.get("federation") != plan.federation:
            raise ProvisionError(
                f"{roster_path} is federation {roster.get('federation')!r}, not "
                f"{plan.federation!r}: use another --out"
            )
        if roster.get("director") != plan.director_id:
            raise ProvisionError(
                f"{roster_path}: the director is {roster.get('director')!r}; "
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
    return names


def _ensure_ca(plan: Plan, *, existing_kit: bool) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of the federation CA, made on the first run."""
    ca_dir = _kit_dir(plan.out / "ca")
    if not (ca_dir / "ca.key").exists():
        if existing_kit:
            raise ProvisionError(
                f"{ca_dir / 'ca.key'} is missing from an existing federation: every "
                "certificate hangs on it; restore it from a backup"
            )
        key_pem, cert_pem = make_ca(plan.federation)
        atomic_write_bytes(ca_dir / "ca.key", key_pem, mode=SECRET_MODE)
        _write_public(ca_dir / "ca.crt", cert_pem)
    return (ca_dir / "ca.key").read_bytes(), (ca_dir / "ca.crt").read_bytes()


def _director_secrets(
    plan: Plan, name: str, ca: tuple[bytes, bytes], *, existing_kit: bool
) -> NodeKeys:
    """Create (on the first run only) and return the public side of the director's keys:
    the operator runs the director, so its kit holds its secrets."""
    kit = _kit_dir(plan.kit(name))
    _kit_dir(kit / "tls")
    _ensure_secret(
        kit / "signing.key",
        lambda: (generate_signing_keypair().private.hex() + "\n").encode(),
        existing_kit=existing_kit,
    )
    seed = read_key_file(kit / "signing.key", encoding="hex", field="signing.key")
    signing_public = signing_public_key(seed)
    write_key_file(kit / "signing.pub", signing_public, encoding="hex", secret=False)
    _ensure_secret(
        kit / "curve.key",
        lambda: (generate_curve_keypair().secret + "\n").encode(),
        existing_kit=existing_kit,
    )
    curve_public = curve_public_key(
        read_key_file(kit / "curve.key", encoding="z85", field="curve.key")
    )
    write_key_file(kit / "curve.pub", curve_public, encoding="z85", secret=False)
    _ensure_secret(
        kit / "mqtt.password",
        lambda: (generate_password() + "\n").encode(),
        existing_kit=existing_kit,
    )
    if not (kit / "tls" / "client.key").exists() or not (kit / "tls" / "client.crt").exists():
        if existing_kit:
            raise ProvisionError(f"{kit / 'tls'}: the director's TLS key or certificate is missing")
        key_pem, cert_pem = issue_cert(*ca, common_name=name)
        atomic_write_bytes(kit / "tls" / "client.key", key_pem, mode=SECRET_MODE)
        _write_public(kit / "tls" / "client.crt", cert_pem)
    _write_public(kit / "tls" / "ca.crt", ca[1])
    fingerprint = cert_fingerprint((kit / "tls" / "client.crt").read_bytes())
    return NodeKeys(name, "director", signing_public.hex(), curve_public, fingerprint)


def _envoy_public(
    plan: Plan, name: str, ca: tuple[bytes, bytes], known: dict[str, Any] | None
) -> NodeKeys:
    """An envoy's public kit files from its public identity (given now, or in the roster)."""
    given = plan.public_keys.get(name)
    if known is not None and known.get("role") != "envoy":
        known = None
    if given is None and known is None:
        raise ProvisionError(
            f"envoy {name!r}: no public keys. Its host runs `fedbus envoy init --node-id "
            f"{name} --out DIR` and hands over DIR/{name}.public.toml (--public-keys)"
        )
    if given is not None and known is not None and given != _identity_of(name, known):
        raise ProvisionError(
            f"envoy {name!r}: the public keys given differ from the roster's; an identity is "
            f"never replaced silently: take it out (--remove {name}), then add it again"
        )
    identity = given if given is not None else _identity_of(name, known or {})
    kit = _kit_dir(plan.kit(name))
    _kit_dir(kit / "tls")
    write_key_file(kit / "signing.pub", identity.signing_public, encoding="hex", secret=False)
    write_key_file(kit / "curve.pub", identity.curve_public_key, encoding="z85", secret=False)
    cert_path = kit / "tls" / "client.crt"
    csr = identity.tls_csr.encode()
    try:
        # The certificate follows the envoy's key: issued again only if the key changed.
        if not cert_path.exists() or not cert_matches_request(
            cert_path.read_bytes(), csr, common_name=name
        ):
            _write_public(cert_path, issue_cert_for_csr(*ca, csr, common_name=name))
    except CsrError as exc:
        raise ProvisionError(f"envoy {name!r}: {exc}") from None
    _write_public(kit / "tls" / "ca.crt", ca[1])
    return NodeKeys(
        name,
        "envoy",
        identity.signing_public_key,
        identity.curve_public_key,
        cert_fingerprint(cert_path.read_bytes()),
        mqtt_password_hash=identity.mqtt_password_hash,
        tls_csr=identity.tls_csr,
    )


def _identity_of(name: str, entry: dict[str, Any]) -> PublicIdentity:
    """The public identity an envoy's roster entry records."""
    try:
        return PublicIdentity(
            node_id=name,
            signing_public_key=entry["signing_public_key"],
            curve_public_key=entry["curve_public_key"],
            mqtt_password_hash=entry["mqtt_password_hash"],
            tls_csr=entry["tls_csr"],
        )
    except KeyError as exc:
        raise ProvisionError(
            f"roster entry of envoy {name!r} lacks {exc}: it predates envoy-made keys; "
            f"add it again from its host's `fedbus envoy init` (--remove {name} first)"
        ) from None


# --------------------------------------------------------------------------- revocation


def _revoke(plan: Plan, name: str) -> None:
    """Take an envoy out: its certificate goes on the CRL, its kit to removed/ (so that
    adding the same id again makes fresh keys), and the rewrite that follows drops it from
    the allow-list, password file, ACL and every peer list."""
    kit = plan.kit(name)
    revoked_path = plan.out / "ca" / "revoked.toml"
    entries = _load_revoked(revoked_path)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    if (kit / "tls" / "client.crt").exists():
        serial = cert_serial((kit / "tls" / "client.crt").read_bytes())
        entries.append({"node_id": name, "serial": format(serial, "x"), "date": now.isoformat()})
        header = "# Revoked client certificates (fedbus provision --remove). Do not edit.\n\n"
        _write_public(revoked_path, header + dump_toml({"revoked": entries}))
    removed = plan.out / "removed"
    removed.mkdir(mode=KIT_DIR_MODE, exist_ok=True)
    kit.rename(removed / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}")
    for stale in [
        plan.kit("broker") / "keys" / f"{name}.pub",
        plan.kit(plan.director_id) / "envoys" / f"{name}.sign.pub",
        *(plan.kit(e) / "peers" / f"{name}.sign.pub" for e in plan.envoys),
    ]:
        stale.unlink(missing_ok=True)


def _load_revoked(path: Path) -> list[dict[str, str]]:
    table = _read_toml_if_present(path)
    return [] if table is None else list(table.get("revoked", []))


# --------------------------------------------------------------------------- the broker kit


def _write_broker_kit(
    plan: Plan, keys: dict[str, NodeKeys], ca: tuple[bytes, bytes], *, existing_kit: bool
) -> None:
    kit = _kit_dir(plan.kit("broker"))
    (kit / "keys").mkdir(exist_ok=True)
    (kit / "tls").mkdir(exist_ok=True)
    _ensure_secret(
        kit / "broker.key",
        lambda: (generate_curve_keypair().secret + "\n").encode(),
        existing_kit=existing_kit,
    )
    public = curve_public_key(read_key_file(kit / "broker.key", encoding="z85", field="broker.key"))
    write_key_file(kit / "broker.pub", public, encoding="z85", secret=False)
    _write_broker_tls(plan, kit, ca)
    _write_zmq_broker_config(plan, kit, keys)
    _write_mosquitto_kit(plan, kit, keys)


def _write_broker_tls(plan: Plan, kit: Path, ca: tuple[bytes, bytes]) -> None:
    """The TLS server certificate (for the host nodes dial, plus loopback for local checks),
    the CA certificate and the CRL of removed nodes."""
    server_names = [plan.broker_host, "localhost", "127.0.0.1"]
    cert_path = kit / "tls" / "server.crt"
    if cert_path.exists() and not cert_names_cover(cert_path.read_bytes(), server_names):
        cert_path.unlink()  # the broker moved: a new server certificate, same CA
    if not (kit / "tls" / "server.key").exists() or not cert_path.exists():
        key_pem, cert_pem = issue_cert(
            *ca, common_name=plan.broker_host, server_names=server_names, client=False
        )
        atomic_write_bytes(kit / "tls" / "server.key", key_pem, mode=SECRET_MODE)
        _write_public(cert_path, cert_pem)
    _write_public(kit / "tls" / "ca.crt", ca[1])
    revoked = [
        (int(e["serial"], 16), dt.datetime.fromisoformat(e["date"]))
        for e in _load_revoked(plan.out / "ca" / "revoked.toml")
    ]
    _write_public(kit / "tls" / "crl.pem", make_crl(*ca, revoked))


def _write_zmq_broker_config(plan: Plan, kit: Path, keys: dict[str, NodeKeys]) -> None:
    """broker.toml of the ZeroMQ daemon: its CurveZMQ allow-list, one public key per node."""
    for name, node in keys.items():
        write_key_file(
            kit / "keys" / f"{name}.pub", node.curve_public, encoding="z85", secret=False
        )
    bind_host = plan.bind_address if ":" not in plan.bind_address else f"[{plan.bind_address}]"
    zmq_port = plan.port if plan.transport == "zmq" else DEFAULT_PORTS["zmq"]
    config = BrokerFile(
        federation=plan.federation,
        bind=f"tcp://{bind_host}:{zmq_port}",
        secret_key_file="broker.key",
        max_frame_bytes=plan.max_frame_bytes,
        heartbeat=plan.heartbeat,
        allow=tuple(
            AllowEntry(node_id=name, role=node.role, public_key_file=f"keys/{name}.pub")
            for name, node in keys.items()
        ),
    )
    header = (
        "# fedbus ZeroMQ broker: `fedbus broker --config broker.toml`. Written by `fedbus "
        "provision`;\n# run provision again to add envoys (it rewrites this file).\n"
    )
    _write_public(kit / "broker.toml", header + dump_toml(msgspec.to_builtins(config)))


def _write_mosquitto_kit(plan: Plan, kit: Path, keys: dict[str, NodeKeys]) -> None:
    """Mosquitto: a TLS listener for the nodes, passwords + the ACL generated from
    broker/topics.py. Paths are where the kit will live on the broker host."""
    mqtt_port = plan.port if plan.transport == "mqtt" else DEFAULT_PORTS["mqtt"]
    home = plan.installed("broker")
    passwords = {
        name: (plan.kit(name) / "mqtt.password").read_text().strip()
        for name, node in keys.items()
        if not node.mqtt_password_hash
    }
    write_broker_files(
        kit,
        federation=plan.federation,
        nodes={name: node.role for name, node in keys.items()},
        passwords=passwords,
        password_hashes={n: k.mqtt_password_hash for n, k in keys.items() if k.mqtt_password_hash},
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
        (kit / "mosquitto-data").mkdir(mode=KIT_DIR_MODE, exist_ok=True)


# --------------------------------------------------------------------------- node kits


def _director_template() -> dict[str, Any]:
    """The shipped director.toml: the training recipe, model and SecAgg settings every kit
    starts from (a missing template is a broken install, never an empty recipe)."""
    return read_toml(DIRECTOR_TEMPLATE)


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


def _merge_config(path: Path, base: dict[str, Any], managed: dict[str, Any]) -> dict[str, Any]:
    """The existing config (or `base`) with every `managed` field set."""
    current = _read_toml_if_present(path)
    merged = dict(base if current is None else current)
    for key, value in managed.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _write_director_kit(plan: Plan, keys: dict[str, NodeKeys]) -> None:
    name = plan.director_id
    kit = plan.kit(name)
    (kit / "envoys").mkdir(exist_ok=True)
    for envoy in plan.envoys:
        _write_public(kit / "envoys" / f"{envoy}.sign.pub", keys[envoy].signing_public + "\n")
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
    _write_public(kit / "director.sign.pub", keys[plan.director_id].signing_public + "\n")
    for peer in plan.envoys:
        _write_public(kit / "peers" / f"{peer}.sign.pub", keys[peer].signing_public + "\n")
    model = dict(_director_template().get("model", {}))
    model.pop("init_seed", None)
    base: dict[str, Any] = {
        "state_dir": plan.state_dir(name),
        # Edit [data] to point at this hospital's images; provision keeps your edits.
        "data": _data_table(plan, index),
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


def _data_table(plan: Plan, index: int) -> dict[str, Any]:
    """An envoy kit's [data]. A hospital's image folder is all its own: no partition, the
    envoy trains on every image in it. PneumoniaMNIST is one public file that every envoy of
    a simulated federation holds: each takes its own Dirichlet label-skewed part."""
    table: dict[str, Any] = {"source": plan.data_source, "path": plan.data_path}
    if plan.data_source == "pneumoniamnist" and len(plan.envoys) > 1:
        table["partition"] = {"scheme": "dirichlet", "index": index, "count": len(plan.envoys)}
    return table


def _write_config(path: Path, config: Mapping[str, Any], kind: NodeKind) -> None:
    """Validate, then write: a kit the node would refuse is never written."""
    header = (
        f"# fedbus {kind} config, written by `fedbus provision`. Relative paths are relative "
        "to this file.\n# Running provision again rewrites the bus, key and peer fields and "
        "keeps the rest.\n"
    )
    text = header + dump_toml(config)
    try:
        table = parse_toml(text, source=str(path))
        parse_config(table, _SCHEMAS[kind], source=str(path), base=path.resolve().parent)
    except ConfigError as exc:
        raise ProvisionError(f"generated {kind} config is invalid: {exc}") from None
    _write_public(path, text)


def update_config(path: Path, kind: NodeKind, changes: Mapping[str, Any]) -> None:
    """Merge `changes` (nested tables merge key by key) into the node config at `path`,
    validate the result and write it back atomically (how `fedbus demo` applies its
    settings to the kits provision made)."""
    _write_config(path, _deep_merge(read_toml(path), changes), kind)


def _deep_merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _write_roster(plan: Plan, keys: dict[str, NodeKeys]) -> None:
    broker = plan.kit("broker")
    roster = {
        "federation": plan.federation,
        "director": plan.director_id,
        "transport": plan.transport,
        "bus_url": plan.bus_url,
        "ca_sha256": cert_fingerprint((plan.out / "ca" / "ca.crt").read_bytes()),
        "broker": {
            "host": plan.broker_host,
            "curve_public_key": (broker / "broker.pub").read_text().strip(),
            "tls_cert_sha256": cert_fingerprint((broker / "tls" / "server.crt").read_bytes()),
        },
        "nodes": {name: _roster_entry(node) for name, node in keys.items()},
    }
    header = "# The federation's public facts, written by `fedbus provision` (no secrets here).\n"
    _write_public(plan.out / "roster.toml", header + dump_toml(roster))


def _roster_entry(node: NodeKeys) -> dict[str, str]:
    entry = {
        "role": node.role,
        "signing_public_key": node.signing_public,
        "curve_public_key": node.curve_public,
        "tls_cert_sha256": node.cert_sha256,
    }
    if node.role == "envoy":
        entry["mqtt_password_hash"] = node.mqtt_password_hash
        entry["tls_csr"] = node.tls_csr
    return entry


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
    p.add_argument(
        "--public-keys",
        nargs="*",
        type=Path,
        default=[],
        help="the envoys' <id>.public.toml files (`fedbus envoy init`), or folders holding them",
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
        help="the envoys' [data] path (each hospital edits its own), e.g. /srv/xray/chest_xray",
    )
    p.add_argument(
        "--data-source",
        choices=("pneumoniamnist", "image_folder"),
        help="what --data holds (default: pneumoniamnist for a .npz file, else image_folder). "
        "An image folder is a hospital's own and trained on whole; PneumoniaMNIST is split "
        "among the envoys (Dirichlet label skew), as in a simulated federation",
    )
    p.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = _plan(args)
        keys = provision(plan)
    except ConfigError:
        raise  # a kit file that cannot be read: exit status 3 (node.cli)
    except (ProvisionError, IdentityError, ValueError) as exc:
        print(f"fedbus provision: error: {exc}", file=sys.stderr)
        return int(ProvisionError.exit_code)
    envoys = [k for k, v in keys.items() if v.role == "envoy"]
    print(
        f"federation {plan.federation}: kits for broker, {plan.director_id} and "
        f"{len(envoys)} envoys ({', '.join(envoys)}) in {plan.out} (bus {plan.bus_url})"
    )
    return int(ExitCode.OK)


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
        public_keys=read_public_keys(args.public_keys),
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
        data_source=args.data_source or _data_source_of(args.data),
        max_frame_bytes=args.max_frame_bytes,
        remove=remove,
    )


def read_public_keys(paths: Sequence[Path]) -> dict[str, PublicIdentity]:
    """The public identities in `paths` (files, or folders searched for *.public.toml)."""
    found: dict[str, PublicIdentity] = {}
    for path in paths:
        files = sorted(path.rglob("*.public.toml")) if path.is_dir() else [path]
        for file in files:
            identity = read_public_identity(file)
            if identity.node_id in found and found[identity.node_id] != identity:
                raise ProvisionError(f"two different public identities of {identity.node_id!r}")
            found[identity.node_id] = identity
    return found


def _data_source_of(path: str) -> DataSourceKind:
    return "pneumoniamnist" if path.lower().endswith(".npz") else "image_folder"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
