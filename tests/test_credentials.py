"""Reading the providers' credential files, and choosing a stack's credentials (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfleet.core.credentials import Credential, Secret, from_environment, read_file
from fedfleet.core.errors import ConfigError, CredentialError
from fedfleet.stages import authenticate

KEY_ID = "AKIAQWERTYUIOPASDFGH"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRETKEY"
SA = {
    "type": "service_account", "project_id": "hospital-fl", "private_key_id": "0123456789abcdef0123",
    "private_key": "-----BEGIN PRIVATE KEY-----\nMIIEzzSECRETzz\n-----END PRIVATE KEY-----\n",
    "client_email": "fl@hospital-fl.iam.gserviceaccount.com", "client_id": "1",
    "token_uri": "https://oauth2.googleapis.com/token",
}  # fmt: skip
TENANT, CLIENT, SUB = (
    "72f988bf-86f1-41af-91ab-2d7cd011db47",
    "04b07795-8ddb-461a-bbee-02f9e1bf7b46",
    "9b5f1c3e-1f43-4b8a-9d6b-7c2d3e4f5a6b",
)
SP = {"appId": CLIENT, "displayName": "fedfleet", "password": "zzAZURESECRETzz~1", "tenant": TENANT}
SDK_AUTH = {
    "clientId": CLIENT,
    "clientSecret": "zzAZURESECRETzz~1",
    "subscriptionId": SUB,
    "tenantId": TENANT,
}


def test_every_format_the_clouds_hand_out_is_read():
    console_csv = f"\ufeffAccess key ID,Secret access key\n{KEY_ID},{SECRET}\n"
    user_csv = f"User name,Password,Access key ID,Secret access key,Console login link\nci,,{KEY_ID},{SECRET},https://x\n"
    for text in (console_csv, user_csv):
        c = read_file("aws", text, "keys.csv")
        assert c.public == {"access_key_id": KEY_ID} and c.secret.reveal() == {"secret_access_key": SECRET}
    ini = (
        f"[default]\naws_access_key_id = AKIADEFAULTDEFAULT00\naws_secret_access_key = {SECRET}\n\n"
        f"[profile fl]\naws_access_key_id = ASIATEMPORARYKEY0000\naws_secret_access_key = {SECRET}\n"
        "aws_session_token = zzTOKENzz\nregion = eu-west-1\n"
    )
    assert read_file("aws", ini, "config").public["access_key_id"] == "AKIADEFAULTDEFAULT00"
    fl = read_file("aws", ini, "config", profile="fl")
    assert fl.public == {"access_key_id": "ASIATEMPORARYKEY0000", "region": "eu-west-1"}
    assert fl.pulumi_env()["AWS_SESSION_TOKEN"] == "zzTOKENzz"

    g = read_file("gcp", json.dumps(SA), "key.json")
    assert g.public["client_email"] == SA["client_email"] and json.loads(g.secret.reveal()["key_json"]) == SA
    assert g.pulumi_env()["GOOGLE_PROJECT"] == "hospital-fl"

    plain = read_file("azure", json.dumps(SP), "sp.json", subscription=SUB)
    sdk = read_file("azure", json.dumps(SDK_AUTH), "sp.json")
    assert plain.public == sdk.public == {"client_id": CLIENT, "tenant_id": TENANT, "subscription_id": SUB}
    assert {k: v for k, v in sdk.pulumi_env().items() if v} == {
        "ARM_CLIENT_ID": CLIENT, "ARM_CLIENT_SECRET": "zzAZURESECRETzz~1", "ARM_TENANT_ID": TENANT,
        "ARM_SUBSCRIPTION_ID": SUB,
    }  # fmt: skip
    # what would win over the verified credential (a managed identity, OIDC) is blanked for Pulumi
    assert sdk.pulumi_env()["ARM_USE_MSI"] == sdk.pulumi_env()["ARM_USE_OIDC"] == ""


def test_the_aws_cli_exports_and_commented_credentials_files_are_read():
    commented = (
        f"# work account\n; old\n[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
    )
    sso = commented + "[sso-session corp]\nsso_start_url = https://x\n"
    export_json = json.dumps(
        {
            "Version": 1,
            "AccessKeyId": "ASIATEMPORARYKEY0000",
            "SecretAccessKey": SECRET,
            "SessionToken": "zzT",
        }
    )
    export_env = f"export AWS_ACCESS_KEY_ID={KEY_ID}\nexport AWS_SECRET_ACCESS_KEY={SECRET}\n"
    for text, key_id in (
        (commented, KEY_ID),
        (sso, KEY_ID),
        (export_json, "ASIATEMPORARYKEY0000"),
        (export_env, KEY_ID),
    ):
        c = read_file("aws", text, "f")
        assert c.key_id == key_id and c.secret.reveal()["secret_access_key"] == SECRET
    assert read_file("aws", export_json, "f").secret.reveal()["session_token"] == "zzT"
    # a stale session token in the shell never pairs with a long-term key
    assert read_file("aws", commented, "f").pulumi_env()["AWS_SESSION_TOKEN"] == ""


@pytest.mark.parametrize(
    "text",
    [
        f"{KEY_ID},{SECRET}\n\n",  # no header
        f"{KEY_ID},{SECRET}\n{KEY_ID},{SECRET}\n",
        json.dumps({"SecretAccessKey": SECRET}) + "\n\n",
    ],
)
def test_a_malformed_file_is_never_quoted(text: str):
    with pytest.raises(ConfigError) as err:
        read_file("aws", text, "keys.csv")
    assert SECRET not in str(err.value) and "keys.csv" in str(err.value)


def test_a_credential_never_shows_its_secret():
    c = read_file("aws", f"Access key ID,Secret access key\n{KEY_ID},{SECRET}\n", "keys.csv")
    for shown in (repr(c), str(c), repr(c.secret), f"{c.secret}", str(c.public)):
        assert SECRET not in shown
    assert str(Secret({"a": "b"})) == "[secret]" and c.masked_key_id() == "AKIA…DFGH"


@pytest.mark.parametrize(
    ("cloud", "text", "kwargs", "message"),
    [
        ("aws", "hello", {}, "neither an AWS credentials file"),
        ("aws", json.dumps(SA), {}, "this is a GCP service-account key, not a credential for aws: `fedfleet auth add gcp"),
        ("gcp", f"Access key ID,Secret access key\n{KEY_ID},{SECRET}\n", {}, "this is an AWS access key"),
        ("aws", f"Access key ID,Secret\n{KEY_ID},{SECRET}\n", {}, "no columns 'Access key ID' and 'Secret access key'"),
        ("aws", f"Access key ID,Secret access key\nAKIA-nope,{SECRET}\n", {}, "is not an AWS access key id"),
        ("aws", f"[default]\naws_access_key_id = {KEY_ID}\n", {}, "the field 'aws_secret_access_key' is missing"),
        ("aws", "[profile a]\nsso_session = corp\n[profile b]\nx = 1\n", {"profile": "a"}, "(SSO) profile holds no keys"),
        ("aws", "[profile a]\nx = 1\n[profile b]\nx = 1\n", {}, "2 profiles (a, b) and none is [default]: pass --profile"),
        ("aws", f"[x]\naws_access_key_id = ASIATEMPORARYKEY0000\naws_secret_access_key = {SECRET}\n", {}, "aws_session_token is missing"),
        ("gcp", "{not json", {}, "not valid JSON"),
        ("gcp", json.dumps({**SA, "type": "authorized_user"}), {}, "a user login (`gcloud auth application-default login`)"),
        ("gcp", json.dumps({k: v for k, v in SA.items() if k != "private_key"}), {}, "the field 'private_key' is missing"),
        ("gcp", json.dumps({**SA, "token_uri": "http://x/token"}), {}, "'token_uri' must be an https:// URL"),
        ("azure", json.dumps(SP), {}, "names no subscription; pass --subscription ID"),
        ("azure", json.dumps({k: v for k, v in SDK_AUTH.items() if k != "clientSecret"}), {}, "the field 'clientSecret' is missing"),
        ("azure", json.dumps({**SDK_AUTH, "tenantId": "contoso"}), {}, "tenantId must be a GUID"),
        ("azure", json.dumps(SP), {"subscription": "nope"}, "--subscription must be a GUID"),
        ("gcp", json.dumps(SA), {"profile": "x"}, "--profile is for AWS"),
        ("aws", "", {}, "the file is empty"),
    ],
)  # fmt: skip
def test_bad_files_name_the_field_or_format_and_the_fix(cloud, text, kwargs, message):
    with pytest.raises(ConfigError) as err:
        read_file(cloud, text, "the-file", **kwargs)
    assert message in str(err.value)
    assert "the-file" in str(err.value) or message == "--profile is for AWS"  # an option, not the file
    for secret in (SECRET, "zzAZURESECRETzz", "MIIEzzSECRETzz"):
        assert secret not in str(err.value)


def test_static_credentials_in_the_environment_are_read_as_pulumi_reads_them(tmp_path: Path):
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    aws = from_environment("aws", env, Path.read_text)
    assert aws is not None and {k: v for k, v in aws.pulumi_env().items() if v} == env
    key = tmp_path / "sa.json"
    key.write_text(json.dumps(SA))
    gcp = from_environment("gcp", {"GOOGLE_APPLICATION_CREDENTIALS": str(key)}, lambda p: Path(p).read_text())
    assert gcp is not None and gcp.public["project_id"] == "hospital-fl"
    assert from_environment("gcp", {"GOOGLE_CREDENTIALS": json.dumps(SA)}, None) == gcp.__class__(
        "gcp", gcp.public, gcp.secret, "the environment (GOOGLE_CREDENTIALS)"
    )
    assert from_environment("azure", {}, None) is None
    with pytest.raises(
        ConfigError, match="ARM_CLIENT_ID set but ARM_CLIENT_SECRET, ARM_TENANT_ID, ARM_SUBSCRIPTION_ID not"
    ):
        from_environment("azure", {"ARM_CLIENT_ID": CLIENT}, None)
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY is not"):
        from_environment("aws", {"AWS_ACCESS_KEY_ID": KEY_ID}, None)


# -- which credentials a stack's Pulumi run gets (the verifier injected) ---------------------


def _fake_verify(refuse: set[str] | None = None):
    seen: list[str] = []

    def verify(credential: Credential, environ) -> dict[str, str]:
        seen.append(credential.key_id)
        if credential.key_id in (refuse or set()):
            raise CredentialError(f"{credential.cloud}: refused by the test", "expired")
        return {"account": "123456789012", "arn": "arn:aws:iam::123456789012:user/ci", "project_id": "p",
                "client_email": "e", "subscription_id": SUB, "subscription_name": "s", "tenant_id": TENANT}  # fmt: skip

    verify.seen = seen  # type: ignore[attr-defined]
    return verify


def _store(tmp_path: Path, *files: tuple[str, str, str]) -> authenticate.Store:
    store = authenticate.Store(tmp_path / "store")
    for cloud, name, text in files:
        path = tmp_path / f"{name}.in"
        path.write_text(text)
        authenticate.add(store, cloud, path, {}, name=name, verify=_fake_verify())
    return store


def test_a_cloud_without_a_credential_is_named_with_the_command_that_adds_one(tmp_path: Path):
    store = _store(tmp_path)
    for cloud in ("aws", "gcp", "azure"):
        with pytest.raises(CredentialError) as err:
            authenticate.for_clouds(store, {cloud}, {}, {}, Path("stacks/Pulumi.prod.yaml"), _fake_verify())
        assert err.value.reason == "missing"
        assert f"the stack uses {cloud}" in str(
            err.value
        ) and f"`fedfleet auth add {cloud} --file FILE`" in str(err.value)


def test_the_stack_named_credential_then_the_environment_then_the_only_stored_one(tmp_path: Path):
    csv = "Access key ID,Secret access key\n{},{}\n"
    store = _store(
        tmp_path,
        ("aws", "team", csv.format("AKIATEAMTEAMTEAMTEAM", SECRET)),
        ("aws", "ci", csv.format("AKIACICICICICICICICI", SECRET)),
        ("azure", "hospital", json.dumps(SDK_AUTH)),
    )
    stack_file = Path("stacks/Pulumi.prod.yaml")
    verify = _fake_verify()
    env, used = authenticate.for_clouds(store, {"aws", "azure"}, {"aws": "ci"}, {}, stack_file, verify)
    assert env["AWS_ACCESS_KEY_ID"] == "AKIACICICICICICICICI" and env["ARM_CLIENT_ID"] == CLIENT
    assert used[0].startswith("aws: stored credential 'ci', verified: account 123456789012")
    assert used[1].startswith("azure: stored credential 'hospital'")  # the only Azure one
    assert verify.seen == ["AKIACICICICICICICICI", CLIENT]  # every credential verified, each once

    environ = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    env, used = authenticate.for_clouds(store, {"aws"}, {}, environ, stack_file, verify)
    assert env["AWS_ACCESS_KEY_ID"] == KEY_ID and "from the environment (AWS_ACCESS_KEY_ID)" in used[0]

    with pytest.raises(
        ConfigError, match=r"2 aws credentials are stored \(ci, team\); say which .* fedfleet:credentials"
    ):
        authenticate.for_clouds(store, {"aws"}, {}, {}, stack_file, verify)
    with pytest.raises(ConfigError, match=r"fedfleet:credentials\.aws: 'hospital' is a azure credential"):
        authenticate.for_clouds(store, {"aws"}, {"aws": "hospital"}, {}, stack_file, verify)
    with pytest.raises(ConfigError, match=r"no stored credential named 'cj'.*known: ci, hospital, team"):
        authenticate.for_clouds(store, {"aws"}, {"aws": "cj"}, {}, stack_file, verify)
    # the environment's own partial settings (ARM_SUBSCRIPTION_ID alone, after `az login`) give way
    # to the one stored Azure credential, and say so
    env, used = authenticate.for_clouds(
        store, {"azure"}, {}, {"ARM_SUBSCRIPTION_ID": SUB}, stack_file, verify
    )
    assert env["ARM_CLIENT_ID"] == CLIENT and "the environment's azure settings were not used" in used[0]
    with pytest.raises(CredentialError) as err:
        authenticate.for_clouds(
            store, {"aws"}, {"aws": "team"}, {}, stack_file, _fake_verify(refuse={"AKIATEAMTEAMTEAMTEAM"})
        )
    assert store.load("team").meta["last_result"] == "expired"  # what the check found is recorded
    assert "aws (stored credential 'team') no longer verifies: aws: refused by the test" in str(err.value)
    assert (
        "`fedfleet auth add aws --file FILE --name NEW`" in str(err.value) and err.value.reason == "expired"
    )


def test_the_store_is_owner_only_outside_repositories_and_refuses_duplicates(tmp_path: Path):
    store = _store(tmp_path, ("azure", "hospital", json.dumps(SDK_AUTH)))
    assert store.root.stat().st_mode & 0o777 == 0o700
    assert store.path("hospital").stat().st_mode & 0o777 == 0o600
    text = store.path("hospital").read_text()
    again = tmp_path / "again.json"
    again.write_text(json.dumps(SDK_AUTH))
    verify = _fake_verify()
    with pytest.raises(ConfigError, match="a credential named 'hospital' is stored already"):
        authenticate.add(store, "azure", again, {}, name="hospital", verify=verify)
    assert verify.seen == [] and store.path("hospital").read_text() == text  # refused before any call
    store.path("hospital").chmod(0o644)
    with pytest.raises(ConfigError, match="can be read by others: `chmod 600"):
        store.load("hospital")
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    with pytest.raises(ConfigError, match="must not be inside a repository"):
        authenticate.Store(tmp_path / "repo" / "secrets")
    with pytest.raises(ConfigError, match=r"no stored credential named '\.\./hospital'"):
        store.remove("../hospital")  # a name never reaches outside the store


def test_a_check_never_brings_back_a_credential_removed_meanwhile(tmp_path: Path):
    store = _store(tmp_path, ("azure", "hospital", json.dumps(SDK_AUTH)))
    loaded = store.load("hospital")
    store.remove("hospital")
    assert store.update(loaded, {**loaded.meta, "last_result": "ok"}) is False
    assert store.names() == []
    replacement = tmp_path / "new.json"
    replacement.write_text(json.dumps({**SDK_AUTH, "clientSecret": "zzNEWSECRETzz"}))
    authenticate.add(store, "azure", replacement, {}, name="hospital", verify=_fake_verify())
    assert store.update(loaded, loaded.meta) is False  # the old secret never overwrites the new one
    assert store.load("hospital").credential.secret.reveal()["client_secret"] == "zzNEWSECRETzz"


def test_a_stack_names_its_credential_per_cloud():
    from ruamel.yaml import YAML

    from fedfleet.core.stack import parse_stack
    from fedfleet.sandbox import REPO

    path = REPO / "stacks" / "Pulumi.prod.yaml"
    config = dict(YAML(typ="safe").load(path.read_text())["config"])
    assert parse_stack("prod", path, config).credentials == {}
    config["fedfleet:credentials"] = {"aws": "ci", "azure": "hospital-sp"}
    assert parse_stack("prod", path, config).credentials == {"aws": "ci", "azure": "hospital-sp"}
    for bad, message in (
        ({"oracle": "x"}, "fedfleet:credentials.oracle: unknown key"),
        ({"aws": "Not A Name"}, "fedfleet:credentials.aws: 'Not A Name' is not a credential name"),
        ({"gcp": ""}, "fedfleet:credentials.gcp: must be a non-empty string"),
    ):
        config["fedfleet:credentials"] = bad
        with pytest.raises(ConfigError) as err:
            parse_stack("prod", path, config)
        assert message in str(err.value) and str(path) in str(err.value)
