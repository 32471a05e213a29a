"""The SuperNodes of one run: start, retry on the next VM, watch, fail over.

`orchestrator.choose` gives each participant its usable VMs in rotation order. Here:

- `start` runs playbooks/site.yml (the SuperLink and the first VM of each participant)
  and waits, at most `fedfleet:orchestrator.connectTimeoutSeconds`, until each SuperNode
  has connected to the SuperLink (its log names its node ID). A VM whose SuperNode fails
  to start or to connect is stopped, marked with the reason, and the participant's next
  VM is tried; a participant left with no VM stops the run before training.
- `check` asks every host's supervisor, about once a second, whether its services run.
  A dead aggregator fails the run. A dead SuperNode or VM is *lost*: its node ID goes
  into the ServerApp's `fleet.json` (the ServerApp stops waiting for its replies and
  waits, bounded, for the replacement when it samples the next round), and a
  replacement starts on the participant's next VM while the run goes on. Flower alone
  would notice only when the node's heartbeat expires (up to 60 s). In the local
  stack's namespaces mode each VM has its own network link, and a VM whose link does
  not answer (`supervision.link_answers`) is lost too, though its SuperNode still runs.

Local hosts only so far (node IDs are read from the SuperNode's log, services from the
host's supervisor): `fedfleet run` drives the local stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfleet import configure, localstack, supervision
from fedfleet.adapters import flwr as flower
from fedfleet.core.errors import FedfleetError, RunFailed
from fedfleet.core.inventory import VM, Inventory
from fedfleet.core.selection import NoUsableVM
from fedfleet.core.stack import StackConfig

FLEET_FILE = "fleet.json"  # the ServerApp reads it (fedfleet_app.server_app.FLEET_FILE)
NODE_ID = re.compile(rb"SuperNode ID: (\d+)")
CONNECT_POLL = 0.2
LINK_TIMEOUT = 0.5  # seconds a VM's link may take to answer (namespaces mode; a kernel replies)

# Flower's exit codes, as printed in the process log ("Exit Code: 305").
EXIT_HINTS = {
    "Exit Code: 305": "the SuperLink refused this SuperNode: either its key is not "
    "registered (delete the VM's record in .fedfleet/<stack>/pki/node-keys/ to register "
    "again) or an earlier SuperNode with this key did not sign off cleanly and the "
    "SuperLink still counts it as connected (about 60 s after an unclean stop)",
}


@dataclass
class Attempt:
    vm: str
    error: str = ""  # empty: it serves
    seconds: float = 0.0


@dataclass
class Failover:
    participant: str
    lost_vm: str
    why: str
    node_id: int | None
    detected_at: float  # time.time()
    attempts: list[Attempt] = field(default_factory=list)
    replacement: str | None = None
    online_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "participant": self.participant,
            "lost_vm": self.lost_vm,
            "why": self.why,
            "node_id": None if self.node_id is None else str(self.node_id),
            "detected_at": self.detected_at,
            "replacement": self.replacement,
            "replacement_online_at": self.online_at,
            "replacement_seconds": None if self.online_at is None else self.online_at - self.detected_at,
            "attempts": [a.__dict__ for a in self.attempts],
        }


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Fleet:
    """Which VM serves each participant during one run, and everything that happened to them."""

    def __init__(
        self,
        stack: StackConfig,
        inventory: Inventory,
        project_dir: Path,
        order: dict[str, list[str]],
        *,
        envvars: dict[str, str],
        progress: configure.Progress,
        say: Callable[[str, str], None],
    ) -> None:
        self.stack = stack
        self.inventory = inventory
        self.project_dir = project_dir
        self.local = localstack.paths(stack, project_dir)
        # Namespaces mode: each VM has its own network link, checked over its address.
        net = localstack.network(stack, project_dir)
        self.links: dict[str, str] = dict(net.vms) if net else {}
        self.queue = {p: list(vms) for p, vms in order.items()}  # untried VMs, in order
        self.envvars = envvars
        self.progress = progress
        self.say = say
        self.serving: dict[str, VM] = {}
        self.node_ids: dict[str, int] = {}  # vm -> the node ID it connected with
        self.pids: dict[str, int] = {}  # vm -> pid of the SuperNode that connected
        self.misses: dict[str, int] = {}  # vm -> supervisor calls in a row without an answer
        self.used: list[str] = []  # every VM a SuperNode was started on (stop, logs)
        self.tried: dict[str, list[Attempt]] = {p: [] for p in order}
        self.failovers: list[Failover] = []
        self.lost_nodes: list[int] = []
        self.expected = len(order)
        self.control: Path | None = None  # the ServerApp's fleet.json, once the run has one
        self.configure_report: dict[str, Any] = {}

    # -- inventory -------------------------------------------------------------------

    def hosts(self) -> dict[str, Any]:
        """The Ansible inventory with the serving VMs as the `supernodes` group."""
        return configure.ansible_inventory(
            self.stack, self.inventory, self.project_dir, self.serving, flwr_bin=flower.tool("flwr")
        )

    def _home(self, vm: str) -> Path:
        return Path(self.inventory.vm(vm).home or self.local.vm_home(vm))

    def _log(self, vm: str) -> Path:
        return self._home(vm) / "supervisor" / "flower-supernode.log"

    def _status(self, host: str, home: Path, timeout: float = 1.0) -> supervision.HostStatus:
        return supervision.status(host, localstack.socket_path(home, "supervisor"), timeout=timeout)

    # -- start -----------------------------------------------------------------------

    def start(self, *, with_aggregator: bool = True) -> None:
        """The SuperLink and one connected SuperNode per participant, or raise NoUsableVM
        (what was started is the caller's to stop: every VM tried is in `used`)."""
        first = {p: vms.pop(0) for p, vms in self.queue.items()}
        self._launch(first, with_aggregator=with_aggregator)
        stranded = [p for p in self.tried if p not in self.serving]
        if stranded:
            raise NoUsableVM(
                "\n".join(
                    f"participant {p!r}: no VM could run its SuperNode ("
                    + "; ".join(f"{a.vm}: {a.error}" for a in self.tried[p])
                    + ")"
                    for p in stranded
                )
                + "\nEvery process this run started was stopped. `fedfleet vms --stack "
                f"{self.stack.name}` shows every VM; the logs are in the run directory"
            )

    def _launch(self, wanted: dict[str, str], *, with_aggregator: bool) -> None:
        """Start SuperNodes on `wanted` (participant -> VM); for each that fails, the
        participant's next VM, until one serves or none is left."""
        while wanted:
            # Where to look for the node ID: after the log's current end, unless the play
            # leaves a SuperNode that already runs (and connected before) as it is.
            offsets = {vm: (_size(self._log(vm)), self._supernode_pid(vm)) for vm in wanted.values()}
            for participant, vm in wanted.items():
                self.serving[participant] = self.inventory.vm(vm)
                if vm not in self.used:
                    self.used.append(vm)
            limit = ",".join(["aggregator"] * with_aggregator + list(wanted.values()))
            started = time.monotonic()
            play = configure.apply(
                configure.SITE,
                self.hosts(),
                limit=limit,
                envvars=self.envvars,
                progress=self.progress,
                check=False,
            )
            if with_aggregator:
                self.configure_report = play.to_dict()
                agg = [p for p in play.problems if p.host == self.inventory.aggregator.name]
                if agg:
                    raise configure.ConfigureFailed(
                        f"{configure.SITE} failed on the aggregator:\n"
                        + "\n".join("  " + p.describe() for p in agg)
                    )
                with_aggregator = False
            problems = {p.host: p for p in play.problems}
            errors: dict[str, str] = {}
            for vm in wanted.values():
                if vm in problems:
                    errors[vm] = f"{problems[vm].task}: {problems[vm].message}"
            errors |= self._await_connection({vm: offsets[vm] for vm in wanted.values() if vm not in errors})
            retry: dict[str, str] = {}
            for participant, vm in wanted.items():
                attempt = Attempt(vm, errors.get(vm, ""), round(time.monotonic() - started, 2))
                self.tried[participant].append(attempt)
                if not attempt.error:
                    continue
                del self.serving[participant]
                if self.queue[participant]:
                    retry[participant] = self.queue[participant].pop(0)
                    self.say("retry", f"{vm} ({participant}): {attempt.error}; trying {retry[participant]}")
            if errors:
                self._stop(",".join(errors))  # what the failed VMs may have left running, in one play
            wanted = retry

    def _supernode_pid(self, vm: str) -> int:
        return self._status(vm, self._home(vm)).pids.get("flower-supernode", 0)

    def _await_connection(self, offsets: dict[str, tuple[int, int]]) -> dict[str, str]:
        """Wait until each VM's SuperNode logs its node ID; the VMs that did not, with why."""
        deadline = time.monotonic() + self.stack.orchestrator.connect_timeout
        waiting = dict(offsets)
        errors: dict[str, str] = {}
        while waiting:
            for vm, offset in list(waiting.items()):  # offset: (log size, SuperNode pid) before the play
                status = self._status(vm, self._home(vm))
                pid = status.pids.get("flower-supernode", 0)
                end, pid_before = offset
                node_id = _node_id(self._log(vm), 0 if pid and pid == pid_before else end)
                if node_id is not None:
                    self.node_ids[vm] = node_id
                    if pid:
                        self.pids[vm] = pid
                    del waiting[vm]
                    continue
                why = status.down("flower-supernode")
                if why is not None:
                    errors[vm] = self._explain(why, self._log(vm))
                    del waiting[vm]
                elif cut := self._link_cut(vm):  # it cannot connect: no need to wait for the deadline
                    errors[vm] = cut
                    del waiting[vm]
            if not waiting:
                break
            if time.monotonic() >= deadline:
                for vm in waiting:
                    errors[vm] = (
                        f"its SuperNode did not connect to the SuperLink within "
                        f"{self.stack.orchestrator.connect_timeout:.0f} s "
                        f"(fedfleet:orchestrator.connectTimeoutSeconds); last lines of {self._log(vm)}:\n"
                        + tail(self._log(vm), 5)
                    )
                break
            time.sleep(CONNECT_POLL)
        return errors

    def _stop(self, vms: str) -> None:
        # If this fails, the run's ProcessGroup stops what is left (it carries the run's marker).
        with contextlib.suppress(FedfleetError):
            configure.apply(configure.STOP, self.hosts(), limit=vms, envvars=self.envvars)

    @staticmethod
    def _explain(why: str, log: Path) -> str:
        text = tail(log)
        hints = [hint for marker, hint in EXIT_HINTS.items() if marker in text]
        return f"{why}{''.join('; ' + h for h in hints)}. Last lines of {log}:\n{text}"

    # -- during the run --------------------------------------------------------------

    def tell_server(self, control: Path) -> None:
        """Write what the ServerApp reads (atomically): lost node IDs, participants expected."""
        self.control = control
        control.parent.mkdir(parents=True, exist_ok=True)
        tmp = control.with_name(control.name + ".tmp")
        tmp.write_text(json.dumps({"lost": self.lost_nodes, "expected": self.expected}) + "\n")
        os.replace(tmp, control)

    def check(self) -> None:
        """Raise RunFailed if the aggregator is down; replace any SuperNode that is."""
        agg = self._status("aggregator", self.local.aggregator, timeout=3.0)
        why = agg.down("flower-superlink")
        if why is not None:
            log = self.local.aggregator / "supervisor" / "flower-superlink.log"
            raise RunFailed(self._explain(why, log))
        for participant, vm in list(self.serving.items()):
            status = self._status(f"{vm.name} ({participant})", self._home(vm.name))
            cut = self._link_cut(vm.name)
            # One slow answer of a busy host is not a lost VM: two in a row are.
            answered = status.reachable and cut is None
            self.misses[vm.name] = 0 if answered else self.misses.get(vm.name, 0) + 1
            if 0 < self.misses[vm.name] < 2:
                continue
            why = cut or status.down("flower-supernode")
            pid = status.pids.get("flower-supernode", 0)
            if why is None and self.pids.get(vm.name, 0) and pid != self.pids[vm.name]:
                # Restarted by its supervisor after a crash: with node authentication the
                # SuperLink refuses its key until the old session expires (about 60 s).
                why = (
                    f"flower-supernode on {vm.name} ({participant}) exited and was restarted "
                    f"(pid {self.pids[vm.name]} → {pid}); its node cannot rejoin for about 60 s"
                )
            if why is not None:
                self.fail_over(participant, vm.name, why)

    def _link_cut(self, vm: str) -> str | None:
        """Why the VM does not answer over its network link (namespaces mode), or None."""
        address = self.links.get(vm)
        if address is None or supervision.link_answers(address, timeout=LINK_TIMEOUT):
            return None
        return (
            f"{vm} ({self.inventory.vm(vm).participant}) does not answer over its network link ({address}: no reply "
            f"within {LINK_TIMEOUT:g} s); its SuperNode cannot reach the SuperLink"
        )

    def fail_over(self, participant: str, vm: str, why: str) -> None:
        """Give up `vm` (the ServerApp stops waiting for it) and start the participant's next VM."""
        event = Failover(participant, vm, why, self.node_ids.get(vm), time.time())
        self.failovers.append(event)
        del self.serving[participant]
        if event.node_id is not None:
            self.lost_nodes.append(event.node_id)
            self._tell()
        queue = self.queue[participant]
        self.say(
            "failover",
            f"{vm} ({participant}) lost: {why.splitlines()[0]}; next VM: {queue[0] if queue else 'none left'}",
        )
        if queue:
            before = len(self.tried[participant])
            self._launch({participant: queue.pop(0)}, with_aggregator=False)
            event.attempts = self.tried[participant][before:]
            replaced = participant in self.serving
            if replaced:
                event.replacement = self.serving[participant].name
                event.online_at = time.time()
            self._stop(vm)  # whatever is left of it, if the VM still answers (after: recovery first)
            if replaced:
                return
        self.expected -= 1
        self._tell()
        self._give_up(participant, event)

    def _tell(self) -> None:
        if self.control is not None:
            self.tell_server(self.control)

    def _give_up(self, participant: str, event: Failover) -> None:
        minimum = self.stack.app.min_participants
        if self.expected < minimum:
            tried = "; ".join(f"{a.vm}: {a.error.splitlines()[0]}" for a in event.attempts)
            raise RunFailed(
                f"{event.why}; participant {participant!r} has no VM left to take over"
                + (f" ({tried})" if tried else "")
                + f", and {self.expected} participants are fewer than min-participants={minimum}"
            )
        self.say("failover", f"{participant} goes on without a SuperNode ({self.expected} participants left)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "serving": {p: vm.name for p, vm in self.serving.items()},
            "node_ids": {vm: str(n) for vm, n in self.node_ids.items()},
            "tried": {p: [a.__dict__ for a in attempts] for p, attempts in self.tried.items()},
            "failovers": [f.to_dict() for f in self.failovers],
        }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _node_id(log: Path, offset: int) -> int | None:
    """The node ID the SuperNode logged after `offset` (it logs it once connected)."""
    try:
        with log.open("rb") as fh:
            if fh.seek(0, os.SEEK_END) < offset:
                offset = 0  # the log was rotated
            fh.seek(offset)
            found = NODE_ID.findall(fh.read())
    except OSError:
        return None
    return int(found[-1]) if found else None
