"""An envoy's identity, made on its own host: `fedbus envoy init`.

    fedbus envoy init --node-id envoy-1 --out /etc/fedbus/envoy-1

writes the envoy's secrets, which never leave that host (0600, in a 0700 folder):

    signing.key        Ed25519 (hex): signs its SecAgg keys, survivor sets and frames
    curve.key          CurveZMQ (Z85): its login to the ZeroMQ broker
    tls/client.key     ECDSA P-256: its TLS identity towards Mosquitto
    mqtt.password      its MQTT password (the broker only ever gets a hash)

and its public half, which it prints with a fingerprint to read out to the operator:

    signing.pub, curve.pub, tls/client.csr
    <node-id>.public.toml   what `fedbus provision --public-keys` takes

Nobody else ever holds an envoy's keys: the operator's provisioning only sees public keys,
signs the certificate request, and never re-creates a missing identity. Running init again
keeps every existing key and rewrites the public files from them.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from broker.files import PUBLIC_MODE, SECRET_MODE, atomic_write_bytes, private_dir, read_toml
from broker.keys import (
    check_z85_key,
    curve_public_key,
    generate_curve_keypair,
    read_key_file,
    write_key_file,
)
from broker.server.mosquitto_files import generate_password, hash_password
from broker.topics import validate_id
from crypto.signing import generate_signing_keypair, signing_public_key
from node.errors import ExitCode, FedbusError
from node.pki import CsrError, csr_public_key, make_csr
from protocol.configfile import ConfigError, convert_config, dump_toml

__all__ = ["IdentityError", "PublicIdentity", "init_identity", "main", "read_public_identity"]

SECRETS = ("signing.key", "curve.key", "tls/client.key", "mqtt.password")


class IdentityError(FedbusError, ValueError):
    """An identity folder or public bundle that cannot be used; the message says why."""

    exit_code = ExitCode.USAGE


class PublicIdentity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The public half of an envoy's identity (its <node-id>.public.toml)."""

    node_id: str
    signing_public_key: str  # hex, 32 bytes
    curve_public_key: str  # Z85, 40 characters
    mqtt_password_hash: str  # Mosquitto $7$ PBKDF2-SHA512
    tls_csr: str  # PEM certificate request for CN = node_id

    @property
    def fingerprint(self) -> str:
        """SHA-256 over every field: what the hospital reads out to the operator."""
        h = hashlib.sha256()
        for value in msgspec.structs.astuple(self):
            raw = value.encode()
            h.update(len(raw).to_bytes(4, "big") + raw)
        return h.hexdigest()

    def check(self) -> PublicIdentity:
        """Itself, if every field is what it claims; IdentityError naming the field if not."""
        try:
            validate_id(self.node_id, field="node_id")
            raw = bytes.fromhex(self.signing_public_key)
            if len(raw) != 32:
                raise ValueError("signing_public_key: not 32 bytes")
            check_z85_key(self.curve_public_key, "curve_public_key")
            if not self.mqtt_password_hash.startswith("$7$"):
                raise ValueError("mqtt_password_hash: not a Mosquitto $7$ hash")
            csr_public_key(self.tls_csr.encode(), common_name=self.node_id)
        except (ValueError, CsrError) as exc:
            raise IdentityError(f"public identity of {self.node_id!r}: {exc}") from None
        return self

    @property
    def signing_public(self) -> bytes:
        return bytes.fromhex(self.signing_public_key)


def public_file(folder: Path, node_id: str) -> Path:
    return folder / f"{node_id}.public.toml"


def init_identity(folder: str | Path, node_id: str) -> PublicIdentity:
    """Create the envoy's keys in `folder` (keeping any already there); its public half."""
    validate_id(node_id, field="--node-id")
    folder = private_dir(folder)
    private_dir(folder / "tls")
    if not (folder / "signing.key").exists():
        write_key_file(
            folder / "signing.key", generate_signing_keypair().private, encoding="hex", secret=True
        )
    signing = signing_public_key(read_key_file(folder / "signing.key", field="signing.key"))
    write_key_file(folder / "signing.pub", signing, encoding="hex", secret=False)
    if not (folder / "curve.key").exists():
        write_key_file(
            folder / "curve.key", generate_curve_keypair().secret, encoding="z85", secret=True
        )
    curve = curve_public_key(read_key_file(folder / "curve.key", encoding="z85", field="curve.key"))
    write_key_file(folder / "curve.pub", curve, encoding="z85", secret=False)
    if not (folder / "mqtt.password").exists():
        atomic_write_bytes(
            folder / "mqtt.password", (generate_password() + "\n").encode(), mode=SECRET_MODE
        )
    password = (folder / "mqtt.password").read_text().strip()
    if not (folder / "tls" / "client.key").exists() or not (folder / "tls" / "client.csr").exists():
        key_pem, csr_pem = make_csr(node_id)
        atomic_write_bytes(folder / "tls" / "client.key", key_pem, mode=SECRET_MODE)
        atomic_write_bytes(folder / "tls" / "client.csr", csr_pem, mode=PUBLIC_MODE)
    identity = PublicIdentity(
        node_id=node_id,
        signing_public_key=signing.hex(),
        curve_public_key=curve,
        mqtt_password_hash=_stable_hash(folder, password),
        tls_csr=(folder / "tls" / "client.csr").read_text(),
    ).check()
    header = (
        f"# fedbus envoy {node_id}: the PUBLIC half of its identity (`fedbus envoy init`).\n"
        "# Hand this file to the federation's operator (`fedbus provision --public-keys`);\n"
        f"# confirm its fingerprint {identity.fingerprint} with them out of band.\n"
    )
    text = header + dump_toml(msgspec.to_builtins(identity))
    atomic_write_bytes(public_file(folder, node_id), text.encode(), mode=PUBLIC_MODE)
    return identity


def _stable_hash(folder: Path, password: str) -> str:
    """The password's hash, computed once (a fresh salt each run would change the bundle)."""
    path = folder / "mqtt.password.hash"
    if path.exists():
        return path.read_text().strip()
    hashed = hash_password(password)
    atomic_write_bytes(path, (hashed + "\n").encode(), mode=PUBLIC_MODE)
    return hashed


def read_public_identity(path: str | Path) -> PublicIdentity:
    """A <node-id>.public.toml, checked (IdentityError naming the file and field)."""
    path = Path(path)
    try:
        identity = convert_config(read_toml(path), PublicIdentity, source=str(path))
    except ConfigError as exc:
        raise IdentityError(str(exc)) from None
    try:
        return identity.check()
    except IdentityError as exc:
        raise IdentityError(f"{path}: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fedbus envoy init",
        description="Make this envoy's keys here; print and write their public half only.",
    )
    p.add_argument("--node-id", required=True)
    p.add_argument("--out", required=True, type=Path, help="the envoy's folder (created, 0700)")
    args = p.parse_args(argv)
    try:
        identity = init_identity(args.out, args.node_id)
    except (IdentityError, ValueError, OSError) as exc:
        print(f"fedbus envoy init: error: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    print(
        f"envoy {identity.node_id}: keys in {args.out} (never copy them elsewhere)\n"
        f"public half: {public_file(args.out, identity.node_id)}\n"
        f"fingerprint: {identity.fingerprint}\n"
        f"signing key: {identity.signing_public_key}\n"
        f"curve key:   {identity.curve_public_key}"
    )
    return int(ExitCode.OK)
