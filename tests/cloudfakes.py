"""Local servers that speak the clouds' real authentication protocols, for `fedfleet auth` tests.

- AWS: moto's ThreadedMotoServer (STS GetCallerIdentity, EC2 DescribeRegions, IAM policies
  enforced), reached through boto3's own `AWS_ENDPOINT_URL_STS` / `AWS_ENDPOINT_URL_EC2`; plus
  `ExpiredSts`, an STS endpoint answering every call with the error real STS gives an expired
  session token (moto never expires one).
- Google and Azure: one HTTPS server (its own CA, which the SDKs trust through
  `REQUESTS_CA_BUNDLE`) with Google's OAuth token endpoint (the JWT-bearer grant, the assertion's
  RS256 signature checked against the service account's public key) and Resource Manager v3
  `projects.get`, and Microsoft's identity platform (OpenID configuration, client-credentials
  grant) and ARM's `subscriptions/{id}`. Error bodies are the ones the real services send.

Each fake holds what the real cloud would know (accounts, keys, grants) and nothing else.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import secrets
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

# -- AWS -----------------------------------------------------------------------------------


class Moto:
    """moto's server with IAM users: `user(name, allow=[...])` gives an access key pair."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self._admin = dict(
            aws_access_key_id="moto-admin", aws_secret_access_key="moto-admin",  # nosec: moto's own
            region_name="us-east-1", endpoint_url=self.url,
        )  # fmt: skip
        self._users: list[str] = []

    def user(self, name: str, allow: list[str]) -> dict[str, str]:
        import boto3

        iam = boto3.client("iam", **self._admin)  # type: ignore[call-overload]
        iam.create_user(UserName=name)
        if allow:
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": allow, "Resource": "*"}],
            }
            iam.put_user_policy(UserName=name, PolicyName="fedfleet", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}

    def enforce_auth(self) -> None:
        """From now on every request is checked against IAM, as AWS does."""
        requests.post(f"{self.url}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL_STS": self.url, "AWS_ENDPOINT_URL_EC2": self.url}

    def stop(self) -> None:
        self.server.stop()


GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
EXPIRED_TOKEN = (
    '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
    "<Code>ExpiredToken</Code><Message>The security token included in the request is expired</Message>"
    "</Error><RequestId>{}</RequestId></ErrorResponse>"
)


# -- Google and Azure, over HTTPS ------------------------------------------------------------


@dataclass
class ServiceAccount:
    email: str
    project: str
    public_pem: bytes
    can_read_project: bool = True


@dataclass
class AzureApp:
    tenant: str
    client_id: str
    secret: str
    subscription: str
    secret_expired: bool = False
    can_read_subscription: bool = True


@dataclass
class State:
    service_accounts: dict[str, ServiceAccount] = field(default_factory=dict)
    google_tokens: dict[str, ServiceAccount] = field(default_factory=dict)
    projects: dict[str, int] = field(default_factory=dict)
    apps: dict[str, AzureApp] = field(default_factory=dict)
    azure_tokens: dict[str, AzureApp] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    forget_google_tokens: bool = False  # Resource Manager answers 401 to every token
    drop_arm: bool = False  # ARM closes the connection without an answer (a reset on the way)


def _google_error(code: int, status: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


def _aad_error(error: str, code: int, text: str) -> dict[str, Any]:
    return {
        "error": error,
        "error_description": f"AADSTS{code}: {text} Trace ID: {secrets.token_hex(8)}",
        "error_codes": [code],
        "timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
    }


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any] | str, content_type: str = "application/json") -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length", "0"))
        return dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))

    def _bearer(self) -> str:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""

    def do_GET(self) -> None:
        state = self.server.state
        path = urllib.parse.urlparse(self.path).path
        with state.lock:
            state.requests.append(f"GET {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["v3", "projects"] and len(parts) == 3:
            return self._project(parts[2])
        if len(parts) == 4 and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            return self._openid(parts[0])
        if parts[0] == "subscriptions" and len(parts) == 2:
            return self._subscription(parts[1])
        self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        state = self.server.state
        path = urllib.parse.urlparse(self.path).path
        with state.lock:
            state.requests.append(f"POST {path}")
        if path == "/token":
            return self._google_token(self._form())
        parts = path.strip("/").split("/")
        if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            return self._azure_token(parts[0], self._form())
        if path.startswith("/sts-expired"):
            return self._send(403, EXPIRED_TOKEN.format(secrets.token_hex(8)), "text/xml")
        self._send(404, {"error": "not found"})

    # Google ---------------------------------------------------------------------------

    def _google_token(self, form: dict[str, str]) -> None:
        from google.auth import jwt

        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._send(
                400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}
            )
        assertion = form.get("assertion", "")
        try:
            claims = jwt.decode(assertion, verify=False)
        except ValueError:
            return self._send(400, {"error": "invalid_grant", "error_description": "Invalid JWT."})
        account = self.server.state.service_accounts.get(claims.get("iss", ""))
        if account is None:
            return self._send(
                400, {"error": "invalid_grant", "error_description": "Invalid grant: account not found"}
            )
        try:
            # google-auth signs for Google's own token URL wherever the key file's token_uri points
            jwt.decode(assertion, certs=account.public_pem, audience=GOOGLE_TOKEN_AUDIENCE)
        except ValueError:
            return self._send(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
        token = "ya29." + secrets.token_urlsafe(24)
        with self.server.state.lock:
            self.server.state.google_tokens[token] = account
        self._send(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    def _project(self, project_id: str) -> None:
        account = (
            None
            if self.server.state.forget_google_tokens
            else self.server.state.google_tokens.get(self._bearer())
        )
        if account is None:
            return self._send(
                401,
                _google_error(
                    401, "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                    "login cookie or other valid authentication credential.",
                ),
            )  # fmt: skip
        number = self.server.state.projects.get(project_id)
        if number is None or not account.can_read_project or account.project != project_id:
            return self._send(
                403,
                _google_error(
                    403, "PERMISSION_DENIED",
                    f"Permission 'resourcemanager.projects.get' denied on resource "
                    f"'//cloudresourcemanager.googleapis.com/projects/{project_id}' (or it may not exist).",
                ),
            )  # fmt: skip
        self._send(
            200,
            {
                "name": f"projects/{number}", "projectId": project_id, "state": "ACTIVE",
                "displayName": project_id, "parent": "organizations/1",
            },
        )  # fmt: skip

    # Azure ----------------------------------------------------------------------------

    def _openid(self, tenant: str) -> None:
        if not any(app.tenant == tenant for app in self.server.state.apps.values()):
            return self._send(
                400,
                _aad_error(
                    "invalid_tenant", 90002,
                    f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
                    "signing into the correct cloud.",
                ),
            )  # fmt: skip
        base = f"{self.server.url}/{tenant}"
        self._send(
            200,
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "issuer": f"{base}/v2.0",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                "response_types_supported": ["code", "id_token", "token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
            },
        )

    def _azure_token(self, tenant: str, form: dict[str, str]) -> None:
        state = self.server.state
        if not any(app.tenant == tenant for app in state.apps.values()):
            return self._send(
                400,
                _aad_error(
                    "invalid_request", 90002,
                    f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
                    "signing into the correct cloud.",
                ),
            )  # fmt: skip
        app = state.apps.get(form.get("client_id", ""))
        if app is None or app.tenant != tenant:
            return self._send(
                400,
                _aad_error(
                    "unauthorized_client", 700016,
                    f"Application with identifier '{form.get('client_id')}' was not found in the directory "
                    f"'{tenant}'.",
                ),
            )  # fmt: skip
        if form.get("client_secret") != app.secret:
            return self._send(
                401,
                _aad_error(
                    "invalid_client", 7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                    f"secret value, not the client secret ID, for a secret added to app '{app.client_id}'.",
                ),
            )  # fmt: skip
        if app.secret_expired:
            return self._send(
                401,
                _aad_error(
                    "invalid_client", 7000222,
                    f"The provided client secret keys for app '{app.client_id}' are expired. Visit the Azure "
                    "portal to create new keys for your app.",
                ),
            )  # fmt: skip
        token = "eyJ0eXAi." + secrets.token_urlsafe(24)
        with state.lock:
            state.azure_tokens[token] = app
        self._send(
            200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}
        )

    def _subscription(self, subscription: str) -> None:
        if self.server.state.drop_arm:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        app = self.server.state.azure_tokens.get(self._bearer())
        if app is None:
            return self._send(
                401,
                {"error": {"code": "InvalidAuthenticationToken", "message": "The access token is invalid."}},
            )
        if app.subscription != subscription:
            return self._send(
                404,
                {
                    "error": {
                        "code": "SubscriptionNotFound",
                        "message": f"The subscription '{subscription}' could not be found.",
                    }
                },
            )
        if not app.can_read_subscription:
            return self._send(
                403,
                {
                    "error": {
                        "code": "AuthorizationFailed",
                        "message": f"The client '{app.client_id}' with object id '{app.client_id}' does not have "
                        "authorization to perform action 'Microsoft.Resources/subscriptions/read' over scope "
                        f"'/subscriptions/{subscription}' or the scope is invalid.",
                    }
                },
            )
        self._send(
            200,
            {
                "id": f"/subscriptions/{subscription}", "subscriptionId": subscription,
                "tenantId": app.tenant, "displayName": "Hospital research", "state": "Enabled",
                "subscriptionPolicies": {"locationPlacementId": "Public_2014-09-01", "quotaId": "PayAsYouGo_2014-09-01",
                                         "spendingLimit": "Off"},
                "authorizationSource": "RoleBased",
            },
        )  # fmt: skip


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: State
    url: str


class Clouds:
    """Google's and Microsoft's endpoints on one local HTTPS server; `ca_file` is its CA."""

    def __init__(self, directory: Path) -> None:
        self.state = State()
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "fake-clouds-ca.pem"
        context = _tls(self.ca_file)
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.server.state = self.state
        self.url = self.server.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # what each cloud knows, and the file a user would download for it

    def service_account(self, project: str, *, can_read_project: bool = True) -> dict[str, Any]:
        """A GCP service account with a key: the key file as the console gives it."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = f"fedfleet-{secrets.token_hex(3)}@{project}.iam.gserviceaccount.com"
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.state.service_accounts[email] = ServiceAccount(email, project, public, can_read_project)
        self.state.projects.setdefault(project, 100000 + len(self.state.projects))
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return {
            "type": "service_account", "project_id": project, "private_key_id": secrets.token_hex(20),
            "private_key": pem, "client_email": email, "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": f"{self.url}/token",
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
            "universe_domain": "googleapis.com",
        }  # fmt: skip

    def delete_key(self, email: str) -> None:
        """The key's public half is gone at Google (key deleted or expired)."""
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        self.state.service_accounts[email].public_pem = other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def service_principal(
        self, *, secret_expired: bool = False, can_read_subscription: bool = True
    ) -> dict[str, str]:
        """An Azure service principal, as `az ad sp create-for-rbac --sdk-auth` prints it."""
        app = AzureApp(
            tenant=_guid(), client_id=_guid(), secret=secrets.token_urlsafe(30), subscription=_guid(),
            secret_expired=secret_expired, can_read_subscription=can_read_subscription,
        )  # fmt: skip
        self.state.apps[app.client_id] = app
        return {
            "clientId": app.client_id, "clientSecret": app.secret, "subscriptionId": app.subscription,
            "tenantId": app.tenant, "activeDirectoryEndpointUrl": self.url,
            "resourceManagerEndpointUrl": self.url + "/",
            "activeDirectoryGraphResourceId": "https://graph.windows.net/",
            "sqlManagementEndpointUrl": "https://management.core.windows.net:8443/",
            "galleryEndpointUrl": "https://gallery.azure.com/",
            "managementEndpointUrl": "https://management.core.windows.net/",
        }  # fmt: skip

    def env(self) -> dict[str, str]:
        """What points the SDKs here: the CA, Resource Manager's endpoint, Azure's authority."""
        return {
            "REQUESTS_CA_BUNDLE": str(self.ca_file),
            "FEDFLEET_GCP_RESOURCE_MANAGER_ENDPOINT": self.url,
        }

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _guid() -> str:
    h = secrets.token_hex(16)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _tls(ca_file: Path) -> ssl.SSLContext:
    """A CA (written to `ca_file`) and a certificate for 127.0.0.1 signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake clouds CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file = ca_file.with_name("fake-clouds.pem")
    cert_file.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file)
    return context
