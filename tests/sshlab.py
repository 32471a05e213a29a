"""A lab of real SSH hosts on this machine: one network namespace per host, each with its
own sshd, joined by a bridge in a controller namespace that has no other network.

The controller (fedfleet itself) runs inside the controller namespace, so it reaches the
hosts only over the lab's links, as it would reach cloud VMs or a hospital's machines;
the hosts have no route anywhere else (no package index either). The namespaces share
this machine's file system and processes, so each host gets a directory of its own as
its fedfleet home and its site's data. Needs root, iproute2 and openssh-server
(`.ci/run` installs it); `why_skip` says what is missing.

Used by tests/test_ssh_run.py and bench/bench_ssh.py.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfleet.adapters import netns
from fedfleet.adapters.processes import ProcessGroup, terminate

SSHD = "/usr/sbin/sshd"
SSH_PORTS = (22, 2222)  # a second port: a second "host" at the same address, with its own host key entry


def why_skip() -> str | None:
    if not Path(SSHD).exists():
        return "needs openssh-server (`apt-get install openssh-server`; .ci/run installs it)"
    why = netns.why_unavailable()
    if why:
        return f"network namespaces: {why}"
    probe = subprocess.run(["ip", "netns", "add", "ff-probe"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"network namespaces: `ip netns add` is not allowed here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "ff-probe"], check=False)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Lab:
    root: Path
    hosts: dict[str, str]  # name -> address
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: str = field(default_factory=lambda: f"10.213.{secrets.randbelow(200) + 20}")
    procs: ProcessGroup = field(default_factory=ProcessGroup)
    tiny: Path | None = None  # a small file system (mounted before any sshd starts), if one could be

    @property
    def key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def wrong_key(self) -> Path:
        return self.root / "wrong_ed25519"

    @property
    def ghost(self) -> str:
        return f"{self.subnet}.250"  # in the subnet, but no host answers there

    def ns(self, host: str) -> str:
        return f"ff{self.tag}-{host}"

    def home(self, host: str) -> Path:
        return self.root / "hosts" / host

    def start(self) -> Lab:
        self.root.mkdir(parents=True, exist_ok=True)
        names = ["ctl", *self.hosts]
        for name in names:
            ip("netns", "add", self.ns(name))
            ip("-n", self.ns(name), "link", "set", "lo", "up")
        ctl = self.ns("ctl")
        ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        ip("-n", ctl, "addr", "add", f"{self.subnet}.1/24", "dev", "br0")
        ip("-n", ctl, "link", "set", "br0", "up")
        for key in (self.key, self.wrong_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for i, (host, address) in enumerate(self.hosts.items()):
            ns = self.ns(host)
            outside = f"v{self.tag}{i}"
            ip("link", "add", outside, "netns", ctl, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", ctl, "link", "set", outside, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            self.start_sshd(host)
        for host in self.hosts:  # sshd is up when it accepts a login (deadline 30 s)
            self.wait_for_ssh(host)
        return self

    def start_sshd(self, host: str) -> None:
        etc = self.root / "sshd" / host
        if not (etc / "host_key").exists():
            etc.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "host_key")], check=True
            )
        address = self.hosts[host]
        listen = "".join(f"ListenAddress {address}:{port}\n" for port in SSH_PORTS)
        (etc / "sshd_config").write_text(
            f"{listen}HostKey {etc / 'host_key'}\nPidFile {etc / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.key}.pub\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "MaxSessions 64\nMaxStartups 64\n"
        )
        self.procs.start(
            f"sshd {host}",
            ["ip", "netns", "exec", self.ns(host), SSHD, "-D", "-e", "-f", str(etc / "sshd_config")],
            dict(os.environ),
            self.root / "logs" / f"sshd-{host}.log",
        )

    def in_ctl(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns("ctl"), *argv]

    def wait_for_ssh(self, host: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            done = subprocess.run(
                self.in_ctl(
                    "ssh", "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                    "-o", "ConnectTimeout=5", f"root@{self.hosts[host]}", "true",
                ),
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode == 0:
                return
            assert time.monotonic() < deadline, f"sshd on {host} did not accept a login: {done.stderr}"
            time.sleep(0.2)

    def pids(self, host: str) -> set[int]:
        listed = subprocess.run(
            ["ip", "netns", "pids", self.ns(host)], capture_output=True, text=True, check=False
        )
        return {int(p) for p in listed.stdout.split()}

    def kill_host(self, host: str) -> None:
        """The VM dies: every process in its namespace (sshd, supervisor, Flower) is killed."""
        for pid in self.pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def cut_link(self, host: str) -> None:
        ip("-n", self.ns(host), "link", "set", "eth0", "down")

    def restore_link(self, host: str) -> None:
        ip("-n", self.ns(host), "link", "set", "eth0", "up")

    def squat(self, host: str, port: int) -> subprocess.Popen[str]:
        """Another program listening on the host's loopback `port` (returns once it listens)."""
        code = (
            "import socket, sys; s = socket.socket(); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); print('listening', flush=True); sys.stdin.read()"
        )
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), sys.executable, "-c", code],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening", (
            "the squatter did not bind"
        )
        return proc

    def left_running(self) -> dict[str, list[str]]:
        """Per host, the processes still running in its namespace (the sshd listener aside:
        an SSH session left open counts)."""
        out = {}
        for host in self.hosts:
            found = []
            for pid in self.pids(host):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if state != "Z" and "[listener]" not in cmdline and not cmdline.startswith(SSHD):
                    found.append(f"{pid}: {cmdline}")
            if found:
                out[host] = found
        return out

    def fedfleet(self, project: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """fedfleet as the operator runs it, from the controller's namespace."""
        return subprocess.run(
            self.in_ctl(sys.executable, "-m", "fedfleet", "--project", str(project), *args),
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def popen(self, project: Path, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.in_ctl(sys.executable, "-m", "fedfleet", "--project", str(project), *args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def stop(self) -> None:
        self.procs.stop_all()
        names = ["ctl", *self.hosts]
        for name in names:  # every process left in a namespace (supervisors, Flower, ssh)
            terminate(self.pids(name), 10)
        for name in names:
            subprocess.run(["ip", "netns", "del", self.ns(name)], capture_output=True, check=False)


def host_entry(lab: Lab, host: str, **extra: Any) -> dict[str, Any]:
    """A stack file's entry for a lab host: its address, its own home, the supervisor (the
    lab has no systemd), and by default the controller's environment (already installed)."""
    entry: dict[str, Any] = {
        "address": lab.hosts[host],
        "home": str(lab.home(host)),
        "venv": sys.prefix,
        "install": False,
        "serviceManager": "supervisor",
    }
    return entry | extra
