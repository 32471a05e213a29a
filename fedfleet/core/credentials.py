"""Cloud credentials as the providers hand them out, read into one shape (pure logic).

Formats read (`read_file`):

    aws    the console's access-key CSV (`Access key ID,Secret access key`, also the IAM
           user CSV with a password column), or an INI profile of `~/.aws/credentials` /
           `~/.aws/config` (`aws_access_key_id`, `aws_secret_access_key`, optional
           `aws_session_token`, `region`)
    gcp    a service-account key JSON (`"type": "service_account"`)
    azure  a service principal as `az ad sp create-for-rbac` prints it (`appId`, `password`,
           `tenant`; the subscription given with --subscription) or with `--sdk-auth`
           (`clientId`, `clientSecret`, `tenantId`, `subscriptionId`, endpoint URLs)

A `Credential` keeps what may be shown (key id, tenant, project, endpoints) apart from its
`Secret`, which prints as `[secret]` and is revealed only to the SDK that verifies it and to
Pulumi's environment. Every error names the file and the field, says what was wrong and the
fix, and never quotes a secret.
"""

from __future__ import annotations

import configparser
import csv
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedfleet.core.errors import ConfigError

CLOUDS = ("aws", "gcp", "azure")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
AWS_KEY_ID = re.compile(r"^(AKIA|ASIA)[A-Z0-9]{12,124}$")
GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
ADD = "fedfleet auth add {cloud} --file FILE"
KEY_ID = {"aws": "access_key_id", "gcp": "private_key_id", "azure": "client_id"}
# Variables through which another credential would win over (or mix with) a verified one.
COMPETING = {
    "aws": ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
    "gcp": ("GOOGLE_OAUTH_ACCESS_TOKEN", "CLOUDSDK_AUTH_ACCESS_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"),
    "azure": ("ARM_USE_MSI", "ARM_USE_OIDC", "ARM_USE_CLI", "ARM_CLIENT_CERTIFICATE_PATH",
              "ARM_CLIENT_CERTIFICATE_PASSWORD", "ARM_OIDC_TOKEN", "ARM_OIDC_TOKEN_FILE_PATH"),
}  # fmt: skip
# Where each cloud's console gives the file `auth add` reads.
WHERE = {
    "aws": "an access key's CSV from the IAM console (Users > Security credentials > Create access key), "
    "or a profile of ~/.aws/credentials",
    "gcp": "a service-account key from the console (IAM > Service accounts > Keys > Add key > JSON) or "
    "`gcloud iam service-accounts keys create key.json --iam-account ...`",
    "azure": "the JSON `az ad sp create-for-rbac --role Contributor --scopes /subscriptions/ID` prints "
    "(with --sdk-auth it carries the subscription too)",
}


class Secret:
    """A secret value: printed, logged or compared in a repr as `[secret]`."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    def reveal(self) -> dict[str, str]:
        return dict(self._values)

    def __repr__(self) -> str:
        return "[secret]"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._values == self._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values)))


@dataclass(frozen=True)
class Credential:
    """One cloud credential: `public` may be shown (ids, tenant, endpoints), `secret` never."""

    cloud: str
    public: dict[str, str]
    secret: Secret = field(repr=False)
    source: str = ""  # the file (or environment) it was read from, for messages

    @property
    def key_id(self) -> str:
        """The identifier that names this key (not a secret): AWS's access key id, the
        service account's key id, the Azure application (client) id."""
        return self.public[KEY_ID[self.cloud]]

    def masked_key_id(self) -> str:
        return mask(self.key_id)

    def pulumi_env(self) -> dict[str, str]:
        """The environment variables Pulumi's provider for this cloud reads its credentials
        from; those that would take precedence over them, or pair with them (a stale session
        token left in the shell), are set empty, which the providers read as unset."""
        s, p = self.secret.reveal(), self.public
        if self.cloud == "aws":
            env = {"AWS_ACCESS_KEY_ID": p["access_key_id"], "AWS_SECRET_ACCESS_KEY": s["secret_access_key"]}
            env["AWS_SESSION_TOKEN"] = s.get("session_token", "")
        elif self.cloud == "gcp":
            env = {"GOOGLE_CREDENTIALS": s["key_json"], "GOOGLE_PROJECT": p["project_id"]}
        else:
            env = {
                "ARM_CLIENT_ID": p["client_id"],
                "ARM_CLIENT_SECRET": s["client_secret"],
                "ARM_TENANT_ID": p["tenant_id"],
                "ARM_SUBSCRIPTION_ID": p["subscription_id"],
            }
        return {**dict.fromkeys(COMPETING[self.cloud], ""), **env}

    def to_store(self) -> dict[str, Any]:
        return {"cloud": self.cloud, "public": self.public, "secret": self.secret.reveal()}

    @classmethod
    def from_store(cls, data: Mapping[str, Any], source: str) -> Credential:
        return cls(str(data["cloud"]), dict(data["public"]), Secret(data["secret"]), source)


def mask(key_id: str) -> str:
    """Enough of an id to tell keys apart: its first 4 and last 4 characters."""
    return key_id if len(key_id) <= 8 else f"{key_id[:4]}…{key_id[-4:]}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"--name {name!r}: a credential's name is 1-63 characters of lowercase letters, digits, "
            "'.', '_' and '-', starting with a letter or digit"
        )
    return name


# -- reading the providers' files ------------------------------------------------------------


def read_file(
    cloud: str,
    text: str,
    source: str,
    *,
    profile: str | None = None,
    subscription: str | None = None,
) -> Credential:
    """The credential in `text` (the file `source`) for `cloud`, or ConfigError naming the
    field or format and the fix."""
    if cloud not in CLOUDS:
        raise ConfigError(f"unknown cloud {cloud!r}: one of {', '.join(CLOUDS)}")
    if not text.strip():
        raise ConfigError(f"{source}: the file is empty; expected {WHERE[cloud]}")
    other = _looks_like(text)
    if other is not None and other != cloud:
        raise ConfigError(
            f"{source}: this is {_KIND[other]}, not a credential for {cloud}: "
            f"`fedfleet auth add {other} --file {source}`, or give {WHERE[cloud]}"
        )
    if profile is not None and cloud != "aws":
        raise ConfigError("--profile is for AWS credentials and config files")
    if subscription is not None and cloud != "azure":
        raise ConfigError("--subscription is for Azure service principals")
    if cloud == "aws":
        return _aws(text, source, profile)
    if cloud == "gcp":
        return _gcp(text, source)
    return _azure(text, source, subscription)


_KIND = {
    "aws": "an AWS access key",
    "gcp": "a GCP service-account key",
    "azure": "an Azure service principal",
}


def _looks_like(text: str) -> str | None:
    """Which cloud's format `text` is in, by its telltale fields (None: none of them)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        if data.get("type") == "service_account" or "client_email" in data:
            return "gcp"
        if {"appId", "password"} <= data.keys() or {"clientId", "clientSecret"} <= data.keys():
            return "azure"
        if "AccessKeyId" in data or "aws_access_key_id" in data:
            return "aws"
        return None
    lowered = text.lower()
    if "aws_access_key_id" in lowered or "access key id" in lowered:
        return "aws"
    return None


def _json(text: str, source: str, cloud: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{source}: not valid JSON ({_where(err)}); expected {WHERE[cloud]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object (got {type(data).__name__}); {WHERE[cloud]}")
    return data


def _where(err: ValueError) -> str:
    # json's message says where (line, column) without quoting the text, which may be a secret
    return str(err).split(":")[0] + (
        f" at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
    )


def _field(data: Mapping[str, Any], name: str, source: str, fix: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        problem = "is missing" if name not in data else "is empty or not a string"
        raise ConfigError(f"{source}: the field {name!r} {problem}; {fix}")
    return value.strip()


INI_SECTION = re.compile(r"^\s*\[[^\]]+\]\s*$", re.MULTILINE)


def _aws(text: str, source: str, profile: str | None) -> Credential:
    head = text.lstrip("\ufeff").strip()
    if INI_SECTION.search(head):  # a credentials/config file (comments before the first section too)
        return _aws_ini(head, source, profile)
    if profile is not None:
        raise ConfigError(f"--profile {profile}: {source} has no [profile] sections")
    if head.startswith("{"):
        return _aws_export(head, source)
    if re.match(r"^(export\s+)?AWS_ACCESS_KEY_ID=", head):
        return _aws_env_lines(head, source)
    rows = list(csv.reader(io.StringIO(head)))
    if len(rows) < 2:
        raise ConfigError(
            f"{source}: neither an AWS credentials file (an INI file with [profile] sections) nor an "
            "access-key CSV (a header `Access key ID,Secret access key` and one row); give "
            f"{WHERE['aws']}"
        )
    header = [h.strip().lower() for h in rows[0]]
    try:
        i_id, i_secret = header.index("access key id"), header.index("secret access key")
    except ValueError:
        # never quote the file: a "header" may be a row of keys
        raise ConfigError(
            f"{source}: the CSV header (its first line, {len(rows[0])} columns) has no columns 'Access key ID' "
            "and 'Secret access key'; give the CSV the IAM console downloads for an access key"
        ) from None
    data = [r for r in rows[1:] if any(c.strip() for c in r)]
    if len(data) != 1:
        raise ConfigError(f"{source}: expected one access key row under the header, found {len(data)}")
    row = data[0]
    if len(row) <= max(i_id, i_secret):
        raise ConfigError(f"{source}: the access key row has {len(row)} columns, the header {len(header)}")
    return _aws_credential(row[i_id].strip(), row[i_secret].strip(), "", "", source, "'Access key ID'")


def _aws_export(text: str, source: str) -> Credential:
    """`aws configure export-credentials` (its default JSON, or `--format process`)."""
    data = _json(text, source, "aws")
    fix = "`aws configure export-credentials` prints AccessKeyId, SecretAccessKey and, for temporary keys, SessionToken"
    key_id, secret = _field(data, "AccessKeyId", source, fix), _field(data, "SecretAccessKey", source, fix)
    token = str(data.get("SessionToken") or "").strip()
    return _aws_credential(key_id, secret, token, "", source, "AccessKeyId")


def _aws_env_lines(text: str, source: str) -> Credential:
    """`aws configure export-credentials --format env`: `export AWS_...=...` lines."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.strip().removeprefix("export").strip().partition("=")
        if sep:
            values[name.strip()] = value.strip().strip("'\"")
    fix = "the lines need AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    key_id = _field(values, "AWS_ACCESS_KEY_ID", source, fix)
    secret = _field(values, "AWS_SECRET_ACCESS_KEY", source, fix)
    token = values.get("AWS_SESSION_TOKEN", "")
    return _aws_credential(key_id, secret, token, values.get("AWS_REGION", ""), source, "AWS_ACCESS_KEY_ID")


def _aws_ini(text: str, source: str, profile: str | None) -> Credential:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error as err:
        line = getattr(err, "lineno", None)
        raise ConfigError(
            f"{source}: not an AWS credentials/config file ({type(err).__name__}"
            f"{f' at line {line}' if line else ''}); expected [profile] sections of key = value lines"
        ) from None
    names = {
        s.removeprefix("profile ").strip(): s
        for s in parser.sections()
        if not s.startswith(("sso-session ", "services "))  # not profiles
    }
    if profile is None:
        if "default" in names:
            profile = "default"
        elif len(names) == 1:
            profile = next(iter(names))
        else:
            raise ConfigError(
                f"{source}: {len(names)} profiles ({', '.join(sorted(names)) or 'none'}) and none is "
                "[default]: pass --profile NAME"
            )
    if profile not in names:
        raise ConfigError(
            f"--profile {profile}: {source} has no such profile (it has: {', '.join(sorted(names)) or 'none'})"
        )
    section = parser[names[profile]]
    where = f"{source} [{names[profile]}]"
    if "aws_access_key_id" not in section and ("sso_session" in section or "sso_start_url" in section):
        raise ConfigError(
            f"{where}: an IAM Identity Center (SSO) profile holds no keys to verify or store; run `aws "
            f"configure export-credentials --profile {profile} --format env` and add those keys, or "
            "create an access key for a deployment user"
        )
    if "aws_access_key_id" not in section and ("role_arn" in section or "credential_process" in section):
        raise ConfigError(
            f"{where}: this profile gets its keys from another (role_arn/credential_process); add the "
            "keys it produces (`aws configure export-credentials --profile NAME`) instead"
        )
    fix = "each profile needs aws_access_key_id and aws_secret_access_key"
    key_id = _field(section, "aws_access_key_id", where, fix)
    secret = _field(section, "aws_secret_access_key", where, fix)
    token = section.get("aws_session_token", "").strip()
    if key_id.startswith("ASIA") and not token:
        raise ConfigError(
            f"{where}: aws_access_key_id starts with ASIA, a temporary key, but aws_session_token is "
            "missing; add the session token that came with it"
        )
    return _aws_credential(
        key_id, secret, token, section.get("region", "").strip(), where, "aws_access_key_id"
    )


def _aws_credential(
    key_id: str, secret: str, token: str, region: str, source: str, id_name: str
) -> Credential:
    if not AWS_KEY_ID.match(key_id):
        raise ConfigError(
            f"{source}: {id_name} is not an AWS access key id (20 characters starting with AKIA, or "
            "ASIA for a temporary key); check the file is the access key's, not the console sign-in"
        )
    if len(secret) < 16 or any(c.isspace() for c in secret):
        raise ConfigError(
            f"{source}: the secret access key is malformed ({len(secret)} characters, expected 40 without "
            "spaces); copy it again from where the key was created"
        )
    public = {"access_key_id": key_id, **({"region": region} if region else {})}
    secrets = {"secret_access_key": secret, **({"session_token": token} if token else {})}
    return Credential("aws", public, Secret(secrets), source)


def _gcp(text: str, source: str) -> Credential:
    data = _json(text, source, "gcp")
    kind = data.get("type")
    if kind != "service_account":
        hint = {
            "authorized_user": "a user login (`gcloud auth application-default login`), which is tied to a "
            "person and expires",
            "external_account": "a workload identity federation config, which points elsewhere for its token",
        }.get(str(kind), f"of type {kind!r}")
        raise ConfigError(
            f"{source}: the field 'type' must be 'service_account'; this file is {hint}. fedfleet stores "
            f"service-account keys: {WHERE['gcp']}"
        )
    fix = f"download the key again: {WHERE['gcp']}"
    public = {
        name: _field(data, name, source, fix)
        for name in ("project_id", "client_email", "private_key_id", "token_uri")
    }
    key = _field(data, "private_key", source, fix)
    if "PRIVATE KEY-----" not in key:
        raise ConfigError(f"{source}: the field 'private_key' is not a PEM private key; {fix}")
    if not public["token_uri"].startswith("https://"):
        raise ConfigError(
            f"{source}: the field 'token_uri' must be an https:// URL (got a {public['token_uri'].split(':')[0]} "
            f"URL); {fix}"
        )
    return Credential("gcp", public, Secret({"key_json": json.dumps(data)}), source)


def _azure(text: str, source: str, subscription: str | None) -> Credential:
    data = _json(text, source, "azure")
    if "clientId" in data:  # --sdk-auth
        fix = "the file `az ad sp create-for-rbac --sdk-auth` prints has clientId, clientSecret, tenantId, subscriptionId"
        client, secret = _field(data, "clientId", source, fix), _field(data, "clientSecret", source, fix)
        tenant = _field(data, "tenantId", source, fix)
        sub = subscription or _field(data, "subscriptionId", source, fix + " (or pass --subscription ID)")
        authority = str(data.get("activeDirectoryEndpointUrl") or "").strip()
        arm = str(data.get("resourceManagerEndpointUrl") or "").strip()
        names = {"client": "clientId", "tenant": "tenantId", "subscription": "subscriptionId"}
    else:
        fix = "the file `az ad sp create-for-rbac` prints has appId, password and tenant"
        client, secret = _field(data, "appId", source, fix), _field(data, "password", source, fix)
        tenant = _field(data, "tenant", source, fix)
        if not subscription:
            raise ConfigError(
                f"{source}: a service principal from `az ad sp create-for-rbac` names no subscription; pass "
                "--subscription ID (`az account show --query id -o tsv` prints yours)"
            )
        sub, authority, arm = subscription, "", ""
        names = {"client": "appId", "tenant": "tenant", "subscription": "--subscription"}
    for label, value in (("client", client), ("tenant", tenant), ("subscription", sub)):
        if not GUID.match(value):
            where = names[label] if label != "subscription" or not subscription else "--subscription"
            raise ConfigError(f"{source}: {where} must be a GUID like 00000000-0000-0000-0000-000000000000")
    public = {"client_id": client, "tenant_id": tenant, "subscription_id": sub}
    for name, url in (("authority", authority), ("resource_manager", arm)):
        if url:
            if not url.startswith("https://"):
                raise ConfigError(f"{source}: endpoint URLs must be https:// (the {name} URL is not)")
            public[name] = url.rstrip("/")
    return Credential("azure", public, Secret({"client_secret": secret}), source)


# -- credentials in the environment (CI) ----------------------------------------------------


def from_environment(cloud: str, environ: Mapping[str, str], read_text: Any) -> Credential | None:
    """The static credential for `cloud` that Pulumi would take from `environ`, when there is
    one fedfleet can verify (CI passes secrets this way); `read_text(path)` reads a key file.
    ConfigError when the variables are there but incomplete or not a key fedfleet can verify."""
    if cloud == "aws":
        key_id, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
        if not key_id:
            return None
        if not secret:
            raise ConfigError(
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both, or neither"
            )
        return _aws_credential(
            key_id, secret, environ.get("AWS_SESSION_TOKEN", ""), environ.get("AWS_REGION", ""),
            "the environment (AWS_ACCESS_KEY_ID)", "AWS_ACCESS_KEY_ID",
        )  # fmt: skip
    if cloud == "gcp":
        for var in ("GOOGLE_CREDENTIALS", "GOOGLE_APPLICATION_CREDENTIALS"):
            value = environ.get(var, "").strip()
            if not value:
                continue
            if value.startswith("{"):
                return _gcp(value, f"the environment ({var})")
            try:
                text = read_text(value)
            except OSError as err:
                raise ConfigError(f"{var}={value}: cannot read the key file ({err.strerror})") from None
            return _gcp(text, f"{value} (from {var})")
        return None
    names = ("ARM_CLIENT_ID", "ARM_CLIENT_SECRET", "ARM_TENANT_ID", "ARM_SUBSCRIPTION_ID")
    present = [n for n in names if environ.get(n)]
    if not present:
        return None
    if len(present) < len(names):
        missing = [n for n in names if n not in present]
        raise ConfigError(
            f"{', '.join(present)} set but {', '.join(missing)} not: set all four for a service principal"
        )
    sdk = {
        "clientId": environ["ARM_CLIENT_ID"], "clientSecret": environ["ARM_CLIENT_SECRET"],
        "tenantId": environ["ARM_TENANT_ID"], "subscriptionId": environ["ARM_SUBSCRIPTION_ID"],
    }  # fmt: skip
    return _azure(json.dumps(sdk), "the environment (ARM_CLIENT_ID)", None)


ENV_HINT = {
    "aws": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "gcp": "GOOGLE_CREDENTIALS or GOOGLE_APPLICATION_CREDENTIALS (a service-account key)",
    "azure": "ARM_CLIENT_ID, ARM_CLIENT_SECRET, ARM_TENANT_ID and ARM_SUBSCRIPTION_ID",
}


def default_name(cloud: str, identity: Mapping[str, Any]) -> str:
    """A name for a newly added credential: the cloud and what it opens (account, project,
    subscription)."""
    key = {"aws": "account", "gcp": "project_id", "azure": "subscription_id"}[cloud]
    tail = str(identity.get(key, "")).lower()[:36]
    tail = re.sub(r"[^a-z0-9._-]", "-", tail).strip("-") or "default"
    return f"{cloud}-{tail}"[:63]
