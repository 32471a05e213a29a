"""Each cloud's own SDK asked whether a credential works, with one real call (or two).

    aws    STS GetCallerIdentity (who the key is; needs no permission), then EC2
           DescribeRegions (a read the deployment needs)            boto3
    gcp    the OAuth token exchange at the key's `token_uri` (the JWT-bearer grant), then
           Resource Manager `projects.get` with that token               google-auth,
                                                                 google-cloud-resource-manager
    azure  a token from Microsoft's identity platform (client-credentials grant), then
           ARM `subscriptions.get`                       azure-identity, azure-mgmt-resource

Endpoints are the SDKs' own settings, so a private or sovereign endpoint (or a local server
that speaks the protocol) is reached the same way: boto3's `AWS_ENDPOINT_URL_STS` /
`AWS_ENDPOINT_URL_EC2`; the key file's `token_uri` and `FEDFLEET_GCP_RESOURCE_MANAGER_ENDPOINT`
(the client's `api_endpoint`); the service principal's `activeDirectoryEndpointUrl` and
`resourceManagerEndpointUrl` (or `AZURE_AUTHORITY_HOST`). Every failure becomes a
CredentialError whose `reason` is rejected, expired, permission, not-found or unreachable,
and whose message says what the cloud said and the fix, without any secret.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from fedfleet.core.credentials import Credential, mask
from fedfleet.core.errors import CredentialError

TIMEOUT = 10.0  # seconds per request; an unreachable endpoint is said within a few of these
GCP_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
AZURE_AUTHORITY = "https://login.microsoftonline.com"
AZURE_ARM = "https://management.azure.com"


def verify(credential: Credential, environ: Mapping[str, str]) -> dict[str, str]:
    """Who the credential is (account, project, subscription...), or CredentialError."""
    for name in ("azure", "msal", "urllib3", "botocore", "google"):  # nothing of theirs on the terminal
        logging.getLogger(name).setLevel(logging.ERROR)
    check = {"aws": _aws, "gcp": _gcp, "azure": _azure}[credential.cloud]
    try:
        return check(credential, environ)
    except CredentialError as err:
        # What a cloud (or a proxy on the way) said is quoted in messages: never a secret.
        raise CredentialError(redact(str(err), credential), err.reason) from None


def redact(text: str, credential: Credential) -> str:
    for value in credential.secret.reveal().values():
        for piece in (value, *value.splitlines()):
            if len(piece.strip()) >= 8:
                text = text.replace(piece.strip(), "[secret]")
    return text


# -- AWS -------------------------------------------------------------------------------------


def _aws(credential: Credential, environ: Mapping[str, str]) -> dict[str, str]:
    import boto3
    import botocore.exceptions as bx
    from botocore.config import Config

    secret = credential.secret.reveal()
    key = mask(credential.key_id)
    config = Config(
        connect_timeout=TIMEOUT, read_timeout=TIMEOUT, retries={"max_attempts": 2, "mode": "standard"}
    )
    session = boto3.session.Session(
        aws_access_key_id=credential.public["access_key_id"],
        aws_secret_access_key=secret["secret_access_key"],
        aws_session_token=secret.get("session_token") or None,
        region_name=credential.public.get("region") or "us-east-1",
        botocore_session=_bare_botocore(),
    )
    step = "STS GetCallerIdentity"

    def client(service: str) -> Any:  # boto3's own endpoint and CA settings, read from `environ`
        endpoint = environ.get(f"AWS_ENDPOINT_URL_{service.upper()}") or environ.get("AWS_ENDPOINT_URL")
        return session.client(
            service, config=config, endpoint_url=endpoint or None, verify=environ.get("AWS_CA_BUNDLE")
        )

    try:
        sts = client("sts")
        step = f"STS GetCallerIdentity at {sts.meta.endpoint_url}"
        who = sts.get_caller_identity()
        ec2 = client("ec2")
        step = f"EC2 DescribeRegions at {ec2.meta.endpoint_url}"
        regions = ec2.describe_regions()["Regions"]
    except bx.ClientError as err:
        error = err.response.get("Error", {})
        code, message = str(error.get("Code", "")), str(error.get("Message", ""))
        raise _aws_refusal(code, message, key, step, credential) from None
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, bx.SSLError) as err:
        raise CredentialError(
            f"aws: could not reach {step.split(' at ')[-1]} ({type(err).__name__}: {err}); check this "
            "machine's network and proxy (HTTPS_PROXY), or AWS_ENDPOINT_URL_STS / AWS_ENDPOINT_URL_EC2 "
            "if you set them.",
            "unreachable",
        ) from None
    except bx.BotoCoreError as err:
        raise CredentialError(f"aws: {step} failed: {err}", "unreachable") from None
    return {
        "account": str(who["Account"]),
        "arn": str(who["Arn"]),
        "user_id": str(who["UserId"]),
        "regions": str(len(regions)),
    }


def _bare_botocore() -> Any:
    """A botocore session that reads no profile: AWS_PROFILE naming a profile that does not
    exist here would otherwise stop the check before it starts."""
    import botocore.session

    # (config name, environment variable, default, conversion): none of them read from anywhere
    return botocore.session.Session(
        session_vars={
            "profile": (None, None, None, None),
            "credentials_file": (None, None, os.devnull, None),
            "config_file": (None, None, os.devnull, None),
        }
    )


def _aws_refusal(code: str, message: str, key: str, step: str, credential: Credential) -> CredentialError:
    if code == "InvalidClientTokenId":
        return CredentialError(
            f"aws: AWS does not know the access key {key} ({step}: {code}): it was deleted or "
            "deactivated, or the key id was mistyped; create a new access key in the IAM console and add "
            "that file",
            "rejected",
        )
    if code == "SignatureDoesNotMatch":
        return CredentialError(
            f"aws: the secret access key does not belong to access key {key} ({step}: {code}); copy the "
            "secret again from the file AWS gave when the key was created (it cannot be shown twice: "
            "if it is lost, create a new key)",
            "rejected",
        )
    if code in ("ExpiredToken", "ExpiredTokenException", "RequestExpired", "TokenRefreshRequired"):
        temporary = "session_token" in credential.secret.reveal()
        return CredentialError(
            f"aws: the {'session token of temporary key ' if temporary else 'key '}{key} has expired "
            f"({step}: {code}: {message}); get new temporary credentials (`aws sts get-session-token`, "
            "or sign in again and `aws configure export-credentials`) and add them",
            "expired",
        )
    if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedAccess"):
        return CredentialError(
            f"aws: the key {key} signs in but may not use what fedfleet deploys ({step}: {code}: {message}); "
            "attach a policy allowing EC2 and VPC (for example AmazonEC2FullAccess) to this user or role",
            "permission",
        )
    return CredentialError(f"aws: {step} refused the key {key}: {code}: {message}", "rejected")


# -- GCP -------------------------------------------------------------------------------------


class _TimedRequest:
    """google-auth's transport with a timeout (its default waits 120 s)."""

    def __init__(self) -> None:
        from google.auth.transport.requests import Request

        self._request = Request()

    def __call__(
        self, url: str, method: str = "GET", body: Any = None, headers: Any = None, **kw: Any
    ) -> Any:
        kw.setdefault("timeout", TIMEOUT)
        return self._request(url, method=method, body=body, headers=headers, **kw)


def _gcp(credential: Credential, environ: Mapping[str, str]) -> dict[str, str]:
    import google.auth.exceptions as gx
    import google.oauth2.credentials
    from google.api_core import client_options
    from google.api_core import exceptions as api
    from google.cloud import resourcemanager_v3
    from google.oauth2 import service_account

    p = credential.public
    email, key = p["client_email"], mask(p["private_key_id"])
    info = json.loads(credential.secret.reveal()["key_json"])
    try:
        sa = service_account.Credentials.from_service_account_info(info, scopes=[GCP_SCOPE])
    except (ValueError, KeyError) as err:
        raise CredentialError(
            f"gcp: the key file's private key cannot be loaded ({type(err).__name__}); download the key again",
            "rejected",
        ) from None
    try:
        sa.refresh(_TimedRequest())  # the token exchange: a JWT signed with the key, at token_uri
    except gx.RefreshError as err:
        raise _gcp_refusal(str(err.args[0]) if err.args else str(err), email, key, p["token_uri"]) from None
    except gx.TransportError as err:
        raise CredentialError(
            f"gcp: could not reach the token endpoint {p['token_uri']} ({_short(err)}); check this machine's "
            "network and proxy (HTTPS_PROXY).",
            "unreachable",
        ) from None
    endpoint = environ.get("FEDFLEET_GCP_RESOURCE_MANAGER_ENDPOINT") or None
    client = resourcemanager_v3.ProjectsClient(
        credentials=google.oauth2.credentials.Credentials(sa.token),  # the exchanged token, nothing else
        transport="rest",
        client_options=client_options.ClientOptions(api_endpoint=endpoint),
    )
    where = endpoint or "cloudresourcemanager.googleapis.com"
    try:
        project = client.get_project(name=f"projects/{p['project_id']}", retry=None, timeout=TIMEOUT)
    except (api.PermissionDenied, api.Forbidden) as err:
        raise CredentialError(
            f"gcp: {email} exchanged its key for a token but may not read project {p['project_id']} "
            f"(Resource Manager: {err.message}); grant it a role on the project (for example "
            "roles/compute.admin and roles/iam.serviceAccountUser, which include resourcemanager.projects.get)",
            "permission",
        ) from None
    except api.NotFound:
        raise CredentialError(
            f"gcp: project {p['project_id']} was not found (deleted, or the key file is for another "
            "project); download a key of a service account in the project you deploy to",
            "not-found",
        ) from None
    except (api.Unauthenticated, api.Unauthorized, gx.GoogleAuthError) as err:
        # (a 401 makes the client try to refresh a token it cannot refresh: a GoogleAuthError)
        raise CredentialError(
            f"gcp: Resource Manager did not accept the token Google issued for {email} just now "
            f"({_short(err)}); check that {where} is Google's Resource Manager",
            "rejected",
        ) from None
    except api.GoogleAPICallError as err:
        raise CredentialError(
            f"gcp: Resource Manager at {where} answered {err.code} ({err.message}) for project {p['project_id']}",
            "unreachable" if (err.code or 0) >= 500 or err.code == 429 else "rejected",
        ) from None
    except OSError as err:
        raise CredentialError(
            f"gcp: could not reach Resource Manager at {where} ({_short(err)}); check this machine's network "
            "and proxy (HTTPS_PROXY).",
            "unreachable",
        ) from None
    return {
        "project_id": str(project.project_id),
        "project_number": str(project.name).removeprefix("projects/"),
        "project_state": project.state.name,
        "client_email": email,
    }


def _gcp_refusal(text: str, email: str, key: str, token_uri: str) -> CredentialError:
    lowered = text.lower()
    if "invalid jwt signature" in lowered:
        return CredentialError(
            f"gcp: Google does not accept key {key} of {email} (token exchange: {text}): the key was "
            "deleted, disabled or has expired, or the file was changed; create a new key and add it",
            "expired" if "expired" in lowered else "rejected",
        )
    if "account not found" in lowered or "invalid_client" in lowered or "disabled" in lowered:
        return CredentialError(
            f"gcp: Google does not know or has disabled the service account {email} (token exchange: "
            f"{text}); enable it, or create a key of an account that exists",
            "rejected",
        )
    if "token must be a short-lived token" in lowered or "iat" in lowered:
        return CredentialError(
            f"gcp: Google refused the token request because this machine's clock is off (token exchange: "
            f"{text}); set the time (timedatectl set-ntp true) and try again",
            "rejected",
        )
    return CredentialError(f"gcp: the token exchange at {token_uri} failed for {email}: {text}", "rejected")


def _short(err: BaseException) -> str:
    text = str(err).split("\n")[0]
    return f"{type(err).__name__}: {text[:200]}"


# -- Azure -----------------------------------------------------------------------------------

AADSTS = re.compile(r"AADSTS(\d+)")
# What requests and urllib3 say when nothing answers (azure-identity wraps them in its own error).
UNREACHABLE = (
    "Failed to establish a new connection",
    "Max retries exceeded",
    "timed out",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Connection refused",
    "Connection reset",
    "Connection aborted",
    "RemoteDisconnected",
    "SSLError",
    "SSL:",
    "EOF occurred",
)


def _azure(credential: Credential, environ: Mapping[str, str]) -> dict[str, str]:
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
    )
    from azure.identity import ClientSecretCredential
    from azure.mgmt.resource.subscriptions import SubscriptionClient

    p = credential.public
    authority = p.get("authority") or environ.get("AZURE_AUTHORITY_HOST") or AZURE_AUTHORITY
    arm = p.get("resource_manager") or AZURE_ARM
    scope = f"{arm}/.default" if arm != AZURE_ARM else f"{AZURE_ARM}/.default"
    transport: dict[str, Any] = {"connection_timeout": TIMEOUT, "read_timeout": TIMEOUT, "retry_total": 1}
    token_credential = ClientSecretCredential(
        p["tenant_id"], p["client_id"], credential.secret.reveal()["client_secret"],
        authority=authority.removeprefix("https://"),
        disable_instance_discovery=authority != AZURE_AUTHORITY,  # a sovereign or private authority
        **transport,
    )  # fmt: skip
    app = f"application {mask(p['client_id'])} in tenant {p['tenant_id']}"
    step = "token"
    try:
        token_credential.get_token(scope)
        step = "ARM"
        client = SubscriptionClient(token_credential, base_url=arm, credential_scopes=[scope], **transport)
        sub = client.subscriptions.get(p["subscription_id"])
    except ClientAuthenticationError as err:
        if step == "ARM":  # a 401 from ARM, after a token was issued
            raise CredentialError(
                f"azure: ARM at {arm} did not accept the token {authority} issued to {app} ({_short(err)})",
                "rejected",
            ) from None
        raise _azure_refusal(str(err.message or err), app, authority) from None
    except ServiceRequestError as err:
        raise CredentialError(
            f"azure: could not reach {authority} or {arm} ({_short(err)}); check this machine's network and "
            "proxy (HTTPS_PROXY), or the endpoint URLs in the service principal's file.",
            "unreachable",
        ) from None
    except HttpResponseError as err:
        code = getattr(err.error, "code", None) or str(err.status_code)
        text = getattr(err.error, "message", None) or str(err.message)
        if err.status_code == 404 or code == "SubscriptionNotFound":
            raise CredentialError(
                f"azure: {app} signs in, but subscription {p['subscription_id']} was not found or it has "
                f"no role there (ARM: {code}); assign it a role on the subscription (`az role assignment "
                f"create --assignee {p['client_id']} --role Contributor --scope /subscriptions/"
                f"{p['subscription_id']}`) or give the right subscription",
                "not-found",
            ) from None
        if err.status_code == 403:
            raise CredentialError(
                f"azure: {app} signs in but may not read subscription {p['subscription_id']} (ARM: {code}: "
                f"{text}); assign it the Contributor role on the subscription",
                "permission",
            ) from None
        raise CredentialError(f"azure: ARM refused {app}: {code}: {text}", "rejected") from None
    except ValueError as err:  # MSAL: the authority answered, but not as one
        raise CredentialError(
            f"azure: {authority} did not answer as Microsoft's identity platform for tenant {p['tenant_id']} "
            f"({_short(err)}); check the tenant id and activeDirectoryEndpointUrl",
            "rejected",
        ) from None
    except AzureError as err:  # a connection reset, a read timeout: no answer
        raise CredentialError(
            f"azure: no answer from {authority if step == 'token' else arm} ({_short(err)}); check this machine's "
            "network and proxy (HTTPS_PROXY).",
            "unreachable",
        ) from None
    finally:
        token_credential.close()
    return {
        "subscription_id": str(sub.subscription_id),
        "subscription_name": str(sub.display_name),
        "subscription_state": str(getattr(sub.state, "value", sub.state)),
        "tenant_id": str(getattr(sub, "tenant_id", None) or p["tenant_id"]),
        "client_id": p["client_id"],
    }


def _azure_refusal(text: str, app: str, authority: str) -> CredentialError:
    found = AADSTS.search(text)
    code = found.group(1) if found else ""
    said = text.split(" Trace ID:", maxsplit=1)[0].split("\n", maxsplit=1)[0].strip()
    first = said.split(". ", 1)[0].rstrip(".") + "."  # Microsoft's first sentence says what
    if not code and any(s in text for s in UNREACHABLE):
        return CredentialError(
            f"azure: could not reach {authority} ({said[:200]}); check this machine's network and proxy "
            "(HTTPS_PROXY), or activeDirectoryEndpointUrl in the service principal's file.",
            "unreachable",
        )
    if not code and "Unable to get authority configuration" in text:
        return CredentialError(
            f"azure: {authority} does not know the tenant of {app}: it has no OpenID configuration for it; "
            "check tenantId (`az account show --query tenantId -o tsv`)",
            "rejected",
        )
    if code == "7000215":
        return CredentialError(
            f"azure: the client secret is wrong for {app} ({first}); use the secret's value (shown once "
            "when it was made), not its ID, or make a new one: `az ad sp credential reset --id CLIENT_ID`",
            "rejected",
        )
    if code == "7000222":
        return CredentialError(
            f"azure: the client secret of {app} has expired ({first}); make a new one (`az ad sp "
            "credential reset --id CLIENT_ID`) and add the file it prints",
            "expired",
        )
    if code in ("700016", "90002", "900023", "90023"):
        return CredentialError(
            f"azure: {authority} does not know {app} ({first}); check the tenant and client ids",
            "rejected",
        )
    return CredentialError(f"azure: {authority} refused {app}: {said[:300]}", "rejected")
