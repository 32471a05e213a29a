"""Flower at the edge: the operator's `flwr` CLI and the environment of Flower processes.

Every Flower process gets telemetry and update checks off and its own FLWR_HOME.
The `flwr` CLI is the supported control interface; each call costs ~1.7 s of CPU,
so fedfleet calls it only to submit a run and confirm its status (the playbooks
register node keys with it).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedfleet.core.errors import EnvironmentProblem, FedfleetError, RunFailed
from fedfleet.core.util import atomic_write

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


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


def toml_key(key: str) -> str:
    """A flat run-config key as TOML writes it (Flower joins nested tables with dots)."""
    return ".".join(
        part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part) for part in key.split(".")
    )


def write_run_config(path: Path, run_config: Mapping[str, str | int | float | bool]) -> Path:
    """A run-config TOML file for `flwr run --run-config` (flat keys, scalar values)."""
    return atomic_write(
        path, "".join(f"{toml_key(key)} = {toml_value(value)}\n" for key, value in run_config.items())
    )


# What a FAB may hold (Flower's allow-list); the rest of an app directory (data, weights,
# virtual environments) is not copied into the staged app.
FAB_FILES = (
    "*.py", "*.toml", "*.md", "*.yaml", "*.yml", "*.json", "*.jsonl", "LICENSE", "LICENSE.md",
    ".gitignore", ".editorconfig",  # Flower applies the app's .gitignore when it builds the FAB
)  # fmt: skip
FAB_SKIP_DIRS = (
    ".venv",
    "__pycache__",
    ".flwr",
)  # as Flower's own file filter (fab-exclude may name the rest)
# Console scripts a Flower app's own environment needs: SuperExec starts them by name.
APP_SCRIPTS = {"flwr-clientapp": "flwr.supernode.cli:flwr_clientapp"}


def _fab_only(directory: str, names: list[str]) -> set[str]:
    skip = set()
    for name in names:
        path = Path(directory, name)
        if path.is_symlink():
            skip.add(name)  # Flower leaves links out of a FAB too
        elif path.is_dir():
            if name in FAB_SKIP_DIRS:
                skip.add(name)
        elif not any(fnmatch.fnmatch(name, pattern) for pattern in FAB_FILES):
            skip.add(name)
    return skip


def stage_app(app_dir: Path, dest: Path, packages: Mapping[str, list[Path]] | None = None) -> Path:
    """A copy of the Flower app in `app_dir` for `flwr run` (which rewrites the pyproject.toml
    it is given when that has [tool.flwr.federations]: the copy has none, the user's app is
    never touched), with more Python packages in it (name -> its files) that then travel
    inside the FAB `flwr run` builds (SuperNodes install the app from it: nothing is copied
    to hosts by hand). Only files a FAB may hold are copied. `dest` is made afresh."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(app_dir, dest, ignore=_fab_only)
    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    pyproject.get("tool", {}).get("flwr", {}).pop("federations", None)
    app = pyproject.setdefault("tool", {}).setdefault("flwr", {}).setdefault("app", {})
    include = list(app.get("fab-include", []))
    for name, files in (packages or {}).items():
        package = dest / name
        package.mkdir()
        (package / "__init__.py").write_text('"""Added to the app by fedfleet from the stack file."""\n')
        for file in files:
            shutil.copyfile(file, package / file.name)
        if include:  # with an explicit list, the FAB takes only what it names
            include.append(f"{name}/*.py")
    if include:
        app["fab-include"] = include
    (dest / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return dest


@dataclass(frozen=True)
class FlwrCli:
    """The operator's `flwr` CLI bound to one SuperLink connection."""

    flwr_home: Path
    connection: str
    address: str
    ca_cert: Path

    def write_config(self) -> None:
        text = (
            "# Written by fedfleet for this stack's SuperLink; rewritten on every run.\n"
            "[superlink]\n"
            f"default = {toml_value(self.connection)}\n\n"
            f"[superlink.{self.connection}]\n"
            f"address = {toml_value(self.address)}\n"
            f"root-certificates = {toml_value(str(self.ca_cert))}\n"
        )
        atomic_write(self.flwr_home / "config.toml", text)

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

    def run(self, app_dir: Path, run_config: Path | None) -> int:
        options = ("--run-config", str(run_config)) if run_config is not None else ()
        reply = self.call("run", str(app_dir), options=options, timeout=120.0)
        if not reply.get("success"):
            raise RunFailed(f"`flwr run` refused the app: {reply.get('error-message', reply)}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        reply = self.call("ls", options=("--run-id", str(run_id)))
        runs = reply.get("runs") or []
        return runs[0] if runs else {"status": "unknown", "status-details": str(reply)}

    def stop(self, run_id: int) -> None:
        self.call("stop", str(run_id), timeout=30.0)

    def log_command(self, run_id: int) -> tuple[list[str], dict[str, str]]:
        """`flwr log RUN --stream` (argv, environment): the ServerApp's output as the SuperLink
        keeps it, from the start, until the run finishes (then the process ends). The text
        comes on stdout, Flower's own messages on stderr."""
        # Unbuffered: `flwr log` prints each chunk as it comes, not when 8 KiB have gathered.
        env = flower_env(self.flwr_home, {"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})
        return [tool("flwr"), "log", str(run_id), self.connection, "--stream"], env

    def show_log(self, run_id: int, timeout: float = 60.0) -> str | None:
        """`flwr log RUN --show`: the ServerApp's whole output as the SuperLink has it now
        (None if it could not be read)."""
        argv = [tool("flwr"), "log", str(run_id), self.connection, "--show"]
        env = flower_env(self.flwr_home, {"PYTHONIOENCODING": "utf-8"})  # Flower's └──> in any locale
        try:
            done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return None
        return done.stdout.decode("utf-8", errors="replace") if done.returncode == 0 else None


def build_fab(app_dir: Path, out_dir: Path) -> Path:
    """`flwr build`: the FAB `flwr run` would send for `app_dir` (Flower's own checks: its
    pyproject, the files a FAB may hold, the app's .gitignore, the size limit)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [tool("flwr"), "build", "--app", str(app_dir)], cwd=out_dir, env=flower_env(out_dir / "flwr-home"),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    fabs = sorted(out_dir.glob("*.fab"))
    if done.returncode != 0 or not fabs:
        said = " ".join(re.sub(r"[╭╮╰╯│─]+", " ", done.stdout + done.stderr).split())  # without its box
        raise FedfleetError("`flwr build` refused it: " + (said[-800:] or f"exit code {done.returncode}"))
    return fabs[0]
