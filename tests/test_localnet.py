"""The local stack's namespaces mode without creating anything: its keys, addresses,
names, the inventory it gives Ansible, the link check, and the error where it cannot run.

(The mode itself, with namespaces, a bridge and a cut link, is exercised end to end in
tests/test_e2e.py::test_a_vm_whose_network_link_is_cut_is_replaced.)
"""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path

import pytest

from fedfleet.adapters import netns as localnet
from fedfleet.core import network
from fedfleet.core.errors import ConfigError, EnvironmentProblem
from fedfleet.core.stack import load_stack
from fedfleet.hosts.local import link_answers
from fedfleet.sandbox import local_config, scratch_project
from fedfleet.stages import provision

from .conftest import Local


def _namespaced(subnet: str = "10.231.5.0/24", vms_per_participant: int = 2) -> dict:
    config = local_config(vms_per_participant=vms_per_participant)
    config["fedfleet:local"] |= {"network": "namespaces", "subnet": subnet}
    return config


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("network", "bridged", r"fedfleet:local\.network: must be one of loopback, namespaces"),
        ("subnet", "10.231.5.0/33", r"fedfleet:local\.subnet: '10\.231\.5\.0/33' is not a network"),
        ("subnet", "8.8.8.0/24", r"fedfleet:local\.subnet: 8\.8\.8\.0/24 must be a private IPv4 network"),
        (
            "subnet",
            "127.0.0.0/24",
            r"fedfleet:local\.subnet: 127\.0\.0\.0/24 must be a private IPv4 network \(RFC 1918",
        ),
        (
            "subnet",
            "10.231.5.0/29",
            r"fedfleet:local\.subnet: 10\.231\.5\.0/29 must be a private IPv4 network",
        ),
    ],
)
def test_bad_network_keys_are_named(make_project, key, value, match):
    config = _namespaced()
    config["fedfleet:local"][key] = value
    with pytest.raises(ConfigError, match=match) as info:
        load_stack(make_project(config), "local")
    assert "Pulumi.local.yaml" in str(info.value)


def test_a_subnet_too_small_for_the_vms_is_named(make_project):
    project = make_project(_namespaced("10.231.5.0/28", vms_per_participant=5))  # 14 addresses, 16 needed
    with pytest.raises(ConfigError, match=r"local\.subnet: 10\.231\.5\.0/28 has too few addresses .* 15 VMs"):
        load_stack(project, "local")


def test_the_bridge_and_vms_get_the_subnets_addresses_in_order(make_project):
    project = make_project(_namespaced())
    stack = load_stack(project, "local")
    net = provision.network(stack, project)
    assert net is not None
    assert net.gateway == "10.231.5.1" and net.prefixlen == 24
    assert list(net.vms.items())[:3] == [
        ("us-vm-1", "10.231.5.2"),
        ("us-vm-2", "10.231.5.3"),
        ("asia-vm-1", "10.231.5.4"),
    ]
    names = [net.bridge] + [net.host_interface(vm) for vm in net.vms]
    assert len(set(names)) == len(names) and all(len(n) <= 15 for n in names)  # Linux's limit
    # Another stack root: other names, so two stacks never share a namespace.
    other = network.plan(stack, project / "elsewhere")
    assert other is not None and other.tag != net.tag
    # The loopback mode has no network to make.
    assert provision.network(load_stack(make_project(local_config()), "local"), project) is None


def test_the_inventory_puts_each_vm_in_its_namespace_and_the_superlink_on_the_bridge(make_project):
    project = make_project(_namespaced())
    stack = load_stack(project, "local")
    net = provision.network(stack, project)
    local = Local(project)  # the addresses, nothing created
    inventory = local.inventory
    assert inventory.aggregator.address == "10.231.5.1"
    assert inventory.vm("eu-vm-2").private_ip == net.vms["eu-vm-2"]
    hosts = local.ansible()["all"]
    assert hosts["vars"]["flower_supernode_superlink"] == f"10.231.5.1:{stack.aggregator.port}"
    assert hosts["children"]["aggregator"]["hosts"]["aggregator"]["flower_superlink_host"] == "10.231.5.1"
    vms = hosts["children"]["participants"]["children"]["participant_hospital_eu"]["hosts"]
    assert vms["eu-vm-2"]["flower_common_netns"] == net.namespace("eu-vm-2")
    assert vms["eu-vm-2"]["flower_supernode_runtime_host"] == "127.0.0.1"  # the namespace's own loopback


def test_without_root_the_mode_says_what_to_do(make_project, monkeypatch):
    project = make_project(_namespaced())
    stack = load_stack(project, "local")
    monkeypatch.setattr(localnet.os, "geteuid", lambda: 1000)
    with pytest.raises(EnvironmentProblem, match=r"local\.network is namespaces, but creating network "
                       r"namespaces needs root\. .* set fedfleet:local\.network to loopback"):  # fmt: skip
        provision.up_local(stack, project)


def test_the_link_check_tells_an_answering_host_from_a_silent_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert link_answers("127.0.0.1", server.getsockname()[1], timeout=1.0)
        free = server.getsockname()[1]
    # Nothing listens there any more: the host's refusal is an answer too.
    assert link_answers("127.0.0.1", free, timeout=1.0)
    # A listener whose queue is full drops new connections unanswered, as a cut link does.
    with socket.socket() as full, socket.socket() as first:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        first.connect(full.getsockname())  # fills the queue (never accepted)
        started = time.monotonic()
        assert not link_answers("127.0.0.1", full.getsockname()[1], timeout=0.5)
        assert time.monotonic() - started < 5  # bounded by its timeout


def test_the_network_is_made_once_refused_on_a_taken_subnet_and_removed_whole(make_project, tmp_path):
    if why := localnet.why_unavailable():
        pytest.skip(f"network namespaces: {why}")
    subnet = f"10.232.{secrets.randbelow(200) + 20}.0/24"
    project = make_project(_namespaced(subnet))
    stack = load_stack(project, "local")
    net = provision.network(stack, project)
    try:
        provision.up_local(stack, project)
        provision.up_local(stack, project)  # again: nothing to add, nothing broken
        assert localnet.namespaces_left([net.tag]) == sorted(net.namespace(vm) for vm in net.vms)
        localnet.set_link(net, "us-vm-1", up=False)
        assert not link_answers(net.vms["us-vm-1"], timeout=0.5)
        assert link_answers(net.vms["us-vm-2"], timeout=0.5)  # refused: it answers
        provision.up_local(stack, project)  # a new run brings the cut link back
        assert link_answers(net.vms["us-vm-1"], timeout=0.5)
        # Another stack on the same subnet would steal these VMs' replies: refused, named.
        other = scratch_project(tmp_path / "other", _namespaced(subnet))
        with pytest.raises(EnvironmentProblem, match=rf"local\.subnet {subnet} overlaps .* on {net.bridge}"):
            provision.up_local(load_stack(other, "local"), other)
        assert localnet.namespaces_left([network.tag_for(other / ".fedfleet" / "local")]) == []
        # Removal goes by the stack root's tag: also the VMs the stack file no longer lists.
        shrunk = _namespaced(subnet, vms_per_participant=1)
        scratch_project(project, shrunk)
        removed = provision.down_network(load_stack(project, "local"), project)
        assert len(removed) == 6
        assert localnet.namespaces_left([net.tag]) == [] and not Path("/sys/class/net", net.bridge).exists()
    finally:
        localnet.remove(net.tag)
