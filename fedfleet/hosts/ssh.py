"""Real hosts over SSH: cloud VMs `fedfleet up` made, and machines a site already has.

Each host gets one master connection (`adapters.ssh.Master`) for the whole command:
Ansible's tasks, the operator's tunnel to the SuperLink and the agent session all
multiplex over it. The agent (`hosts.agent`, sent over the session and run by the host's
own Python, nothing installed) answers the runner's questions - the services' states
once a second, new lines of a log or of the ServerApp's events - each in one round trip
on a session that stays open. A host that does not answer within the timeout, or whose
connection closed, is unreachable: that is the link check too. A closed connection is
reopened in the background (with the operator's tunnels), until the host is closed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import IO, Any

from fedfleet.adapters.processes import Managed, ProcessGroup
from fedfleet.adapters.ssh import SERVER_ALIVE, Endpoint, Master, SSHFailed, explain, options, ssh_argv
from fedfleet.core.errors import EnvironmentProblem, FedfleetError
from fedfleet.core.stack import HostSpec
from fedfleet.hosts import agent
from fedfleet.hosts.base import NO_ANSWER, ServiceStatus

AGENT_SOURCE = Path(agent.__file__).read_text(encoding="utf-8")
# The remote side reads the agent's source (one base64 line) from the session, then serves.
# Unbuffered (the raw file reads byte by byte up to the newline): a buffered readline would
# keep requests sent right behind the source in sys.stdin's buffer, where the agent, which
# reads its file descriptor, never sees them.
BOOT = (
    "import sys,base64;"
    "exec(compile(base64.b64decode(sys.stdin.buffer.raw.readline()),'fedfleet-agent','exec'))"
)
UNITS = ("flower-superlink", "flower-proxy", "flower-supernode", "fedfleet-worker")
REVIVE_EVERY = 5.0  # seconds between attempts to reopen a lost connection
PING_EVERY = 10.0  # the agent exits after agent.IDLE_SECONDS without a request
AGENT_MARGIN = 0.2  # seconds of a status timeout left for the round trip (the agent gets the rest)
CLOSE_WAIT = 5.0  # seconds close() waits for a reconnection in progress
FETCH_SECONDS = 300.0  # a copy not done by then is stopped (the host hangs)
# A copy's own ssh: it notices a dead link (it may make a connection of its own when the
# master is gone), and never becomes a master itself (a user's `ControlMaster auto`).
FETCH_OPTIONS = ("-n", *SERVER_ALIVE, "-o", "ControlMaster=no")
# The shell's answer when sudo is not installed (bash, dash, zsh), as opposed to sudo's
# own "sudo: /usr/bin/python3: command not found".
SUDO_MISSING = re.compile(r"\bsudo: (?:command )?not found|command not found: sudo")


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

    def call(self, op: str, wait: float, **args: Any) -> dict[str, Any] | None:
        """The agent's answer, or None if none came within `wait` seconds (or the session ended)."""
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
        return self.wait(rid, wait)

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
        # The connection is reopened in a thread of its own (`_revive`) while the stages
        # use the host, and close() may come at any time: these say what is going on.
        self._lock = threading.Lock()
        self._closed = False
        self._reviver: threading.Thread | None = None
        self._last_revive = 0.0
        self._forwards: dict[int, int] = {}  # the operator's tunnels: local port -> the host's
        self._connecting = threading.Lock()  # one connect at a time
        self._shutting = threading.Lock()  # one teardown at a time

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

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def _closed_error(self) -> str:
        return f"{self.label}: its SSH connection is closed (fedfleet is done with the host)"

    def connect(self) -> str | None:
        """Open the master and the agent's session; why that failed (None: it works). A
        tunnel that a reopened master cannot forward again is said in `error` only: the
        host itself is reachable."""
        if self.closed:
            return self._closed_error()
        with self._connecting:
            before = self.master.proc
            failed: str | None = None
            try:
                self.master.open()
                self._start_session()
            except SSHFailed as err:
                failed = str(err)
            except subprocess.TimeoutExpired as err:
                failed = f"{self.label} ({self.ep.destination}): ssh did not finish within {err.timeout:g} s"
            except EnvironmentProblem as err:  # the command is ending: its process group is closed
                failed = str(err)
            self.error = failed
            if failed is None and self.master.proc is not before and not self.closed:
                self._forward_again()
            if self.closed:
                # close() came while this ran (a reconnection in the background): nothing
                # this started may outlive it.
                self._shut()
                return self._closed_error()
            return failed

    def _start_session(self) -> None:
        if self.closed:
            raise SSHFailed(self._closed_error())
        stale = self.session
        if stale is not None and stale.alive:
            return
        if stale is not None:
            self.procs.stop(stale.proc, timeout=2)
            self.session = None
        ready = self._open_session()
        systemd = self.spec.service_manager == "systemd" or (
            self.spec.service_manager == "auto" and bool(ready.get("systemd"))
        )
        if systemd and int(ready.get("uid", 0)) != 0:
            self.close_session()
            self.sudo = True
            if self.closed:
                raise SSHFailed(self._closed_error())
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
            raise SSHFailed(self._session_problem(stderr))
        session.python = str(ready.get("python", ""))
        self.session = session
        return ready

    def _session_problem(self, stderr: str) -> str:
        """Why the agent did not start, from its session's stderr, and the fix. sudo's
        failures first: the shell's "sudo: not found" is a missing sudo, not a missing Python."""
        text = stderr.strip()
        last = text.splitlines()[-1] if text else ""
        user = self.ep.user
        sudoers = f"a sudoers line such as `{user} ALL=(ALL) NOPASSWD:ALL`"
        if self.sudo and SUDO_MISSING.search(text):
            return (
                f"{self.label}: reading the state of its systemd services needs sudo, which is not "
                f"installed there ({last}): install it (e.g. `apt-get install sudo`) and let {user} use it "
                f"without a password ({sudoers}), or give the host serviceManager: supervisor"
            )
        if self.sudo and (
            ("sudo:" in text and "command not found" not in text)
            or "not allowed" in text
            or "sudoers" in text
        ):
            return (
                f"{self.label}: reading the state of its systemd services needs sudo, and {user} cannot "
                f"use it without a password there ({last}): allow it ({sudoers}), or give the host "
                "serviceManager: supervisor"
            )
        if "not found" in text or "No such file" in text:
            return (
                f"{self.label}: {self.spec.python} is not on the host ({last}); install Python 3 there "
                "(e.g. `apt-get install python3 python3-venv`) or set python: to its interpreter in the "
                "stack file"
            )
        return explain(self.ep, text or "no answer from the agent (Connection timed out)")

    def close_session(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            stdin = session.proc.popen.stdin
            if stdin is not None:
                with contextlib.suppress(OSError):
                    stdin.close()  # the agent exits when its input ends
            self.procs.stop(session.proc, timeout=3)

    def _shut(self) -> None:
        with self._shutting:
            self.close_session()
            self.master.close()

    def _revive(self) -> None:
        """Reopen a lost connection in the background, at most every few seconds, one
        attempt at a time, and never once the host is closed."""
        with self._lock:
            busy = self._reviver is not None and self._reviver.is_alive()
            if self._closed or busy or time.monotonic() - self._last_revive < REVIVE_EVERY:
                return
            self._last_revive = time.monotonic()
            self._reviver = threading.Thread(target=self.connect, name=f"reconnect {self.name}", daemon=True)
            self._reviver.start()

    def _forward_again(self) -> None:
        """The operator's tunnels on a reopened master, at the same local ports (its flwr
        configuration names them). One that cannot be made again (another program took
        the port meanwhile) is said in `error` and the host's SSH log; the rest go on."""
        with self._lock:
            forwards = dict(self._forwards)
        failed = []
        for local, remote in forwards.items():
            spec = f"127.0.0.1:{local}:127.0.0.1:{remote}"
            argv = ["ssh", *options(self.ep), "-O", "forward", "-L", spec, self.ep.destination]
            try:
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL
                )
                why = (done.stderr.strip() or f"exit {done.returncode}") if done.returncode != 0 else ""
            except (OSError, subprocess.TimeoutExpired) as err:
                why = str(err)
            if why:
                failed.append(f"127.0.0.1:{local} to its port {remote} ({why})")
        if failed:
            self.error = (
                f"{self.label}: reconnected, but could not forward {'; '.join(failed)} again: what uses "
                "that local port (the operator's flwr commands) cannot reach the host through it"
            )
            with contextlib.suppress(OSError), self.master.log.open("a", encoding="utf-8") as fh:
                fh.write(f"fedfleet: {self.error}\n")

    def _call(self, op: str, wait: float, **args: Any) -> dict[str, Any] | None:
        session = self.session
        if session is None or not session.alive:
            self._revive()
            return None
        reply = session.call(op, wait, **args)
        if reply is None and not session.alive:
            self._revive()
        return reply

    def _silence(self, wait: float) -> str:
        """Why a request got no answer: this machine's connection closed (it is being
        reopened: nothing says the host is unwell), or the host did not answer in time."""
        session = self.session
        where = f"{self.label} ({self.ep.address})"
        if self.closed:
            return f"{where}: fedfleet has closed its SSH connection to it"
        if session is None or not session.alive:
            last = f"; the last attempt: {self.error}" if self.error else ""
            return f"{where}: this machine's SSH connection to it closed and is being reopened{last}"
        return f"{where} does not answer over SSH within {wait:g} s: it hangs, or the link to it is cut"

    # -- what the stages ask ---------------------------------------------------------

    def status(self, timeout: float = 1.0) -> ServiceStatus:
        manager = self.spec.service_manager
        reply = self._call(
            "status",
            timeout,
            manager="auto" if manager == "auto" else manager,
            socket_path=f"{self.home.rstrip('/')}/supervisor/supervisor.sock",
            units=list(UNITS),
            # The agent answers one request at a time: its supervisor or systemctl call
            # must end before this one stops waiting, or the next request queues behind it.
            timeout=max(0.2, timeout - AGENT_MARGIN),
        )
        if reply is None:
            return ServiceStatus(self.label, False, problem=self._silence(timeout))
        if not reply.get("ok"):
            return ServiceStatus(
                self.label,
                False,
                problem=f"fedfleet's agent on {self.label} could not read its services' state: "
                f"{reply.get('error') or 'no reason given'}",
            )
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
            return b"", NO_ANSWER
        return base64.b64decode(reply["data"]), int(reply["size"])

    def write(self, path: str, data: bytes) -> None:
        reply = self._call("write", 10.0, path=path, data=base64.b64encode(data).decode())
        if reply is None or not reply.get("ok"):
            why = reply.get("error") if reply else self._silence(10.0)
            raise FedfleetError(f"could not write {path} on {self.label}: {why}")

    def fetch(self, path: str, dest: Path, deadline: float = FETCH_SECONDS) -> bool:
        """The directory as a tar stream over the master connection, unpacked safely
        (`unpack`). The copy is stopped after `deadline` seconds: a host whose disk hangs
        keeps its tar, and the channel, open for ever, and the run would wait with it."""
        quoted = shlex.quote(path)
        if self.sudo:
            # As the owner of the directory above (the services' account), not as root: a
            # link that account planted cannot make root read what it could not.
            above = shlex.quote(posixpath.dirname(path.rstrip("/")) or "/")
            command = (
                f'u=$(sudo -n stat -c %u {above}) || exit 4; sudo -n -u "#$u" test -d {quoted} || exit 3; '
                f'exec sudo -n -u "#$u" tar -C {quoted} -cf - .'
            )
        else:
            command = f"test -d {quoted} || exit 3; exec tar -C {quoted} -cf - ."
        with tempfile.TemporaryDirectory(prefix="fedfleet-copy-") as tmp:
            # stderr to a file: tar's warnings are read after the archive, and a pipe full
            # of them would stop both sides.
            errors = Path(tmp) / "stderr"
            argv = ssh_argv(self.ep, command, extra=FETCH_OPTIONS)
            proc = self.procs.start(f"ssh copy {self.name}", argv, dict(os.environ), errors, pipes=True)
            popen = proc.popen
            assert popen.stdin is not None and popen.stdout is not None
            popen.stdin.close()  # nothing to send (and -n: ssh reads no input)
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                self.procs.stop(proc, timeout=2)

            timer = threading.Timer(deadline, expire)
            timer.daemon = True
            timer.start()
            refused = damaged = None
            try:
                try:
                    unpack(popen.stdout, dest)
                    while popen.stdout.read(65536):
                        pass  # the archive's padding: ssh ends once it is read
                except tarfile.TarError as err:
                    damaged = f"the archive is damaged ({err})"  # or empty: the exit status says why
                except (FedfleetError, OSError) as err:
                    refused = str(err)
                    self.procs.stop(proc, timeout=2)  # it may still be sending
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=deadline if damaged is None else 5)
            finally:
                timer.cancel()
                timer.join()
                self.procs.stop(proc, timeout=2)  # ended already, or now
                popen.stdout.close()
                stderr = errors.read_text(errors="replace").strip() if errors.exists() else ""
        code = popen.returncode
        where = f"could not copy {path} from {self.label}"
        if expired.is_set():
            raise FedfleetError(
                f"{where}: not done within {deadline:g} s, so it was stopped (the host hangs, or the link "
                "to it is too slow for the copy)"
            )
        if refused is not None:
            raise FedfleetError(f"{where} into {dest}: {refused}")
        if code == 3:
            return False
        if code != 0:
            raise FedfleetError(f"{where}: {stderr.splitlines()[-1] if stderr else f'exit {code}'}")
        if damaged is not None:
            raise FedfleetError(f"{where}: {damaged}")
        return True

    def reach(self, port: int) -> str:
        """127.0.0.1:<a local port> forwarded over the connection to the host's own 127.0.0.1:port
        (so the operator needs no firewall opening to the aggregator). A reopened connection
        forwards the same local port again."""
        local = self.master.forward(port)
        with self._lock:
            self._forwards[local] = port
        return f"127.0.0.1:{local}"

    def close(self) -> None:
        """End the session and the master. A reconnection in progress gets a little time to
        finish; if it takes longer, it ends what it started itself (`connect` checks)."""
        with self._lock:
            self._closed = True
            reviver = self._reviver
        if reviver is not None and reviver is not threading.current_thread():
            reviver.join(CLOSE_WAIT)
        self._shut()


def _directory(root: Path, parts: tuple[str, ...]) -> Path:
    """root/parts..., made where missing, never through a link (it could lead anywhere)."""
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise FedfleetError(f"refused to write through the link {path}")
        if not path.is_dir():
            path.mkdir()
    return path


def unpack(stream: IO[bytes], dest: Path) -> None:
    """Unpack a tar stream into `dest`, a member at a time as it arrives.

    The archive comes from a host, which may be compromised: only regular files and
    directories whose path stays inside `dest` are written, and by this code, not by
    tarfile's extraction (its "data" filter has had bypasses: CVE-2025-4517 and others,
    fixed in Python 3.11.13). Anything else (a link, a device, an absolute path, "..")
    stops the copy with an error naming it."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            name = PurePosixPath(member.name)
            if name.is_absolute() or ".." in name.parts:
                raise FedfleetError(f"refused {member.name!r}: its path leads out of the directory copied")
            if not (member.isreg() or member.isdir()):
                kind = "a link" if member.issym() or member.islnk() else "a device or FIFO"
                raise FedfleetError(
                    f"refused {member.name!r}: {kind}; only regular files and directories are copied"
                )
            if member.isdir():
                _directory(root, name.parts)
                continue
            if not name.parts:
                raise FedfleetError(f"refused {member.name!r}: a file without a name")
            target = _directory(root, name.parts[:-1]) / name.parts[-1]
            source = archive.extractfile(member)
            assert source is not None  # a regular file has contents
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
            with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
                shutil.copyfileobj(source, out)
            os.utime(target, (member.mtime, member.mtime))
