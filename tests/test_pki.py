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


def _expiring_ca(directory: Path, days: float, key: object | None = None) -> None:
    """A CA (and its key) that expires in `days`, as an old stack's would."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    key = key or ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfleet t CA")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA384())  # type: ignore[arg-type]
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )  # type: ignore[attr-defined]
    )
    (directory / "ca.key").chmod(0o600)
    (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_a_ca_expiring_within_the_run_is_refused_and_rotation_keeps_the_old_one_trusted(tmp_path: Path):
    import datetime as dt

    import pytest

    from fedfleet.adapters.pki import rotate, status
    from fedfleet.core.errors import EnvironmentProblem

    _expiring_ca(tmp_path, days=2)
    ensure_server_tls(tmp_path, ["127.0.0.1"], "t", dt.timedelta(hours=1))  # a short run: fine
    old_ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    old_server = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    assert old_server.not_valid_after_utc <= old_ca.not_valid_after_utc  # never outlives its CA
    with pytest.raises(EnvironmentProblem) as err:
        ensure_server_tls(tmp_path, ["127.0.0.1"], "t", dt.timedelta(days=3))
    assert "expires" in str(err.value) and "fedfleet certs rotate --stack t" in str(err.value)
    assert "3.0 days" in str(err.value)

    after = rotate(tmp_path, "t")
    bundle = x509.load_pem_x509_certificates((tmp_path / "ca.crt").read_bytes())
    assert len(bundle) == 2 and bundle[1] == old_ca  # the previous CA stays trusted
    assert [c["current"] for c in after["cas"]] == [True, False] and after["cas"][0]["days_left"] > 1800
    server = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    server.verify_directly_issued_by(bundle[0])  # re-issued by the new CA, for the same names
    assert after["superlink"]["names"] == ["127.0.0.1"] and after["superlink"]["issued_by_current_ca"]
    ensure_server_tls(tmp_path, ["127.0.0.1"], "t", dt.timedelta(days=30))  # a long run now fine
    assert status(tmp_path)["ca_key_private"]


def test_a_moved_aggregator_gets_a_new_certificate_from_the_same_ca(tmp_path: Path):
    first = ensure_server_tls(tmp_path, ["127.0.0.1", "10.0.0.5"], "t")
    ca = first.ca_cert.read_bytes()
    ensure_server_tls(tmp_path, ["127.0.0.1", "10.9.9.9"], "t")  # the plan moved the aggregator
    assert first.ca_cert.read_bytes() == ca  # no participant needs anything new
    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.9.9.9") in san.get_values_for_type(x509.IPAddress)


def test_a_wrong_or_mismatched_ca_key_is_named_with_the_fix(tmp_path: Path):
    import pytest
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from fedfleet.core.errors import EnvironmentProblem

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _expiring_ca(tmp_path / "rsa", days=100, key=rsa_key)
    with pytest.raises(
        EnvironmentProblem, match=r"ca\.key: a RSA key; fedfleet's certificates use ECDSA P-384"
    ):
        ensure_server_tls(tmp_path / "rsa", ["127.0.0.1"], "t")
    _expiring_ca(tmp_path / "pair", days=100)
    other = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "pair" / "ca.key").write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(EnvironmentProblem, match="do not belong together"):
        ensure_server_tls(tmp_path / "pair", ["127.0.0.1"], "t")
    (tmp_path / "pair" / "ca.key").chmod(0o644)
    with pytest.raises(EnvironmentProblem, match="can be read by others: `chmod 600"):
        ensure_server_tls(tmp_path / "pair", ["127.0.0.1"], "t")
    (tmp_path / "pair" / "ca.key").unlink()
    with pytest.raises(EnvironmentProblem, match="is missing: the CA's key never leaves this machine"):
        ensure_server_tls(tmp_path / "pair", ["127.0.0.1"], "t")


def test_certs_status_and_rotate_commands(make_project):
    import json
    import subprocess
    import sys

    from fedfleet.core.paths import stack_paths
    from fedfleet.core.stack import load_stack

    project = make_project()

    def certs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fedfleet", "--project", str(project), "certs", *args],
            capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    assert "has no CA yet" in certs("status").stdout
    pki_dir = stack_paths(load_stack(project, "local"), project).pki
    ensure_server_tls(pki_dir, ["127.0.0.1", "localhost"], "local")
    before = json.loads(certs("status", "--json").stdout)
    assert len(before["cas"]) == 1 and before["ca_outlasts_a_run"] and before["run_horizon_days"] > 0
    assert before["superlink"]["names"] == ["127.0.0.1", "localhost"]
    refused = certs("rotate")
    assert refused.returncode == 1 and "pass --yes" in refused.stderr  # nothing changed without a yes
    assert json.loads(certs("status", "--json").stdout)["cas"] == before["cas"]
    rotated = certs("rotate", "--yes")
    assert rotated.returncode == 0 and "the previous CA stays in the trust bundle" in rotated.stdout
    after = json.loads(certs("status", "--json").stdout)
    assert [c["sha256"] for c in after["cas"]][1] == before["cas"][0]["sha256"]
    assert (
        after["superlink"]["issued_by_current_ca"]
        and after["superlink"]["sha256"] != before["superlink"]["sha256"]
    )
    assert "the previous CA stays trusted by every host until it expires" in certs("status").stdout


def test_a_leaf_of_either_ca_verifies_against_the_rotated_bundle_unless_the_old_one_is_dropped(
    tmp_path: Path,
):
    import ssl

    from fedfleet.adapters.pki import rotate

    ensure_server_tls(tmp_path, ["127.0.0.1"], "t")
    old_leaf = (tmp_path / "superlink.crt").read_bytes()
    old_key = (tmp_path / "superlink.key").read_bytes()
    rotate(tmp_path, "t")  # same second as the CA's creation: the two CAs still differ by name

    def handshake(cert: bytes, key: bytes) -> bool:
        """A real TLS handshake, as a SuperNode or `flwr` makes it, trusting the bundle."""
        import socket
        import threading

        (tmp_path / "leaf.pem").write_bytes(cert + key)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(tmp_path / "leaf.pem")
        client_ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]

            def serve() -> None:
                conn, _ = listener.accept()
                try:
                    with server_ctx.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass

            thread = threading.Thread(target=serve)
            thread.start()
            try:
                with (
                    socket.create_connection(("127.0.0.1", port)) as raw,
                    client_ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
                ):
                    return True
            except ssl.SSLCertVerificationError:
                return False
            finally:
                thread.join(timeout=10)

    new_leaf, new_key = (tmp_path / "superlink.crt").read_bytes(), (tmp_path / "superlink.key").read_bytes()
    assert handshake(new_leaf, new_key) and handshake(old_leaf, old_key)  # strict X.509, both CAs
    rotate(tmp_path, "t", keep_previous=False)
    assert len(x509.load_pem_x509_certificates((tmp_path / "ca.crt").read_bytes())) == 1
    assert not handshake(old_leaf, old_key)


def test_a_superlink_key_that_is_not_its_certificates_is_replaced(tmp_path: Path):
    first = ensure_server_tls(tmp_path, ["127.0.0.1"], "t")
    cert = first.cert.read_bytes()
    (tmp_path / "other").mkdir()
    other = ensure_server_tls(tmp_path / "other", ["127.0.0.1"], "t")
    first.key.write_bytes(other.key.read_bytes())
    ensure_server_tls(tmp_path, ["127.0.0.1"], "t")
    assert first.cert.read_bytes() != cert  # re-issued with a key of its own


def test_the_run_horizon_counts_rounds_phases_and_the_wait():
    from fedfleet_app.settings import AppSettings

    from fedfleet.core.stack import load_stack
    from fedfleet.sandbox import REPO
    from fedfleet.workflow import run_horizon

    stack = load_stack(REPO, "local")
    settings = AppSettings(
        num_server_rounds=10, round_timeout=60.0, node_wait_timeout=30.0, evaluation="separate"
    )
    assert run_horizon(stack, settings).total_seconds() == 10 * 2 * 60 + 30
    with_train = AppSettings(num_server_rounds=10, round_timeout=60.0, node_wait_timeout=30.0)
    assert run_horizon(stack, with_train).total_seconds() == (10 + 1) * 60 + 30


def test_adding_a_participant_leaves_the_aggregators_tls_untouched(make_project):
    """The SuperLink's certificate names the aggregator's addresses only: a fourth participant
    (its VMs make their own node keys) changes nothing any other site or the SuperLink holds."""
    import copy
    import datetime as dt

    from fedfleet.core.paths import stack_paths
    from fedfleet.core.stack import load_stack
    from fedfleet.sandbox import free_ports, local_config
    from fedfleet.stages import configure, provision

    config = local_config()
    project = make_project(config)

    def prepare() -> dict[str, bytes]:
        stack = load_stack(project, "local")
        paths = stack_paths(stack, project)
        inventory = provision.up_local(stack, project, with_network=False)
        address = f"127.0.0.1:{stack.aggregator.internal_port}"
        configure.prepare_controller(stack, inventory, paths, address, dt.timedelta(days=1))
        return {p.name: p.read_bytes() for p in sorted(paths.pki.iterdir()) if p.is_file()}

    before = prepare()
    assert {"ca.crt", "ca.key", "superlink.crt", "superlink.key"} <= set(before)
    added = copy.deepcopy(config["fedfleet:participants"][0])
    used = {config["fedfleet:aggregator"]["port"], config["fedfleet:aggregator"]["internalPort"]}
    used |= {vm["port"] for p in config["fedfleet:participants"] for vm in p["vms"]}
    fresh = iter(p for p in free_ports(len(used) + 4) if p not in used)
    added["name"] = "clinic-new"
    added["vms"] = [
        {**vm, "name": f"new-vm-{i}", "port": next(fresh)} for i, vm in enumerate(added["vms"], 1)
    ]
    config["fedfleet:participants"].append(added)
    make_project(config)
    assert [p.name for p in load_stack(project, "local").participants][-1] == "clinic-new"
    assert prepare() == before
