"""Azure components under Pulumi's mocks: resources, NSG rules, private VMs, tags, outputs."""

from __future__ import annotations

import base64
import functools
import importlib
import inspect
from collections import Counter
from dataclasses import replace
from typing import Any

import pulumi
import pytest

from fedfleet.core.cloudplan import AggregatorPlan, SitePlan, VmPlan
from fedfleet.core.stack import Operator

from .infra_harness import SSH_KEY, Recorder, Resource, declare

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

OPERATOR = Operator(SSH_KEY, "198.51.100.7/32")
SITE = SitePlan(
    "hospital-eu",
    "azure",
    "westeurope",
    "10.22.0.0/16",
    (VmPlan("eu-vm-1", "Standard_D4s_v5", 4, 16, 40), VmPlan("eu-vm-2", "Standard_B2s", 2, 4, 20)),
)
AGG = AggregatorPlan("azure", "northeurope", "Standard_B2s", 2, 4, 9443, "10.10.0.0/24")
SOURCES = ["203.0.113.9", "203.0.113.10"]
RG = "azure-native:resources:ResourceGroup"
VNET = "azure-native:network:VirtualNetwork"
SUBNET = "azure-native:network:Subnet"
NSG = "azure-native:network:NetworkSecurityGroup"
PIP = "azure-native:network:PublicIPAddress"
NAT = "azure-native:network:NatGateway"
NIC = "azure-native:network:NetworkInterface"
VM = "azure-native:compute:VirtualMachine"
DISK = "azure-native:compute:Disk"
OPEN = {"*", "internet", "any", "0.0.0.0/0", "0.0.0.0", "::/0"}
ASG = "azure-native:network:ApplicationSecurityGroup"
VM_KEYS = {"name", "participant", "private_ip", "public_ip", "vcpu", "memory_gib", "disk_gib",
           "instance_type", "cloud", "region", "jump_host"}  # fmt: skip
WITH_BASTION = replace(SITE, bastion_type="Standard_B2s")


class AzureRecorder(Recorder):
    """The harness's mocks plus what Azure fills in: resource names, NIC private addresses.

    The harness only invents a NIC's `ipConfigurations` when it has none in its inputs; a real
    NIC always has some, and Azure adds each one's allocated `privateIPAddress`.
    """

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        rid, outputs = super().new_resource(args)
        n = self.counter
        if args.typ.startswith("azure-native:"):
            outputs.setdefault("name", args.name)
        if args.typ == NIC:
            outputs["ipConfigurations"] = [
                {**config, "privateIPAddress": f"10.97.{n // 250}.{n % 250 + 1}"}
                for config in args.inputs.get("ipConfigurations", [])
            ]
        return rid, outputs


def build_site(operator=OPERATOR, plan=SITE):
    from infra import azure
    from infra.common import SiteArgs, Tags

    site = azure.ParticipantSite("site-hospital-eu", SiteArgs(plan, operator, Tags("test")))
    return pulumi.Output.all(egress=site.egress_ip, vms=site.vms, bastion=site.bastion_ip)


def build_aggregator(sources=SOURCES):
    from infra import azure
    from infra.common import AggregatorArgs, Tags

    agg = azure.Aggregator("aggregator", AggregatorArgs(AGG, OPERATOR, Tags("test"), sources))
    return pulumi.Output.all(
        public_ip=agg.public_ip, private_ip=agg.private_ip, port=agg.port, cloud=agg.cloud,
        region=agg.region, instance_type=agg.instance_type,
    )  # fmt: skip


# azure-native resources carry many aliases, so a declaration takes seconds: each one is made
# once and its recorder shared by the tests that only read it.
@functools.cache
def site(operator: Operator = OPERATOR, plan: SitePlan = SITE) -> tuple[Recorder, Any]:
    return declare(lambda: build_site(operator, plan), recorder=AzureRecorder())


@functools.cache
def aggregator() -> tuple[Recorder, Any]:
    return aggregator_with(SOURCES)


def aggregator_with(sources) -> tuple[Recorder, Any]:
    return declare(lambda: build_aggregator(sources), recorder=AzureRecorder())


def counts(rec: Recorder) -> dict[str, int]:
    return dict(Counter(r.typ for r in rec.resources if r.typ.startswith("azure-native:")))


def inbound(rec: Recorder, nsg_name: str | None = None) -> dict[str, dict[str, Any]]:
    """The inbound rules by name of the one NSG (or of the NSG `nsg_name`)."""
    (nsg,) = [n for n in rec.of(NSG) if nsg_name in (None, n.name)]
    return {r["name"]: r for r in nsg.inputs["securityRules"] if r["direction"] == "Inbound"}


def sources_of(rule: dict[str, Any]) -> list[str]:
    return rule.get("sourceAddressPrefixes") or [rule["sourceAddressPrefix"]]


def allowed(rec: Recorder, nsg_name: str | None = None) -> dict[tuple[str, str], list[str]]:
    """(protocol, destination port) -> sources, for every inbound Allow rule."""
    return {
        (r["protocol"], r["destinationPortRange"]): sources_of(r)
        for r in inbound(rec, nsg_name).values()
        if r["access"] == "Allow"
    }


def assert_denies_the_rest(rec: Recorder, nsg_name: str | None = None) -> None:
    rules = inbound(rec, nsg_name)
    deny = rules["deny-all-inbound"]
    assert (deny["access"], deny["protocol"], sources_of(deny)) == ("Deny", "*", ["*"])
    assert deny["destinationPortRange"] == "*"
    # Lowest priority of all (4096 is the lowest Azure accepts): evaluated after every allow.
    assert deny["priority"] == 4096
    assert all(r["priority"] < deny["priority"] for name, r in rules.items() if name != "deny-all-inbound")
    assert len({r["priority"] for r in rules.values()}) == len(rules)
    for rule in rules.values():
        if rule["access"] == "Allow":
            assert not {s.lower() for s in sources_of(rule)} & OPEN, rule["name"]


def test_site_resources():
    rec, _ = site()
    assert counts(rec) == {RG: 1, VNET: 1, SUBNET: 1, PIP: 1, NAT: 1, NSG: 1, NIC: 2, DISK: 2, VM: 2}
    (group,) = rec.of(RG)
    assert group.inputs["location"] == "westeurope"
    (vnet,) = rec.of(VNET)
    assert vnet.inputs["addressSpace"]["addressPrefixes"] == ["10.22.0.0/16"]
    assert "subnets" not in vnet.inputs  # standalone subnet only: inline ones would fight it
    (subnet,) = rec.of(SUBNET)
    assert subnet.inputs["addressPrefix"] == "10.22.0.0/16"
    assert subnet.inputs["virtualNetworkName"] == "site-hospital-eu-vnet"
    assert subnet.inputs["defaultOutboundAccess"] is False
    # Everything lives in the site's resource group, in the site's region.
    for r in rec.resources:
        if r.typ.startswith("azure-native:") and r.typ != RG:
            assert r.inputs["resourceGroupName"] == "site-hospital-eu-rg", r.name
            assert r.inputs.get("location", "westeurope") == "westeurope", r.name


def test_aggregator_resources():
    rec, _ = aggregator()
    assert counts(rec) == {RG: 1, VNET: 1, SUBNET: 1, NSG: 1, PIP: 1, NIC: 1, VM: 1}
    (vnet,) = rec.of(VNET)
    assert vnet.inputs["addressSpace"]["addressPrefixes"] == ["10.10.0.0/24"]
    (subnet,) = rec.of(SUBNET)
    assert subnet.inputs["addressPrefix"] == "10.10.0.0/24"
    assert subnet.inputs["defaultOutboundAccess"] is False
    for r in rec.resources:
        if r.typ.startswith("azure-native:"):
            assert r.inputs.get("location", "northeurope") == "northeurope", r.name
    (address,) = rec.of(PIP)
    assert address.inputs["sku"]["name"] == "Standard"
    assert address.inputs["publicIPAllocationMethod"] == "Static"


def test_site_vms_are_private_with_data_disks_and_nat_egress():
    rec, out = site()
    vms = sorted(rec.of(VM), key=lambda v: v.name)  # registration order varies
    assert [v.name for v in vms] == ["site-hospital-eu-eu-vm-1", "site-hospital-eu-eu-vm-2"]
    assert [v.inputs["hardwareProfile"]["vmSize"] for v in vms] == ["Standard_D4s_v5", "Standard_B2s"]
    # NICs in the site's subnet, without a public address and without an NSG of their own.
    nics = {n.name: n.inputs for n in rec.of(NIC)}
    assert set(nics) == {f"{v.name}-nic" for v in vms}
    for name, nic in nics.items():
        (config,) = nic["ipConfigurations"]
        assert "publicIPAddress" not in config, name
        assert config["subnet"]["id"] == "site-hospital-eu-subnet-id"
        assert "networkSecurityGroup" not in nic
    for v in vms:
        (ref,) = v.inputs["networkProfile"]["networkInterfaces"]
        assert ref["id"] == f"{v.name}-nic-id"
    # Each VM has its own data disk, of its size, attached to it.
    disks = {d.name: d.inputs for d in rec.of(DISK)}
    assert {name: d["diskSizeGB"] for name, d in disks.items()} == {
        "site-hospital-eu-eu-vm-1-data": 40, "site-hospital-eu-eu-vm-2-data": 20,
    }  # fmt: skip
    assert all(d["creationData"]["createOption"] == "Empty" for d in disks.values())
    assert all(d["sku"]["name"] == "StandardSSD_LRS" for d in disks.values())
    for v in vms:
        (data,) = v.inputs["storageProfile"]["dataDisks"]
        assert data["createOption"] == "Attach" and data["lun"] == 0
        assert data["managedDisk"]["id"] == f"{v.name}-data-id"
    # Outbound through the NAT gateway on the reserved address, which is the site's egress_ip.
    (nat_ip,) = rec.of(PIP)
    (nat,) = rec.of(NAT)
    assert nat_ip.inputs["sku"]["name"] == "Standard"
    assert nat_ip.inputs["publicIPAllocationMethod"] == "Static"
    assert nat.inputs["sku"]["name"] == "Standard"
    assert nat.inputs["publicIpAddresses"] == [{"id": f"{nat_ip.name}-id"}]
    (subnet,) = rec.of(SUBNET)
    assert subnet.inputs["natGateway"] == {"id": f"{nat.name}-id"}
    assert out["egress"].startswith("192.0.2.")


def test_site_outputs():
    _, out = site()
    assert [v["name"] for v in out["vms"]] == ["eu-vm-1", "eu-vm-2"]
    for vm in out["vms"]:
        assert set(vm) == VM_KEYS
        assert vm["public_ip"] is None and vm["private_ip"].startswith("10.97.")
        assert (vm["cloud"], vm["region"], vm["participant"]) == ("azure", "westeurope", "hospital-eu")
        assert vm["jump_host"] is None  # no bastion in this plan
    assert out["bastion"] is None
    assert len({vm["private_ip"] for vm in out["vms"]}) == 2
    assert [(v["instance_type"], v["vcpu"], v["memory_gib"], v["disk_gib"]) for v in out["vms"]] == [
        ("Standard_D4s_v5", 4, 16, 40), ("Standard_B2s", 2, 4, 20),
    ]  # fmt: skip


def test_site_firewall_admits_nothing_from_outside():
    rec, _ = site()
    assert allowed(rec) == {("*", "*"): ["10.22.0.0/16"]}
    assert_denies_the_rest(rec)
    # The NSG guards the subnet every site VM is in.
    (nsg,) = rec.of(NSG)
    (subnet,) = rec.of(SUBNET)
    assert subnet.inputs["networkSecurityGroup"] == {"id": f"{nsg.name}-id"}


def test_aggregator_opens_superlink_to_participants_and_ssh_to_operator_only():
    rec, out = aggregator()
    assert allowed(rec) == {
        ("Tcp", "9443"): ["203.0.113.9/32", "203.0.113.10/32"],
        ("Tcp", "22"): ["198.51.100.7/32"],
    }
    assert_denies_the_rest(rec)
    # The NIC carries the NSG and the static public address; the VM uses that NIC.
    (nsg,) = rec.of(NSG)
    (address,) = rec.of(PIP)
    (nic,) = rec.of(NIC)
    assert nic.inputs["networkSecurityGroup"] == {"id": f"{nsg.name}-id"}
    (config,) = nic.inputs["ipConfigurations"]
    assert config["publicIPAddress"] == {"id": f"{address.name}-id"}
    assert config["subnet"]["id"] == "aggregator-subnet-id"
    (vm,) = rec.of(VM)
    assert vm.inputs["networkProfile"]["networkInterfaces"] == [{"id": "aggregator-nic-id", "primary": True}]
    assert vm.inputs["hardwareProfile"]["vmSize"] == "Standard_B2s"
    assert out["public_ip"].startswith("192.0.2.")


def test_aggregator_without_participants_opens_nothing():
    rec, _ = aggregator_with([])
    assert allowed(rec) == {("Tcp", "22"): ["198.51.100.7/32"]}
    assert_denies_the_rest(rec)


def test_aggregator_sources_may_be_outputs():
    rec, _ = aggregator_with(pulumi.Output.all(pulumi.Output.from_input("192.0.2.4"), "192.0.2.5/32"))
    assert allowed(rec)[("Tcp", "9443")] == ["192.0.2.4/32", "192.0.2.5/32"]


@pytest.mark.parametrize("build", [site, aggregator])
def test_vms_boot_ubuntu_with_the_operators_key_only(build):
    from infra.common import cloud_init

    rec, _ = build()
    vms = sorted(rec.of(VM), key=lambda v: v.name)  # registration order varies
    assert vms
    for vm in vms:
        assert vm.inputs["storageProfile"]["imageReference"] == {
            "publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest",
        }, vm.name  # fmt: skip
        os_disk = vm.inputs["storageProfile"]["osDisk"]
        assert os_disk["createOption"] == "FromImage" and os_disk["deleteOption"] == "Delete"
        profile = vm.inputs["osProfile"]
        assert profile["adminUsername"] == "fedfleet"
        assert "adminPassword" not in profile
        linux = profile["linuxConfiguration"]
        assert linux["disablePasswordAuthentication"] is True
        assert linux["ssh"]["publicKeys"] == [
            {"path": "/home/fedfleet/.ssh/authorized_keys", "keyData": SSH_KEY}
        ]
        assert base64.b64decode(profile["customData"]).decode() == cloud_init(OPERATOR)
        security = vm.inputs["securityProfile"]
        assert security["securityType"] == "TrustedLaunch"
        assert security["uefiSettings"] == {"secureBootEnabled": True, "vTpmEnabled": True}
        assert "identity" not in vm.inputs  # no cloud API credentials on the VM
    # No image is looked up: "latest" resolves in the VM's region at deploy time.
    assert rec.calls == []


def test_admin_user_comes_from_the_operator():
    rec, _ = site(Operator(SSH_KEY, "198.51.100.7/32", admin_user="ops"))
    for vm in rec.of(VM):
        profile = vm.inputs["osProfile"]
        assert profile["adminUsername"] == "ops"
        (key,) = profile["linuxConfiguration"]["ssh"]["publicKeys"]
        assert key["path"] == "/home/ops/.ssh/authorized_keys"
        assert "name: ops" in base64.b64decode(profile["customData"]).decode()


def accepts_tags(r: Resource) -> bool:
    """Whether the azure-native resource type takes `tags` (from the SDK's own signature)."""
    _, module, kind = r.typ.split(":")
    cls = getattr(importlib.import_module(f"pulumi_azure_native.{module}"), kind)
    return "tags" in inspect.signature(cls._internal_init).parameters


def azure_resources(rec: Recorder) -> list[Resource]:
    return [r for r in rec.resources if r.typ.startswith("azure-native:")]


def test_site_everything_taggable_is_tagged():
    rec, _ = site()
    taggable = [r for r in azure_resources(rec) if accepts_tags(r)]
    assert {r.typ for r in azure_resources(rec)} - {r.typ for r in taggable} == {SUBNET}
    for r in taggable:
        assert "tags" in r.inputs, r.name
        assert {k: r.inputs["tags"][k] for k in ("project", "stack", "role", "participant")} == {
            "project": "fedfleet", "stack": "test", "role": "participant", "participant": "hospital-eu",
        }, r.name  # fmt: skip
    # Each VM's own resources say which VM they belong to.
    per_vm = rec.of(VM) + rec.of(NIC) + rec.of(DISK)
    assert len(per_vm) == 6
    for r in per_vm:
        assert r.name.startswith(f"site-hospital-eu-{r.inputs['tags']['vm']}"), r.name


def test_aggregator_everything_taggable_is_tagged():
    rec, _ = aggregator()
    taggable = [r for r in azure_resources(rec) if accepts_tags(r)]
    assert {r.typ for r in azure_resources(rec)} - {r.typ for r in taggable} == {SUBNET}
    assert all(
        r.inputs.get("tags") == {"project": "fedfleet", "stack": "test", "role": "aggregator"}
        for r in taggable
    )


def test_aggregator_outputs():
    _, out = aggregator()
    assert out["cloud"] == "azure" and out["port"] == 9443
    assert out["region"] == "northeurope" and out["instance_type"] == "Standard_B2s"
    assert out["public_ip"].startswith("192.0.2.") and out["private_ip"].startswith("10.97.")


def test_provider_is_explicit_per_region():
    from infra import azure
    from infra.common import SiteArgs, Tags
    from infra.config import Accounts

    def build():
        p = azure.provider("westeurope", Accounts())
        azure.ParticipantSite(
            "site-hospital-eu", SiteArgs(SITE, OPERATOR, Tags("test")), pulumi.ResourceOptions(provider=p)
        )
        return p.urn

    rec, _ = declare(build, recorder=AzureRecorder())
    (prov,) = rec.of("pulumi:providers:azure-native")
    assert prov.name == "azure-westeurope" and prov.inputs.get("location") == "westeurope"
    resources = azure_resources(rec)
    assert resources and all(r.provider and "azure-westeurope" in r.provider for r in resources)


def test_site_bastion_is_public_and_admits_ssh_from_the_operator_only():
    from infra.common import cloud_init

    rec, out = site(OPERATOR, WITH_BASTION)
    assert counts(rec) == {RG: 1, VNET: 1, SUBNET: 1, PIP: 2, NAT: 1, NSG: 2, ASG: 1, NIC: 3, DISK: 2, VM: 3}
    vms = {v.name: v.inputs for v in rec.of(VM)}
    (name,) = [n for n, v in vms.items() if v["tags"]["role"] == "bastion"]
    bastion = vms.pop(name)
    assert name == "site-hospital-eu-bastion-vm"
    assert bastion["hardwareProfile"]["vmSize"] == "Standard_B2s"
    assert not bastion["storageProfile"].get("dataDisks")
    assert bastion["osProfile"]["adminUsername"] == "fedfleet"
    assert base64.b64decode(bastion["osProfile"]["customData"]).decode() == cloud_init(OPERATOR)
    # Its NIC: in the site's subnet, on a static public address, in the bastion's security group,
    # behind an NSG of its own that admits SSH from the operator and denies the rest.
    nics = {n.name: n.inputs for n in rec.of(NIC)}
    nic = nics.pop("site-hospital-eu-bastion-nic")
    assert bastion["networkProfile"]["networkInterfaces"] == [
        {"id": "site-hospital-eu-bastion-nic-id", "primary": True}
    ]
    (config,) = nic["ipConfigurations"]
    assert config["subnet"]["id"] == "site-hospital-eu-subnet-id"
    assert config["publicIPAddress"] == {"id": "site-hospital-eu-bastion-ip-id"}
    assert config["applicationSecurityGroups"] == [{"id": "site-hospital-eu-bastion-asg-id"}]
    assert nic["networkSecurityGroup"] == {"id": "site-hospital-eu-bastion-firewall-id"}
    assert allowed(rec, "site-hospital-eu-bastion-firewall") == {("Tcp", "22"): ["198.51.100.7/32"]}
    assert_denies_the_rest(rec, "site-hospital-eu-bastion-firewall")
    address = next(p for p in rec.of(PIP) if p.name == "site-hospital-eu-bastion-ip")
    assert address.inputs["publicIPAllocationMethod"] == "Static"
    # The site's subnet NSG (Azure applies it too): everything from inside the site, and SSH from
    # the operator to the bastion's security group only.
    site_rules = inbound(rec, "site-hospital-eu-firewall")
    assert allowed(rec, "site-hospital-eu-firewall") == {
        ("*", "*"): ["10.22.0.0/16"], ("Tcp", "22"): ["198.51.100.7/32"],
    }  # fmt: skip
    to_bastion = site_rules["ssh-to-bastion-from-operator"]
    assert to_bastion["destinationApplicationSecurityGroups"] == [{"id": "site-hospital-eu-bastion-asg-id"}]
    assert "destinationAddressPrefix" not in to_bastion
    assert_denies_the_rest(rec, "site-hospital-eu-firewall")
    # The site's VMs stay private; each names the bastion as its jump host.
    for vm_nic in nics.values():
        (vm_config,) = vm_nic["ipConfigurations"]
        assert "publicIPAddress" not in vm_config and "applicationSecurityGroups" not in vm_config
    assert out["bastion"].startswith("192.0.2.")
    assert [v["jump_host"] for v in out["vms"]] == [f"fedfleet@{out['bastion']}"] * 2
    assert all(v["public_ip"] is None for v in out["vms"])
    # Tagged like the site, with the role "bastion".
    for r in azure_resources(rec):
        if "-bastion-" in r.name and accepts_tags(r):
            assert r.inputs["tags"]["role"] == "bastion" and r.inputs["tags"]["participant"] == "hospital-eu"
