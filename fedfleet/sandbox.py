"""Throw-away project directories for the tests and benchmarks.

A scratch project has its own Pulumi.yaml, stack file and state, links the real
Flower app (fl/), and uses ports the OS reports free, so it never touches the
working copy's `.fedfleet/` or `runs/` and can run beside it.
"""

from __future__ import annotations

import copy
import os
import random
import socket
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """Distinct ports nothing uses right now, below the kernel's ephemeral range: the ports
    the OS hands out to `bind(0)` servers and to outgoing connections (which other tests make
    by the thousand) never take one of them between now and the run. Under pytest-xdist each
    worker takes only ports of its own residue, so two workers never pick one port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    mine = int(worker.removeprefix("gw")) if worker.startswith("gw") else 0
    low, high = 20000, _ephemeral_start()
    if high - low < 1000:  # an unusual range: fall back to the OS's choice
        low, high = high, 65535
    candidates = [p for p in range(low, high) if p % workers == mine % workers]
    random.SystemRandom().shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        if len(ports) == count:
            break
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    if len(ports) < count:
        raise RuntimeError(f"fewer than {count} free ports in {low}..{high - 1}")
    return ports


def local_config(vms_per_participant: int = 2, ports: list[int] | None = None) -> dict[str, Any]:
    """The shipped local stack's `config:` with fresh ports (and VM names -1, -2, ...)."""
    shipped = YAML(typ="safe").load((REPO / "stacks" / "Pulumi.local.yaml").read_text())["config"]
    config = copy.deepcopy(shipped)
    participants = config["fedfleet:participants"]
    ports = ports or free_ports(1 + len(participants) * vms_per_participant)
    config["fedfleet:aggregator"]["port"] = ports[0]
    # the SuperLink's own loopback port behind the proxy: free too, never a neighbour's guess
    config["fedfleet:aggregator"]["internalPort"] = next(
        p for p in free_ports(len(ports) + 1) if p not in ports
    )
    rest = iter(ports[1:])
    for participant in participants:
        first = participant["vms"][0]
        stem = first["name"].rsplit("-", 1)[0]
        participant["vms"] = [
            {**first, "name": f"{stem}-{j + 1}", "port": next(rest)} for j in range(vms_per_participant)
        ]
    config["fedfleet:local"] = {"root": ".fedfleet/{stack}"}
    return config


def scratch_project(
    directory: Path, config: dict[str, Any] | None = None, stack: str = "local", raw: str | None = None
) -> Path:
    """Write a project into `directory`: Pulumi.yaml, fl/ (a link), stacks/Pulumi.<stack>.yaml."""
    (directory / "stacks").mkdir(parents=True, exist_ok=True)
    (directory / "Pulumi.yaml").write_text((REPO / "Pulumi.yaml").read_text())
    if not (directory / "fl").exists():
        (directory / "fl").symlink_to(REPO / "fl")
    path = directory / "stacks" / f"Pulumi.{stack}.yaml"
    if raw is not None:
        path.write_text(raw)
    else:
        with path.open("w") as fh:
            YAML().dump({"config": config if config is not None else local_config()}, fh)
    return directory
