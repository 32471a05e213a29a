"""TLS material for the SuperLink.

A stack gets its own certificate authority; the SuperLink's certificate carries
every address it is reached at (127.0.0.1 included: the SuperLink connects to
itself to run the ServerApp, and the operator's `flwr` reaches it through an SSH
tunnel there). SuperNode keys are made on the VMs by the Ansible role.

Existing files are reused while they still fit (same SANs, not close to expiry),
so repeated runs keep the same CA and the SuperLink keeps its registrations. The
SuperLink's certificate is renewed unseen (only the aggregator holds it); the CA is
never replaced behind the operator's back: a run whose horizon outlasts it is refused,
and `fedfleet certs rotate` makes a new one, kept beside the previous one in the trust
bundle (`ca.crt`) so hosts not yet reconfigured go on trusting the SuperLink.
Private keys are written 0600 and never printed; the CA's key never leaves this machine.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedfleet.core.errors import EnvironmentProblem
from fedfleet.core.util import atomic_write

VALIDITY = dt.timedelta(days=365)  # the SuperLink's certificate: renewed by fedfleet, unseen
CA_VALIDITY = dt.timedelta(days=5 * 365)  # the stack's CA: rotated by the operator (`fedfleet certs rotate`)
RENEW_BEFORE = dt.timedelta(days=30)
ROTATE = "fedfleet certs rotate --stack {stack}"


@dataclass(frozen=True)
class ServerTLS:
    ca_cert: Path  # the trust bundle every host gets: the current CA first, then the previous one
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


def _bundle(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return []


def _still_good(cert_path: Path, names: Sequence[str] | None, margin: dt.timedelta) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < margin:
        return False
    if names is None:
        return True
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(san) == set(_san_entries(names))


def _load_key(path: Path, stack: str) -> ec.EllipticCurvePrivateKey:
    """A private key of the stack's PKI, or an error naming the file and the fix."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise EnvironmentProblem(
            f"{path}: not a readable, unencrypted PEM private key ({type(err).__name__}); "
            f"`{ROTATE.format(stack=stack)}` makes a new CA"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
        raise EnvironmentProblem(
            f"{path}: a {kind} key; fedfleet's certificates use ECDSA P-384 keys: "
            f"`{ROTATE.format(stack=stack)}` makes a new CA with one"
        )
    return key


def _new_ca(stack: str, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"fedfleet {stack} CA"),
            x509.NameAttribute(
                NameOID.SERIAL_NUMBER, f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"
            ),  # one name per CA
        ]
    )
    usage = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return ca_key, ca_cert


def _write_ca(directory: Path, key: ec.EllipticCurvePrivateKey, certs: Sequence[x509.Certificate]) -> None:
    _write_private(directory / "ca.key", _pem_private(key))
    _write_public(directory / "ca.crt", b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


def _current_ca(directory: Path, stack: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The stack's CA (key and certificate, checked to belong together), or None before the first."""
    bundle, key_path = _bundle(directory / "ca.crt"), directory / "ca.key"
    if not bundle and not key_path.exists():
        return None
    if not bundle:
        raise EnvironmentProblem(
            f"{directory / 'ca.crt'} is missing or not a PEM certificate while ca.key exists; "
            f"`{ROTATE.format(stack=stack)}` makes a new CA"
        )
    if not key_path.exists():
        raise EnvironmentProblem(
            f"{key_path} is missing: the CA's key never leaves this machine, and without it no certificate "
            f"can be issued; `{ROTATE.format(stack=stack)}` makes a new CA"
        )
    if key_path.stat().st_mode & 0o077:
        raise EnvironmentProblem(f"{key_path} can be read by others: `chmod 600 {key_path}`")
    key = _load_key(key_path, stack)
    if key.public_key().public_numbers() != bundle[0].public_key().public_numbers():  # type: ignore[union-attr]
        raise EnvironmentProblem(
            f"{directory / 'ca.crt'} and {key_path} do not belong together (the certificate is not the key's); "
            f"restore the pair, or `{ROTATE.format(stack=stack)}`"
        )
    return key, bundle[0]


def ensure_server_tls(
    directory: Path, names: Sequence[str], stack: str, horizon: dt.timedelta = dt.timedelta(0)
) -> ServerTLS:
    """The stack's CA (made once) and a SuperLink certificate for `names` (IPs or DNS names),
    valid for at least `horizon` (a run's longest duration): re-issued when the names change
    or it would expire, which touches only the aggregator. A CA that would expire within
    `horizon` is refused with the command that rotates it (that touches every host)."""
    tls = ServerTLS(directory / "ca.crt", directory / "superlink.crt", directory / "superlink.key")
    now = dt.datetime.now(dt.UTC)
    current = _current_ca(directory, stack)
    if current is None:
        ca_key, ca_cert = _new_ca(stack, now)
        _write_ca(directory, ca_key, [ca_cert])
        tls.cert.unlink(missing_ok=True)
    else:
        ca_key, ca_cert = current
        _refuse_short(ca_cert, directory, stack, horizon, now)
    # renewed a month ahead, but never later than its CA allows (an old CA's last month)
    margin = min(max(RENEW_BEFORE, horizon), ca_cert.not_valid_after_utc - now - dt.timedelta(minutes=1))
    if (
        _still_good(tls.cert, names, margin)
        and _signed_by(tls.cert, ca_cert)
        and _key_matches(tls.key, tls.cert)
    ):
        return tls
    _issue_server(tls, names, ca_key, ca_cert, now)
    return tls


def _refuse_short(
    ca: x509.Certificate, directory: Path, stack: str, horizon: dt.timedelta, now: dt.datetime
) -> None:
    if ca.not_valid_after_utc - now < horizon:
        raise EnvironmentProblem(
            f"the CA of stack {stack} ({directory / 'ca.crt'}) expires {ca.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, "
            f"before this run could end (it may take {_span(horizon)}): `{ROTATE.format(stack=stack)}` makes a new "
            "CA; every host gets it at the run's configure"
        )


def check_horizon(directory: Path, stack: str, horizon: dt.timedelta) -> None:
    """Refuse, reading only, a stack whose CA would expire before a run of `horizon` ends
    (a stack without a CA yet gets a new one at configure)."""
    current = _current_ca(directory, stack)
    if current is not None:
        _refuse_short(current[1], directory, stack, horizon, dt.datetime.now(dt.UTC))


def _key_matches(key_path: Path, cert_path: Path) -> bool:
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError, TypeError):
        return False
    return bool(key.public_key().public_numbers() == cert.public_key().public_numbers())  # type: ignore[union-attr]


def _issue_server(
    tls: ServerTLS,
    names: Sequence[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: dt.datetime,
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfleet superlink")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(tls.key, _pem_private(key))
    _write_public(tls.cert, cert.public_bytes(serialization.Encoding.PEM))


def rotate(directory: Path, stack: str, *, keep_previous: bool = True) -> dict[str, Any]:
    """A new CA for the stack, the SuperLink's certificate re-issued by it for the names it had.
    The trust bundle keeps the previous CA (while it is valid) unless `keep_previous` is False
    (after a leak: nothing it signed is trusted at the next configure)."""
    now = dt.datetime.now(dt.UTC)
    old = [c for c in _bundle(directory / "ca.crt") if c.not_valid_after_utc > now] if keep_previous else []
    ca_key, ca_cert = _new_ca(stack, now)
    directory.mkdir(parents=True, exist_ok=True)
    _write_ca(directory, ca_key, [ca_cert, *old[:1]])
    tls = ServerTLS(directory / "ca.crt", directory / "superlink.crt", directory / "superlink.key")
    names = _names(tls.cert)
    if names:
        _issue_server(tls, names, ca_key, ca_cert, now)
    else:
        tls.cert.unlink(missing_ok=True)  # the next configure issues it
    return status(directory)


def _names(cert_path: Path) -> list[str]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def _span(delta: dt.timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _describe(cert: x509.Certificate, now: dt.datetime) -> dict[str, Any]:
    left = cert.not_valid_after_utc - now
    return {
        "subject": cert.subject.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(timespec="seconds"),
        "days_left": round(left.total_seconds() / 86400, 1),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(":"),
    }


def status(directory: Path) -> dict[str, Any]:
    """What the stack's PKI holds: the CAs of the trust bundle, the SuperLink's certificate
    (names, issuer), the CA key's permissions; nothing secret."""
    now = dt.datetime.now(dt.UTC)
    bundle = _bundle(directory / "ca.crt")
    out: dict[str, Any] = {
        "directory": str(directory),
        "cas": [{**_describe(c, now), "current": i == 0} for i, c in enumerate(bundle)],
        "ca_key_private": (directory / "ca.key").exists()
        and not (directory / "ca.key").stat().st_mode & 0o077,
        "superlink": None,
    }
    try:
        cert = x509.load_pem_x509_certificate((directory / "superlink.crt").read_bytes())
    except (OSError, ValueError):
        return out
    out["superlink"] = {
        **_describe(cert, now),
        "names": _names(directory / "superlink.crt"),
        "issued_by_current_ca": bool(bundle) and _signed_by(directory / "superlink.crt", bundle[0]),
    }
    return out


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
