"""GCP components under Pulumi's mocks: resources, firewall rules, private VMs, labels, outputs."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import pulumi
import pytest

from fedfleet.core.cloudplan import AggregatorPlan, SitePlan, VmPlan
from fedfleet.core.stack import Operator

from .infra_harness import SSH_KEY, Recorder, declare

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

OPERATOR = Operator(SSH_KEY, "198.51.100.7/32")
SITE = SitePlan(
    "hospital-eu",
    "gcp",
    "europe-west1",
    "10.21.0.0/16",
    (VmPlan("eu-vm-1", "n2-standard-4", 4, 16, 40), VmPlan("eu-vm-2", "n4-standard-2", 2, 8, 20)),
)
AGG = AggregatorPlan("gcp", "us-central1", "e2-standard-2", 2, 8, 9443, "10.10.0.0/24")
SOURCES = ["203.0.113.9", "203.0.113.10"]
INSTANCE = "gcp:compute/instance:Instance"
FIREWALL = "gcp:compute/firewall:Firewall"
ANYWHERE = "0.0.0.0/0"
IMAGE = "projects/ubuntu-os-cloud/global/images/ubuntu-2404-noble-amd64-v20990101-from-lookup"
VM_KEYS = {"name", "participant", "private_ip", "public_ip", "vcpu", "memory_gib", "disk_gib",
           "instance_type", "cloud", "region", "jump_host"}  # fmt: skip
WITH_BASTION = replace(SITE, bastion_type="e2-standard-2")


class GcpRecorder(Recorder):
    """The harness's mocks plus what GCP fills in (self links, auto-names) and the invokes' providers."""

    def __init__(self) -> None:
        super().__init__()
        self.invoke_providers: list[tuple[str, str]] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        rid, outputs = super().new_resource(args)
        if args.typ.startswith("gcp:"):
            outputs.setdefault("selfLink", f"https://www.googleapis.com/compute/v1/projects/test/{args.name}")
            outputs.setdefault("name", args.name)
        return rid, outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        result = super().call(args)
        self.invoke_providers.append((args.token, args.provider))
        if args.token == "gcp:compute/getImage:getImage":
            # A value no one would hard-code: proves the VMs use the lookup's answer.
            result = {**result, "selfLink": IMAGE}
        return result


def build_site(plan: SitePlan = SITE):
    from infra import gcp
    from infra.common import SiteArgs, Tags

    site = gcp.ParticipantSite("site-hospital-eu", SiteArgs(plan, OPERATOR, Tags("test")))
    return pulumi.Output.all(egress=site.egress_ip, vms=site.vms, bastion=site.bastion_ip)


def build_aggregator(sources=SOURCES):
    from infra import gcp
    from infra.common import AggregatorArgs, Tags

    agg = gcp.Aggregator("aggregator", AggregatorArgs(AGG, OPERATOR, Tags("test"), sources))
    return pulumi.Output.all(
        public_ip=agg.public_ip, private_ip=agg.private_ip, port=agg.port, cloud=agg.cloud,
        region=agg.region, instance_type=agg.instance_type,
    )  # fmt: skip


def site(plan: SitePlan = SITE):
    return declare(lambda: build_site(plan), recorder=GcpRecorder())


def aggregator(sources=SOURCES):
    return declare(lambda: build_aggregator(sources), recorder=GcpRecorder())


def counts(rec: Recorder) -> dict[str, int]:
    return dict(Counter(r.typ for r in rec.resources if r.typ.startswith("gcp:")))


def ingress(rec: Recorder) -> dict[str, dict[str, Any]]:
    return {r.name: r.inputs for r in rec.of(FIREWALL) if r.inputs.get("direction", "INGRESS") == "INGRESS"}


def test_site_resources():
    rec, _ = site()
    assert counts(rec) == {
        "gcp:compute/network:Network": 1,
        "gcp:compute/subnetwork:Subnetwork": 1,
        "gcp:compute/address:Address": 1,
        "gcp:compute/router:Router": 1,
        "gcp:compute/routerNat:RouterNat": 1,
        FIREWALL: 1,
        "gcp:compute/disk:Disk": 2,
        INSTANCE: 2,
    }
    (network,) = rec.of("gcp:compute/network:Network")
    assert network.inputs["autoCreateSubnetworks"] is False
    (subnet,) = rec.of("gcp:compute/subnetwork:Subnetwork")
    assert subnet.inputs["ipCidrRange"] == "10.21.0.0/16" and subnet.inputs["region"] == "europe-west1"
    assert subnet.inputs["privateIpGoogleAccess"] is True


def test_aggregator_resources():
    rec, _ = aggregator()
    assert counts(rec) == {
        "gcp:compute/network:Network": 1,
        "gcp:compute/subnetwork:Subnetwork": 1,
        "gcp:compute/address:Address": 1,
        FIREWALL: 2,
        INSTANCE: 1,
    }
    (subnet,) = rec.of("gcp:compute/subnetwork:Subnetwork")
    assert subnet.inputs["ipCidrRange"] == "10.10.0.0/24" and subnet.inputs["region"] == "us-central1"


def test_site_vms_are_private_with_data_disks_and_nat_egress():
    rec, out = site()
    instances = rec.of(INSTANCE)
    assert [i.name for i in instances] == ["site-hospital-eu-eu-vm-1", "site-hospital-eu-eu-vm-2"]
    assert [i.inputs["machineType"] for i in instances] == ["n2-standard-4", "n4-standard-2"]
    assert all(i.inputs["zone"] == "europe-west1-b" for i in instances)
    for i in instances:
        (nic,) = i.inputs["networkInterfaces"]
        assert not nic.get("accessConfigs"), i.name
    # Each VM has its own data disk, of its size, in its zone.
    disks = {d.name: d.inputs for d in rec.of("gcp:compute/disk:Disk")}
    assert {name: d["size"] for name, d in disks.items()} == {
        "site-hospital-eu-eu-vm-1-data": 40, "site-hospital-eu-eu-vm-2-data": 20,
    }  # fmt: skip
    assert all(d["zone"] == "europe-west1-b" for d in disks.values())
    for i in instances:
        (attached,) = i.inputs["attachedDisks"]
        assert attached["source"].endswith(f"/{i.name}-data")
    # n4 takes only Hyperdisk: its boot and data disks follow the machine series.
    assert disks["site-hospital-eu-eu-vm-1-data"]["type"] == "pd-balanced"
    assert disks["site-hospital-eu-eu-vm-2-data"]["type"] == "hyperdisk-balanced"
    assert [i.inputs["bootDisk"]["initializeParams"]["type"] for i in instances] == [
        "pd-balanced", "hyperdisk-balanced",
    ]  # fmt: skip
    # Egress goes through Cloud NAT on the reserved address, which is the site's egress_ip.
    (nat_ip,) = rec.of("gcp:compute/address:Address")
    (nat,) = rec.of("gcp:compute/routerNat:RouterNat")
    assert nat.inputs["natIpAllocateOption"] == "MANUAL_ONLY"
    assert [link.rsplit("/", 1)[-1] for link in nat.inputs["natIps"]] == [nat_ip.name]
    assert nat.inputs["router"] == "site-hospital-eu-router"
    assert nat.inputs["sourceSubnetworkIpRangesToNat"] == "LIST_OF_SUBNETWORKS"
    assert [s["name"] for s in nat.inputs["subnetworks"]] == ["site-hospital-eu-subnet-id"]
    assert out["egress"].startswith("198.51.100.")


def test_site_outputs():
    _, out = site()
    assert [v["name"] for v in out["vms"]] == ["eu-vm-1", "eu-vm-2"]
    for vm in out["vms"]:
        assert set(vm) == VM_KEYS
        assert vm["public_ip"] is None and vm["private_ip"].startswith("10.98.")
        assert (vm["cloud"], vm["region"], vm["participant"]) == ("gcp", "europe-west1", "hospital-eu")
        assert vm["jump_host"] is None  # no bastion in this plan
    assert out["bastion"] is None
    assert [(v["instance_type"], v["vcpu"], v["memory_gib"], v["disk_gib"]) for v in out["vms"]] == [
        ("n2-standard-4", 4, 16, 40), ("n4-standard-2", 2, 8, 20),
    ]  # fmt: skip


def test_site_firewall_admits_nothing_from_outside():
    rec, _ = site()
    rules = ingress(rec)
    assert list(rules) == ["site-hospital-eu-firewall"]
    (rule,) = rules.values()
    assert rule["sourceRanges"] == ["10.21.0.0/16"]
    assert not rule.get("sourceTags") and not rule.get("sourceServiceAccounts")
    assert rule["targetTags"] == ["fedfleet-site"]
    assert all(i.inputs["tags"] == ["fedfleet-site"] for i in rec.of(INSTANCE))


def test_aggregator_opens_superlink_to_participants_and_ssh_to_operator_only():
    rec, out = aggregator()
    rules = {
        tuple((a["protocol"], tuple(a.get("ports", ()))) for a in r["allows"]): r["sourceRanges"]
        for r in ingress(rec).values()
        if not r.get("disabled")
    }
    assert rules == {
        (("tcp", ("9443",)),): ["203.0.113.9/32", "203.0.113.10/32"],
        (("tcp", ("22",)),): ["198.51.100.7/32"],
    }
    assert all(ANYWHERE not in ranges for ranges in rules.values())
    (vm,) = rec.of(INSTANCE)
    assert all(r["targetTags"] == vm.inputs["tags"] == ["fedfleet-aggregator"] for r in ingress(rec).values())
    # Public through an access config on the reserved static address.
    (address,) = rec.of("gcp:compute/address:Address")
    (nic,) = vm.inputs["networkInterfaces"]
    (access,) = nic["accessConfigs"]
    assert access["natIp"] == out["public_ip"] and address.inputs["region"] == "us-central1"
    assert vm.inputs["machineType"] == "e2-standard-2" and vm.inputs["zone"] == "us-central1-b"


def test_aggregator_without_participants_opens_nothing():
    rec, _ = aggregator([])
    superlink = ingress(rec)["aggregator-superlink"]
    assert superlink["disabled"] is True
    assert superlink["sourceRanges"] == ["10.10.0.0/24"]
    assert all(ANYWHERE not in r["sourceRanges"] for r in ingress(rec).values())


def test_aggregator_sources_may_be_outputs():
    rec, _ = aggregator(pulumi.Output.all(pulumi.Output.from_input("192.0.2.4"), "192.0.2.5/32"))
    assert ingress(rec)["aggregator-superlink"]["sourceRanges"] == ["192.0.2.4/32", "192.0.2.5/32"]


@pytest.mark.parametrize("build", [site, aggregator])
def test_vms_boot_the_looked_up_ubuntu_with_the_operators_key(build):
    rec, _ = build()
    lookups = [args for token, args in rec.calls if token == "gcp:compute/getImage:getImage"]
    assert lookups and all(
        (a.get("family"), a.get("project")) == ("ubuntu-2404-lts-amd64", "ubuntu-os-cloud") for a in lookups
    )
    for vm in rec.of(INSTANCE):
        image = vm.inputs["bootDisk"]["initializeParams"]["image"]
        assert image == IMAGE, vm.name
        metadata = vm.inputs["metadata"]
        assert metadata["user-data"].startswith("#cloud-config") and SSH_KEY in metadata["user-data"]
        assert metadata["ssh-keys"] == f"fedfleet:{SSH_KEY}"
        assert metadata["block-project-ssh-keys"] == "TRUE"
        assert vm.inputs["shieldedInstanceConfig"]["enableSecureBoot"] is True
        assert "serviceAccount" not in vm.inputs


def test_site_everything_labelable_is_labelled():
    rec, _ = site()
    labelled = {r.typ for r in rec.resources if "labels" in r.inputs}
    assert labelled == {"gcp:compute/address:Address", "gcp:compute/disk:Disk", INSTANCE}
    for r in rec.resources:
        if "labels" not in r.inputs:
            continue
        assert {k: r.inputs["labels"][k] for k in ("project", "stack", "role", "participant")} == {
            "project": "fedfleet", "stack": "test", "role": "participant", "participant": "hospital-eu",
        }, r.name  # fmt: skip
    for r in rec.of(INSTANCE) + rec.of("gcp:compute/disk:Disk"):
        assert r.inputs["labels"]["vm"] in r.name, r.name
    for vm in rec.of(INSTANCE):
        assert vm.inputs["bootDisk"]["initializeParams"]["labels"] == vm.inputs["labels"]


def test_aggregator_everything_labelable_is_labelled():
    rec, _ = aggregator()
    labelled = [r for r in rec.resources if "labels" in r.inputs]
    assert {r.typ for r in labelled} == {"gcp:compute/address:Address", INSTANCE}
    assert all(
        r.inputs["labels"] == {"project": "fedfleet", "stack": "test", "role": "aggregator"} for r in labelled
    )


def test_aggregator_outputs():
    _, out = aggregator()
    assert out["cloud"] == "gcp" and out["port"] == 9443
    assert out["region"] == "us-central1" and out["instance_type"] == "e2-standard-2"
    assert out["public_ip"].startswith("198.51.100.") and out["private_ip"].startswith("10.98.")


def test_provider_is_explicit_per_region():
    from infra import gcp
    from infra.common import SiteArgs, Tags
    from infra.config import Accounts

    def build():
        p = gcp.provider("europe-west1", Accounts(gcp_project="my-project"))
        gcp.ParticipantSite(
            "site-hospital-eu", SiteArgs(SITE, OPERATOR, Tags("test")), pulumi.ResourceOptions(provider=p)
        )
        return p.urn

    rec, _ = declare(build, recorder=GcpRecorder())
    (prov,) = rec.of("pulumi:providers:gcp")
    assert prov.name == "gcp-europe-west1"
    assert (prov.inputs["project"], prov.inputs["region"]) == ("my-project", "europe-west1")
    gcp_resources = [r for r in rec.resources if r.typ.startswith("gcp:")]
    assert gcp_resources and all(r.provider and "gcp-europe-west1" in r.provider for r in gcp_resources)
    # The image is looked up through the same provider.
    lookups = [prov for token, prov in rec.invoke_providers if token == "gcp:compute/getImage:getImage"]
    assert lookups and all(prov and "gcp-europe-west1" in prov for prov in lookups)


def test_site_bastion_is_public_and_admits_ssh_from_the_operator_only():
    rec, out = site(WITH_BASTION)
    instances = {i.name: i.inputs for i in rec.of(INSTANCE)}
    (name,) = [n for n, i in instances.items() if i["labels"]["role"] == "bastion"]
    bastion = instances.pop(name)
    assert name == "site-hospital-eu-bastion-vm" and bastion["machineType"] == "e2-standard-2"
    assert bastion["tags"] == ["fedfleet-bastion"] and not bastion.get("attachedDisks")
    assert bastion["metadata"]["ssh-keys"] == f"fedfleet:{SSH_KEY}"
    assert bastion["bootDisk"]["initializeParams"]["image"] == IMAGE
    # In the site's own subnet (the site's range), public on a reserved static address.
    (nic,) = bastion["networkInterfaces"]
    assert nic["subnetwork"] == "site-hospital-eu-subnet-id"
    (access,) = nic["accessConfigs"]
    addresses = {a.name: a.inputs for a in rec.of("gcp:compute/address:Address")}
    assert set(addresses) == {"site-hospital-eu-nat-ip", "site-hospital-eu-bastion-ip"}
    assert access["natIp"] == out["bastion"] and out["bastion"].startswith("198.51.100.")
    # Inbound: SSH from the operator to the bastion; everything from inside the site to its VMs.
    rules = ingress(rec)
    assert set(rules) == {"site-hospital-eu-firewall", "site-hospital-eu-bastion-ssh"}
    ssh = rules["site-hospital-eu-bastion-ssh"]
    assert [(a["protocol"], a["ports"]) for a in ssh["allows"]] == [("tcp", ["22"])]
    assert ssh["sourceRanges"] == ["198.51.100.7/32"] and ssh["targetTags"] == ["fedfleet-bastion"]
    assert rules["site-hospital-eu-firewall"]["sourceRanges"] == [WITH_BASTION.cidr]
    assert all(ANYWHERE not in r["sourceRanges"] for r in rules.values())
    # The site's VMs stay private; each names the bastion as its jump host.
    for vm in instances.values():
        (vm_nic,) = vm["networkInterfaces"]
        assert not vm_nic.get("accessConfigs") and vm["tags"] == ["fedfleet-site"]
    assert [v["jump_host"] for v in out["vms"]] == [f"fedfleet@{out['bastion']}"] * 2
    assert all(v["public_ip"] is None for v in out["vms"])
    # Labelled like the site, with the role "bastion".
    for r in rec.resources:
        if "labels" in r.inputs and "-bastion-" in r.name:
            assert (
                r.inputs["labels"]["role"] == "bastion" and r.inputs["labels"]["participant"] == "hospital-eu"
            )
