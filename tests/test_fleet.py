"""The fleet's watch and failover with in-memory hosts: what counts as a lost VM, what
does not (one slow answer, this machine's own connection), and the notice to the
ServerApp surviving a failed write. The real thing runs in tests/test_e2e.py and
tests/test_ssh_run.py; these pin the rules."""

from __future__ import annotations

import itertools
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from fedfleet.core.errors import FedfleetError, RunFailed
from fedfleet.hosts.base import NO_ANSWER, NO_FILE, PROXY, SUPERLINK, SUPERNODE, ServiceStatus
from fedfleet.stages import fleet

PIDS = itertools.count(100)


class FakeHost:
    """A host whose answers the test sets: up, silent, or with its services stopped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.label = f"{name} (site)"
        self.home = f"/srv/{name}"
        self.files: dict[str, bytes] = {}
        self.programs: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.silent = False
        self.refuse_writes = 0  # how many writes fail next

    def status(self, timeout: float = 1.0) -> ServiceStatus:
        if self.silent:
            return ServiceStatus(
                self.label, False, problem=f"{self.label} does not answer within {timeout:g} s"
            )
        return ServiceStatus(self.label, True, dict(self.programs), dict(self.pids))

    def read(self, path: str, offset: int = 0, limit: int | None = None) -> tuple[bytes, int]:
        if self.silent:
            return b"", NO_ANSWER
        if path not in self.files:
            return b"", NO_FILE
        data = self.files[path]
        offset = offset if offset <= len(data) else 0
        return data[offset : None if limit is None else offset + limit], len(data)

    def write(self, path: str, data: bytes) -> None:
        if self.refuse_writes:
            self.refuse_writes -= 1
            raise FedfleetError(f"could not write {path} on {self.label}: no answer")
        self.files[path] = data

    def log(self, service: str) -> str:
        return f"{self.home}/log/{service}.log"


class FakeLauncher:
    """Starts a SuperNode by marking it running and logging a node ID (as Flower does)."""

    def __init__(self, hosts: dict[str, FakeHost]) -> None:
        self.hosts = hosts
        self.stopped: list[str] = []
        self.ids = itertools.count(7001)

    def start(self, serving: Collection[str], limit: Collection[str]) -> dict[str, str]:
        for name in limit:
            host = self.hosts[name]
            service = SUPERLINK if name == "aggregator" else SUPERNODE
            host.programs[service] = "RUNNING"
            host.pids[service] = next(PIDS)
            if service == SUPERLINK:  # and the proxy in front of it
                host.programs[PROXY] = "RUNNING"
            if service == SUPERNODE:
                log = host.files.get(host.log(SUPERNODE), b"")
                host.files[host.log(SUPERNODE)] = log + f"INFO SuperNode ID: {next(self.ids)}\n".encode()
        return {}

    def stop(self, limit: Collection[str], serving: Collection[str] = ()) -> Any:
        self.stopped += list(limit)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """time.monotonic as the test sets it (checks happen when the test calls them); the
    fleet's own waits move it on instead of sleeping."""
    now = [1000.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(fleet.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(fleet.time, "sleep", sleep)
    return now


def make_fleet(min_participants: int = 2) -> tuple[fleet.Fleet, dict[str, FakeHost], FakeLauncher, list[str]]:
    hosts = {name: FakeHost(name) for name in ("aggregator", "a-1", "a-2", "b-1", "b-2")}
    launcher = FakeLauncher(hosts)
    said: list[str] = []
    f = fleet.Fleet(
        hosts,  # type: ignore[arg-type]
        {"a": ["a-1", "a-2"], "b": ["b-1", "b-2"]},
        launcher,
        fleet.Rules("test", connect_timeout=5, min_participants=min_participants),
        lambda stage, detail: said.append(f"{stage}: {detail}"),
    )
    return f, hosts, launcher, said


def started(clock: list[float]) -> tuple[fleet.Fleet, dict[str, FakeHost], FakeLauncher, list[str]]:
    f, hosts, launcher, said = make_fleet()
    f.start()
    f.tell_server("/srv/aggregator/runs/r1/fleet.json")
    assert f.serving == {"a": "a-1", "b": "b-1"}
    return f, hosts, launcher, said


def notice(hosts: dict[str, FakeHost]) -> dict[str, Any]:
    return json.loads(hosts["aggregator"].files["/srv/aggregator/runs/r1/fleet.json"])


def test_one_slow_answer_is_not_a_lost_vm_but_a_silence_is(clock: list[float]):
    f, hosts, launcher, _ = started(clock)
    hosts["a-1"].silent = True
    f.check()  # one unanswered check
    clock[0] += 1.2
    f.check()  # a second one, but only 1.2 s of silence
    assert f.serving["a"] == "a-1" and f.failovers == []
    hosts["a-1"].silent = False
    clock[0] += 1.0
    f.check()  # it answered again: the count starts over
    hosts["a-1"].silent = True
    for _ in range(4):  # silent at each of them: 3 s from the first
        clock[0] += 1.0
        f.check()
    assert f.serving["a"] == "a-1"
    clock[0] += 1.0
    f.check()  # 4 s (fleet.LOST_AFTER) without an answer
    assert f.serving["a"] == "a-2"
    (event,) = f.failovers
    assert event.lost_vm == "a-1" and "does not answer" in event.why and event.replacement == "a-2"
    assert notice(hosts)["lost"] == [7001]
    assert "a-1" in launcher.stopped


def test_when_no_host_answers_nothing_is_failed_over_until_the_outage_limit(clock: list[float]):
    f, hosts, _, said = started(clock)
    for host in hosts.values():
        host.silent = True
    for _ in range(10):
        clock[0] += 1.0
        f.check()
    assert f.failovers == [] and f.serving == {"a": "a-1", "b": "b-1"}
    assert any("this machine's connection" in line for line in said)
    for host in hosts.values():  # the connection is back: the silence does not count
        host.silent = False
    clock[0] += 1.0
    f.check()
    assert f.failovers == []
    for host in hosts.values():
        host.silent = True
    with pytest.raises(
        RunFailed, match="no host has answered for 60 s: this machine has lost its connection"
    ):
        for _ in range(70):
            clock[0] += 1.0
            f.check()


def test_a_silent_aggregator_fails_the_run_only_after_a_silence(clock: list[float]):
    f, hosts, _, _ = started(clock)
    hosts["aggregator"].silent = True
    f.check()
    clock[0] += 1.0
    f.check()
    with pytest.raises(RunFailed, match="aggregator"):
        for _ in range(5):
            clock[0] += 1.0
            f.check()


def test_a_stopped_superlink_fails_the_run_at_once(clock: list[float]):
    f, hosts, _, _ = started(clock)
    hosts["aggregator"].programs[SUPERLINK] = "FATAL"
    with pytest.raises(RunFailed, match=r"flower-superlink on aggregator .* is FATAL"):
        f.check()


def test_a_notice_that_cannot_be_written_is_sent_at_the_next_check(clock: list[float]):
    f, hosts, _, _ = started(clock)
    hosts["b-1"].programs[SUPERNODE] = "EXITED"
    hosts["aggregator"].refuse_writes = 1
    f.check()  # b-1 lost and replaced though the notice could not be written
    assert f.serving["b"] == "b-2" and notice(hosts)["lost"] == []
    clock[0] += 1.0
    f.check()
    assert notice(hosts)["lost"] == [7002]


def test_an_old_node_id_in_the_log_is_not_taken_for_the_new_one(clock: list[float]):
    f, hosts, _, _ = make_fleet()
    # a-1's log holds an earlier run's node ID; the new SuperNode logs its own after the play.
    hosts["a-1"].files[hosts["a-1"].log(SUPERNODE)] = b"INFO SuperNode ID: 42\n" * 1000
    f.start()
    assert f.nodes["a-1"].node_id == 7001 and f.nodes["b-1"].node_id == 7002


def test_a_supernode_already_running_is_found_by_its_last_id_in_a_long_log(clock: list[float]):
    f, hosts, launcher, _ = make_fleet()
    for name in ("aggregator", "a-1", "b-1"):
        launcher.start([], [name])  # configure started them: a-1 logged ID 7001, b-1 7002
    log = hosts["a-1"].log(SUPERNODE)
    hosts["a-1"].files[log] = b"x" * 100 + hosts["a-1"].files[log] + b"INFO round\n" * 50_000
    launcher.start = lambda serving, limit: {}  # type: ignore[method-assign]  # the play leaves them as they are
    f.start()
    assert f.nodes["a-1"].node_id == 7001 and f.nodes["b-1"].node_id == 7002


def test_after_an_outage_hosts_reconnecting_one_by_one_are_not_lost(clock: list[float]):
    f, hosts, _, _ = started(clock)
    hosts["a-1"].silent = True  # missed one check before the outage
    f.check()
    for host in hosts.values():
        host.silent = True
    for _ in range(20):
        clock[0] += 1.0
        f.check()
    hosts["aggregator"].silent = hosts["b-1"].silent = False  # back first; a-1 takes 10 s more
    for _ in range(10):
        clock[0] += 1.0
        f.check()
    assert f.failovers == []
    for host in hosts.values():
        host.silent = False
    clock[0] += 1.0
    f.check()
    # Once all are back, the usual rule again: a-1 silent for 4 s is lost.
    hosts["a-1"].silent = True
    for _ in range(5):
        clock[0] += 1.0
        f.check()
    assert [e.lost_vm for e in f.failovers] == ["a-1"]


def test_a_host_still_silent_after_the_grace_is_lost(clock: list[float]):
    f, hosts, _, _ = started(clock)
    for host in hosts.values():
        host.silent = True
    clock[0] += 1.0
    f.check()
    for name in ("aggregator", "b-1", "a-2", "b-2"):  # all back but a-1
        hosts[name].silent = False
    for _ in range(int(fleet.RECOVERY_GRACE) + 6):
        clock[0] += 1.0
        f.check()
    assert [e.lost_vm for e in f.failovers] == ["a-1"]


def test_time_spent_elsewhere_is_not_a_hosts_silence(clock: list[float]):
    f, hosts, _, _ = started(clock)
    hosts["a-1"].silent = True
    f.check()
    clock[0] += 20.0  # e.g. a replacement started elsewhere took 20 s
    f.check()
    clock[0] += 1.0
    f.check()
    assert f.failovers == []  # 1 s of regular checks, not 21 s


def test_a_notice_that_cannot_be_written_for_long_fails_the_run(clock: list[float]):
    f, hosts, _, _ = started(clock)
    hosts["b-1"].programs[SUPERNODE] = "EXITED"
    hosts["aggregator"].refuse_writes = 10_000
    f.check()
    with pytest.raises(
        RunFailed, match=r"could not tell the ServerApp which nodes are lost for 30 s: could not write"
    ):
        for _ in range(40):
            clock[0] += 1.0
            f.check()


def test_the_aggregators_output_cannot_replace_what_fedfleet_writes(tmp_path: Path):
    from fedfleet.hosts.local import LocalHost
    from fedfleet.stages import collect

    out = tmp_path / "agg" / "runs" / "r1"
    (out / "models").mkdir(parents=True)
    (out / "models" / "round-1.pt").write_bytes(b"weights")
    (out / "run_config.toml").write_text("num-server-rounds = 99\n")  # not the run's own
    (out / "logs").write_text("a file where the logs go")
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "run_config.toml").write_text("num-server-rounds = 2\n")
    host = LocalHost("aggregator", "aggregator", tmp_path / "agg", "127.0.0.1")
    refused = collect.merge(host, str(out), run_dir, 1, "events.jsonl")
    assert refused == ["logs", "run_config.toml"]
    assert (run_dir / "run_config.toml").read_text() == "num-server-rounds = 2\n"
    assert (run_dir / "models" / "round-1.pt").read_bytes() == b"weights"
    assert sorted(p.name for p in run_dir.iterdir()) == ["models", "run_config.toml"]


def test_a_resumed_attempt_joins_the_runs_files_and_a_commit_travels_as_its_pair(tmp_path: Path):
    from fedfleet.hosts.local import LocalHost
    from fedfleet.stages import collect

    out = tmp_path / "agg" / "runs" / "r1.2"
    (out / "models").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    (out / "models" / "round-1.pt").write_bytes(b"attempt 2's copy")  # round 1 was the first attempt's
    (out / "models" / "round-2.pt").write_bytes(b"round 2")
    (out / "checkpoints" / "round-2.npz").write_bytes(b"whole")
    (out / "checkpoints" / "round-2.json").write_text("{}")
    (out / "checkpoints" / "round-3.npz").write_bytes(b"cut short")  # no manifest: never committed
    (out / "events.jsonl").write_text('{"event": "resumed"}\n')
    (out / "fleet.json").write_text("{}")
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "models").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "models" / "round-1.pt").write_bytes(b"round 1")
    (run_dir / "checkpoints" / "round-2.npz").write_bytes(b"orphan of a cut commit")
    (run_dir / "events.jsonl").write_text('{"event": "started"}\n')
    host = LocalHost("aggregator", "aggregator", tmp_path / "agg", "127.0.0.1")
    kept = collect.merge(host, str(out), run_dir, 2, "events-attempt-2.jsonl")
    assert kept == ["models/round-1.pt"]
    assert (run_dir / "models" / "round-1.pt").read_bytes() == b"round 1"
    assert (run_dir / "models" / "round-2.pt").read_bytes() == b"round 2"
    assert (run_dir / "checkpoints" / "round-2.npz").read_bytes() == b"whole"  # the orphan replaced
    assert not (run_dir / "checkpoints" / "round-3.npz").exists()
    assert (run_dir / "events.jsonl").read_text() == '{"event": "started"}\n'
    assert (run_dir / "events-attempt-2.jsonl").read_text() == '{"event": "resumed"}\n'
    assert (run_dir / "attempt-2" / "fleet.json").exists()


def test_a_proxy_that_stops_fails_the_run_like_the_superlink(clock: list[float]):
    f, hosts, _, _ = started(clock)
    hosts["aggregator"].programs[PROXY] = "EXITED"
    with pytest.raises(RunFailed, match=r"flower-proxy on aggregator .* is EXITED"):
        f.check()
