"""The federation's TLS certificate authority: a CA, client and server certificates, the
revocation list. `fedbus provision` issues every certificate Mosquitto's TLS listener and the
nodes present; the CA key never leaves the operator's kit folder. An envoy makes its own TLS
key and hands over a certificate request (`make_csr`, node.identity); the CA signs it
(`issue_cert_for_csr`) without ever seeing the key.

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
    "CsrError",
    "cert_fingerprint",
    "cert_matches_request",
    "cert_names_cover",
    "cert_serial",
    "csr_public_key",
    "issue_cert",
    "issue_cert_for_csr",
    "make_ca",
    "make_crl",
    "make_csr",
]


class CsrError(ValueError):
    """A certificate request that cannot be signed (bad signature, another name)."""


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
    if not client and not server_names:
        raise ValueError("a certificate is either for a server (server_names) or a client")
    key = _new_ec_key()
    cert = _sign(
        ca_key_pem,
        ca_cert_pem,
        key.public_key(),
        common_name=common_name,
        server_names=server_names,
        days=days,
    )
    return _key_pem(key), cert


def _subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbus"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_csr(common_name: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate request PEM) of a fresh client key, made where it will stay."""
    key = _new_ec_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(common_name))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def csr_public_key(csr_pem: bytes, *, common_name: str) -> ec.EllipticCurvePublicKey:
    """The public key of a request for `common_name`; CsrError unless it is one, self-signed."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CsrError(f"not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise CsrError("the certificate request's signature is not valid")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [common_name]:
        raise CsrError(f"the certificate request is not for {common_name!r}")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CsrError("the certificate request's key is not an EC key")
    return key


def issue_cert_for_csr(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    csr_pem: bytes,
    *,
    common_name: str,
    days: int = CERT_DAYS,
) -> bytes:
    """The client certificate (PEM) for a request of `common_name`, signed by the CA."""
    key = csr_public_key(csr_pem, common_name=common_name)
    return _sign(ca_key_pem, ca_cert_pem, key, common_name=common_name, server_names=(), days=days)


def _sign(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    public_key: ec.EllipticCurvePublicKey,
    *,
    common_name: str,
    server_names: Sequence[str],
    days: int,
) -> bytes:
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
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
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_matches_request(cert_pem: bytes, csr_pem: bytes, *, common_name: str) -> bool:
    """Whether the certificate certifies the key of the request (CsrError if the request
    is not a valid one for `common_name`)."""
    wanted = csr_public_key(csr_pem, common_name=common_name)
    have = x509.load_pem_x509_certificate(cert_pem).public_key()
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return have.public_bytes(*der) == wanted.public_bytes(*der)


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
