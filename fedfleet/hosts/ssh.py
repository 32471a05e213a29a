"""Real hosts over SSH: cloud VMs `fedfleet up` made, and machines a site already has.

Each host gets one master connection (`adapters.ssh.Master`) for the whole command:
Ansible's tasks, the operator's tunnel to the SuperLink and the agent session all
multiplex over it. The agent (`hosts.agent`, sent over the session and run by the host's
own Python, nothing installed) answers the runner's questions - the services' states
once a second, new lines of a log or of the ServerApp's events - each in one round trip
on a session that stays open. A host that does not answer within the timeout, or whose
connection closed, is unreachable: that is the link check too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from fedfleet.adapters.processes import Managed, ProcessGroup
from fedfleet.adapters.ssh import Endpoint, Master, SSHFailed, explain, options, ssh_argv
from fedfleet.core.errors import FedfleetError
from fedfleet.core.stack import HostSpec
from fedfleet.hosts import agent
from fedfleet.hosts.base import ServiceStatus

AGENT_SOURCE = Path(agent.__file__).read_text(encoding="utf-8")
# The remote side reads the agent's source (one base64 line) from the session, then serves.
BOOT = "import sys,base64;exec(compile(base64.b64decode(sys.stdin.readline()),'fedfleet-agent','exec'))"
UNITS = ("flower-superlink", "flower-supernode", "fedfleet-worker")
REVIVE_EVERY = 5.0  # seconds between attempts to reopen a lost connection
PING_EVERY = 10.0  # the agent exits after agent.IDLE_SECONDS without a request


class _Session:
    """One long-lived agent on the host: a request per line, an answer per line."""

    def __init__(self, proc: Managed) -> None:
        self.proc = proc
        self.answers: dict[int, dict[str, Any]] = {}
        self.cond = threading.Condition()
        self.next_id = 1
        self.closed = False
        self.python = ""
        assert proc.popen.stdout is not None
        threading.Thread(target=self._read, args=(proc.popen.stdout,), daemon=True).start()
        threading.Thread(target=self._keep_alive, daemon=True).start()

    def _keep_alive(self) -> None:
        """A request now and then, so the agent knows the controller is still there."""
        while self.alive:
            time.sleep(PING_EVERY)
            if self.alive:
                self.call("ping", PING_EVERY)

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.answers[int(reply.get("id") or 0)] = reply
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, rid: int, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while rid not in self.answers and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.answers.pop(rid, None)

    def call(self, op: str, timeout: float, **args: Any) -> dict[str, Any] | None:
        """The agent's answer, or None if none came within `timeout` (or the session ended)."""
        stdin = self.proc.popen.stdin
        with self.cond:
            if self.closed or stdin is None:
                return None
            rid = self.next_id
            self.next_id += 1
            self.answers = {k: v for k, v in self.answers.items() if k >= rid - 100}  # late answers
        try:
            stdin.write((json.dumps({"id": rid, "op": op, **args}) + "\n").encode())
            stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            return None
        return self.wait(rid, timeout)

    @property
    def alive(self) -> bool:
        return not self.closed and self.proc.exit_code() is None


class SSHHost:
    def __init__(
        self, name: str, label: str, ep: Endpoint, spec: HostSpec, procs: ProcessGroup, logs: Path
    ) -> None:
        self.name = name
        self.label = label
        self.ep = ep
        self.spec = spec
        self.home = spec.home
        self.procs = procs
        self.logs = logs
        self.master = Master(ep, procs, logs / f"{name}.ssh.log")
        self.session: _Session | None = None
        self.error: str | None = None  # why the last connection attempt failed
        # Under systemd the services' files belong to their service account: the agent and
        # the copies run with sudo there (the admin user has it: the roles need it too).
        self.sudo = False
        self._reviving = threading.Lock()
        self._last_revive = 0.0

    # -- connection ------------------------------------------------------------------

    def ansible_vars(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ansible_host": self.ep.address,
            "ansible_port": self.ep.port,
            "ansible_user": self.ep.user,
            # Everything Ansible runs goes through this host's master connection.
            "ansible_ssh_common_args": shlex.join(options(self.ep)),
            "ansible_ssh_args": "-o ControlMaster=auto -o ControlPersist=no",
            "ansible_python_interpreter": self.spec.python,
        }
        if self.ep.key_file is not None:
            out["ansible_ssh_private_key_file"] = str(self.ep.key_file)
        return out

    def connect(self) -> str | None:
        try:
            self.master.open()
            self._start_session()
        except SSHFailed as err:
            self.error = str(err)
            return self.error
        self.error = None
        return None

    def _start_session(self) -> None:
        if self.session is not None and self.session.alive:
            return
        if self.session is not None:
            self.procs.stop(self.session.proc, timeout=2)
            self.session = None
        ready = self._open_session()
        systemd = self.spec.service_manager == "systemd" or (
            self.spec.service_manager == "auto" and bool(ready.get("systemd"))
        )
        if systemd and int(ready.get("uid", 0)) != 0:
            self.close_session()
            self.sudo = True
            self._open_session()

    def _open_session(self) -> dict[str, Any]:
        log = self.logs / f"{self.name}.agent.log"
        offset = log.stat().st_size if log.exists() else 0
        sudo = "sudo -n " if self.sudo else ""
        argv = ssh_argv(self.ep, f"exec {sudo}{shlex.quote(self.spec.python)} -u -c {shlex.quote(BOOT)}")
        proc = self.procs.start(f"ssh agent {self.name}", argv, dict(os.environ), log, pipes=True)
        session = _Session(proc)
        assert proc.popen.stdin is not None
        try:
            proc.popen.stdin.write(base64.b64encode(AGENT_SOURCE.encode()) + b"\n")
            proc.popen.stdin.flush()
        except OSError:
            pass
        ready = session.wait(0, self.ep.connect_timeout + 5)
        if ready is None:
            self.procs.stop(proc, timeout=2)
            stderr = log.read_bytes()[offset:].decode(errors="replace") if log.exists() else ""
            if "sudo" in stderr and ("password" in stderr or "not allowed" in stderr):
                raise SSHFailed(
                    f"{self.label}: reading the state of its systemd services needs sudo, and {self.ep.user} "
                    "cannot use it without a password there: allow it (a sudoers line such as "
                    f"`{self.ep.user} ALL=(ALL) NOPASSWD:ALL`), or give the host serviceManager: supervisor"
                )
            if "not found" in stderr or "No such file" in stderr:
                raise SSHFailed(
                    f"{self.label}: {self.spec.python} is not on the host ({stderr.strip().splitlines()[-1]}); "
                    "install Python 3 there (e.g. `apt-get install python3 python3-venv`) or set python: "
                    "to its interpreter in the stack file"
                )
            raise SSHFailed(explain(self.ep, stderr or "no answer from the agent (Connection timed out)"))
        session.python = str(ready.get("python", ""))
        self.session = session
        return ready

    def close_session(self) -> None:
        if self.session is not None:
            stdin = self.session.proc.popen.stdin
            if stdin is not None:
                with contextlib.suppress(OSError):
                    stdin.close()  # the agent exits when its input ends
            self.procs.stop(self.session.proc, timeout=3)
            self.session = None

    def _revive(self) -> None:
        """Reopen a lost connection in the background, at most every few seconds."""
        if time.monotonic() - self._last_revive < REVIVE_EVERY or not self._reviving.acquire(blocking=False):
            return
        self._last_revive = time.monotonic()

        def work() -> None:
            try:
                self.connect()
            finally:
                self._reviving.release()

        threading.Thread(target=work, daemon=True).start()

    def _call(self, op: str, timeout: float, **args: Any) -> dict[str, Any] | None:
        session = self.session
        if session is None or not session.alive:
            self._revive()
            return None
        reply = session.call(op, timeout, **args)
        if reply is None and not session.alive:
            self._revive()
        return reply

    # -- what the stages ask ---------------------------------------------------------

    def status(self, timeout: float = 1.0) -> ServiceStatus:
        manager = self.spec.service_manager
        reply = self._call(
            "status",
            timeout,
            manager="auto" if manager == "auto" else manager,
            socket_path=f"{self.home.rstrip('/')}/supervisor/supervisor.sock",
            units=list(UNITS),
        )
        if reply is None or not reply.get("ok"):
            session = self.session
            if session is not None and session.alive:
                why = f"does not answer over SSH within {timeout:g} s ({self.ep.address}): its link is cut or it hangs"
            else:
                why = (
                    f"cannot be reached over SSH ({self.ep.address}): {self.error or 'the connection closed'}"
                )
            return ServiceStatus(self.label, False, problem=f"{self.label} {why}")
        if not reply["answered"]:
            return ServiceStatus(
                self.label,
                False,
                problem=f"the service manager of {self.label} does not answer (its supervisor is not running)",
            )
        return ServiceStatus(self.label, True, dict(reply["programs"]), dict(reply["pids"]))

    def read(self, path: str, offset: int = 0, limit: int | None = None) -> tuple[bytes, int]:
        reply = self._call(
            "read", 10.0, path=path, offset=offset, limit=agent.READ_LIMIT if limit is None else limit
        )
        if reply is None or not reply.get("ok"):
            return b"", -1
        return base64.b64decode(reply["data"]), int(reply["size"])

    def write(self, path: str, data: bytes) -> None:
        reply = self._call("write", 10.0, path=path, data=base64.b64encode(data).decode())
        if reply is None or not reply.get("ok"):
            why = reply.get("error") if reply else "no answer"
            raise FedfleetError(f"could not write {path} on {self.label}: {why}")

    def fetch(self, path: str, dest: Path) -> bool:
        """The directory as a tar stream over the master connection, unpacked safely."""
        sudo = "sudo -n " if self.sudo else ""
        command = (
            f"{sudo}test -d {shlex.quote(path)} || exit 3; exec {sudo}tar -C {shlex.quote(path)} -cf - ."
        )
        with subprocess.Popen(
            ssh_argv(self.ep, command), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            dest.mkdir(parents=True, exist_ok=True)
            try:
                with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
                    archive.extractall(dest, filter="data")
            except tarfile.ReadError:
                pass  # nothing came: the exit status says why
            stderr = proc.stderr.read().decode(errors="replace")
            code = proc.wait(timeout=60)
        if code == 3:
            return False
        if code != 0:
            raise FedfleetError(
                f"could not copy {path} from {self.label}: {stderr.strip() or f'exit {code}'}"
            )
        return True

    def reach(self, port: int) -> str:
        """127.0.0.1:<a local port> forwarded over the connection to the host's own 127.0.0.1:port
        (so the operator needs no firewall opening to the aggregator)."""
        return f"127.0.0.1:{self.master.forward(port)}"

    def close(self) -> None:
        self.close_session()
        self.master.close()
