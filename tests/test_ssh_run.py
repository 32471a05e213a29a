"""`fedfleet configure` and `fedfleet run` on real hosts over SSH (a stack of hosts you have).

The lab (tests/sshlab.py): an aggregator and 3 participants with 2 VMs each, every host
a network namespace with its own sshd; fedfleet runs in a controller namespace and
reaches them only over SSH, with host keys checked. No host has a route to anywhere
else: eu-vm-1 installs Flower and torch into its own environment from the controller's
wheel cache, the others use the controller's environment (already installed).

- configure installs offline; a run after it changes nothing on the hosts, and SIGTERM
  stops it everywhere;
- a whole run: 2 rounds, a serving VM killed (sshd, supervisor, services) as round 2
  starts and replaced, accuracy up, every model, the events and the logs back here;
- a run past an unreachable VM, a wrong key, a changed host key, a host without Python,
  one whose disk is too small for the install and one whose SuperNode port another
  program holds (each its own message, the next VM serves), with one serving VM's link
  cut as round 2 starts and replaced.
After each: nothing left running on any host.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fedfleet_app.data import write_demo
from fedfleet_app.task import build_model
from ruamel.yaml import YAML

from fedfleet.core.paths import stack_paths
from fedfleet.core.stack import load_stack
from fedfleet.sandbox import scratch_project
from fedfleet.stages import configure

from .controlapi import assert_participant_refused, participant_attempts
from .sshlab import Lab, host_entry, why_skip

# One lab, its tests in order (`make test` runs the e2e tests in one process).
pytestmark = [pytest.mark.e2e, pytest.mark.ssh]  # `make test-ssh`

VMS = ("us-vm-1", "us-vm-2", "asia-vm-1", "asia-vm-2", "eu-vm-1", "eu-vm-2")
PARTICIPANTS = {"hospital-us": "us", "hospital-asia": "asia", "hospital-eu": "eu"}
LOCATIONS = {
    "hospital-us": {"cloud": "aws", "region": "us-east-1"},
    "hospital-asia": {"cloud": "gcp", "region": "asia-northeast3"},
    "hospital-eu": {"cloud": "azure", "region": "westeurope"},
}
PORT = 9443


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if why := why_skip():
        pytest.skip(why)
    root = tmp_path_factory.mktemp("lab")
    tiny = root / "tiny"  # a disk too small for the install (mounted before any sshd starts)
    tiny.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(tiny)], check=False).returncode
        == 0
    )
    hosts = {"agg": "", **dict.fromkeys(VMS, "")}
    lab = Lab(root, hosts)
    lab.hosts = {name: f"{lab.subnet}.{11 + i}" for i, name in enumerate(hosts)}
    lab.tiny = tiny if mounted else None
    write_demo(
        [root / "data" / p for p in PARTICIPANTS], iid=False, alpha=1.0, seed=42, test_fraction=0.2
    )  # each site's own data, already on its machines
    try:
        yield lab.start()
    finally:
        lab.stop()
        if mounted:
            subprocess.run(["umount", str(tiny)], check=False)


def stack(lab: Lab, vms: dict[str, list[dict[str, Any]]], **extra: Any) -> dict[str, Any]:
    return {
        "fedfleet:ssh": {"user": "root", "keyFile": str(lab.key), "connectTimeoutSeconds": 5},
        "fedfleet:aggregator": {"port": PORT, **host_entry(lab, "agg")},
        "fedfleet:participants": [
            {
                "name": participant,
                "location": LOCATIONS[participant],
                "dataPath": str(lab.root / "data" / participant),
                "vms": vms[participant],
            }
            for participant in PARTICIPANTS
        ],
        "fedfleet:app": {
            "num-server-rounds": 2,
            "classes": [str(c) for c in range(10)],
            "image-size": 8,
            "channels": 1,
            "local-epochs": 2,
            "learning-rate": 0.05,
        },
        "fedfleet:orchestrator": {"probeTimeoutSeconds": 10, "connectTimeoutSeconds": 60},
        **extra,
    }


def two_vms(lab: Lab) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for participant, short in PARTICIPANTS.items():
        out[participant] = [{"name": f"{short}-vm-{i}", **host_entry(lab, f"{short}-vm-{i}")} for i in (1, 2)]
    # eu-vm-1 installs into an environment of its own, from the wheel cache (no index).
    out["hospital-eu"][0] = {"name": "eu-vm-1", **host_entry(lab, "eu-vm-1", install=True)}
    del out["hospital-eu"][0]["venv"]
    return out


@pytest.fixture(scope="module")
def project(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = scratch_project(
        tmp_path_factory.mktemp("ssh-project") / "p", stack(lab, two_vms(lab)), stack="lab"
    )
    # The operator's machine builds the wheel cache from its package index (the lab's
    # controller namespace, like the hosts, has none: it reaches only the hosts).
    configure.wheel_cache(stack_paths(load_stack(directory, "lab"), directory))
    return directory


def write_stack(project: Path, name: str, config: dict[str, Any]) -> None:
    with (project / "stacks" / f"Pulumi.{name}.yaml").open("w") as fh:
        YAML().dump({"config": config}, fh)


def events(lab: Lab) -> list[dict[str, Any]]:
    found = sorted((lab.home("agg") / "runs").glob("*/events.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        return []
    return [json.loads(line) for line in found[-1].read_text().splitlines() if line.strip()]


def wait_for_round(lab: Lab, proc: subprocess.Popen[str], n: int, after: float) -> None:
    deadline = time.monotonic() + 400
    while not any(e["event"] == "round-start" and e["round"] == n and e["time"] > after for e in events(lab)):
        if proc.poll() is not None:
            raise AssertionError(
                f"fedfleet exited ({proc.returncode}) before round {n}: {proc.stderr.read()}"
            )
        assert time.monotonic() < deadline, f"round {n} did not start"
        time.sleep(0.2)


def logins(lab: Lab, host: str) -> int:
    return (lab.root / "logs" / f"sshd-{host}.log").read_text().count("Accepted publickey")


def test_configure_installs_offline_then_a_run_changes_nothing_and_sigterm_stops_it(lab: Lab, project: Path):
    up = lab.fedfleet(project, "up", "--stack", "lab", "--json")
    assert up.returncode == 0, up.stderr
    inventory = json.loads(up.stdout)
    assert inventory["aggregator"]["address"] == lab.hosts["agg"]
    assert [vm["private_ip"] for vm in inventory["participants"]["hospital-eu"]] == [
        lab.hosts["eu-vm-1"], lab.hosts["eu-vm-2"],
    ]  # fmt: skip
    # eu-vm-1 has no route to any index: only the wheels the controller copies over.
    routes = subprocess.run(
        ["ip", "-n", lab.ns("eu-vm-1"), "route"], capture_output=True, text=True, check=True
    )
    assert "default" not in routes.stdout

    # Another program holds the proxy's port on the aggregator: configuring it names the host,
    # the port and the stack key, and starts no SuperLink there.
    squatter = lab.squat("agg", PORT)
    try:
        taken = lab.fedfleet(project, "configure", "--stack", "lab", "--limit", "aggregator", timeout=600)
    finally:
        squatter.communicate("")  # its stdin closed: it exits
    said = " ".join(taken.stderr.split())
    assert taken.returncode == 6, taken.stderr
    assert f"port {PORT} on aggregator is already in use by another program" in said, said
    assert "fedfleet:aggregator.port in the stack file" in said, said
    assert not any(b"flower-superlink" in Path(f"/proc/{p}/cmdline").read_bytes() for p in lab.pids("agg"))

    first = lab.fedfleet(project, "configure", "--stack", "lab", "--json", timeout=1500)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert set(report["hosts"]) == {"aggregator", "us-vm-1", "asia-vm-1", "eu-vm-1"}
    venv = lab.home("eu-vm-1") / "venv"
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import flwr, torch; print(flwr.__version__, torch.__version__)"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert installed.stdout.split() == ["1.41.0", "2.13.0+cpu"], installed.stderr
    # eu-vm-1's SuperNode runs from that environment, the SuperLink in the aggregator's namespace.
    running = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in lab.pids("eu-vm-1")}
    assert any(str(venv / "bin" / "flower-supernode").encode() in c for c in running.values())
    assert any(b"flower-superlink" in Path(f"/proc/{p}/cmdline").read_bytes() for p in lab.pids("agg"))
    # From a participant's VM, with its CA certificate: the SuperLink's address serves the Fleet
    # API only, and the SuperLink's own port (the aggregator's loopback) is not reachable; the
    # operator's `flwr run` (through fedfleet's SSH tunnel to that port) is the run below.
    stack_file = load_stack(project, "lab")
    seen = participant_attempts(
        lab.hosts["agg"], PORT, stack_paths(stack_file, project).pki / "ca.crt", lab.root,
        inside=("ip", "netns", "exec", lab.ns("eu-vm-2")), internal=stack_file.aggregator.internal_port,
    )  # fmt: skip
    assert_participant_refused(seen, internal_closed=True)
    # The first contact with each host recorded its key; the private key was never sent.
    known = project / ".fedfleet" / "lab" / "known_hosts"
    for h in ("agg", "us-vm-1", "asia-vm-1", "eu-vm-1"):
        found = subprocess.run(
            ["ssh-keygen", "-F", lab.hosts[h], "-f", str(known)], capture_output=True, check=False
        )
        assert found.returncode == 0, f"no key recorded for {h}"

    # A run configures again (the same site.yml through the same stage): nothing changes.
    # SIGTERM once its ServerApp runs: every host is left with nothing running.
    started = time.time()
    proc = lab.popen(project, "run", "--stack", "lab", "--rounds", "2", "--json")
    try:
        deadline = time.monotonic() + 400
        while not any(e["event"] == "started" and e["time"] > started for e in events(lab)):
            assert proc.poll() is None, f"fedfleet exited ({proc.returncode}): {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the ServerApp did not start"
            time.sleep(0.2)
        proc.terminate()
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    assert proc.returncode == 130, err
    (summary_file,) = (project / "runs").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "interrupted"
    assert summary["configure"]["changed"] == 0, summary["configure"]["changes"]
    assert lab.left_running() == {}


def test_a_whole_run_over_ssh_replaces_a_vm_killed_as_round_2_starts(lab: Lab, project: Path):
    # From each participant's first VM, whatever the test before it left (it failing included).
    stack_paths(load_stack(project, "lab"), project).rotation.unlink(missing_ok=True)
    before = logins(lab, "agg")
    started = time.time()
    proc = lab.popen(project, "run", "--stack", "lab", "--rounds", "2", "--json")
    try:
        wait_for_round(lab, proc, 2, started)
        killed_at = time.time()
        lab.kill_host("asia-vm-1")  # its sshd, supervisor, SuperNode and worker
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(120)
        lab.start_sshd("asia-vm-1")  # the VM is back for the next test
        lab.wait_for_ssh("asia-vm-1")
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["aggregator"]["kind"] == "hosts"
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert rounds[2]["metrics"]["accuracy"] > rounds[0]["metrics"]["accuracy"]
    (lost,) = summary["orchestration"]["failovers"]
    assert lost["lost_vm"] == "asia-vm-1" and lost["replacement"] == "asia-vm-2"
    assert "asia-vm-1 (hospital-asia)" in lost["why"] and "SSH" in lost["why"]
    detected, online = lost["detected_at"] - killed_at, lost["replacement_online_at"] - killed_at
    print(
        f"killed asia-vm-1 over SSH: detected after {detected:.1f} s, replacement online after {online:.1f} s"
    )
    assert 0 <= detected < 10 and online < 60
    served = {r: {s["vm"] for s in rounds[r]["sites"]["train"]} for r in (1, 2)}
    assert served[1] == {"us-vm-1", "asia-vm-1", "eu-vm-1"}
    # The examples each site trained on, as the sites reported them.
    assert all(p["train_examples"] and p["test_examples"] for p in summary["participants"])
    # Every round's model, the events and each host's logs came back over SSH.
    run_dir = project / "runs" / summary["run_id"]
    for r in (0, 1, 2):
        build_model(1, 10).load_state_dict(torch.load(run_dir / rounds[r]["model"], weights_only=True))
    assert (run_dir / "events.jsonl").read_text().count('"round-end"') == 3
    for log in (
        "aggregator-flower-superlink.log",
        "asia-vm-2-flower-supernode.log",
        "eu-vm-1-flower-supernode.log",
    ):
        assert (run_dir / "logs" / log).stat().st_size > 0, log
    # The watch went over one connection per host, not a login per check.
    assert logins(lab, "agg") - before <= 2, "a new SSH login per check"
    # The operator's flwr reached the SuperLink through a tunnel over that connection.
    config = (project / ".fedfleet" / "lab" / "operator" / "flwr-home" / "config.toml").read_text()
    assert 'address = "127.0.0.1:' in config and f':{PORT}"' not in config
    assert lab.left_running() == {}


def test_bad_hosts_are_named_and_a_cut_link_is_replaced(lab: Lab, project: Path):
    vms = two_vms(lab)
    del vms["hospital-eu"][0]["install"]  # installed by the first test; reuse the controller's now
    vms["hospital-eu"][0]["venv"] = sys.prefix
    vms["hospital-us"][:0] = [
        {"name": "us-vm-0", **host_entry(lab, "us-vm-1", address=lab.ghost)},  # nothing answers there
        {"name": "us-vm-00", **host_entry(lab, "us-vm-1", python="/opt/none/bin/python3")},  # no Python 3
    ]
    asia_wrong_key = {
        "name": "asia-vm-0",
        **host_entry(lab, "asia-vm-1"),
        "ssh": {"keyFile": str(lab.wrong_key)},
    }
    vms["hospital-asia"].insert(0, asia_wrong_key)
    if lab.tiny is not None:  # a disk too small for the install: its next VM serves
        tiny = {"name": "asia-vm-00", **host_entry(lab, "asia-vm-1", home=str(lab.tiny), install=True)}
        tiny["ssh"] = {"port": 2222}
        del tiny["venv"]
        vms["hospital-asia"].insert(1, tiny)
    vms["hospital-eu"].insert(0, {"name": "eu-vm-0", **host_entry(lab, "eu-vm-1"), "ssh": {"port": 2222}})
    config = stack(lab, vms)
    config["fedfleet:orchestrator"]["minFreeDiskGib"] = 0
    write_stack(project, "lab-b", config)
    # eu-vm-0 was known with another key: as if the machine had been reinstalled since.
    known = project / ".fedfleet" / "lab-b" / "known_hosts"
    known.parent.mkdir(parents=True, exist_ok=True)
    fake = " ".join(Path(f"{lab.wrong_key}.pub").read_text().split()[:2])
    known.write_text(f"[{lab.hosts['eu-vm-1']}]:2222 {fake}\n")

    squatter = lab.squat("us-vm-1", 9094)  # another program on the SuperNode's runtime port
    started = time.time()
    proc = lab.popen(project, "run", "--stack", "lab-b", "--rounds", "2", "--json")
    try:
        wait_for_round(lab, proc, 2, started)
        cut_at = time.time()
        lab.cut_link("eu-vm-1")  # the VM runs on, unreachable
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(120)
        lab.restore_link("eu-vm-1")
        squatter.communicate("")  # its stdin closed: it exits
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    why = {vm["vm"]: vm["why_not"] or "" for p in summary["participants"] for vm in p["vms"]}
    assert "cannot be reached from this machine" in why["us-vm-0"]
    assert (
        "/opt/none/bin/python3 is not on the host" in why["us-vm-00"]
        and "install Python 3" in why["us-vm-00"]
    )
    assert "refused the login as 'root'" in why["asia-vm-0"] and str(lab.wrong_key) in why["asia-vm-0"]
    assert "host key is not the one recorded" in why["eu-vm-0"]
    assert "fedfleet trust eu-vm-0 --stack lab-b" in why["eu-vm-0"]
    tried = summary["orchestration"]["tried"]
    taken, us_next = tried["hospital-us"]
    assert taken["vm"] == "us-vm-1" and "port 9094 on us-vm-1 is already in use" in taken["error"]
    assert us_next == {**us_next, "vm": "us-vm-2", "error": ""}
    if "asia-vm-00" in why:
        assert why["asia-vm-00"] == ""  # it answered and has the size: it fails at the install
        first, second = tried["hospital-asia"]
        assert first["vm"] == "asia-vm-00" and "the install needs" in first["error"]
        assert second == {**second, "vm": "asia-vm-1", "error": ""}
    (cut,) = summary["orchestration"]["failovers"]
    assert cut["lost_vm"] == "eu-vm-1" and cut["replacement"] == "eu-vm-2"
    assert "does not answer over SSH" in cut["why"]
    detected, online = cut["detected_at"] - cut_at, cut["replacement_online_at"] - cut_at
    print(
        f"cut eu-vm-1's link over SSH: detected after {detected:.1f} s, replacement online after {online:.1f} s"
    )
    assert 0 <= detected < 10 and online < 60
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert rounds[2]["metrics"]["accuracy"] > rounds[0]["metrics"]["accuracy"]
    # `fedfleet trust`: eu-vm-0's new key is accepted once it answers; a host that does not
    # answer keeps the key recorded for it.
    ghost = f"{lab.ghost} {fake}"
    with known.open("a") as fh:
        fh.write(ghost + "\n")
    trusted = lab.fedfleet(project, "trust", "eu-vm-0", "us-vm-0", "--stack", "lab-b", "--json")
    assert trusted.returncode == 0, trusted.stderr
    eu, us = json.loads(trusted.stdout)
    real = subprocess.run(
        ["ssh-keygen", "-lf", str(lab.root / "sshd" / "eu-vm-1" / "host_key.pub")],
        capture_output=True, text=True, check=True,
    ).stdout.split()[1]  # fmt: skip
    assert eu["error"] is None and eu["forgot_old_key"] and real in eu["fingerprint"]
    assert us["error"] and "cannot be reached" in us["error"] and us["fingerprint"] is None
    lines = known.read_text().splitlines()
    assert ghost in lines and f"[{lab.hosts['eu-vm-1']}]:2222 {fake}" not in lines
    # What the run could not stop (the cut VM) is named with the command that does it later.
    assert summary["stop"]["unreachable"] == ["eu-vm-1"]
    stop = lab.fedfleet(project, *summary["stop"]["later"].split()[1:], "--json")
    assert stop.returncode == 0, stop.stderr
    # The agent the run had on eu-vm-1 sat on a connection the cut left half-open: it
    # leaves by itself once the controller stops pinging (30 s).
    deadline = time.monotonic() + 60
    while (left := lab.left_running()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == {}
