"""Every process a run starts is stopped, children included (fedfleet/processes.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from fedfleet.adapters.processes import ProcessGroup, group_alive, living, reap_leftovers

# A parent that starts a child: the group must go as a whole.
TREE = [
    sys.executable,
    "-c",
    "import subprocess,sys,time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "time.sleep(600)",
]
# A process that ignores SIGTERM: only SIGKILL at the deadline stops it.
STUBBORN = [
    sys.executable,
    "-c",
    "import signal,time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('up', flush=True)\n"
    "time.sleep(600)",
]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def children_of(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


def test_stop_all_ends_the_whole_tree(tmp_path: Path):
    pidfile = tmp_path / "pids.json"
    with ProcessGroup(pidfile) as group:
        proc = group.start("tree", TREE, {}, tmp_path / "tree.log")
        wait_for(lambda: children_of(proc.pid))
        assert json.loads(pidfile.read_text())[0]["pgid"] == proc.pid
    assert not group_alive(proc.pid)
    assert not pidfile.exists()


# Like flower-superlink: starts a child in a session of its own, then its parent exits.
DETACHES = [
    sys.executable,
    "-c",
    "import subprocess,sys; p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(600)'],"
    " start_new_session=True); print(p.pid, flush=True)",
]


def test_detached_and_orphaned_children_are_stopped_too(tmp_path: Path):
    group = ProcessGroup()
    proc = group.start("detacher", DETACHES, {}, tmp_path / "d.log")
    proc.popen.wait(timeout=10)
    orphan = int(proc.log.read_text().split()[0])
    assert living([orphan]) == {orphan}  # outside the group, parent gone
    group.stop_all()
    assert living([orphan]) == set()


def test_sigterm_ignored_means_sigkill_at_the_deadline(tmp_path: Path):
    group = ProcessGroup()
    proc = group.start("stubborn", STUBBORN, {}, tmp_path / "s.log")
    wait_for(lambda: "up" in proc.log.read_text())
    started = time.monotonic()
    group.stop_all(timeout=1.0)
    assert 0.9 < time.monotonic() - started < 8
    assert not group_alive(proc.pid)


def test_clients_stop_before_the_server(tmp_path: Path):
    marker = tmp_path / "order"
    script = (
        "import signal,sys,time\n"
        "def bye(*_):\n"
        f"    open({str(marker)!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    group = ProcessGroup()
    server = group.start("server", [sys.executable, "-c", script, "server"], {}, tmp_path / "a.log", tier=0)
    client = group.start("client", [sys.executable, "-c", script, "client"], {}, tmp_path / "b.log", tier=1)
    wait_for(lambda: "up" in server.log.read_text() and "up" in client.log.read_text())
    group.stop_all()
    assert marker.read_text().split() == ["client", "server"]


def test_leftovers_of_a_killed_run_are_reaped(tmp_path: Path):
    pidfile = tmp_path / "pids.json"
    group = ProcessGroup(pidfile)
    proc = group.start("tree", TREE, {}, tmp_path / "tree.log")
    wait_for(lambda: children_of(proc.pid))
    # The owning run "dies" without stopping anything: only the pid file remains.
    assert reap_leftovers(pidfile) == ["tree"]
    assert not group_alive(proc.pid)
    proc.popen.wait(timeout=5)


def test_a_reused_pid_is_not_touched(tmp_path: Path):
    pidfile = tmp_path / "pids.json"
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        pidfile.write_text(
            json.dumps([{"name": "superlink", "pgid": sleeper.pid, "argv0": "/x/flower-superlink"}])
        )
        assert reap_leftovers(pidfile) == []
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
