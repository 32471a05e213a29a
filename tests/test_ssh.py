"""The SSH edge without a network: what ssh's errors mean, jump hosts, and the host agent
(its boot over a session's stdin, as `hosts.ssh` sends it, and its answers)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedfleet.adapters.ssh import Endpoint, explain, options, parse_jump
from fedfleet.hosts import agent
from fedfleet.hosts.ssh import AGENT_SOURCE, BOOT


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
