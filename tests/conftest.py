"""Shared fixtures: a throw-away project directory with its own stack and free ports."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedfleet.adapters import netns as localnet
from fedfleet.adapters.processes import ProcessGroup
from fedfleet.core.inventory import Inventory
from fedfleet.core.paths import StackPaths, stack_paths
from fedfleet.core.stack import StackConfig, load_stack
from fedfleet.hosts import Hosts, for_stack
from fedfleet.sandbox import scratch_project
from fedfleet.stages import configure, provision


class Local:
    """A local stack's pieces, as the workflow puts them together (no processes started)."""

    def __init__(self, project: Path, name: str = "local", *, with_network: bool = False) -> None:
        self.project = project
        self.stack: StackConfig = load_stack(project, name)
        self.paths: StackPaths = stack_paths(self.stack, project)
        self.inventory: Inventory = provision.up_local(self.stack, project, with_network=with_network)
        self.hosts: Hosts = for_stack(self.stack, self.inventory, self.paths, ProcessGroup())

    def ansible(self, serving: list[str] | None = None, flwr_bin: str = "/x/flwr") -> dict[str, Any]:
        return configure.ansible_inventory(
            self.stack, self.inventory, self.paths, self.hosts, serving or [], flwr_bin=flwr_bin
        )


def why_no_namespaces() -> str | None:
    """Why this machine cannot make network namespaces (tests that need them skip), or None."""
    why = localnet.why_unavailable()
    if why:
        return why
    probe = subprocess.run(["ip", "netns", "add", "ff-probe"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns add` is not allowed here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "ff-probe"], check=False)
    return None


def running_processes_mentioning(text: str) -> list[str]:
    """Command lines of live (non-zombie) processes whose argv contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


@pytest.fixture
def make_project(tmp_path: Path) -> Callable[..., Path]:
    """A project directory: Pulumi.yaml, the real fl/ app, and a stack file we write."""

    def make(config: dict[str, Any] | None = None, stack: str = "local", raw: str | None = None) -> Path:
        return scratch_project(tmp_path / "project", config, stack, raw)

    return make


@pytest.fixture(autouse=True, scope="session")
def nothing_written_into_the_repository() -> Iterator[None]:
    """MLflow's defaults write `mlflow.db` and `mlruns/` into the current directory: a test
    (or the code under test) that fell back to them would leave them in the repository."""
    from fedfleet.sandbox import REPO

    strays = ("mlflow.db", "mlruns", "mlartifacts")
    before = {name for name in strays if (REPO / name).exists()}
    yield
    after = {name for name in strays if (REPO / name).exists()}
    assert after <= before, f"tests left {sorted(after - before)} in {REPO}"
