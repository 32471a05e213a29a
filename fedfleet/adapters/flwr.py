"""Flower at the edge: argv for flower-superlink / flower-supernode and the `flwr` CLI.

Every Flower process gets telemetry and update checks off and its own FLWR_HOME.
The `flwr` CLI is the supported control interface; each call costs ~1.7 s of CPU,
so fedfleet calls it only to register keys, submit a run, and confirm its status.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfleet.adapters.pki import ServerTLS
from fedfleet.core.errors import EnvironmentProblem, FedfleetError, RunFailed

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
# The SuperNode's SuperExec looks for new ClientApp tasks every 1 s by default.
SUPEREXEC_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def tool(name: str) -> str:
    """Path of a console script from this environment (beside the running Python)."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise EnvironmentProblem(f"{name} is not installed in this environment ({sys.prefix}); run `make setup`")


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # Flower starts flower-superexec and flwr-*app by name: this environment first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_run_config(path: Path, run_config: Mapping[str, str | int | float | bool]) -> Path:
    """A run-config TOML file for `flwr run --run-config` (flat keys, scalar values)."""
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in run_config.items()))
    return path


def superlink_argv(*, host: str, port: int, database: Path, tls: ServerTLS) -> list[str]:
    return [
        tool("flower-superlink"),
        "--host", host,
        "--port", str(port),
        "--ssl-ca-certfile", str(tls.ca_cert),
        "--ssl-certfile", str(tls.cert),
        "--ssl-keyfile", str(tls.key),
        "--enable-supernode-auth",
        "--database", str(database),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def supernode_argv(
    *,
    superlink: str,
    ca_cert: Path,
    private_key: Path,
    host: str,
    port: int,
    node_config: Mapping[str, str | int | float],
) -> list[str]:
    return [
        tool("flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", str(private_key),
        "--host", host,
        "--port", str(port),
        "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items()),
    ]  # fmt: skip


def wait_healthy(url: str, ca_cert: Path, deadline: float, still_running: Callable[[], None]) -> float:
    """Poll `url` (HTTPS, verified against `ca_cert`) until 200; return seconds waited."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    started = time.monotonic()
    while True:
        still_running()
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
            pass
        if time.monotonic() >= deadline:
            raise EnvironmentProblem(f"{url} did not answer 200 within the deadline")
        time.sleep(0.1)


@dataclass(frozen=True)
class FlwrCli:
    """The operator's `flwr` CLI bound to one SuperLink connection."""

    flwr_home: Path
    connection: str
    address: str
    ca_cert: Path

    def write_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        text = (
            "# Written by fedfleet for this stack's SuperLink; rewritten on every run.\n"
            "[superlink]\n"
            f"default = {toml_value(self.connection)}\n\n"
            f"[superlink.{self.connection}]\n"
            f"address = {toml_value(self.address)}\n"
            f"root-certificates = {toml_value(str(self.ca_cert))}\n"
        )
        (self.flwr_home / "config.toml").write_text(text)

    def call(self, *positional: str, options: tuple[str, ...] = (), timeout: float = 60.0) -> dict[str, Any]:
        """`flwr <positional...> <connection> --format json <options...>`, parsed."""
        argv = [tool("flwr"), *positional, self.connection, "--format", "json", *options]
        try:
            done = subprocess.run(
                argv,
                env=flower_env(self.flwr_home),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise FedfleetError(f"`flwr {positional[0]}` did not finish within {timeout:.0f} s") from err
        try:
            return dict(json.loads(done.stdout[done.stdout.index("{") :]))
        except ValueError:
            return {"success": False, "error-message": (done.stdout + done.stderr).strip()[-2000:]}

    def register(self, public_key: Path) -> int | None:
        """Register a SuperNode key; None if the SuperLink already knows it."""
        reply = self.call("supernode", "register", str(public_key))
        if reply.get("success"):
            return int(reply["node-id"])
        message = str(reply.get("error-message", ""))
        if "already in use" in message:
            return None
        raise EnvironmentProblem(f"registering SuperNode key {public_key} failed: {message}")

    def run(self, app_dir: Path, run_config: Path) -> int:
        reply = self.call("run", str(app_dir), options=("--run-config", str(run_config)), timeout=120.0)
        if not reply.get("success"):
            raise RunFailed(f"`flwr run` refused the app: {reply.get('error-message', reply)}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        reply = self.call("ls", options=("--run-id", str(run_id)))
        runs = reply.get("runs") or []
        return runs[0] if runs else {"status": "unknown", "status-details": str(reply)}

    def stop(self, run_id: int) -> None:
        self.call("stop", str(run_id), timeout=30.0)
