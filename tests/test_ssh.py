"""The SSH edge without a network: what ssh's errors mean, jump hosts, the host agent
(its boot over a session's stdin, as `hosts.ssh` sends it, and its answers), and an
SSHHost over a stand-in `ssh` that runs everything on this machine (its connection
closing and reopening, its tunnels, copies and close)."""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfleet.adapters.processes import ProcessGroup
from fedfleet.adapters.ssh import Endpoint, explain, options, parse_jump, pin_host_key
from fedfleet.core.errors import FedfleetError
from fedfleet.core.stack import HostSpec, SSHSettings
from fedfleet.core.util import poll
from fedfleet.hosts import agent
from fedfleet.hosts import ssh as hosts_ssh
from fedfleet.hosts.ssh import AGENT_SOURCE, BOOT, SSHHost, unpack


def endpoint(tmp_path: Path, **extra: object) -> Endpoint:
    fields: dict[str, object] = {
        "name": "a-vm-1",
        "label": "a-vm-1 (hospital-a)",
        "address": "10.20.0.5",
        "user": "fedfleet",
        "port": 22,
        "key_file": tmp_path / "id_ed25519",
        "known_hosts": tmp_path / "known_hosts",
        "connect_timeout": 5,
        "trust_command": "fedfleet trust a-vm-1 --stack prod",
    }
    return Endpoint(**(fields | extra))  # type: ignore[arg-type]


CHANGED = (
    "@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\nHost key verification failed.\n"
)


def test_a_changed_host_key_names_the_file_and_the_command_that_accepts_it(tmp_path: Path):
    message = explain(endpoint(tmp_path), CHANGED)
    assert f"not the one recorded in {tmp_path / 'known_hosts'}" in message
    assert "Nothing was sent to it" in message
    assert message.endswith("fedfleet trust a-vm-1 --stack prod")


def test_behind_a_jump_host_a_changed_key_says_how_to_forget_the_gateways_too(tmp_path: Path):
    ep = endpoint(tmp_path)
    ep = Endpoint(**{**ep.__dict__, "jump": parse_jump("fedfleet@198.51.100.9:2222", ep)})
    message = explain(ep, CHANGED)
    assert "(or that of its jump host fedfleet@198.51.100.9, port 2222)" in message
    assert "fedfleet trust a-vm-1 --stack prod" in message
    assert f"ssh-keygen -R '[198.51.100.9]:2222' -f {tmp_path / 'known_hosts'}" in message


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        ("fedfleet@10.20.0.5: Permission denied (publickey).", "refused the login as 'fedfleet'"),
        ("ssh: connect to host 10.20.0.5 port 22: Connection refused", "nothing accepts SSH connections"),
        (
            "ssh: connect to host 10.20.0.5 port 22: Connection timed out",
            "cannot be reached from this machine",
        ),
        ("ssh: connect to host 10.20.0.5 port 22: No route to host", "cannot be reached from this machine"),
        ("ssh: Could not resolve hostname nowhere: Name or service not known", "the name does not resolve"),
        ("WARNING: UNPROTECTED PRIVATE KEY FILE!", "chmod 600"),
        ("something else entirely", "ssh failed: something else entirely"),
    ],
)
def test_each_ssh_failure_says_what_it_is_and_the_fix(tmp_path: Path, stderr: str, expected: str):
    message = explain(endpoint(tmp_path), stderr)
    assert message.startswith("a-vm-1 (hospital-a) (fedfleet@10.20.0.5, port 22): ")
    assert expected in message


def test_a_jump_host_gets_the_same_key_and_host_key_checks(tmp_path: Path):
    ep = endpoint(tmp_path)
    hop = parse_jump("gateway.example", ep)
    assert (hop.user, hop.address, hop.port) == ("fedfleet", "gateway.example", 22)
    assert (hop.key_file, hop.known_hosts) == (ep.key_file, ep.known_hosts)
    opts = options(Endpoint(**{**ep.__dict__, "jump": hop}))
    (proxy,) = [o for o in opts if o.startswith("ProxyCommand=")]
    assert "StrictHostKeyChecking=accept-new" in proxy and f"IdentityFile={ep.key_file}" in proxy
    assert "BatchMode=yes" in proxy and "ControlPath" not in proxy  # the hop has no master of its own
    assert "ForwardAgent=no" in opts and "IdentitiesOnly=yes" in opts


def boot_agent() -> subprocess.Popen[bytes]:
    """The agent as an SSH session starts it: the host's Python reading its source from stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", BOOT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(base64.b64encode(AGENT_SOURCE.encode()) + b"\n")
    proc.stdin.flush()
    return proc


def ask(proc: subprocess.Popen[bytes], request: dict[str, object]) -> dict[str, object]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((json.dumps(request) + "\n").encode())
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def test_the_agent_boots_from_the_session_answers_and_exits_when_it_ends(tmp_path: Path):
    log = tmp_path / "log" / "flower-supernode.log"
    log.parent.mkdir()
    log.write_bytes(b"INFO starting\nINFO SuperNode ID: 42\n")
    proc = boot_agent()
    try:
        assert proc.stdout is not None
        hello = json.loads(proc.stdout.readline())
        assert hello["ready"] and hello["uid"] == os.getuid() and hello["python"]
        got = ask(proc, {"id": 1, "op": "read", "path": str(log), "offset": 14})
        assert got["ok"] and got["id"] == 1 and got["size"] == log.stat().st_size
        assert base64.b64decode(str(got["data"])) == b"INFO SuperNode ID: 42\n"
        target = tmp_path / "srv" / "fleet.json"
        assert ask(
            proc, {"id": 2, "op": "write", "path": str(target), "data": base64.b64encode(b"{}\n").decode()}
        )["ok"]
        assert target.read_bytes() == b"{}\n" and not list(target.parent.glob(".*.tmp"))
        # No supervisor behind the socket: answered, but the manager did not answer.
        status = ask(
            proc, {"id": 3, "op": "status", "manager": "supervisor", "socket_path": str(tmp_path / "no")}
        )
        assert status["ok"] and status["answered"] is False
        bad = ask(proc, {"id": 4, "op": "format-disk"})
        assert bad == {"ok": False, "error": "ValueError: unknown operation", "id": 4}
        assert proc.stdin is not None
        proc.stdin.close()  # the session ends
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_rotated_log_is_read_from_its_start(tmp_path: Path):
    log = tmp_path / "x.log"
    log.write_bytes(b"new\n")
    reply = agent.read(str(log), offset=100)
    assert reply["size"] == 4 and base64.b64decode(reply["data"]) == b"new\n"
    assert agent.read(str(tmp_path / "missing"))["size"] == -1


def test_systemd_states_read_as_the_supervisors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`systemctl show` as systemd prints it (a fake systemctl on PATH)."""
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\ncat <<'EOF'\n"
        "Id=flower-superlink.service\nLoadState=loaded\nActiveState=active\nMainPID=812\n\n"
        "Id=flower-supernode.service\nLoadState=loaded\nActiveState=failed\nMainPID=0\n\n"
        "Id=fedfleet-worker.service\nLoadState=not-found\nActiveState=inactive\nMainPID=0\nEOF\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    reply = agent.status("systemd", units=["flower-superlink", "flower-supernode", "fedfleet-worker"])
    assert reply == {
        "answered": True,
        "programs": {"flower-superlink": "RUNNING", "flower-supernode": "FATAL"},
        "pids": {"flower-superlink": 812, "flower-supernode": 0},
    }


def replies(proc: subprocess.Popen[bytes], count: int, within: float = 5.0) -> list[dict[str, object]]:
    """The agent's next `count` answers, read from the pipe itself with a deadline (a
    buffered readline would wait for ever for an answer that never comes)."""
    assert proc.stdout is not None
    fd, data = proc.stdout.fileno(), b""
    deadline = time.monotonic() + within
    while data.count(b"\n") < count:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(data.splitlines())} of {count} answers within {within:g} s: {data!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the agent ended after {data!r}"
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_requests_that_arrive_together_are_each_answered_at_once():
    proc = boot_agent()
    try:
        (hello,) = replies(proc, 1)
        assert hello["ready"]
        assert proc.stdin is not None
        proc.stdin.write(b'{"id": 1, "op": "ping"}\n{"id": 2, "op": "ping"}\n')  # one write
        proc.stdin.flush()
        got = replies(proc, 2)  # long before the agent's idle exit (30 s)
        assert [(r["id"], r["ok"]) for r in got] == [(1, True), (2, True)]
    finally:
        stop(proc)


def test_a_request_sent_right_behind_the_agents_source_is_answered():
    """The boot reads the source unbuffered: what follows it stays for the agent."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", BOOT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdin is not None
        proc.stdin.write(base64.b64encode(AGENT_SOURCE.encode()) + b'\n{"id": 7, "op": "ping"}\n')
        proc.stdin.flush()
        hello, pong = replies(proc, 2)
        assert hello["ready"] and (pong["id"], pong["ok"]) == (7, True)
    finally:
        stop(proc)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files away needs root")
def test_as_root_the_agent_writes_as_the_owner_of_the_directory_above(tmp_path: Path):
    """Under sudo on a systemd host: the service account, which owns its home, must be
    able to write beside fleet.json (the ServerApp's models and events)."""
    home = open_dir() / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    target = home / "runs" / "run-1" / "fleet.json"
    agent.write(str(target), base64.b64encode(b"{}\n").decode())
    agent.write(str(target), base64.b64encode(b'{"lost": []}\n').decode())  # and again
    umask = os.umask(0)
    os.umask(umask)
    for path in (home / "runs", home / "runs" / "run-1", target):
        found = path.stat()
        assert (found.st_uid, found.st_gid) == (65534, 65534), path
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 & ~umask
    assert stat.S_IMODE((home / "runs").stat().st_mode) == 0o777 & ~umask
    assert target.read_bytes() == b'{"lost": []}\n' and not list(target.parent.glob(".*.tmp"))


def open_dir() -> Path:
    """A directory anyone may pass through (pytest's own are 0700 root's), as /opt is."""
    path = Path(tempfile.mkdtemp(prefix="ff-", dir="/tmp"))
    path.chmod(0o755)
    return path


def test_as_root_a_link_the_service_account_planted_leads_nowhere_it_could_not_go(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root (the agent under sudo)")
    home = open_dir() / "home"
    (home / "runs").mkdir(parents=True)
    os.chown(home, 65534, 65534)
    os.chown(home / "runs", 65534, 65534)
    root_only = tmp_path / "root-only"
    root_only.mkdir(mode=0o700)
    (home / "runs" / "run-1").symlink_to(root_only)  # as if the account made it
    os.chown(home / "runs" / "run-1", 65534, 65534, follow_symlinks=False)
    with pytest.raises(OSError, match=r"Permission denied|File exists"):
        agent.write(str(home / "runs" / "run-1" / "fleet.json"), base64.b64encode(b"{}\n").decode())
    assert list(root_only.iterdir()) == []


def test_the_agent_never_writes_through_a_link_at_its_temporary_name(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / f".fleet.json.{os.getpid()}.tmp").symlink_to(victim)
    agent.write(str(tmp_path / "fleet.json"), base64.b64encode(b"{}\n").decode())
    assert victim.read_bytes() == b"untouched"
    assert (tmp_path / "fleet.json").read_bytes() == b"{}\n"


def short_dir() -> Path:
    """A directory with a short path: a Unix socket's path must fit in 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="ff-", dir="/tmp"))


def test_a_supervisor_answering_a_byte_at_a_time_is_cut_at_the_timeout():
    where = short_dir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(where / "s.sock"))
    server.listen()
    done = threading.Event()

    def trickle() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.0 200 OK\r\nContent-Type: text/xml\r\n" * 10:
                if done.wait(0.05):
                    return
                conn.send(bytes([byte]))

    threading.Thread(target=trickle, daemon=True).start()
    try:
        started = time.monotonic()
        found = agent.supervisor_status(str(where / "s.sock"), timeout=0.5)
        assert found["answered"] is False
        assert time.monotonic() - started < 2.0  # each byte came in time; the whole did not
    finally:
        done.set()
        server.close()
        shutil.rmtree(where)


# -- an SSHHost over a stand-in ssh ---------------------------------------------------

FAKE_SSH = r'''#!PYTHON
"""ssh without a network: a master is a file at the ControlPath (and a process that
waits), -O asks that "master", anything else runs its command here with sh."""
import json, os, sys, time

args = sys.argv[1:]
opts, flags, i = {}, {}, 0
while i < len(args) and args[i].startswith("-"):
    if args[i] in ("-o", "-O", "-L", "-F", "-W", "-p", "-i"):
        if args[i] == "-o":
            key, _, value = args[i + 1].partition("=")
            opts.setdefault(key, value)
        else:
            flags[args[i]] = args[i + 1]
        i += 2
    else:
        flags[args[i]] = ""
        i += 1
with open(os.environ["FAKE_SSH_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
control = opts["ControlPath"]
if flags.get("-O") == "check":
    sys.exit(0 if os.path.exists(control) else 255)
if flags.get("-O") == "exit":
    if os.path.exists(control):
        os.unlink(control)
    sys.exit(0)
if flags.get("-O") == "forward":
    refusal = os.environ.get("FAKE_SSH_FORWARD_FAILS")
    if refusal:
        sys.stderr.write(refusal + "\n")
        sys.exit(255)
    sys.exit(0)
if "-M" in flags:
    open(control, "w").close()
    while True:
        time.sleep(60)
os.execvp("sh", ["sh", "-c", args[i + 1]])
'''


@pytest.fixture
def ssh_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in `ssh` first on PATH; the file where it records each call's arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ssh"
    fake.write_text(FAKE_SSH.replace("PYTHON", sys.executable, 1))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    calls = tmp_path / "ssh-calls.jsonl"
    monkeypatch.setenv("FAKE_SSH_LOG", str(calls))
    return calls


def forwards(calls: Path) -> list[str]:
    """The -L specs of every `ssh -O forward` made so far."""
    found = []
    for line in calls.read_text().splitlines():
        argv = json.loads(line)
        if "forward" in argv and "-L" in argv:
            found.append(argv[argv.index("-L") + 1])
    return found


def make_host(tmp_path: Path, home: Path, procs: ProcessGroup) -> SSHHost:
    spec = HostSpec(
        address="127.0.0.1", ssh=SSHSettings(), home=str(home), python=sys.executable,
        service_manager="supervisor",
    )  # fmt: skip
    ep = endpoint(tmp_path, address="127.0.0.1")
    return SSHHost("a-vm-1", "a-vm-1 (hospital-a)", ep, spec, procs, tmp_path / "ssh")


@pytest.fixture
def host(tmp_path: Path, ssh_calls: Path) -> Iterator[SSHHost]:
    home = short_dir()
    with ProcessGroup() as procs:
        made = make_host(tmp_path, home, procs)
        try:
            yield made
        finally:
            made.close()
    shutil.rmtree(home)


def reopened(host: SSHHost, master: object) -> bool:
    session, reviver = host.session, host._reviver
    return (
        host.master.proc is not master
        and session is not None
        and session.alive
        and (reviver is None or not reviver.is_alive())
    )


def test_a_lost_connection_is_reported_as_such_and_reopened_with_its_tunnel(host: SSHHost, ssh_calls: Path):
    assert host.connect() is None
    local = host.reach(9093)
    (spec,) = forwards(ssh_calls)
    assert local == f"127.0.0.1:{spec.split(':')[1]}" and spec.endswith(":127.0.0.1:9093")
    old = host.master.proc
    assert old is not None and host.session is not None
    host.procs.stop(old, timeout=2)  # this machine's link blinked: master and session gone
    host.procs.stop(host.session.proc, timeout=2)

    lost = host.status()
    assert not lost.reachable
    assert "this machine's SSH connection to it closed and is being reopened" in lost.problem
    assert "does not answer" not in lost.problem

    assert poll(lambda: reopened(host, old), 20, every=0.05)
    assert forwards(ssh_calls) == [spec, spec]  # the same local port, again
    assert host.error is None
    # Back: the agent answers (no supervisor runs there, and it says so).
    assert "its supervisor is not running" in host.status().problem


def test_a_tunnel_that_cannot_be_made_again_is_said_and_the_rest_goes_on(
    host: SSHHost, ssh_calls: Path, monkeypatch: pytest.MonkeyPatch
):
    assert host.connect() is None
    local = host.reach(9093).rsplit(":", 1)[1]
    monkeypatch.setenv("FAKE_SSH_FORWARD_FAILS", f"bind [127.0.0.1]:{local}: Address already in use")
    old = host.master.proc
    assert old is not None
    host.procs.stop(old, timeout=2)
    assert host.connect() is None  # reconnected all the same
    assert host.error is not None
    assert f"could not forward 127.0.0.1:{local} to its port 9093" in host.error
    assert "Address already in use" in host.error
    assert "Address already in use" in (host.logs / "a-vm-1.ssh.log").read_text()
    assert "its supervisor is not running" in host.status().problem


def test_a_host_that_hangs_is_told_from_a_closed_connection(host: SSHHost):
    assert host.connect() is None
    assert host.session is not None
    pid = host.session.proc.pid  # the agent itself (the stand-in ssh execs it)
    os.kill(pid, signal.SIGSTOP)
    try:
        hung = host.status(timeout=0.3)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert not hung.reachable
    assert (
        hung.problem
        == "a-vm-1 (hospital-a) (127.0.0.1) does not answer over SSH within 0.3 s: it hangs, or the link to it is cut"
    )


def test_a_slow_service_manager_does_not_make_the_host_miss_its_answers(host: SSHHost):
    """The agent gets the controller's timeout (less the round trip): a supervisor that
    does not answer costs one 'not answered', never a silent agent and a queue."""
    sock = Path(host.home) / "supervisor" / "supervisor.sock"
    sock.parent.mkdir()
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(sock))
    mute.listen(8)  # accepts (the kernel does), never answers
    try:
        assert host.connect() is None
        for _ in range(2):
            found = host.status(timeout=1.0)
            assert not found.reachable
            assert "its supervisor is not running" in found.problem, found.problem
    finally:
        mute.close()


def test_the_agents_error_is_reported_as_it_is(host: SSHHost, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(host, "_call", lambda *a, **k: {"ok": False, "error": "ValueError: bad MainPID"})
    found = host.status()
    assert not found.reachable
    assert found.problem == (
        "fedfleet's agent on a-vm-1 (hospital-a) could not read its services' state: ValueError: bad MainPID"
    )


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        ("bash: line 1: exec: sudo: not found", "needs sudo, which is not installed there"),
        ("sh: 1: exec: sudo: not found", "needs sudo, which is not installed there"),
        ("bash: sudo: command not found", "needs sudo, which is not installed there"),
        ("sudo: a password is required", "cannot use it without a password there (sudo: a password"),
        (
            "Sorry, user fedfleet is not allowed to execute '/usr/bin/python3 -u -c x' as root on vm.",
            "cannot use it without a password there",
        ),
        ("sudo: /usr/bin/python3: command not found", "is not on the host (sudo: /usr/bin/python3"),
    ],
)
def test_a_session_under_sudo_names_sudos_problem_before_pythons(tmp_path: Path, stderr: str, expected: str):
    made = make_host(tmp_path, tmp_path, ProcessGroup())
    made.sudo = True
    assert expected in made._session_problem(stderr)


def test_without_sudo_a_missing_python_is_named(tmp_path: Path):
    made = make_host(tmp_path, tmp_path, ProcessGroup())
    why = made._session_problem("bash: line 1: exec: /usr/bin/python3: not found")
    assert "is not on the host" in why and "sudo" not in why


def test_a_closed_host_starts_nothing(host: SSHHost):
    assert host.connect() is None
    host.close()
    assert "closed" in (host.connect() or "")
    found = host.status()
    assert not found.reachable and "closed" in found.problem
    assert host._reviver is None and host.procs.procs == []


def test_a_reconnection_that_outlives_close_ends_what_it_started(
    host: SSHHost, monkeypatch: pytest.MonkeyPatch
):
    """close() waits a little for a reconnection in progress; one still opening the
    master after that sees the host closed and stops what it started (no orphan ssh)."""
    entered, gate = threading.Event(), threading.Event()
    opening = host.master.open

    def slow_open() -> None:
        entered.set()
        gate.wait(10)
        opening()

    monkeypatch.setattr(host.master, "open", slow_open)
    monkeypatch.setattr(hosts_ssh, "CLOSE_WAIT", 0.2)
    host._revive()
    assert entered.wait(5)
    host.close()  # returns while the reconnection still waits at the gate
    reviver = host._reviver
    assert reviver is not None and reviver.is_alive()
    gate.set()  # now it starts a master
    reviver.join(20)
    assert not reviver.is_alive()
    assert host.procs.procs == [] and host.session is None and host.master.proc is None
    assert not host.ep.control_path.exists()


def test_a_copy_comes_back_over_an_ssh_that_notices_a_dead_link(
    host: SSHHost, ssh_calls: Path, tmp_path: Path
):
    source = tmp_path / "out"
    (source / "models").mkdir(parents=True)
    (source / "events.jsonl").write_bytes(b'{"round": 1}\n')
    (source / "models" / "round-1.pt").write_bytes(b"\0" * 70_000)
    assert host.fetch(str(source), tmp_path / "here") is True
    assert (tmp_path / "here" / "events.jsonl").read_bytes() == b'{"round": 1}\n'
    assert (tmp_path / "here" / "models" / "round-1.pt").stat().st_size == 70_000
    assert host.fetch(str(tmp_path / "missing"), tmp_path / "here") is False
    argv = json.loads(ssh_calls.read_text().splitlines()[-1])
    assert "-n" in argv and "ServerAliveInterval=5" in argv and "ControlMaster=no" in argv
    assert host.procs.procs == []


def test_a_copy_that_hangs_is_stopped_at_its_deadline(
    host: SSHHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    hung = tmp_path / "hung-bin"
    hung.mkdir()
    (hung / "tar").write_text("#!/bin/sh\nexec sleep 60\n")  # the host's disk hangs
    (hung / "tar").chmod(0o755)
    monkeypatch.setenv("PATH", f"{hung}:{os.environ['PATH']}")
    (tmp_path / "log").mkdir()
    started = time.monotonic()
    with pytest.raises(
        FedfleetError, match=r"could not copy .*/log from a-vm-1 \(hospital-a\): not done within 0.5 s"
    ):
        host.fetch(str(tmp_path / "log"), tmp_path / "here", deadline=0.5)
    assert time.monotonic() - started < 10
    assert host.procs.procs == []


def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw.seek(0)
    return raw


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_unpack_writes_files_and_directories_inside_the_destination(tmp_path: Path):
    stream = tar_of(
        (member("./", tarfile.DIRTYPE), b""),
        (member("./log", tarfile.DIRTYPE), b""),
        (member("./log/flower-supernode.log"), b"INFO SuperNode ID: 42\n"),
    )
    unpack(stream, tmp_path / "dest")
    assert (tmp_path / "dest" / "log" / "flower-supernode.log").read_bytes() == b"INFO SuperNode ID: 42\n"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (member("./logs", tarfile.SYMTYPE, "/etc"), "a link"),
        (member("./run_config.toml", tarfile.LNKTYPE, "/etc/passwd"), "a link"),
        (member("../x"), "leads out of the directory"),
        (member("./a/../../x"), "leads out of the directory"),
        (member("/tmp/x"), "leads out of the directory"),
        (member("./null", tarfile.CHRTYPE), "a device or FIFO"),
    ],
)
def test_unpack_refuses_what_could_write_outside_the_destination(
    tmp_path: Path, bad: tarfile.TarInfo, why: str
):
    dest = tmp_path / "a" / "dest"
    dest.mkdir(parents=True)
    stream = tar_of((bad, b"owned\n"), (member("./logs/x"), b"through the link\n"))
    with pytest.raises(FedfleetError, match=f"refused '{bad.name}': .*{why}"):
        unpack(stream, dest)
    assert list(dest.iterdir()) == [] and sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dest"]


def test_unpack_never_writes_through_a_link_already_there(tmp_path: Path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "logs").symlink_to(tmp_path)
    with pytest.raises(FedfleetError, match="refused to write through the link"):
        unpack(tar_of((member("./logs/x"), b"x\n")), dest)
    assert not (tmp_path / "x").exists()


def test_a_jump_hosts_failure_is_blamed_on_the_jump_host(tmp_path: Path):
    ep = endpoint(tmp_path)
    ep = Endpoint(**{**ep.__dict__, "jump": parse_jump("fl@gateway.example", ep)})
    refused = explain(
        ep, "fl@gateway.example: Permission denied (publickey).\nConnection closed by UNKNOWN port 65535"
    )
    assert refused.startswith("a-vm-1 (hospital-a): its jump host failed: jump host fl@gateway.example")
    assert "refused the login as 'fl'" in refused and "~fl/.ssh/authorized_keys" in refused
    down = explain(ep, "ssh: connect to host gateway.example port 22: Connection refused\n")
    assert "its jump host failed" in down and "nothing accepts SSH connections" in down
    # The hop got through; the target refused: the target is named.
    target = explain(ep, "fedfleet@10.20.0.5: Permission denied (publickey).")
    assert target.startswith("a-vm-1 (hospital-a) (fedfleet@10.20.0.5, port 22): the host refused")


def test_a_pinned_host_key_that_changed_is_fixed_in_the_stack_file(tmp_path: Path):
    message = explain(endpoint(tmp_path, host_key="ssh-ed25519 AAAAC3Nz"), CHANGED)
    assert "not the one the stack file pins (ssh.hostKey)" in message
    assert "ssh-keyscan -p 22 10.20.0.5" in message and "fedfleet trust" not in message


def test_no_ssh_fedfleet_starts_reads_the_operators_ssh_config_or_becomes_a_master(tmp_path: Path):
    ep = endpoint(tmp_path)
    client = options(ep)
    assert client[:2] == ["-F", "/dev/null"] and "ControlMaster=no" in client
    master = options(ep, master=True)
    assert "ControlMaster=no" not in master and any(o.startswith("ControlPath=") for o in master)


def test_pinning_a_key_forgets_the_key_recorded_before(tmp_path: Path):
    ep = endpoint(
        tmp_path, host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPinnedPinnedPinnedPinnedPinnedPinnedPinned"
    )
    other = "10.99.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherOtherOtherOtherOtherOtherOtherOtherOt"
    (tmp_path / "known_hosts").write_text(
        "10.20.0.5 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFirstContactFirstContactFirstContactFirst\n"
        + other
        + "\n"
    )
    pin_host_key(ep)
    pin_host_key(ep)  # twice: one line
    lines = (tmp_path / "known_hosts").read_text().splitlines()
    assert lines.count(f"10.20.0.5 {ep.host_key}") == 1 and other in lines
    assert not any("FirstContact" in line for line in lines)


def test_under_sudo_a_copy_is_made_as_the_owner_of_the_directory_above(
    host: SSHHost, ssh_calls: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The command a systemd host runs (sudo to the services' account, found by stat), with a
    stand-in sudo that records how it was asked and runs the rest."""
    fake = tmp_path / "sudo-bin"
    fake.mkdir()
    asked = tmp_path / "sudo-calls"
    (fake / "sudo").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {asked}\n'
        'while [ "$#" -gt 0 ]; do case "$1" in -n) shift;; -u) shift 2;; *) break;; esac; done\n'
        'exec "$@"\n'
    )
    (fake / "sudo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    source = tmp_path / "runs" / "r1"
    source.mkdir(parents=True)
    (source / "events.jsonl").write_bytes(b"{}\n")
    host.sudo = True
    assert host.fetch(str(source), tmp_path / "here") is True
    assert (tmp_path / "here" / "events.jsonl").read_bytes() == b"{}\n"
    calls = asked.read_text().splitlines()
    owner = (tmp_path / "runs").stat().st_uid
    assert calls[0] == f"-n stat -c %u {tmp_path / 'runs'}"
    assert calls[1:] == [f"-n -u #{owner} test -d {source}", f"-n -u #{owner} tar -C {source} -cf - ."]
