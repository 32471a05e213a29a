"""Shared fixtures: a throw-away project directory with its own stack and free ports."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedfleet.adapters import netns as localnet
from fedfleet.sandbox import scratch_project


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
