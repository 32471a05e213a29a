"""`fedfleet auth` and the credentials `fedfleet preview|up|destroy` hand to Pulumi, verified by
each cloud's own SDK against local servers that speak the real protocols (tests/cloudfakes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedfleet.core.errors import CredentialError
from fedfleet.sandbox import REPO, scratch_project
from fedfleet.stages import authenticate

from .cloudfakes import Clouds, Moto

CLOUD_VARS = ("AWS_", "GOOGLE_", "ARM_", "AZURE_", "CLOUDSDK_", "REQUESTS_CA_BUNDLE", "FEDFLEET_", "MLFLOW_")


class Fakes:
    def __init__(self, tmp: Path) -> None:
        self.moto = Moto()
        self.deployer = self.moto.user("deployer", ["ec2:Describe*"])
        self.reader = self.moto.user("reader", [])  # signs in; may use nothing
        self.moto.enforce_auth()
        self.clouds = Clouds(tmp)

    def env(self) -> dict[str, str]:
        return {**self.moto.env(), **self.clouds.env(), "AWS_CA_BUNDLE": str(self.clouds.ca_file)}


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fakes]:
    f = Fakes(tmp_path_factory.mktemp("clouds"))
    yield f
    f.moto.stop()
    f.clouds.stop()


@pytest.fixture
def env(tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This machine's environment without any cloud's settings, pointed at the fakes, with an
    empty store and a home of its own (nothing read from the real ~/.aws or ~/.azure)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(CLOUD_VARS)}
    (tmp_path / "home").mkdir()
    clean.update(fakes.env(), HOME=str(tmp_path / "home"), FEDFLEET_CREDENTIALS_DIR=str(tmp_path / "store"))
    for key in os.environ:
        if key.startswith(CLOUD_VARS):
            monkeypatch.delenv(key)
    for key, value in clean.items():
        monkeypatch.setenv(key, value)  # for the SDKs called in this process
    return clean


def fedfleet(
    env: dict[str, str], *args: str, project: Path | None = None
) -> subprocess.CompletedProcess[str]:
    where = ["--project", str(project)] if project else []
    return subprocess.run(
        [sys.executable, "-m", "fedfleet", *where, *args],
        capture_output=True, text=True, timeout=120, check=False, env=env, cwd=project or env["HOME"],
    )  # fmt: skip


def write(tmp_path: Path, name: str, data: Any) -> Path:
    """A credential file as the user downloaded it (in downloads/, which scans skip)."""
    path = tmp_path / "downloads" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def aws_csv(key: dict[str, str]) -> str:
    return f"Access key ID,Secret access key\n{key['id']},{key['secret']}\n"


def secrets_of(*credentials: Any) -> list[str]:
    """The secret parts of credential files, for scans (a piece of a private key's body too)."""
    found = []
    for c in credentials:
        if isinstance(c, dict) and "secret" in c:
            found.append(c["secret"])
        elif isinstance(c, dict) and "private_key" in c:
            found.append(c["private_key"].splitlines()[5])
        elif isinstance(c, dict):
            found.append(c.get("clientSecret") or c["password"])
    return found


def scan(secrets: list[str], *texts: str, roots: tuple[Path, ...] = (), but: tuple[Path, ...] = ()) -> None:
    """No secret in `texts`, nor in any file under `roots` except under `but`."""
    assert secrets and all(len(s) >= 8 for s in secrets)
    for secret in secrets:
        for text in texts:
            assert secret not in text
        for root in roots:
            for path in root.rglob("*"):
                if path.is_file() and not path.is_symlink() and not any(b in path.parents for b in but):
                    assert secret.encode() not in path.read_bytes(), path


def test_valid_credentials_are_verified_shown_and_stored_owner_only(tmp_path: Path, fakes: Fakes, env):
    sa = fakes.clouds.service_account("hospital-fl")
    sp = fakes.clouds.service_principal()
    files = {
        "aws": write(tmp_path, "keys.csv", aws_csv(fakes.deployer)),
        "gcp": write(tmp_path, "sa.json", sa),
        "azure": write(tmp_path, "sp.json", sp),
    }
    outputs = []
    for cloud, path in files.items():
        added = fedfleet(env, "auth", "add", cloud, "--file", str(path))
        assert added.returncode == 0, added.stderr
        outputs += [added.stdout, added.stderr]
    shown = " ".join(" ".join(outputs).split())
    assert "verified account 123456789012 as arn:aws:iam::123456789012:user/deployer" in shown
    assert f"verified project hospital-fl as {sa['client_email']}" in shown
    assert f"subscription Hospital research ({sp['subscriptionId']}), tenant {sp['tenantId']}" in shown
    assert "stored as aws-123456789012" in shown and "stored as gcp-hospital-fl" in shown

    listed = fedfleet(env, "auth", "list", "--json")
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {"aws-123456789012", "gcp-hospital-fl", f"azure-{sp['subscriptionId']}"}
    assert (
        rows["aws-123456789012"]["masked_key_id"] == f"{fakes.deployer['id'][:4]}…{fakes.deployer['id'][-4:]}"
    )
    assert rows["gcp-hospital-fl"]["identity"]["project_number"].isdigit()
    assert all(r["last_result"] == "ok" and r["last_verified"] for r in rows.values())
    table = fedfleet(env, "auth", "list")
    assert "aws-123456789012" in table.stdout and "ok" in table.stdout

    verified = fedfleet(env, "auth", "verify", "--json")
    assert verified.returncode == 0 and all(r["ok"] for r in json.loads(verified.stdout))

    store = Path(env["FEDFLEET_CREDENTIALS_DIR"])
    assert store.stat().st_mode & 0o777 == 0o700
    files = {p.name: p.stat().st_mode & 0o777 for p in store.iterdir()}
    assert files == {**{f"{n}.json": 0o600 for n in rows}, ".lock": 0o600}
    # No secret in anything shown, nor in any file but the store (the credential files aside).
    everything = [listed.stdout, table.stdout, verified.stdout, verified.stderr, *outputs]
    scan(
        secrets_of(fakes.deployer, sa, sp),
        *everything,
        roots=(tmp_path,),
        but=(store, tmp_path / "downloads"),
    )
    assert all(
        secret.encode() in b"".join(p.read_bytes() for p in store.iterdir()) for secret in secrets_of(sp)
    )

    removed = fedfleet(env, "auth", "remove", "gcp-hospital-fl", "--json")
    assert json.loads(removed.stdout)["removed"] == "gcp-hospital-fl"
    assert not (store / "gcp-hospital-fl.json").exists()
    unknown = fedfleet(env, "auth", "remove", "gcp-hospital")
    assert unknown.returncode == 2 and "did you mean 'gcp-hospital-fl'" not in unknown.stderr  # it is gone
    assert "no stored credential named 'gcp-hospital'" in unknown.stderr


def _case(fakes: Fakes, tmp_path: Path, case: str) -> tuple[str, Path, dict[str, str], list[str]]:
    """(cloud, file, extra environment, secrets) for a credential that must be refused."""
    c = fakes.clouds
    if case.startswith("aws"):
        key = {"aws-wrong-secret": {**fakes.deployer, "secret": "x" + fakes.deployer["secret"][1:]},
               "aws-unknown-key": {"id": "AKIAIOSFODNN7EXAMPLE", "secret": fakes.deployer["secret"]},
               "aws-missing-permission": fakes.reader}.get(case, fakes.deployer)  # fmt: skip
        text = aws_csv(key)
        extra: dict[str, str] = {}
        if case == "aws-expired-token":
            text = (
                f"[default]\naws_access_key_id = ASIA{'Q' * 16}\naws_secret_access_key = {'s' * 40}\n"
                "aws_session_token = zzSESSIONzz\n"
            )
            extra = {
                "AWS_ENDPOINT_URL_STS": f"{c.url}/sts-expired"
            }  # answers as STS does for an expired token
            key = {"secret": "s" * 40}
        if case == "aws-unreachable":
            extra = {"AWS_ENDPOINT_URL_STS": "http://127.0.0.1:9"}
        return "aws", write(tmp_path, "keys.csv", text), extra, [key["secret"]]
    if case.startswith("gcp"):
        sa = c.service_account("bank-fl", can_read_project=case != "gcp-missing-permission")
        if case == "gcp-deleted-key":
            c.delete_key(sa["client_email"])
        if case == "gcp-unreachable":
            sa["token_uri"] = "https://127.0.0.1:9/token"
        return "gcp", write(tmp_path, "sa.json", sa), {}, secrets_of(sa)
    sp = c.service_principal(
        secret_expired=case == "azure-expired-secret",
        can_read_subscription=case != "azure-missing-permission",
    )
    if case == "azure-wrong-secret":
        sp["clientSecret"] = "a-wrong-secret-" + sp["clientSecret"][:6]
    if case == "azure-unreachable":
        sp["activeDirectoryEndpointUrl"] = "https://127.0.0.1:9"
    return "azure", write(tmp_path, "sp.json", sp), {}, secrets_of(sp)


REFUSALS = {
    "aws-wrong-secret": ("rejected", "the secret access key does not belong to access key AKIA"),
    "aws-unknown-key": ("rejected", "AWS does not know the access key AKIA…MPLE"),
    "aws-expired-token": ("expired", "the session token of temporary key ASIA…QQQQ has expired"),
    "aws-missing-permission": ("permission", "signs in but may not use what fedfleet deploys"),
    "aws-unreachable": ("unreachable", "aws: could not reach http://127.0.0.1:9"),
    "gcp-deleted-key": ("rejected", "Google does not accept key"),
    "gcp-missing-permission": (
        "permission",
        "exchanged its key for a token but may not read project bank-fl",
    ),
    "gcp-unreachable": ("unreachable", "could not reach the token endpoint https://127.0.0.1:9/token"),
    "azure-wrong-secret": ("rejected", "the client secret is wrong for application"),
    "azure-expired-secret": ("expired", "has expired (Authentication failed: AADSTS7000222"),
    "azure-missing-permission": ("permission", "signs in but may not read subscription"),
    "azure-unreachable": ("unreachable", "azure: could not reach https://127.0.0.1:9"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_has_its_own_message_and_nothing_is_stored(
    case: str, tmp_path: Path, fakes: Fakes, env, monkeypatch: pytest.MonkeyPatch
):
    cloud, path, extra, secrets = _case(fakes, tmp_path, case)
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    store = authenticate.Store(Path(env["FEDFLEET_CREDENTIALS_DIR"]))
    with pytest.raises(CredentialError) as err:
        authenticate.add(store, cloud, path, {**env, **extra})
    reason, message = REFUSALS[case]
    assert (err.value.reason, err.value.exit_code) == (reason, 7)
    assert message in str(err.value), str(err.value)
    assert store.names() == [] and not any(store.root.glob("*")) if store.root.exists() else True
    scan(secrets, str(err.value))


@pytest.mark.parametrize("case", ["gcp-token-not-accepted", "azure-connection-reset"])
def test_an_answer_cut_short_or_a_token_refused_later_is_a_clear_error(
    case: str, tmp_path: Path, fakes: Fakes, env
):
    store = authenticate.Store(Path(env["FEDFLEET_CREDENTIALS_DIR"]))
    try:
        if case.startswith("gcp"):
            fakes.clouds.state.forget_google_tokens = True
            sa = fakes.clouds.service_account("hospital-fl")
            cloud, path, secrets = "gcp", write(tmp_path, "sa.json", sa), secrets_of(sa)
        else:
            fakes.clouds.state.drop_arm = True
            sp = fakes.clouds.service_principal()
            cloud, path, secrets = "azure", write(tmp_path, "sp.json", sp), secrets_of(sp)
        with pytest.raises(CredentialError) as err:
            authenticate.add(store, cloud, path, env)
    finally:
        fakes.clouds.state.forget_google_tokens = fakes.clouds.state.drop_arm = False
    if case.startswith("gcp"):
        assert err.value.reason == "rejected"
        assert "Resource Manager did not accept the token Google issued for" in str(err.value)
    else:
        assert err.value.reason == "unreachable" and "azure: no answer from https://127.0.0.1" in str(
            err.value
        )
    assert store.names() == []
    scan(secrets, str(err.value))


def test_the_cli_says_nothing_was_stored_and_keeps_what_was(tmp_path: Path, fakes: Fakes, env):
    good = fedfleet(
        env,
        "auth",
        "add",
        "aws",
        "--file",
        str(write(tmp_path, "a.csv", aws_csv(fakes.deployer))),
        "--name",
        "ci",
    )
    assert good.returncode == 0, good.stderr
    store = Path(env["FEDFLEET_CREDENTIALS_DIR"])
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    bad = fedfleet(env, "auth", "add", "aws", "--file", str(write(tmp_path, "b.csv", aws_csv(fakes.reader))))
    assert bad.returncode == 7 and "Nothing was stored." in bad.stderr
    dup = fedfleet(env, "auth", "add", "aws", "--file", str(tmp_path / "downloads" / "a.csv"), "--name", "ci")
    assert dup.returncode == 2 and "a credential named 'ci' is stored already" in dup.stderr
    wrong_cloud = fedfleet(env, "auth", "add", "azure", "--file", str(tmp_path / "downloads" / "a.csv"))
    assert (
        wrong_cloud.returncode == 2
        and "this is an AWS access key, not a credential for azure" in wrong_cloud.stderr
    )
    missing = fedfleet(env, "auth", "add", "gcp", "--file", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "--file" in missing.stderr and "no such file" in missing.stderr
    folder = fedfleet(env, "auth", "add", "gcp", "--file", str(tmp_path))
    assert folder.returncode == 2 and "is a directory" in folder.stderr
    binary = write(tmp_path, "x.bin", "")
    binary.write_bytes(b"\xff\xfe\x00\x81")
    assert "not a text file" in fedfleet(env, "auth", "add", "gcp", "--file", str(binary)).stderr
    unknown = fedfleet(env, "auth", "add", "oracle", "--file", str(binary))
    assert unknown.returncode == 2 and "unknown cloud 'oracle': one of aws, gcp, azure" in unknown.stderr
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    scan(secrets_of(fakes.reader, fakes.deployer), bad.stdout, bad.stderr, dup.stderr, wrong_cloud.stderr)


def test_in_a_terminal_the_identity_is_shown_and_storing_it_is_asked(tmp_path: Path, fakes: Fakes, env):
    import pty

    path = write(tmp_path, "keys.csv", aws_csv(fakes.deployer))
    for answer, stored in (("n", False), ("y", True)):
        main, tty = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedfleet", "auth", "add", "aws", "--file", str(path)],
            stdin=tty, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )  # fmt: skip
        os.write(main, f"{answer}\n".encode())
        out, _ = proc.communicate(timeout=60)
        os.close(main), os.close(tty)
        said = " ".join(out.split())
        assert "verified account 123456789012 as arn:aws:iam::123456789012:user/deployer" in said
        assert said.index("verified account") < said.index("Store it as aws-123456789012?")
        assert (proc.returncode, "not stored" in said) == ((0, False) if stored else (1, True))
        assert authenticate.Store(Path(env["FEDFLEET_CREDENTIALS_DIR"])).names() == (
            ["aws-123456789012"] if stored else []
        )


def test_verify_finds_a_credential_that_stopped_working(tmp_path: Path, fakes: Fakes, env):
    sp = fakes.clouds.service_principal()
    assert (
        fedfleet(
            env, "auth", "add", "azure", "--file", str(write(tmp_path, "sp.json", sp)), "--name", "hosp"
        ).returncode
        == 0
    )
    fakes.clouds.state.apps[sp["clientId"]].secret_expired = True  # its secret expires at Microsoft
    result = fedfleet(env, "auth", "verify", "hosp")
    assert result.returncode == 7
    assert "expired hosp: azure: the client secret of application" in " ".join(result.stdout.split())
    listed = json.loads(fedfleet(env, "auth", "list", "--json").stdout)
    assert [(r["name"], r["last_result"]) for r in listed] == [("hosp", "expired")]


# -- fedfleet preview | up | destroy -------------------------------------------------------

FAKE_PULUMI = """#!{python}
import json, os, sys
with open({log!r}, "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                                                 if k.startswith(("AWS_", "ARM_", "GOOGLE_"))}}}}) + "\\n")
if sys.argv[1:2] == ["version"]:
    print("v3.220.0")
elif "preview" in sys.argv:
    print("error: this is a stand-in for the Pulumi CLI; it stops at preview", file=sys.stderr)
    sys.exit(1)
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    p = scratch_project(tmp_path / "project")
    (p / "stacks" / "Pulumi.prod.yaml").write_text((REPO / "stacks" / "Pulumi.prod.yaml").read_text())
    (p / "infra").symlink_to(REPO / "infra")
    return p


def test_preview_verifies_each_cloud_and_hands_pulumi_the_credentials_in_its_environment_only(
    tmp_path: Path, fakes: Fakes, env, project: Path
):
    none = fedfleet(env, "preview", "--stack", "prod", project=project)
    assert none.returncode == 7
    said = " ".join(none.stderr.split())
    for cloud in ("aws", "gcp", "azure"):  # every cloud the stack uses, at once
        assert f"{cloud}: the stack uses {cloud}, and no credential for it is stored" in said
        assert f"`fedfleet auth add {cloud} --file FILE`" in said

    sa, sp = fakes.clouds.service_account("hospital-fl"), fakes.clouds.service_principal()
    for cloud, path in (("aws", write(tmp_path, "k.csv", aws_csv(fakes.deployer))), ("gcp", write(tmp_path, "sa.json", sa)),
                        ("azure", write(tmp_path, "sp.json", sp))):  # fmt: skip
        assert fedfleet(env, "auth", "add", cloud, "--file", str(path)).returncode == 0
    # Without the Pulumi CLI: every credential verified first, then the CLI named.
    no_cli = fedfleet(env, "preview", "--stack", "prod", project=project)
    assert no_cli.returncode == 4 and "the Pulumi CLI is not installed here" in no_cli.stderr
    said = " ".join(no_cli.stderr.split())
    assert "aws: stored credential 'aws-123456789012', verified: account 123456789012" in said
    assert "gcp: stored credential 'gcp-hospital-fl', verified: project hospital-fl" in said
    assert f"azure: stored credential 'azure-{sp['subscriptionId']}', verified: subscription" in said

    # With a stand-in for the CLI: the credentials reach its processes, and nothing else; what
    # this shell holds of other credentials (a stale session token, a profile) does not.
    env = {**env, "AWS_SESSION_TOKEN": "zzSTALEzz", "AWS_PROFILE": "someone-else", "ARM_USE_MSI": "true"}
    bin_dir, log = tmp_path / "bin", tmp_path / "pulumi-calls.jsonl"
    bin_dir.mkdir()
    (bin_dir / "pulumi").write_text(FAKE_PULUMI.format(python=sys.executable, log=str(log)))
    (bin_dir / "pulumi").chmod(0o755)
    with_cli = fedfleet(
        {**env, "PATH": f"{bin_dir}:{env['PATH']}"}, "preview", "--stack", "prod", project=project
    )
    assert with_cli.returncode == 4 and "pulumi preview failed" in with_cli.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    stack_calls = [c for c in calls if c["argv"][:1] != ["version"]]
    assert stack_calls and any("preview" in c["argv"] for c in stack_calls)
    for call in stack_calls:
        assert call["env"]["AWS_ACCESS_KEY_ID"] == fakes.deployer["id"]
        assert call["env"]["AWS_SECRET_ACCESS_KEY"] == fakes.deployer["secret"]
        assert json.loads(call["env"]["GOOGLE_CREDENTIALS"])["client_email"] == sa["client_email"]
        assert call["env"]["ARM_CLIENT_SECRET"] == sp["clientSecret"]
        assert (
            call["env"]["AWS_SESSION_TOKEN"] == call["env"]["AWS_PROFILE"] == call["env"]["ARM_USE_MSI"] == ""
        )
    scan(secrets_of(fakes.deployer, sa, sp), none.stderr, no_cli.stdout, no_cli.stderr, with_cli.stdout, with_cli.stderr,
         roots=(project,))  # fmt: skip

    # A credential that stops verifying stops the next preview before Pulumi starts.
    fakes.clouds.state.apps[sp["clientId"]].secret_expired = True
    log.unlink()
    expired = fedfleet(
        {**env, "PATH": f"{bin_dir}:{env['PATH']}"}, "preview", "--stack", "prod", project=project
    )
    assert expired.returncode == 7 and not log.exists()
    said = " ".join(expired.stderr.split())
    assert f"azure (stored credential 'azure-{sp['subscriptionId']}') no longer verifies" in said
    assert "Fix: `fedfleet auth add azure --file FILE --name NEW`" in said
