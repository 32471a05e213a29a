"""The Ansible inventory fedfleet generates from a stack, and how playbook failures read."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from fedfleet import workflow
from fedfleet.adapters import ansible
from fedfleet.adapters.processes import ProcessGroup
from fedfleet.adapters.ssh import Endpoint, options
from fedfleet.core.errors import ConfigError
from fedfleet.core.inventory import VM, AggregatorHost, Inventory
from fedfleet.core.paths import data_path, stack_paths
from fedfleet.core.selection import Probe, Verdict
from fedfleet.core.stack import load_stack
from fedfleet.hosts import Hosts, for_stack
from fedfleet.hosts.ssh import SSHHost
from fedfleet.sandbox import REPO, local_config, scratch_project
from fedfleet.stages import configure
from fedfleet.stages.probe import choose

from .conftest import Local


def hosts_of(inventory: dict, group: str) -> dict:
    children = inventory["all"]["children"]
    if group == "participants":  # a group of one group per participant
        return {h: v for g in children["participants"]["children"].values() for h, v in g["hosts"].items()}
    return children[group]["hosts"]


def test_local_inventory_has_every_host_and_one_supernode_per_participant(tmp_path: Path):
    project = scratch_project(tmp_path / "p", local_config(vms_per_participant=2))
    local = Local(project)
    stack, inventory = local.stack, local.inventory
    hosts = local.ansible([vms[0].name for vms in inventory.participants.values()])

    shared = hosts["all"]["vars"]
    assert shared["flower_common_service_manager"] == "supervisor"
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
    assert us1["ansible_connection"] == "local"
    assert us1["flower_supernode_data_path"] == str(data_path(stack, project, "hospital-us"))
    assert Path(us1["flower_common_home"]) == stack_paths(stack, project).vm_home("us-vm-1")
    assert len(us1["flower_supernode_worker_socket"]) <= 100
    # Paths to key material, never the material itself.
    assert "PRIVATE KEY" not in json.dumps(hosts)


def test_stopped_vms_are_not_chosen_and_runs_rotate(tmp_path: Path):
    config = local_config(vms_per_participant=3)
    config["fedfleet:participants"][1]["vms"][0]["state"] = "stopped"
    project = scratch_project(tmp_path / "p", config)
    local = Local(project)
    # As the probe finds them: hospital-asia's first VM is stopped.
    verdicts = {
        p.name: [
            Verdict(
                Probe(vm.name, p.name, vm.state == "active", 2, 4, 10),
                "" if vm.state == "active" else "inactive",
            )
            for vm in p.vms
        ]
        for p in local.stack.participants
    }
    served = []
    for _ in range(3):
        chosen, order = choose(local.stack, local.inventory, local.paths, verdicts, advance=True)
        served.append(chosen["hospital-asia"].name)
        assert order["hospital-asia"][0] == chosen["hospital-asia"].name
    assert served == ["asia-vm-2", "asia-vm-3", "asia-vm-2"]
    # Without advancing (fedfleet configure), the choice stays where the rotation is.
    for _ in range(2):
        chosen, _ = choose(local.stack, local.inventory, local.paths, verdicts, advance=False)
        assert chosen["hospital-asia"].name == "asia-vm-3"


def cloud_inventory(jumps: dict[str, str] | None = None) -> Inventory:
    """A cloud stack's inventory; `jumps`: each participant's bastion ("user@address")."""

    def vm(name: str, participant: str, ip: str) -> VM:
        jump = (jumps or {}).get(participant)
        return VM(name, participant, "aws", "us-east-1", ip, None, 2, 4, 20, "t3.medium", jump_host=jump)

    return Inventory(
        "dev",
        AggregatorHost("aggregator", "aws", "us-east-1", "t3.medium", "198.51.100.7", 9443, private_ip="10.10.0.5"),
        {"hospital-a": (vm("a-vm-1", "hospital-a", "10.20.1.10"),),
         "hospital-b": (vm("b-vm-1", "hospital-b", "10.21.1.10"),)},
    )  # fmt: skip


def test_cloud_inventory_reaches_vms_over_ssh(tmp_path: Path):
    project = scratch_project(tmp_path / "p")
    (project / "stacks" / "Pulumi.dev.yaml").write_text((REPO / "stacks" / "Pulumi.dev.yaml").read_text())
    stack = load_stack(project, "dev")
    inventory = cloud_inventory()
    paths = stack_paths(stack, project)
    hosts = for_stack(stack, inventory, paths, ProcessGroup())
    ansible_hosts = configure.ansible_inventory(
        stack, inventory, paths, hosts, ["a-vm-1", "b-vm-1"], flwr_bin="flwr"
    )
    shared = ansible_hosts["all"]["vars"]
    assert shared["flower_supernode_superlink"] == "198.51.100.7:9443"
    with tarfile.open(shared["flower_supernode_app_src"]) as app:
        assert app.getmember("fedfleet_app/worker.py").isfile()
    assert "flwr==1.41.0" in shared["flower_common_packages"]
    agg = hosts_of(ansible_hosts, "aggregator")["aggregator"]
    assert agg["ansible_host"] == "198.51.100.7" and agg["flower_superlink_host"] == "0.0.0.0"
    # As the operator's admin user, through the host's one SSH connection, host keys checked
    # against the stack's own file; systemd where the host has it (sudo only for those tasks).
    assert agg["ansible_user"] == "fedfleet" and "ansible_become" not in agg
    assert agg["flower_common_service_manager"] == "auto"
    common = agg["ansible_ssh_common_args"]
    assert "ControlPath=" in common and "BatchMode=yes" in common and "ForwardAgent=no" in common
    assert f"UserKnownHostsFile={project / '.fedfleet' / 'dev' / 'known_hosts'}" in common
    assert "ControlPersist=no" in agg["ansible_ssh_args"]
    vm = hosts_of(ansible_hosts, "participants")["a-vm-1"]
    assert vm["ansible_host"] == "10.20.1.10"
    assert vm["flower_supernode_data_path"] == "/srv/fedfleet/sites/hospital-a/data"


BASTIONS = {"hospital-a": "fedfleet@203.0.113.20", "hospital-b": "fedfleet@203.0.113.21"}


def endpoint_of(hosts: Hosts, name: str) -> Endpoint:
    host = hosts[name]
    assert isinstance(host, SSHHost)
    return host.ep


def test_cloud_vms_are_reached_through_their_sites_bastion(tmp_path: Path):
    project = scratch_project(tmp_path / "p")
    (project / "stacks" / "Pulumi.dev.yaml").write_text((REPO / "stacks" / "Pulumi.dev.yaml").read_text())
    stack = load_stack(project, "dev")
    paths = stack_paths(stack, project)
    hosts = for_stack(stack, cloud_inventory(BASTIONS), paths, ProcessGroup())
    for name, bastion in (("a-vm-1", "203.0.113.20"), ("b-vm-1", "203.0.113.21")):
        ep = endpoint_of(hosts, name)
        assert ep.address.startswith("10.2") and isinstance(ep.jump, Endpoint)
        assert (ep.jump.user, ep.jump.address, ep.jump.port) == ("fedfleet", bastion, 22)
        # The same key and the same host-key checks as the VM behind it.
        assert (ep.jump.key_file, ep.jump.known_hosts) == (ep.key_file, ep.known_hosts)
        proxy = options(ep)[-1]
        assert proxy.startswith("ProxyCommand=ssh ") and proxy.endswith(f" fedfleet@{bastion}")
    assert endpoint_of(hosts, "aggregator").jump is None
    # Ansible goes the same way.
    ansible_hosts = configure.ansible_inventory(
        stack, cloud_inventory(BASTIONS), paths, hosts, [], flwr_bin="flwr"
    )
    vm = hosts_of(ansible_hosts, "participants")["a-vm-1"]
    assert vm["ansible_host"] == "10.20.1.10" and "fedfleet@203.0.113.20" in vm["ansible_ssh_common_args"]


def test_a_jump_host_in_the_stack_file_wins_over_the_bastion(tmp_path: Path):
    config = YAML(typ="safe").load((REPO / "stacks" / "Pulumi.dev.yaml").read_text())["config"]
    config["fedfleet:participants"][1]["ssh"] = {"jumpHost": "ops@vpn.hospital-b.example:2222"}
    project = scratch_project(tmp_path / "p", config, stack="dev")
    stack = load_stack(project, "dev")
    hosts = for_stack(stack, cloud_inventory(BASTIONS), stack_paths(stack, project), ProcessGroup())
    b = endpoint_of(hosts, "b-vm-1").jump
    assert b is not None and (b.user, b.address, b.port) == ("ops", "vpn.hospital-b.example", 2222)
    a = endpoint_of(hosts, "a-vm-1").jump
    assert a is not None and a.address == "203.0.113.20"


def test_an_inventory_saved_before_bastions_still_loads():
    saved = cloud_inventory().to_dict()
    for vms in saved["participants"].values():
        for vm in vms:
            del vm["jump_host"]
    inventory = Inventory.from_dict(saved)
    assert [vm.jump_host for vm in inventory.vms()] == [None, None]
    assert inventory == cloud_inventory()


def test_configure_a_cloud_stack_before_it_is_up_says_what_to_do(tmp_path: Path):
    project = scratch_project(tmp_path / "p")
    (project / "stacks" / "Pulumi.dev.yaml").write_text((REPO / "stacks" / "Pulumi.dev.yaml").read_text())
    with pytest.raises(ConfigError, match=r"has no inventory yet .*fedfleet up --stack dev"):
        workflow.configure_stack(project, "dev")
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
    assert ansible._message(res) == "permission denied: /b"
    assert "details hidden" in ansible._message({"censored": "hidden", "msg": ""})
