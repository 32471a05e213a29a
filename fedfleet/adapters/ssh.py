"""OpenSSH at the edge: one multiplexed connection per host, and what its errors mean.

Every ssh fedfleet starts - its own, Ansible's, the operator's tunnel - goes through
the host's one master connection (ControlPath), so a check once a second costs no new
handshake. The options are the safe ones, always: no password or passphrase prompt
(BatchMode), host keys checked against the stack's own known_hosts file (a key pinned
in the stack file, or the first contact recorded; a changed key is refused), only the
stack's key file offered (IdentitiesOnly), no agent or X11 forwarding, so no key or
credential ever reaches a host. A jump host is reached with the same key and the same
host-key checks (ProxyCommand: command-line options do not apply to a ProxyJump hop).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedfleet.adapters.processes import Managed, ProcessGroup
from fedfleet.core.errors import EnvironmentProblem, FedfleetError
from fedfleet.core.paths import private_dir
from fedfleet.core.util import poll

SERVER_ALIVE = ("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")


class SSHFailed(FedfleetError):
    """A host cannot be reached or logged in to over SSH (the message says why and the fix)."""

    exit_code = 4


@dataclass(frozen=True)
class Endpoint:
    name: str  # the inventory's name (messages, the trust command)
    label: str
    address: str
    user: str
    port: int
    key_file: Path | None
    known_hosts: Path
    connect_timeout: float
    host_key: str | None = None  # pinned in the stack file
    jump: Endpoint | None = None
    trust_command: str = ""  # the command that accepts a changed host key

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.address}"

    @property
    def known_name(self) -> str:
        """The host as known_hosts names it."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    @property
    def control_path(self) -> Path:
        # One master per host entry: two entries for one address (another key, another
        # user) never share a connection.
        digest = hashlib.sha256(
            f"{self.name}|{self.known_hosts}|{self.destination}|{self.port}|{self.key_file}|{self.jump}".encode()
        ).hexdigest()[:16]
        return private_dir("ssh") / f"{digest}.sock"


def parse_jump(spec: str, like: Endpoint) -> Endpoint:
    """`[user@]host[:port]` as an endpoint with `like`'s key and known_hosts."""
    user, _, rest = spec.rpartition("@")
    host, port = rest, 22
    if re.fullmatch(r".+:\d+", rest) and rest.count(":") == 1:
        host, port_text = rest.rsplit(":", 1)
        port = int(port_text)
    return Endpoint(
        name=f"{like.name}'s jump host",
        label=f"jump host {spec}",
        address=host,
        user=user or like.user,
        port=port,
        key_file=like.key_file,
        known_hosts=like.known_hosts,
        connect_timeout=like.connect_timeout,
        trust_command="",  # `fedfleet trust` names hosts of the inventory; a gateway is forgotten by hand
    )


def options(ep: Endpoint, *, control: bool = True, master: bool = False) -> list[str]:
    """The options of every ssh to `ep`: with its master's ControlPath unless `control` is off,
    as a client of that master (never a master of its own) unless it is the `master`. The
    operator's ~/.ssh/config does not apply (-F /dev/null): the stack file says everything,
    and a ProxyJump or ControlPersist there would bypass the checks below."""
    opts = [
        "-F", "/dev/null",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", f"UserKnownHostsFile={ep.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", "ForwardAgent=no",
        "-o", "ForwardX11=no",
        "-o", f"ConnectTimeout={int(ep.connect_timeout)}",
        "-o", "LogLevel=ERROR",
        "-o", f"Port={ep.port}",
        "-o", f"User={ep.user}",
    ]  # fmt: skip
    if ep.key_file is not None:
        opts += ["-o", "IdentitiesOnly=yes", "-o", f"IdentityFile={ep.key_file}"]
    if control:
        opts += ["-o", f"ControlPath={ep.control_path}"]
        if not master:
            opts += ["-o", "ControlMaster=no"]
    if ep.jump is not None:
        hop = ["ssh", *options(ep.jump, control=False), "-W", "%h:%p", ep.jump.destination]
        opts += ["-o", "ProxyCommand=" + shlex.join(hop)]
    return opts


def pin_host_key(ep: Endpoint) -> None:
    """Record a host key given in the stack file, so even the first contact is checked; any
    other key recorded for the host before goes (ssh accepts a key that matches any line)."""
    for hop in (ep, ep.jump):
        if hop is None or hop.host_key is None:
            continue
        hop.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        line = f"{hop.known_name} {hop.host_key}"
        present = hop.known_hosts.read_text().splitlines() if hop.known_hosts.exists() else []
        if line in present and len(recorded(hop)) == 1:
            continue
        forget_host_key(hop)
        with hop.known_hosts.open("a") as fh:
            fh.write(line + "\n")


def recorded(ep: Endpoint) -> list[str]:
    """The key lines recorded for `ep` (hashed or not), as ssh-keygen -F finds them."""
    if not ep.known_hosts.exists():
        return []
    done = subprocess.run(
        ["ssh-keygen", "-F", ep.known_name, "-f", str(ep.known_hosts)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return [line for line in done.stdout.splitlines() if line and not line.startswith("#")]


def _blames_jump(ep: Endpoint, text: str) -> bool:
    """Whether ssh's last words are about `ep`'s jump host rather than `ep` itself (the hop's
    ssh writes to the same stream, naming its own host)."""
    if ep.jump is None:
        return False
    hop = ep.jump
    for line in reversed(text.splitlines()):
        names_hop = hop.address in line or hop.known_name in line
        names_target = ep.address in line or ep.known_name in line
        if names_hop and not names_target:
            return True
        if names_target and not names_hop:
            return False
    return False


def explain(ep: Endpoint, stderr: str) -> str:
    """What an ssh failure means for `ep`, and the fix."""
    text = stderr.strip()
    if ep.jump is not None and _blames_jump(ep, text):
        return f"{ep.label}: its jump host failed: " + explain(ep.jump, stderr)
    last = text.splitlines()[-1] if text else "no message"
    where = f"{ep.label} ({ep.destination}, port {ep.port})"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        if ep.host_key is not None:
            return (
                f"{where}: its SSH host key is not the one the stack file pins (ssh.hostKey). Nothing "
                "was sent to it. If the host was rebuilt, put its new key there (as `ssh-keyscan -p "
                f"{ep.port} {ep.address}` prints it, checked against the host's console)"
            )
        hop = ep.jump
        via = "" if hop is None else f" (or that of its jump host {hop.destination}, port {hop.port})"
        return (
            f"{where}: its SSH host key{via} is not the one recorded in {ep.known_hosts} (the host was "
            "reinstalled, or another machine answers at that address). Nothing was sent to it. If you "
            f"trust the host's new key: {ep.trust_command or forget_command(ep)}"
            + ("" if hop is None else f"; the jump host's: {forget_command(hop)}")
        )
    if "UNPROTECTED PRIVATE KEY FILE" in text:
        return (
            f"{where}: ssh refuses the key file {ep.key_file}: others can read it; `chmod 600 {ep.key_file}`"
        )
    if "no such identity" in text.lower() or "not accessible" in text.lower():
        return f"{where}: the key file {ep.key_file} does not exist on this machine; set ssh.keyFile"
    if "Permission denied" in text or "Too many authentication failures" in text:
        key = ep.key_file or "ssh's default keys"
        return (
            f"{where}: the host refused the login as {ep.user!r} with {key} ({last}). Add the key's "
            f"public half ({key}.pub) to ~{ep.user}/.ssh/authorized_keys on the host, or set ssh.user "
            "and ssh.keyFile to a login it accepts (fedfleet never asks for passwords or passphrases: "
            "a key with a passphrase must be loaded into ssh-agent first)"
        )
    if "Connection refused" in text:
        return f"{where}: nothing accepts SSH connections there ({last}); start sshd on it or set ssh.port"
    if "Could not resolve hostname" in text:
        return f"{where}: the name does not resolve ({last}); check the address in the stack file"
    if any(
        s in text for s in ("timed out", "No route to host", "Network is unreachable", "Connection closed")
    ):
        return (
            f"{where}: cannot be reached from this machine ({last}); check that it is up, the "
            "address, and the network path to it (VPN, firewall, ssh.jumpHost)"
        )
    return f"{where}: ssh failed: {last}"


def forget_command(ep: Endpoint) -> str:
    """The command that forgets the key recorded for `ep` (the next contact records the new one)."""
    return f"ssh-keygen -R {shlex.quote(ep.known_name)} -f {shlex.quote(str(ep.known_hosts))}"


def ssh_argv(ep: Endpoint, *command: str, extra: tuple[str, ...] = ()) -> list[str]:
    """ssh through the master (a mux client: no handshake), running `command` on the host."""
    return ["ssh", *options(ep), *extra, ep.destination, *command]


class Master:
    """The host's one SSH connection; everything else multiplexes over it."""

    def __init__(self, ep: Endpoint, procs: ProcessGroup, log: Path) -> None:
        self.ep = ep
        self.procs = procs
        self.log = log
        self.proc: Managed | None = None

    def alive(self) -> bool:
        if self.proc is None or self.proc.exit_code() is not None:
            return False
        try:
            check = subprocess.run(
                ["ssh", *options(self.ep), "-O", "check", self.ep.destination],
                capture_output=True, timeout=10, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return False
        return check.returncode == 0

    def open(self) -> None:
        """Connect (within the endpoint's connect timeout) or raise SSHFailed saying why."""
        if self.alive():
            return
        self.ep.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        pin_host_key(self.ep)
        self.ep.control_path.unlink(missing_ok=True)  # a stale socket of a killed master
        offset = self.log.stat().st_size if self.log.exists() else 0
        argv = [
            "ssh", "-M", "-N", *options(self.ep, master=True), "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
            "-o", "ExitOnForwardFailure=yes", *SERVER_ALIVE, self.ep.destination,
        ]  # fmt: skip
        proc = self.procs.start(f"ssh {self.ep.name}", argv, dict(os.environ), self.log)
        self.proc = proc

        def settled() -> bool:
            return proc.exit_code() is not None or self.ep.control_path.exists()

        # ConnectTimeout bounds each hop; a jump host adds one more.
        poll(settled, self.ep.connect_timeout * (2 if self.ep.jump else 1) + 5, every=0.05)
        if proc.exit_code() is None and self.alive():
            return
        self.procs.stop(proc)
        self.proc = None
        stderr = self.log.read_bytes()[offset:].decode(errors="replace") if self.log.exists() else ""
        if not stderr.strip() and proc.exit_code() is None:
            stderr = "Connection timed out (no answer within the connect timeout)"
        raise SSHFailed(explain(self.ep, stderr))

    def forward(self, remote_port: int) -> int:
        """Forward a free 127.0.0.1 port here to 127.0.0.1:remote_port on the host; that port."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            local_port = int(probe.getsockname()[1])
        spec = f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}"
        try:
            done = subprocess.run(
                ["ssh", *options(self.ep), "-O", "forward", "-L", spec, self.ep.destination],
                capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            why = done.stderr.strip() if done.returncode != 0 else ""
        except subprocess.TimeoutExpired:
            why = "no answer from the connection within 30 s"
        if why:
            raise EnvironmentProblem(
                f"could not forward 127.0.0.1:{local_port} to {self.ep.label}'s port {remote_port} over "
                f"SSH: {why}"
            )
        return local_port

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(
                    ["ssh", *options(self.ep), "-O", "exit", self.ep.destination],
                    capture_output=True, timeout=10, check=False, stdin=subprocess.DEVNULL,
                )  # fmt: skip
            self.procs.stop(self.proc, timeout=5)
            self.proc = None
        self.ep.control_path.unlink(missing_ok=True)


def forget_host_key(ep: Endpoint) -> bool:
    """Remove the recorded key of `ep` (the next contact records the new one); whether one was."""
    if not ep.known_hosts.exists():
        return False
    done = subprocess.run(
        ["ssh-keygen", "-R", ep.known_name, "-f", str(ep.known_hosts)],
        capture_output=True,
        text=True,
        check=False,
    )
    Path(f"{ep.known_hosts}.old").unlink(missing_ok=True)
    return done.returncode == 0 and "not found" not in done.stdout + done.stderr


def fingerprint(ep: Endpoint) -> str | None:
    """The SHA256 fingerprint of the key recorded for `ep`, as ssh-keygen prints it."""
    done = subprocess.run(
        ["ssh-keygen", "-l", "-F", ep.known_name, "-f", str(ep.known_hosts)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in done.stdout.splitlines():
        if not line.startswith("#") and "SHA256:" in line:
            return line.split(" ", 1)[1].strip() if " " in line else line
    return None
