"""`fedfleet vms`: the probe playbook on the local stack's VMs and the verdict per VM."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedfleet.adapters import ansible
from fedfleet.core.errors import ConfigError
from fedfleet.core.stack import load_stack
from fedfleet.sandbox import local_config, scratch_project
from fedfleet.stages.probe import free_disk_gib

from .test_cli_errors import assert_nothing_left, earlier_run


def vms(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedfleet", "--project", str(project), "vms", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_vms_probes_every_vm_and_says_which_would_serve(tmp_path: Path):
    config = local_config(vms_per_participant=3)
    config["fedfleet:participants"][0]["vms"][1]["state"] = "stopped"  # us-vm-2: inactive
    config["fedfleet:participants"][1]["vms"][0]["vcpu"] = 1  # asia-vm-1: too small
    config["fedfleet:orchestrator"] = {"minVcpu": 2, "minMemoryGib": 4, "probeTimeoutSeconds": 10}
    project = scratch_project(tmp_path / "p", config)

    done = vms(project, "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["vm"]: r for r in json.loads(done.stdout)["vms"]}
    assert len(rows) == 9
    assert (
        rows["us-vm-2"]["reachable"] is False and rows["us-vm-2"]["why_not"] == "inactive: the VM is stopped"
    )
    assert rows["asia-vm-1"]["reachable"] is True
    assert rows["asia-vm-1"]["why_not"] == "below the minimum: 1 vCPU < 2"
    # Who serves, and the failover order after it (the rotation starts at each first VM).
    assert {vm for vm, r in rows.items() if r["pick"] == 1} == {"us-vm-1", "asia-vm-2", "eu-vm-1"}
    assert rows["us-vm-3"]["pick"] == 2 and rows["eu-vm-3"]["pick"] == 3
    assert all(r["free_disk_gib"] > 0 for r in rows.values() if r["reachable"])


def test_free_disk_is_read_from_the_mount_that_holds_the_home():
    facts = {
        "ansible_mounts": [
            {"mount": "/", "size_available": 10 * 2**30},
            {"mount": "/srv", "size_available": 200 * 2**30},
            {"mount": "/srv/other", "size_available": 1 * 2**30},
        ]
    }
    assert free_disk_gib(facts, "/srv/fedfleet") == 200
    assert free_disk_gib(facts, "/opt/fedfleet") == 10
    assert free_disk_gib({}, "/opt") is None


def test_orchestrator_keys_are_checked(tmp_path: Path):
    config = local_config()
    config["fedfleet:orchestrator"] = {"minVcpu": 0}
    project = scratch_project(tmp_path / "p", config)
    with pytest.raises(ConfigError, match=r"fedfleet:orchestrator\.minVcpu"):
        load_stack(project, "local")
    config["fedfleet:orchestrator"] = {"minVCPU": 2}
    scratch_project(tmp_path / "p", config)
    with pytest.raises(ConfigError, match=r"minVCPU"):
        load_stack(project, "local")


def test_a_run_without_a_usable_vm_for_a_participant_starts_nothing(tmp_path: Path):
    config = local_config(vms_per_participant=2)
    config["fedfleet:participants"][2]["vms"][0]["state"] = "stopped"
    config["fedfleet:participants"][2]["vms"][1]["memoryGib"] = 1
    config["fedfleet:orchestrator"] = {"minMemoryGib": 2}
    project = scratch_project(tmp_path / "p", config)
    before = earlier_run(project)
    done = subprocess.run(
        [sys.executable, "-m", "fedfleet", "--project", str(project), "run"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 4, done.stderr
    err = " ".join(done.stderr.split())
    assert "participant 'hospital-eu' has no usable VM" in err
    assert "eu-vm-1: inactive: the VM is stopped" in err
    assert "eu-vm-2: below the minimum: 1 GiB memory < 2" in err
    assert "No process was started" in err
    assert_nothing_left(project, before)


def test_a_probe_that_hangs_ends_at_its_deadline():
    # A "VM" that accepts SSH connections and then says nothing, beside a healthy one.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        port = hung.getsockname()[1]
        participant = {
            "hung-vm": {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": port},
            "ok-vm": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        }
        hosts = {
            "all": {
                "vars": {"fedfleet_probe_timeout": 3},
                "children": {"participants": {"children": {"participant_x": {"hosts": participant}}}},
            }
        }
        result = ansible.apply(ansible.PROBE, hosts, check=False)
    (problem,) = result.problems
    assert problem.host == "hung-vm" and "Timed out after 3 second(s)" in problem.message
    assert set(result.facts) == {"ok-vm"}
