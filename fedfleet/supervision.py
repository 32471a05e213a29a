"""What the supervisor of a local host says about its programs (XML-RPC over its Unix socket).

On the local stack the Ansible roles run Flower under supervisord, one per emulated
host (systemd's stand-in). The runner asks it, cheaply and often, whether the
SuperLink and the SuperNodes still run; a host whose supervisor does not answer
is down.
"""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

RUNNING_STATES = frozenset({"RUNNING", "STARTING", "BACKOFF"})


@dataclass(frozen=True)
class HostStatus:
    host: str
    reachable: bool
    programs: dict[str, str]  # program name -> supervisor state (RUNNING, FATAL, ...)
    pids: dict[str, int] = field(default_factory=dict)  # program name -> pid (0: not running)

    def down(self, program: str) -> str | None:
        """Why `program` is not running on this host, or None if it runs."""
        if not self.reachable:
            return f"the supervisor of {self.host} does not answer (the host is down)"
        state = self.programs.get(program)
        if state is None:
            return f"{program} is not defined on {self.host}"
        if state not in RUNNING_STATES:
            return f"{program} on {self.host} is {state}"
        return None


# supervisor.xmlrpc.SupervisorTransport speaks the same protocol but has no timeout,
# and a probe of a hung host must end by its deadline.
class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self.path = path
        self.timeout = timeout

    def make_connection(self, host: object) -> http.client.HTTPConnection:
        return _UnixConnection(self.path, self.timeout)


def link_answers(address: str, port: int = 22, timeout: float = 1.0) -> bool:
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


def status(host: str, socket_path: Path, timeout: float = 3.0) -> HostStatus:
    """The state of every program the host's supervisor runs (unreachable: an empty map)."""
    proxy = xmlrpc.client.ServerProxy(
        "http://localhost/RPC2", transport=_UnixTransport(str(socket_path), timeout)
    )
    try:
        infos = proxy.supervisor.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error, http.client.HTTPException):
        return HostStatus(host, False, {})
    return HostStatus(
        host,
        True,
        {str(i["name"]): str(i["statename"]) for i in infos},  # type: ignore[union-attr]
        {str(i["name"]): int(i["pid"]) for i in infos},  # type: ignore[union-attr]
    )
