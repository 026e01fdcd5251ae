"""Certificates for TLS by default: a CA, the leaves it signs, and when to replace them. Pure functions.

Everything is PEM text in and out, and the current time is an argument, so the rotation decision is a plain
function of its inputs. Keys are ECDSA P-256: small, fast, and accepted by every TLS stack the runtime uses
(Python's ssl, grpcio, curl).
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Replace a certificate once less than this share of its validity remains: with the default 90 days that
# is a month of margin for a missed resync, an operator outage or a slow rollout.
ROTATE_WHEN_REMAINING = 1 / 3
# Certificates start this much in the past, so a node whose clock lags a little accepts them at once.
BACKDATE = dt.timedelta(minutes=5)


class Usage(Enum):
    SERVER = ExtendedKeyUsageOID.SERVER_AUTH
    CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, PEM encoded (what a kubernetes.io/tls Secret holds)."""

    cert: str
    key: str


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names a Service is reached by from inside the cluster, shortest first."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeloop"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime, until: dt.datetime):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(until)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def new_ca(common_name: str, now: dt.datetime, validity: dt.timedelta) -> KeyPair:
    """A self-signed CA that may sign leaves only (path length 0)."""
    key = _new_key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key(), now, now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(_cert_pem(cert), _key_pem(key))


def issue(
    ca: KeyPair,
    common_name: str,
    usage: Usage,
    now: dt.datetime,
    validity: dt.timedelta,
    dns_names: list[str] | tuple[str, ...] = (),
) -> KeyPair:
    """A leaf signed by `ca`, for a server (its DNS names as SANs) or a client (mTLS). Never outlives the CA."""
    ca_cert, ca_key = load_cert(ca.cert), serialization.load_pem_private_key(ca.key.encode(), password=None)
    key = _new_key()
    until = min(now + validity, ca_cert.not_valid_after_utc)
    builder = _builder(_name(common_name), ca_cert.subject, key.public_key(), now, until)
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), False)
    cert = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage.value]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False  # type: ignore[arg-type]
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return KeyPair(_cert_pem(cert), _key_pem(key))


def load_cert(pem: str) -> x509.Certificate:
    """The first certificate in `pem`; ValueError when there is none or it is malformed."""
    return x509.load_pem_x509_certificate(pem.encode())


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def needs_rotation(cert_pem: str | None, ca_pem: str, now: dt.datetime, dns_names: list[str] | tuple[str, ...] = (),
                   remaining: float = ROTATE_WHEN_REMAINING, common_name: str | None = None) -> bool:
    """Whether a certificate must be (re)issued: it is missing or unreadable, not signed by the current CA,
    not for these DNS names (nor, when given, this subject CN), or has less than `remaining` of its validity
    left (or none at all)."""
    if not cert_pem:
        return True
    window = _validity(cert_pem, ca_pem, tuple(sorted(dns_names)), common_name)
    if window is None:
        return True
    start, end = window
    return not start <= now < end or end - now < (end - start) * remaining


@functools.lru_cache(maxsize=4096)
def _validity(
    cert_pem: str, ca_pem: str, dns_names: tuple[str, ...], common_name: str | None
) -> tuple[dt.datetime, dt.datetime] | None:
    """The validity window of a certificate that is CA's and for these names; None if it is not. Cached: a
    running round checks every one of its clients' certificates at each poll."""
    try:
        cert, ca = load_cert(cert_pem), load_cert(ca_pem)
    except ValueError:
        return None
    if not signed_by(cert, ca):
        return None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
    except x509.ExtensionNotFound:
        sans = []
    if tuple(sorted(sans)) != dns_names:
        return None
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if common_name is not None and names != [common_name]:
        return None
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def expires_soon(cert: x509.Certificate, now: dt.datetime, remaining: float = ROTATE_WHEN_REMAINING) -> bool:
    """Less than `remaining` of the certificate's validity is left, or it is not valid at `now`."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= now < end:
        return True
    return end - now < (end - start) * remaining


def ca_needs_rotation(ca: KeyPair | None, now: dt.datetime, remaining: float = ROTATE_WHEN_REMAINING) -> bool:
    """Whether the CA must be replaced: missing, unreadable, its key not its own, or expiring soon. Every
    leaf it signed is then reissued, since `needs_rotation` checks the signer."""
    if ca is None:
        return True
    try:
        cert = load_cert(ca.cert)
        key = serialization.load_pem_private_key(ca.key.encode(), password=None)
    except (ValueError, TypeError):
        return True
    if key.public_key() != cert.public_key():
        return True
    return expires_soon(cert, now, remaining)
