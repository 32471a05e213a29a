"""Processes a run starts, and the guarantee that it stops every one of them.

Each process starts in a session of its own, with a marker in its environment
(FEDFLEET_PROCESS_GROUP=<token>) that everything it spawns inherits. Stopping
means stopping every process that carries the marker: its process group, its
descendants, and also those Flower detaches into sessions of their own (the
SuperLink's flower-superexec and flwr-serverapp), even once orphaned.
SIGTERM first, SIGKILL for whatever is still there at the deadline.

Clients are stopped before the server they talk to: with node authentication a
SuperNode that cannot sign off (SIGKILL, or its SuperLink already gone) is locked
out of the SuperLink for ~60 s.

A pid file lists the live trees so a later run can find and stop the leftovers
of a run that was itself killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedfleet.core.errors import EnvironmentProblem
from fedfleet.core.util import atomic_write, poll

MARKER = "FEDFLEET_PROCESS_GROUP"


@dataclass
class Managed:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes]
    tier: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.rstrip().splitlines()[-lines:])


def _table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) of every process, read once from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def tree(roots: Iterable[int], table: dict[int, tuple[int, int, str]] | None = None) -> set[int]:
    """The roots, the members of their process groups, and all their descendants."""
    table = _table() if table is None else table
    found = {pid for pid in roots if pid in table}
    found |= {pid for pid, (_, pgid, _) in table.items() if pgid in found}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def living(pids: Iterable[int]) -> set[int]:
    """The pids that still run (zombies do not count)."""
    table = _table()
    return {pid for pid in pids if pid in table and table[pid][2] != "Z"}


def group_alive(pgid: int) -> bool:
    """True while the process group has a member that is not a zombie."""
    return any(pg == pgid and state != "Z" for _, pg, state in _table().values())


def marked(token: str) -> set[int]:
    """Live processes whose environment carries this group's marker."""
    needle = f"\0{MARKER}={token}\0".encode()
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in b"\0" + environ.read_bytes() + b"\0":
                found.add(int(environ.parent.name))
        except OSError:
            continue
    return living(found - {os.getpid()})


def terminate(pids: set[int], timeout: float) -> None:
    """SIGTERM `pids`, wait up to `timeout` for them to exit, SIGKILL the rest."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    poll(lambda: not living(pids), timeout, every=0.05)
    for pid in living(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    poll(lambda: not living(pids), 5, every=0.05)


class ProcessGroup:
    """Start processes; `stop_all` (also on exit of the `with` block) ends them all."""

    def __init__(self, pidfile: Path | None = None) -> None:
        self.pidfile = pidfile
        self.procs: list[Managed] = []
        self.claims: list[str] = []
        self.token = secrets.token_hex(8)
        self.lock = threading.RLock()  # hosts connect in threads of their own
        self.closed = False  # stop_all has begun: nothing new starts (a late reconnect thread)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log: Path,
        cwd: Path | None = None,
        tier: int = 0,
        pipes: bool = False,
    ) -> Managed:
        """Start `argv`; higher tiers are stopped first (clients before the server). With
        `pipes`, its stdin and stdout are pipes to this process (its stderr goes to the log)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with self.lock, log.open("ab") as out:
            if self.closed:
                raise EnvironmentProblem(f"cannot start {name}: the command is stopping what it started")
            try:
                popen = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                    stdout=subprocess.PIPE if pipes else out,
                    stderr=out if pipes else subprocess.STDOUT,
                    env={**env, MARKER: self.token},
                    cwd=cwd,
                    start_new_session=True,
                )
            except FileNotFoundError as err:
                raise EnvironmentProblem(
                    f"cannot start {name}: {argv[0]} not found; install the project "
                    "(make setup) and run fedfleet from its environment"
                ) from err
            proc = Managed(name, list(argv), log, popen, tier)
            self.procs.append(proc)
            self._write_pidfile()
        return proc

    def claim(self, name: str) -> dict[str, str]:
        """The marker for processes that others start on this group's behalf (a playbook's
        services): recorded in the pid file, so a later run reaps them if this one is killed,
        and swept by `stop_all`. Returns the environment entry to pass on."""
        self.claims.append(name)
        self._write_pidfile()
        return {MARKER: self.token}

    def stop(self, proc: Managed, timeout: float = 10.0) -> None:
        """Stop one process (and its tree) before the others, and forget it."""
        terminate(tree([proc.pid]), timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)
        with self.lock:
            if proc in self.procs:
                self.procs.remove(proc)
                self._write_pidfile()

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop tier by tier, highest first: a SuperNode must see its SuperLink to sign off.
        Nothing starts in the group from then on."""
        with self.lock:
            self.closed = True
        for tier in sorted({p.tier for p in self.procs}, reverse=True):
            procs = [p for p in self.procs if p.tier == tier]
            terminate(tree(p.pid for p in procs), timeout)
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=5)
        # Whatever carries the marker but left the trees (detached, or orphaned).
        terminate(marked(self.token), timeout)
        self.procs.clear()
        self.claims.clear()
        self._write_pidfile()

    def _write_pidfile(self) -> None:
        if self.pidfile is None:
            return
        if not self.procs and not self.claims:
            self.pidfile.unlink(missing_ok=True)
            return
        entries = [
            {"name": p.name, "pgid": p.pid, "argv0": p.argv[0], "token": self.token} for p in self.procs
        ] + [{"name": name, "pgid": 0, "argv0": "", "token": self.token} for name in self.claims]
        atomic_write(self.pidfile, json.dumps(entries) + "\n")


def _leader_runs(pid: int, argv0: str) -> bool:
    """Guard against pid reuse: the group leader still runs the program we started."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    name = Path(argv0).name
    return bool(name) and any(Path(part.decode(errors="replace")).name == name for part in cmdline[:2])


def reap_leftovers(pidfile: Path, timeout: float = 10.0) -> list[str]:
    """Stop the process trees a killed earlier run left in `pidfile`; return their names."""
    try:
        entries = json.loads(pidfile.read_text())
    except (OSError, ValueError):
        return []
    alive = [
        e
        for e in entries
        if isinstance(e, dict)
        and int(e.get("pgid", 0)) > 1
        and group_alive(int(e["pgid"]))
        and _leader_runs(int(e["pgid"]), str(e.get("argv0", "")))
    ]
    tokens = {str(e.get("token", "")) for e in entries if isinstance(e, dict)} - {""}
    if alive:
        terminate(tree(int(e["pgid"]) for e in alive), timeout)
    swept = []
    for token in tokens:  # detached children of an owner that is already gone, claimed services
        left = marked(token)
        if left:
            swept += [str(e.get("name")) for e in entries if e.get("token") == token and e not in alive]
            terminate(left, timeout)
    pidfile.unlink(missing_ok=True)
    return [str(e.get("name")) for e in alive] + sorted(set(swept))
