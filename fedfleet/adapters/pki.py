"""TLS material for the SuperLink.

A stack gets its own certificate authority; the SuperLink's certificate carries
every address it is reached at (127.0.0.1 included: the SuperLink connects to
itself to run the ServerApp, and the operator's `flwr` reaches it through an SSH
tunnel there). SuperNode keys are made on the VMs by the Ansible role.

Existing files are reused while they still fit (same SANs, not close to expiry),
so repeated runs keep the same CA and the SuperLink keeps its registrations.
Private keys are written 0600 and never printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedfleet.core.util import atomic_write

VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class ServerTLS:
    ca_cert: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    atomic_write(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write(path, data, 0o644)


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _still_good(cert_path: Path, names: Sequence[str] | None = None) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < RENEW_BEFORE:
        return False
    if names is None:
        return True
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(san) == set(_san_entries(names))


def ensure_server_tls(directory: Path, names: Sequence[str], stack: str) -> ServerTLS:
    """CA + SuperLink certificate for `names` (IPs or DNS names) under `directory`."""
    tls = ServerTLS(directory / "ca.crt", directory / "superlink.crt", directory / "superlink.key")
    now = dt.datetime.now(dt.UTC)
    ca_key_path = directory / "ca.key"
    if _still_good(tls.ca_cert) and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedfleet {stack} CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
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
            .sign(ca_key, hashes.SHA384())
        )
        _write_private(ca_key_path, _pem_private(ca_key))
        _write_public(tls.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        tls.cert.unlink(missing_ok=True)  # a new CA invalidates the old server cert
    if _still_good(tls.cert, names) and tls.key.exists() and _signed_by(tls.cert, ca_cert):
        return tls
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfleet superlink")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(tls.key, _pem_private(key))
    _write_public(tls.cert, cert.public_bytes(serialization.Encoding.PEM))
    return tls


def _signed_by(cert_path: Path, ca_cert: x509.Certificate) -> bool:
    try:
        x509.load_pem_x509_certificate(cert_path.read_bytes()).verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return True


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
