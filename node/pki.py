"""The federation's TLS certificate authority: a CA, client and server certificates, the
revocation list. `fedbus provision` issues every certificate Mosquitto's TLS listener and the
nodes present; the CA key never leaves the operator's kit folder.

ECDSA P-256 throughout: what every TLS stack (OpenSSL under Mosquitto, Python's ssl) accepts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_DAYS",
    "CERT_DAYS",
    "cert_fingerprint",
    "cert_names_cover",
    "cert_serial",
    "issue_cert",
    "make_ca",
    "make_crl",
]

CA_DAYS = 3650
CERT_DAYS = 825


def _new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


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


def cert_names_cover(cert_pem: bytes, names: Sequence[str]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    present = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    present |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return all(n in present for n in names)


def cert_serial(cert_pem: bytes) -> int:
    """The serial number of a PEM certificate (what a CRL lists)."""
    return x509.load_pem_x509_certificate(cert_pem).serial_number
