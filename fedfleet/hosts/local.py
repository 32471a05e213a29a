"""The local stack's emulated hosts: a directory as the disk, a supervisor as systemd's
stand-in, and (namespaces mode) a network namespace of its own.

Its services are asked through the supervisor's Unix socket, its files read and written
directly, with the same functions the SSH agent runs on a real host (`hosts.agent`).
"""

from __future__ import annotations

import base64
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from fedfleet.core.paths import socket_path
from fedfleet.hosts import agent
from fedfleet.hosts.base import ServiceStatus

LINK_TIMEOUT = 0.5  # seconds a VM's link may take to answer (namespaces mode; a kernel replies)
SYSTEM_PYTHON = "/usr/bin/python3"


def link_answers(address: str, port: int = 22, timeout: float = LINK_TIMEOUT) -> bool:
    """Whether a host answers over its network link: a TCP connection to `port` (SSH, a
    VM's management port) accepted or refused - either way the host's network stack
    replied. No reply within `timeout` (or no route): the link is cut or the host is down."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


class LocalHost:
    def __init__(self, name: str, label: str, home: Path, address: str, *, own_link: bool = False) -> None:
        self.name = name
        self.label = label
        self.home = str(home)
        self.address = address
        # Namespaces mode: the VM has a network link of its own, checked before its services.
        self.link = address if own_link else None
        self.supervisor_socket = socket_path(home, "supervisor")

    def ansible_vars(self) -> dict[str, Any]:
        return {
            "ansible_connection": "local",
            # Modules need only the standard library; the system Python starts faster.
            "ansible_python_interpreter": SYSTEM_PYTHON if Path(SYSTEM_PYTHON).exists() else sys.executable,
        }

    def connect(self) -> str | None:
        return None  # nothing to open: it is this machine

    def reach(self, port: int) -> str:
        return f"127.0.0.1:{port}"  # the emulated aggregator is this machine (its root namespace)

    def status(self, timeout: float = 1.0) -> ServiceStatus:
        if self.link is not None and not link_answers(self.link):
            return ServiceStatus(
                self.label,
                False,
                problem=f"{self.label} does not answer over its network link ({self.link}: no reply "
                f"within {LINK_TIMEOUT:g} s); its SuperNode cannot reach the SuperLink",
            )
        found = agent.supervisor_status(str(self.supervisor_socket), timeout)
        if not found["answered"]:
            return ServiceStatus(
                self.label,
                False,
                problem=f"the supervisor of {self.label} does not answer (the host is down)",
            )
        return ServiceStatus(self.label, True, found["programs"], found["pids"])

    def read(self, path: str, offset: int = 0, limit: int | None = None) -> tuple[bytes, int]:
        found = agent.read(path, offset, agent.READ_LIMIT if limit is None else limit)
        return base64.b64decode(found["data"]), int(found["size"])

    def write(self, path: str, data: bytes) -> None:
        agent.write(path, base64.b64encode(data).decode())

    def fetch(self, path: str, dest: Path) -> bool:
        if not Path(path).is_dir():
            return False
        shutil.copytree(path, dest, dirs_exist_ok=True)
        return True

    def close(self) -> None:
        pass
