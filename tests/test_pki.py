"""TLS material for the SuperLink (fedfleet.adapters.pki)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

from cryptography import x509

from fedfleet.adapters.pki import ensure_server_tls


def test_server_certificate_names_every_address_and_chains_to_the_ca(tmp_path: Path):
    tls = ensure_server_tls(tmp_path, ["127.0.0.1", "localhost", "10.0.0.5"], "t")
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.5"),
    }
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert stat.S_IMODE(tls.key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600


def test_certificates_are_reused_until_the_names_change(tmp_path: Path):
    first = ensure_server_tls(tmp_path, ["127.0.0.1"], "t")
    ca_before, cert_before = first.ca_cert.read_bytes(), first.cert.read_bytes()
    ensure_server_tls(tmp_path, ["127.0.0.1"], "t")
    assert first.cert.read_bytes() == cert_before
    ensure_server_tls(tmp_path, ["127.0.0.1", "10.1.1.1"], "t")
    assert first.ca_cert.read_bytes() == ca_before  # same CA: SuperNodes keep trusting it
    assert first.cert.read_bytes() != cert_before
