"""Ansible at the edge: the playbooks in playbooks/, run through ansible-runner.

Every run gets a fresh private data directory that is deleted afterwards, with
`suppress_env_files`, so no key, extravar or environment (ansible-runner stores the
whole environment in artifacts/<id>/command) outlives the run. Progress comes from
the playbook's events; a failure names each host, the task and what it means.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedfleet.core.errors import FedfleetError

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
SITE = "site.yml"
STOP = "stop.yml"
PROBE = "probe.yml"


class ConfigureFailed(FedfleetError):
    """A playbook failed on one or more hosts (the message names each host and task)."""

    exit_code = 6


class Progress(Protocol):
    def task(self, host: str, name: str) -> None: ...
    def result(self, host: str, name: str, status: str) -> None: ...


class _Silent:
    def task(self, host: str, name: str) -> None:
        pass

    def result(self, host: str, name: str, status: str) -> None:
        pass


@dataclass(frozen=True)
class HostProblem:
    host: str
    task: str
    message: str
    unreachable: bool = False

    def describe(self) -> str:
        what = "unreachable" if self.unreachable else f"task {self.task!r} failed"
        return f"{self.host}: {what}: {self.message}"


@dataclass
class PlayResult:
    playbook: str
    seconds: float
    # host -> {ok, changed, failures, unreachable, skipped}
    hosts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[HostProblem] = field(default_factory=list)
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # host -> facts a task returned
    changes: dict[str, list[str]] = field(default_factory=dict)  # host -> the tasks that changed it

    @property
    def changed(self) -> int:
        return sum(h.get("changed", 0) for h in self.hosts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook,
            "seconds": round(self.seconds, 2),
            "changed": self.changed,
            "hosts": self.hosts,
            "changes": self.changes,
            "problems": [p.__dict__ for p in self.problems],
        }


def apply(
    playbook: str,
    inventory: dict[str, Any],
    *,
    limit: str | None = None,
    envvars: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    check: bool = True,
    cancellable: bool = True,
) -> PlayResult:
    """Run `playbook` from playbooks/ over `inventory`; raise ConfigureFailed naming each failed
    host (with `check` false, return the problems in the result instead). Ctrl-C or SIGTERM
    cancels the play and raises KeyboardInterrupt; a play that is not `cancellable` (the stop
    play, run while a command unwinds) lets the first one pass and only a second cancels it."""
    import ansible_runner

    progress = progress or _Silent()
    result = PlayResult(playbook, 0.0)
    current: dict[str, str] = {}

    def on_event(event: dict[str, Any]) -> bool:
        data = event.get("event_data") or {}
        kind = event.get("event", "")
        host = str(data.get("host") or "")
        task = str(data.get("task") or "")
        if kind == "runner_on_start" and host:
            current[host] = task
            progress.task(host, task)
        elif kind in ("runner_on_ok", "runner_on_skipped", "runner_on_failed", "runner_on_unreachable"):
            status = kind.removeprefix("runner_on_")
            res = data.get("res") or {}
            if status == "ok" and res.get("changed"):
                status = "changed"
                result.changes.setdefault(host, []).append(task)
            if status == "ok" and isinstance(res.get("ansible_facts"), dict):
                result.facts.setdefault(host, {}).update(res["ansible_facts"])
            if kind == "runner_on_failed" and not data.get("ignore_errors"):
                result.problems.append(HostProblem(host, task, _explained(_message(res))))
            if kind == "runner_on_unreachable":
                result.problems.append(HostProblem(host, task, _explained(_message(res)), unreachable=True))
            progress.result(host, task, status)
        elif kind == "playbook_on_stats":
            for key, stat in (
                ("ok", "ok"), ("changed", "changed"), ("failures", "failures"),
                ("dark", "unreachable"), ("skipped", "skipped"),
            ):  # fmt: skip
                for name, count in (data.get(key) or {}).items():
                    result.hosts.setdefault(name, {}).__setitem__(stat, int(count))
        return False  # nothing is kept in artifacts

    # ansible-runner would install SIGINT/SIGTERM handlers of its own and never restore
    # them; ours cancel the playbook (ansible-runner stops it) and are put back after.
    interrupted = threading.Event()
    signals: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)
        if cancellable or len(signals) > 1:
            interrupted.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    for sig in previous:  # a Python handler: the play's processes keep the default ones
        signal.signal(sig, on_signal)
    private = Path(tempfile.mkdtemp(prefix="fedfleet-ansible-"))
    started = time.monotonic()
    try:
        runner = ansible_runner.run(
            cancel_callback=interrupted.is_set,
            private_data_dir=str(private),
            project_dir=str(PLAYBOOKS),
            playbook=playbook,
            inventory=inventory,
            limit=limit,
            envvars={
                "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"),
                "ANSIBLE_LOCAL_TEMP": str(private / "tmp"),
                "ANSIBLE_NOCOLOR": "1",
                # Whatever the operator exports: Ansible's own ssh must check host keys too.
                "ANSIBLE_HOST_KEY_CHECKING": "True",
                # ansible-runner starts ansible-playbook by name: this environment's first.
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                **(envvars or {}),
            },
            event_handler=on_event,
            suppress_env_files=True,
            quiet=True,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        result.seconds = time.monotonic() - started
        shutil.rmtree(private, ignore_errors=True)
    if interrupted.is_set():
        raise KeyboardInterrupt
    if not check and (result.hosts or result.problems):
        return result
    if runner.status != "successful" or result.problems:
        if not result.problems:
            result.problems.append(
                HostProblem(
                    "controller",
                    playbook,
                    f"ansible-playbook ended {runner.status} (exit {runner.rc})"
                    + (": not found; run `make setup`" if runner.rc == 127 else ""),
                )
            )
        raise ConfigureFailed(
            f"{playbook} failed on {len({p.host for p in result.problems})} host(s); the other hosts "
            "were left as they were:\n" + "\n".join("  " + p.describe() for p in result.problems)
        )
    return result


def _message(res: Mapping[str, Any]) -> str:
    """The useful part of a failed task's result, one paragraph."""
    items = [
        r
        for r in res.get("results") or []
        if isinstance(r, dict) and (r.get("failed") or r.get("unreachable"))
    ]
    if items:  # a loop: the items that failed say why
        return "; ".join(dict.fromkeys(_message(r) for r in items))
    parts = [str(res.get("msg") or "").strip()]
    for key in ("stderr", "stdout"):
        text = str(res.get(key) or "").strip()
        if text and text not in parts[0]:
            parts.append(f"{key}: {text[-600:]}")
    if res.get("censored"):
        parts.append("(details hidden: the task handles a secret)")
    return " ".join(p for p in parts if p) or "no message"


# What some failures on a host mean, and the fix (matched on Ansible's and sudo's words).
HINTS = (
    (
        re.compile(r"missing sudo password|a password is required|not in the sudoers|may not run sudo", re.I),
        "this task needs root and the SSH user cannot use sudo without a password there: allow it "
        "(a sudoers line such as `fedfleet ALL=(ALL) NOPASSWD:ALL`), or give the host serviceManager: "
        "supervisor and a home the user owns, where no task needs root",
    ),
    (
        re.compile(
            r"interpreter .* (was )?not found|python3?: (command )?not found|No such file or directory.*python",
            re.I,
        ),
        "the host has no Python 3 at the path Ansible uses: install it (e.g. `apt-get install python3 "
        "python3-venv`) or set python: in the stack file to its interpreter",
    ),
    (
        re.compile(r"No space left on device", re.I),
        "the host's disk is full: free space under its fedfleet home, or give the host another home",
    ),
)


def _explained(message: str) -> str:
    for pattern, hint in HINTS:
        if pattern.search(message) and hint not in message:
            return f"{message} ({hint})"
    return message
