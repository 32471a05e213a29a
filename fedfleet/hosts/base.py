"""What the stages ask of a host, whatever kind it is.

Two kinds implement it: `LocalHost` (the local stack's emulated hosts, this machine's
files and sockets) and `SSHHost` (real hosts over one multiplexed SSH connection each).
The stages above never ask which kind they have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

RUNNING_STATES = frozenset({"RUNNING", "STARTING", "BACKOFF"})
NO_FILE = -1  # the size `Host.read` gives for a file the host does not have
NO_ANSWER = -2  # ...and when the host did not answer (a real host, over its connection)
SUPERLINK = "flower-superlink"
PROXY = "flower-proxy"  # nginx in front of the SuperLink: the Fleet API only
SUPERNODE = "flower-supernode"
WORKER = "fedfleet-worker"


@dataclass(frozen=True)
class ServiceStatus:
    """What a host says about fedfleet's services (or why it says nothing)."""

    host: str  # the host's label, as messages name it
    reachable: bool
    programs: dict[str, str] = field(default_factory=dict)  # program -> RUNNING, FATAL, ...
    pids: dict[str, int] = field(default_factory=dict)  # program -> pid (0: not running)
    problem: str = ""  # why the host did not answer

    def down(self, program: str) -> str | None:
        """Why `program` is not running on this host, or None if it runs."""
        if not self.reachable:
            return self.problem or f"{self.host} does not answer"
        state = self.programs.get(program)
        if state is None:
            return f"{program} is not defined on {self.host}"
        if state not in RUNNING_STATES:
            return f"{program} on {self.host} is {state}"
        return None


class Host(Protocol):
    name: str  # the inventory's name (aggregator, us-vm-1, ...)
    label: str  # "us-vm-1 (hospital-us)": how messages name it
    home: str  # fedfleet's directory on the host, as the host sees it

    def ansible_vars(self) -> dict[str, Any]:
        """How Ansible reaches this host (connection variables of its inventory entry)."""
        ...

    def connect(self) -> str | None:
        """Open what talking to the host needs; why that failed (None: it works)."""
        ...

    def reach(self, port: int) -> str:
        """host:port at which this machine reaches the service on the host's own loopback at
        `port` (directly for a host emulated here, or through a tunnel over its SSH connection):
        the SuperLink's port behind the proxy, which nothing else can reach."""
        ...

    def status(self, timeout: float = 1.0) -> ServiceStatus:
        """The state of fedfleet's services; unreachable when the host (or its link) does
        not answer within `timeout`."""
        ...

    def read(self, path: str, offset: int = 0, limit: int | None = None) -> tuple[bytes, int]:
        """Up to `limit` bytes of a file on the host from `offset` (from 0 when the file is
        now shorter: it was rotated), and the file's size (NO_FILE: no such file; NO_ANSWER: the
        host did not answer)."""
        ...

    def write(self, path: str, data: bytes) -> None:
        """Write a file on the host atomically."""
        ...

    def fetch(self, path: str, dest: Path) -> bool:
        """Copy a directory of the host into `dest` on this machine; False if it has none."""
        ...

    def close(self) -> None: ...


def log_path(home: str, service: str) -> str:
    """Where the roles write a service's log on a host (supervisor and systemd alike)."""
    return f"{home.rstrip('/')}/log/{service}.log"


def read_whole(host: Host, path: str) -> bytes:
    """A whole file of a host, however large (read in the host's chunks)."""
    chunks, offset = [], 0
    while True:
        chunk, size = host.read(path, offset)
        if size < 0:
            raise FileNotFoundError(f"{path} is not on {getattr(host, 'name', 'the host')}")
        chunks.append(chunk)
        offset += len(chunk)
        if not chunk or offset >= size:
            return b"".join(chunks)


def tail_lines(data: bytes, lines: int = 15) -> str:
    text = data.decode("utf-8", errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) if text else "(empty log)"
