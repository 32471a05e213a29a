"""The whole Pulumi program under mocks for every shipped stack; config errors before any resource."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path

import pytest

from fedfleet.core.catalog import load_catalog
from fedfleet.core.cloudplan import infra_plan
from fedfleet.core.errors import ConfigError
from fedfleet.core.inventory import Inventory
from fedfleet.core.stack import load_stack, parse_stack
from fedfleet.sandbox import REPO

from .infra_harness import Recorder, run_program, stack_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CLOUD_STACKS = ["dev", "prod"]


def bastions(rec: Recorder) -> list[str]:
    """The names of the VMs with the role "bastion", whatever the cloud (labels on GCP)."""
    vms = [
        (r, "tags")
        for r in rec.of("aws:ec2/instance:Instance") + rec.of("azure-native:compute:VirtualMachine")
    ]
    vms += [(r, "labels") for r in rec.of("gcp:compute/instance:Instance")]
    return sorted(r.name for r, key in vms if r.inputs[key]["role"] == "bastion")


def ingress_sources(rec: Recorder) -> list[tuple[str, str]]:
    """(resource, source range) for every inbound allow rule, whatever the cloud."""
    out = []
    for r in rec.of("aws:ec2/securityGroup:SecurityGroup"):
        out += [(r.name, cidr) for rule in r.inputs.get("ingress", []) for cidr in rule.get("cidrBlocks", [])]
    for r in rec.of("gcp:compute/firewall:Firewall"):
        if r.inputs.get("direction", "INGRESS") == "INGRESS" and r.inputs.get("allows"):
            out += [(r.name, cidr) for cidr in r.inputs.get("sourceRanges", [])]
    for r in rec.of("azure-native:network:NetworkSecurityGroup"):
        for rule in r.inputs.get("securityRules", []):
            if rule.get("direction") == "Inbound" and rule.get("access") == "Allow":
                prefixes = rule.get("sourceAddressPrefixes") or [rule.get("sourceAddressPrefix")]
                out += [(f"{r.name}/{rule.get('name')}", p) for p in prefixes if p]
    return out


@pytest.mark.parametrize("name", CLOUD_STACKS)
def test_shipped_cloud_stack_builds_under_mocks(name: str):
    stack = load_stack(REPO, name)
    rec, exported = run_program(stack_config(name), stack=name)
    inventory = Inventory.from_dict(exported["inventory"])
    # One site per participant, every VM of the stack file in the inventory, none public.
    assert list(inventory.participants) == [p.name for p in stack.participants]
    for participant in stack.participants:
        vms = inventory.participants[participant.name]
        assert [vm.name for vm in vms] == [v.name for v in participant.vms]
        assert all(vm.public_ip is None and vm.private_ip for vm in vms)
        assert {(vm.cloud, vm.region) for vm in vms} == {(participant.cloud, participant.region)}
    # One bastion per site; the controller reaches each site's VMs through it, as the admin user.
    assert bastions(rec) == sorted(f"site-{p.name}-bastion-vm" for p in stack.participants)
    assert stack.operator is not None
    bastion_ips = set()
    for vms in inventory.participants.values():
        (jump,) = {vm.jump_host for vm in vms}
        user, _, ip = str(jump).partition("@")
        assert user == stack.operator.admin_user, jump
        bastion_ips.add(ipaddress.ip_address(ip))
    assert len(bastion_ips) == len(stack.participants)
    agg = inventory.aggregator
    assert (agg.cloud, agg.region, agg.instance_type) == (
        stack.aggregator.cloud, stack.aggregator.region, stack.aggregator.instance_type,
    )  # fmt: skip
    assert agg.address and agg.port == stack.aggregator.port
    # An explicit provider per (cloud, region); every component uses one.
    providers = [r for r in rec.resources if r.typ.startswith("pulumi:providers:")]
    assert len(providers) == len(
        {(p.cloud, p.region) for p in stack.participants} | {(agg.cloud, agg.region)}
    )
    # Nothing is open to the whole internet; the SuperLink port only to the sites' NAT addresses.
    for resource, source in ingress_sources(rec):
        assert source not in ("0.0.0.0/0", "*", "Internet", "Any"), resource
        assert ipaddress.ip_network(source).num_addresses <= 2**16, (resource, source)


def test_local_stack_is_not_a_pulumi_stack():
    rec = Recorder()
    with pytest.raises(ConfigError, match=r"is a local stack .* not provisioned with Pulumi"):
        run_program(stack_config("local"), stack="local", recorder=rec)
    assert rec.resources == []


def _prod() -> dict:
    return copy.deepcopy(stack_config("prod"))


def _plan(config: dict, tmp_path: Path):
    return infra_plan(parse_stack("prod", tmp_path / "stacks" / "Pulumi.prod.yaml", config), load_catalog())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda c: c["fedfleet:participants"][0].update(cloud="ibm"),
            r"participants\[0\]\.cloud: must be one of aws, gcp, azure \(got 'ibm'\)",
        ),
        (
            lambda c: c["fedfleet:participants"][1].update(cidr="10.300.0.0/16"),
            r"participants\[1\]\.cidr: '10.300.0.0/16' is not a CIDR block",
        ),
        (
            lambda c: c["fedfleet:participants"][1].update(cidr="10.20.128.0/20"),
            r"participants\[1\]\.cidr: 10.20.128.0/20 overlaps fedfleet:participants\[0\]\.cidr",
        ),
        (
            lambda c: c["fedfleet:participants"][2]["vms"][1].update(name="us-vm-1"),
            r"vms\[1\]\.name: VM name 'us-vm-1' is already used",
        ),
        (
            lambda c: c["fedfleet:participants"][1].update(vms=[]),
            r"participants\[1\]\.vms: participant 'hospital-asia' has no VMs",
        ),
        (
            lambda c: c["fedfleet:participants"][0].update(region="us-east-9"),
            r"participants\[0\]\.region: 'us-east-9' is not a aws region in the catalog \(closest: us-east-",
        ),
        (
            lambda c: c["fedfleet:participants"][0]["vms"][0].update(instanceType="m6i.xlarg"),
            r"vms\[0\]\.instanceType: 'm6i.xlarg' is not priced in aws us-east-1 \(closest: m6i.xlarge",
        ),
        (
            lambda c: c["fedfleet:participants"][0]["vms"][0].update(vcpu=96),
            r"vms\[0\]: no instance type in aws us-east-1 has 96 vCPU",
        ),
        (
            lambda c: c["fedfleet:aggregator"].update(instanceType="t3.tiny"),
            r"aggregator\.instanceType: 't3.tiny' is not priced in",
        ),
        (lambda c: c.pop("fedfleet:operator"), r"fedfleet:operator: is required for a cloud stack"),
        (
            lambda c: c["fedfleet:operator"].update(cidr="0.0.0.0/0"),
            r"operator\.cidr: 0.0.0.0/0 would open SSH to the whole internet",
        ),
        (
            lambda c: c["fedfleet:operator"].update(sshPublicKey="-----BEGIN OPENSSH PRIVATE KEY-----"),
            r"operator\.sshPublicKey: must be an OpenSSH public key",
        ),
        (
            lambda c: [c["fedfleet:aggregator"].pop(k) for k in ("cloud", "region", "instanceType")],
            r"aggregator: has no cloud, region and instanceType yet; run `fedfleet plan --stack prod`",
        ),
    ],
)
def test_bad_stack_config_names_file_and_key(tmp_path: Path, change, match: str):
    config = _prod()
    change(config)
    with pytest.raises(ConfigError, match=match) as info:
        _plan(config, tmp_path)
    assert "Pulumi.prod.yaml" in str(info.value)


def test_bad_config_stops_the_program_before_any_resource():
    config = _prod()
    config["fedfleet:participants"][0]["cidr"] = "not-a-cidr"
    rec = Recorder()
    with pytest.raises(ConfigError, match=r"participants\[0\]\.cidr"):
        run_program(config, stack="prod", recorder=rec)
    assert rec.resources == []


def test_gcp_project_is_required_for_gcp_sites():
    config = _prod()
    del config["gcp:project"]
    rec = Recorder()
    with pytest.raises(ConfigError, match=r"gcp:project: is required"):
        run_program(config, stack="prod", recorder=rec)
    assert rec.resources == []


def test_vm_sizes_become_the_cheapest_fitting_type(tmp_path: Path):
    plan = _plan(_prod(), tmp_path)
    catalog = load_catalog()
    for site in plan.sites:
        for vm in site.vms:
            chosen = catalog.prices[(site.cloud, site.region, vm.instance_type)]
            fits = [p for (c, r, _), p in catalog.prices.items()
                    if (c, r) == (site.cloud, site.region) and p.vcpu >= vm.vcpu and p.memory_gib >= vm.memory_gib]  # fmt: skip
            assert chosen.usd_per_hour == min(p.usd_per_hour for p in fits)


def test_names_too_long_for_the_cloud_are_refused(tmp_path: Path):
    config = _prod()
    config["fedfleet:participants"][1]["name"] = "hospital-of-the-very-long-name-asia"
    config["fedfleet:participants"][1]["vms"][0]["name"] = "asia-virtual-machine-one"
    with pytest.raises(
        ConfigError, match=r"participants\[1\]\.vms\[0\]\.name: resource names .* over gcp's 63"
    ):
        _plan(config, tmp_path)


def test_a_pulumi_test_without_the_decorator_fails(tmp_path: Path):
    """Returning an Output from a plain test would pass silently; the project's pytest config makes it fail."""
    import subprocess
    import sys

    (tmp_path / "test_forgotten.py").write_text(
        "import pulumi\n\ndef test_forgot_decorator():\n    return pulumi.Output.from_input(1)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
         "--rootdir", str(tmp_path), str(tmp_path / "test_forgotten.py")],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "PytestReturnNotNoneWarning" in result.stdout


def test_a_mixed_stack_creates_the_aggregator_and_no_vm_for_machines_given_by_address():
    """A cloud aggregator with one participant on its own machines: Pulumi creates nothing for
    that participant, and the aggregator's firewall admits the range its machines come from."""
    config = _prod()
    config["fedfleet:participants"][2] = {
        "name": "hospital-eu",
        "location": {"lat": 52.37, "lon": 4.90},
        "egressCidr": "198.51.100.0/28",
        "ssh": {"user": "fl", "keyFile": "~/.ssh/fedfleet_ed25519"},
        "vms": [
            {"name": "eu-ws-1", "address": "198.51.100.5"},
            {"name": "eu-ws-2", "address": "198.51.100.6"},
        ],
    }
    rec, exported = run_program(config, stack="prod")
    inventory = Inventory.from_dict(exported["inventory"], partial=True)
    assert list(inventory.participants) == ["hospital-us", "hospital-asia"]  # fedfleet up adds the rest
    assert not [r for r in rec.resources if "eu-" in r.name or r.typ.startswith("azure-native:")]
    aggregator_rules = [src for resource, src in ingress_sources(rec) if resource.startswith("aggregator")]
    assert "198.51.100.0/28" in aggregator_rules
    assert inventory.aggregator is not None and inventory.aggregator.address


def test_every_created_site_gets_a_bastion_of_the_cheapest_type(tmp_path: Path):
    plan = _plan(_prod(), tmp_path)
    catalog = load_catalog()
    for site in plan.sites:
        assert site.bastion_type is not None
        chosen = catalog.prices[(site.cloud, site.region, site.bastion_type)]
        here = [p for (c, r, _), p in catalog.prices.items() if (c, r) == (site.cloud, site.region)]
        assert chosen.usd_per_hour == min(p.usd_per_hour for p in here)


def test_a_site_without_a_bastion_is_reached_another_way():
    """`bastion: false`: no bastion for that site, and its VMs have no jump host."""
    config = _prod()
    config["fedfleet:participants"][1]["bastion"] = False
    rec, exported = run_program(config, stack="prod")
    inventory = Inventory.from_dict(exported["inventory"])
    assert bastions(rec) == ["site-hospital-eu-bastion-vm", "site-hospital-us-bastion-vm"]
    assert [vm.jump_host for vm in inventory.participants["hospital-asia"]] == [None, None]
    assert not [r for r in rec.resources if r.name.startswith("site-hospital-asia-bastion")]
    assert all(vm.jump_host for p in ("hospital-us", "hospital-eu") for vm in inventory.participants[p])
