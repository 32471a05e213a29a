"""The SuperNodes of one run: start, retry on the next VM, watch, fail over.

The probe gives each participant its usable VMs in rotation order. Here:

- `start` runs site.yml (through the launcher: the SuperLink and the first VM of each
  participant) and waits, at most `fedfleet:orchestrator.connectTimeoutSeconds`, until
  each SuperNode has connected to the SuperLink (its log names its node ID). A VM whose
  SuperNode fails to start or to connect is stopped, marked with the reason, and the
  participant's next VM is tried; a participant left with no VM stops the run before
  training.
- `check`, about once a second, asks every host at once what runs (the host's
  supervisor or systemd: on a local host through its socket, on an SSH host through the
  agent on its one connection). A dead aggregator fails the run. A dead SuperNode, or a
  VM that has not answered for `LOST_AFTER` seconds (its link cut, or it is gone; one
  slow answer is not enough), is *lost*: its node ID goes to the ServerApp
  (`fleet.json` on the aggregator: the ServerApp stops waiting for its replies and
  waits, bounded, for the replacement when it samples the next round), and a
  replacement starts on the participant's next VM while the run goes on. Flower alone
  would notice only when the node's heartbeat expires (up to 60 s). When no host at all
  answers, the problem is this machine's own connection, not the hosts: nothing is
  failed over, and the run fails only if that lasts `OUTAGE_LIMIT` seconds.

Nothing here knows which kind of host it talks to.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedfleet.core.errors import FedfleetError, RunFailed
from fedfleet.core.selection import NoUsableVM
from fedfleet.hosts.base import (
    NO_ANSWER,
    PROXY,
    SUPERLINK,
    SUPERNODE,
    Host,
    ServiceStatus,
    log_path,
    tail_lines,
)

FLEET_FILE = "fleet.json"  # the ServerApp reads it (fedfleet_app.server_app.FLEET_FILE)
NODE_ID = re.compile(rb"SuperNode ID: (\d+)")
CONNECT_POLL = 0.2
MISSES = 2  # a host is lost after at least this many unanswered checks in a row...
LOST_AFTER = 4.0  # ...spanning at least this many seconds without an answer
OUTAGE_LIMIT = 60.0  # seconds no host at all may be silent (this machine's link) before the run fails
# After such an outage the hosts' connections come back one by one (each reconnects on its
# own): for this long a host still silent does not count as lost.
RECOVERY_GRACE = 30.0
CHECK_GAP = 3.0  # checks further apart than this (a failover ran in between) start the count over
NOTICE_PATIENCE = 30.0  # seconds the ServerApp's fleet.json may fail to be written before the run fails
STATUS_TIMEOUT = 1.0  # seconds a participant VM has to answer one check (the aggregator: 3)
LOG_TAIL_BYTES = 16_384

# Flower's exit codes, as printed in the process log ("Exit Code: 305").
EXIT_HINTS = {
    "Exit Code: 305": "the SuperLink refused this SuperNode: either its key is not "
    "registered (delete the VM's record in .fedfleet/<stack>/pki/node-keys/ to register "
    "again) or an earlier SuperNode with this key did not sign off cleanly and the "
    "SuperLink still counts it as connected (about 60 s after an unclean stop)",
}


class Launcher(Protocol):
    """How the fleet starts and stops Flower on hosts (the configure stage's Configurer)."""

    def start(self, serving: Collection[str], limit: Collection[str]) -> dict[str, str]: ...
    def stop(self, limit: Collection[str], serving: Collection[str] = ()) -> Any: ...


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


class Roster:
    """Which VM serves each participant, which are left to try, and every attempt."""

    def __init__(self, order: Mapping[str, list[str]]) -> None:
        self.queue = {p: list(vms) for p, vms in order.items()}  # untried VMs, in order
        self.serving: dict[str, str] = {}
        self.tried: dict[str, list[Attempt]] = {p: [] for p in order}
        self.used: list[str] = []  # every VM a SuperNode was started on (stop, logs)

    def take_next(self, participant: str) -> str | None:
        queue = self.queue[participant]
        return queue.pop(0) if queue else None

    def assign(self, participant: str, vm: str) -> None:
        self.serving[participant] = vm
        if vm not in self.used:
            self.used.append(vm)


@dataclass
class Silence:
    """How long a host has not answered (one slow answer is not a lost host)."""

    misses: int = 0  # checks in a row it did not answer
    since: float = 0.0  # time.monotonic() of the first of them
    last: float = 0.0  # of the latest

    def heard(self, status: ServiceStatus, now: float) -> bool:
        """Record one check; whether the host now counts as gone: silent at every check for
        LOST_AFTER seconds, the checks no further apart than CHECK_GAP (time this machine
        spent elsewhere, starting a replacement, is not the host's silence)."""
        if status.reachable:
            self.misses = 0
            return False
        if self.misses == 0 or now - self.last > CHECK_GAP:
            self.misses, self.since = 0, now
        self.misses += 1
        self.last = now
        return self.misses >= MISSES and now - self.since >= LOST_AFTER

    def forget(self) -> None:
        self.misses = 0


@dataclass
class Node:
    """What the watch knows of the SuperNode on one VM."""

    node_id: int | None = None
    pid: int = 0  # of the SuperNode that connected (0: unknown)
    silence: Silence = field(default_factory=Silence)


class Notice:
    """What the ServerApp reads on the aggregator: lost node IDs, participants still expected.
    A write that fails (the aggregator slow to answer) is sent again at the next check."""

    def __init__(self, host: Host, path: str, expected: int) -> None:
        self.host = host
        self.path = path
        self.lost: list[int] = []
        self.expected = expected
        self.failing_since: float | None = None  # the first write that failed, unsent since
        self.error = ""

    @property
    def pending(self) -> bool:
        return self.failing_since is not None

    def send(self) -> None:
        try:
            self.host.write(
                self.path, (json.dumps({"lost": self.lost, "expected": self.expected}) + "\n").encode()
            )
        except FedfleetError as err:
            self.error = str(err)
            if self.failing_since is None:
                self.failing_since = time.monotonic()
        else:
            self.failing_since = None


@dataclass(frozen=True)
class Rules:
    stack: str
    connect_timeout: float
    min_participants: int


class Fleet:
    """Which VM serves each participant during one run, and everything that happened to them."""

    def __init__(
        self,
        hosts: Mapping[str, Host],
        order: Mapping[str, list[str]],
        launcher: Launcher,
        rules: Rules,
        say: Callable[[str, str], None],
    ) -> None:
        self.hosts = hosts
        self.launcher = launcher
        self.rules = rules
        self.say = say
        self.roster = Roster(order)
        self.nodes: dict[str, Node] = {}
        self.failovers: list[Failover] = []
        self.notice: Notice | None = None  # once the run has a ServerApp to tell
        self.aggregator_silence = Silence()
        self.outage_since: float | None = None  # no host answers: this machine's connection
        self.grace_until = 0.0  # after an outage: hosts still reconnecting are not lost yet

    @property
    def serving(self) -> dict[str, str]:
        return dict(self.roster.serving)

    @property
    def used(self) -> list[str]:
        return list(self.roster.used)

    # -- start -----------------------------------------------------------------------

    def start(self, *, with_aggregator: bool = True) -> None:
        """The SuperLink and one connected SuperNode per participant, or raise NoUsableVM
        (what was started is the caller's to stop: every VM tried is in `used`)."""
        first = {p: vm for p in self.roster.queue if (vm := self.roster.take_next(p)) is not None}
        self._launch(first, with_aggregator=with_aggregator)
        stranded = [p for p in self.roster.tried if p not in self.roster.serving]
        if stranded:
            raise NoUsableVM(
                "\n".join(
                    f"participant {p!r}: no VM could run its SuperNode ("
                    + "; ".join(f"{a.vm}: {a.error}" for a in self.roster.tried[p])
                    + ")"
                    for p in stranded
                )
                + "\nEvery process this run started was stopped. `fedfleet vms --stack "
                f"{self.rules.stack}` shows every VM; the logs are in the run directory"
            )

    def _launch(self, wanted: dict[str, str], *, with_aggregator: bool) -> None:
        """Start SuperNodes on `wanted` (participant -> VM); for each that fails, the
        participant's next VM, until one serves or none is left."""
        while wanted:
            # Where to look for the node ID: after the log's current end, unless the play
            # leaves a SuperNode that already runs (and connected before) as it is.
            before = {vm: (self._log_size(vm), self._pid(vm)) for vm in wanted.values()}
            for participant, vm in wanted.items():
                self.roster.assign(participant, vm)
            started = time.monotonic()
            limit = ["aggregator"] * with_aggregator + list(wanted.values())
            errors = self.launcher.start(self.roster.serving.values(), limit)
            errors = {vm: errors[vm] for vm in wanted.values() if vm in errors}
            with_aggregator = False
            errors |= self._await_connection({vm: before[vm] for vm in wanted.values() if vm not in errors})
            retry: dict[str, str] = {}
            for participant, vm in wanted.items():
                attempt = Attempt(vm, errors.get(vm, ""), round(time.monotonic() - started, 2))
                self.roster.tried[participant].append(attempt)
                if not attempt.error:
                    continue
                del self.roster.serving[participant]
                following = self.roster.take_next(participant)
                if following is not None:
                    retry[participant] = following
                    self.say("retry", f"{vm} ({participant}): {attempt.error}; trying {following}")
            if errors:
                self.launcher.stop(list(errors))  # what the failed VMs may have left, in one play
            wanted = retry

    def _log(self, vm: str) -> str:
        return log_path(self.hosts[vm].home, SUPERNODE)

    def _log_size(self, vm: str) -> int:
        """The SuperNode log's size now (0: no log yet). A host that does not say is asked
        again; if it never does, 0: a node ID from an earlier start may then be read, which
        is the same node's (its ID comes with its registered key) but no proof that it has
        connected yet; the ServerApp's sampling still waits for it."""
        for _ in range(3):
            size = self.hosts[vm].read(self._log(vm), 0, limit=0)[1]
            if size != NO_ANSWER:
                return max(0, size)
        return 0

    def _pid(self, vm: str) -> int:
        return self.hosts[vm].status(timeout=3.0).pids.get(SUPERNODE, 0)

    def _node_id(self, vm: str, offset: int) -> tuple[int | None, int]:
        """The last node ID the SuperNode logged after `offset` (it logs one once connected),
        and how far the log was read."""
        found: int | None = None
        while True:
            data, size = self.hosts[vm].read(self._log(vm), offset)
            if size < 0 or not data:
                return found, offset
            ids = NODE_ID.findall(data)
            if ids:
                found = int(ids[-1])
            # Read on from the last complete line (a line cut by a read is read again whole).
            cut = data.rfind(b"\n") + 1
            if not cut:
                return found, offset
            offset += cut
            if offset >= size:
                return found, offset

    def _await_connection(self, before: dict[str, tuple[int, int]]) -> dict[str, str]:
        """Wait until each VM's SuperNode logs its node ID; the VMs that did not, with why."""
        deadline = time.monotonic() + self.rules.connect_timeout
        # vm -> where to look for the node ID: after the log's end before the play, or from
        # the start when the play left a SuperNode that already ran (and connected before).
        offsets: dict[str, int] = {}
        for vm, (end, pid_before) in before.items():
            pid = self._pid(vm)
            offsets[vm] = 0 if pid and pid == pid_before else end
        errors: dict[str, str] = {}
        silence = {vm: Silence() for vm in before}
        while offsets:
            for vm in list(offsets):
                status = self.hosts[vm].status(timeout=STATUS_TIMEOUT)
                node_id, offsets[vm] = self._node_id(vm, offsets[vm])
                if node_id is not None:
                    self.nodes[vm] = Node(node_id, status.pids.get(SUPERNODE, 0) or self._pid(vm))
                    del offsets[vm]
                    continue
                gone = silence[vm].heard(status, time.monotonic())
                if status.reachable and (why := status.down(SUPERNODE)) is not None:
                    errors[vm] = self._explain(why, vm, SUPERNODE)  # it stopped
                    del offsets[vm]
                elif gone:  # its host (or link) has not answered for a while
                    errors[vm] = status.problem or f"{self.hosts[vm].label} does not answer"
                    del offsets[vm]
            if not offsets:
                break
            if time.monotonic() >= deadline:
                for vm in offsets:
                    errors[vm] = (
                        f"its SuperNode did not connect to the SuperLink within "
                        f"{self.rules.connect_timeout:.0f} s "
                        f"(fedfleet:orchestrator.connectTimeoutSeconds); last lines of {self._log(vm)}:\n"
                        + self._tail(vm, SUPERNODE, 5)
                    )
                break
            time.sleep(CONNECT_POLL)
        return errors

    def _tail(self, host: str, service: str, lines: int = 15) -> str:
        path = log_path(self.hosts[host].home, service)
        size = self.hosts[host].read(path, 0, limit=0)[1]
        if size < 0:
            return "(no log)"
        return tail_lines(self.hosts[host].read(path, max(0, size - LOG_TAIL_BYTES))[0], lines)

    def _explain(self, why: str, host: str, service: str) -> str:
        text = self._tail(host, service)
        hints = [hint for marker, hint in EXIT_HINTS.items() if marker in text]
        where = log_path(self.hosts[host].home, service)
        return f"{why}{''.join('; ' + h for h in hints)}. Last lines of {where} on {host}:\n{text}"

    # -- during the run --------------------------------------------------------------

    def tell_server(self, path: str) -> None:
        """From now on, tell the ServerApp (its `fleet.json` on the aggregator) what is lost."""
        self.notice = Notice(self.hosts["aggregator"], path, len(self.roster.tried))
        self.notice.send()

    def check(self) -> None:
        """Raise RunFailed if the aggregator is down; replace any SuperNode that is lost.
        Every host is asked at once (one slow host does not delay the others' verdict)."""
        if self.notice is not None and self.notice.failing_since is not None:
            self.notice.send()
            failing = self.notice.failing_since
            if failing is not None and time.monotonic() - failing >= NOTICE_PATIENCE:
                raise RunFailed(
                    f"could not tell the ServerApp which nodes are lost for {NOTICE_PATIENCE:.0f} s: "
                    f"{self.notice.error}"
                )
        serving = dict(self.roster.serving)
        names = ["aggregator", *serving.values()]
        timeouts = {name: 3.0 if name == "aggregator" else STATUS_TIMEOUT for name in names}
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            statuses = dict(
                zip(names, pool.map(lambda n: self.hosts[n].status(timeout=timeouts[n]), names), strict=True)
            )
        now = time.monotonic()
        if not any(status.reachable for status in statuses.values()):
            self._outage(statuses, now)
            return  # not the hosts' fault: nothing counts as lost meanwhile
        if self.outage_since is not None:  # back: the silence during the outage does not count
            self.outage_since = None
            self.grace_until = now + RECOVERY_GRACE
            for silence in [self.aggregator_silence, *(n.silence for n in self.nodes.values())]:
                silence.forget()
        if all(status.reachable for status in statuses.values()):
            self.grace_until = 0.0
        # Within the grace after an outage a silent host is still reconnecting: not judged
        # (a host that answers is, as always: a stopped service is stopped).
        judged = {n: st for n, st in statuses.items() if st.reachable or now >= self.grace_until}
        agg = judged.get("aggregator")
        if agg is not None and (self.aggregator_silence.heard(agg, now) or agg.reachable):
            for program in (SUPERLINK, PROXY):  # the participants reach the SuperLink through the proxy
                why = agg.down(program)
                if why is not None:
                    raise RunFailed(self._explain(why, "aggregator", program) if agg.reachable else why)
        for participant, vm in serving.items():
            if vm not in judged:
                continue
            why = self._lost(vm, judged[vm], now)
            if why is not None:
                self.fail_over(participant, vm, why)

    def _outage(self, statuses: Mapping[str, ServiceStatus], now: float) -> None:
        """No host answers: this machine's own connection is down (or it is too busy)."""
        if self.outage_since is None:
            self.outage_since = now
            self.say("watch", "no host answers; waiting for this machine's connection to come back")
        if now - self.outage_since >= OUTAGE_LIMIT:
            problems = "; ".join(s.problem for s in statuses.values() if s.problem)
            raise RunFailed(
                f"no host has answered for {OUTAGE_LIMIT:.0f} s: this machine has lost its connection to "
                f"all of them ({problems}). Check this machine's network (VPN, the route to the hosts)"
            )

    def _lost(self, vm: str, status: ServiceStatus, now: float) -> str | None:
        """Why the SuperNode on `vm` is lost, or None (one missed answer is not yet)."""
        node = self.nodes.setdefault(vm, Node())
        gone = node.silence.heard(status, now)
        if not status.reachable:
            return (status.problem or f"{self.hosts[vm].label} does not answer") if gone else None
        why = status.down(SUPERNODE)
        pid = status.pids.get(SUPERNODE, 0)
        if why is None and node.pid and pid and pid != node.pid:
            # Restarted by its supervisor after a crash: with node authentication the
            # SuperLink refuses its key until the old session expires (about 60 s).
            why = (
                f"flower-supernode on {self.hosts[vm].label} exited and was restarted "
                f"(pid {node.pid} → {pid}); its node cannot rejoin for about 60 s"
            )
        return why

    def fail_over(self, participant: str, vm: str, why: str) -> None:
        """Give up `vm` (the ServerApp stops waiting for it) and start the participant's next VM."""
        event = Failover(participant, vm, why, self.nodes.get(vm, Node()).node_id, time.time())
        self.failovers.append(event)
        del self.roster.serving[participant]
        if event.node_id is not None and self.notice is not None:
            self.notice.lost.append(event.node_id)
            self.notice.send()
        following = self.roster.take_next(participant)
        self.say(
            "failover",
            f"{vm} ({participant}) lost: {why.splitlines()[0]}; next VM: {following or 'none left'}",
        )
        if following is not None:
            before = len(self.roster.tried[participant])
            self._launch({participant: following}, with_aggregator=False)
            event.attempts = self.roster.tried[participant][before:]
            if participant in self.roster.serving:
                event.replacement = self.roster.serving[participant]
                event.online_at = time.time()
            self.launcher.stop([vm])  # whatever is left of it, if it still answers (after: recovery first)
            if event.replacement is not None:
                return
        self._give_up(participant, event)

    def _give_up(self, participant: str, event: Failover) -> None:
        expected = len(self.roster.tried) - len(
            [p for p in self.roster.tried if p not in self.roster.serving and not self.roster.queue[p]]
        )
        if self.notice is not None:
            self.notice.expected = expected
            self.notice.send()
        minimum = self.rules.min_participants
        if expected < minimum:
            tried = "; ".join(f"{a.vm}: {a.error.splitlines()[0]}" for a in event.attempts)
            raise RunFailed(
                f"{event.why}; participant {participant!r} has no VM left to take over"
                + (f" ({tried})" if tried else "")
                + f", and {expected} participants are fewer than min-participants={minimum}"
            )
        self.say("failover", f"{participant} goes on without a SuperNode ({expected} participants left)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "serving": self.serving,
            "node_ids": {vm: str(n.node_id) for vm, n in self.nodes.items() if n.node_id is not None},
            "tried": {p: [a.__dict__ for a in attempts] for p, attempts in self.roster.tried.items()},
            "failovers": [f.to_dict() for f in self.failovers],
        }
