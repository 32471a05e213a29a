"""The Ansible inventory fedfleet generates from a stack, and how playbook failures read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedfleet import configure, localstack
from fedfleet.core.errors import ConfigError
from fedfleet.core.inventory import VM, AggregatorHost, Inventory
from fedfleet.core.stack import load_stack
from fedfleet.sandbox import REPO, local_config, scratch_project
from fedfleet.stages.probe import choose


def hosts_of(inventory: dict, group: str) -> dict:
    children = inventory["all"]["children"]
    if group == "participants":  # a group of one group per participant
        return {h: v for g in children["participants"]["children"].values() for h, v in g["hosts"].items()}
    return children[group]["hosts"]


def test_local_inventory_has_every_host_and_one_supernode_per_participant(tmp_path: Path):
    project = scratch_project(tmp_path / "p", local_config(vms_per_participant=2))
    stack = load_stack(project, "local")
    inventory = localstack.up(stack, project)
    chosen = {name: vms[0] for name, vms in inventory.participants.items()}
    hosts = configure.ansible_inventory(stack, inventory, project, chosen, flwr_bin="/x/flwr")

    shared = hosts["all"]["vars"]
    assert shared["ansible_connection"] == "local" and shared["flower_common_service_manager"] == "supervisor"
    assert shared["flower_common_install"] is False and shared["flower_common_venv"] == sys.prefix
    assert hosts_of(hosts, "supernodes") == {"us-vm-1": {}, "asia-vm-1": {}, "eu-vm-1": {}}
    every_vm = hosts_of(hosts, "participants")
    assert sorted(every_vm) == sorted(vm.name for vms in inventory.participants.values() for vm in vms)
    assert set(hosts["all"]["children"]["participants"]["children"]) == {
        "participant_hospital_us", "participant_hospital_asia", "participant_hospital_eu",
    }  # fmt: skip
    agg = hosts_of(hosts, "aggregator")["aggregator"]
    assert (
        agg["flower_superlink_port"] == stack.aggregator.port and agg["flower_superlink_host"] == "127.0.0.1"
    )
    us1 = every_vm["us-vm-1"]
    assert us1["flower_supernode_runtime_port"] == stack.participant("hospital-us").vms[0].port
    assert us1["flower_supernode_data_path"] == str(localstack.data_path(stack, project, "hospital-us"))
    assert Path(us1["flower_common_home"]) == localstack.paths(stack, project).vm_home("us-vm-1")
    assert len(us1["flower_supernode_worker_socket"]) <= 100
    # Paths to key material, never the material itself.
    assert "PRIVATE KEY" not in json.dumps(hosts)


def test_stopped_vms_are_not_chosen_and_runs_rotate(tmp_path: Path):
    config = local_config(vms_per_participant=3)
    config["fedfleet:participants"][1]["vms"][0]["state"] = "stopped"
    project = scratch_project(tmp_path / "p", config)
    stack = load_stack(project, "local")
    inventory = localstack.up(stack, project)
    served = []
    for _ in range(3):
        chosen, order, _ = choose(stack, inventory, project, advance=True)
        served.append(chosen["hospital-asia"].name)
        assert order["hospital-asia"][0] == chosen["hospital-asia"].name
    assert served == ["asia-vm-2", "asia-vm-3", "asia-vm-2"]
    # Without advancing (fedfleet configure), the choice stays where the rotation is.
    assert choose(stack, inventory, project, advance=False)[0]["hospital-asia"].name == "asia-vm-3"
    assert choose(stack, inventory, project, advance=False)[0]["hospital-asia"].name == "asia-vm-3"


def cloud_inventory() -> Inventory:
    def vm(name: str, participant: str, ip: str) -> VM:
        return VM(name, participant, "aws", "us-east-1", ip, None, 2, 4, 20, "t3.medium")

    return Inventory(
        "dev",
        AggregatorHost("aggregator", "aws", "us-east-1", "t3.medium", "198.51.100.7", 9443, private_ip="10.10.0.5"),
        {"hospital-a": (vm("a-vm-1", "hospital-a", "10.20.1.10"),),
         "hospital-b": (vm("b-vm-1", "hospital-b", "10.21.1.10"),)},
    )  # fmt: skip


def test_cloud_inventory_reaches_vms_over_ssh_with_systemd(tmp_path: Path):
    project = scratch_project(tmp_path / "p")
    (project / "stacks" / "Pulumi.dev.yaml").write_text((REPO / "stacks" / "Pulumi.dev.yaml").read_text())
    stack = load_stack(project, "dev")
    inventory = cloud_inventory()
    chosen = {name: vms[0] for name, vms in inventory.participants.items()}
    hosts = configure.ansible_inventory(stack, inventory, project, chosen, flwr_bin="flwr")
    shared = hosts["all"]["vars"]
    assert shared["ansible_user"] == "fedfleet" and shared["ansible_become"] is True
    assert (
        "ansible_connection" not in shared and "flower_common_service_manager" not in shared
    )  # systemd default
    assert shared["flower_supernode_superlink"] == "198.51.100.7:9443"
    assert Path(shared["flower_supernode_app_src"], "worker.py").exists()
    agg = hosts_of(hosts, "aggregator")["aggregator"]
    assert agg["ansible_host"] == "198.51.100.7" and agg["flower_superlink_host"] == "0.0.0.0"
    vm = hosts_of(hosts, "participants")["a-vm-1"]
    assert vm["ansible_host"] == "10.20.1.10"
    assert vm["flower_supernode_data_path"] == "/srv/fedfleet/sites/hospital-a/data"


def test_configure_a_cloud_stack_before_it_is_up_says_what_to_do(tmp_path: Path):
    project = scratch_project(tmp_path / "p")
    (project / "stacks" / "Pulumi.dev.yaml").write_text((REPO / "stacks" / "Pulumi.dev.yaml").read_text())
    with pytest.raises(ConfigError, match=r"has no inventory yet .*fedfleet up --stack dev"):
        configure.configure_stack(project, "dev")
    done = subprocess.run(
        [sys.executable, "-m", "fedfleet", "--project", str(project), "configure", "--stack", "dev"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "fedfleet up --stack dev" in done.stderr


def test_a_failed_loop_item_explains_itself():
    res = {
        "msg": "All items completed",
        "results": [
            {"item": "/a", "changed": False},
            {"item": "/b", "failed": True, "msg": "permission denied: /b"},
        ],
    }
    assert configure._message(res) == "permission denied: /b"
    assert "details hidden" in configure._message({"censored": "hidden", "msg": ""})
