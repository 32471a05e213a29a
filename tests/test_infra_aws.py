"""AWS components under Pulumi's mocks: resources, firewall rules, private VMs, tags, outputs."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pulumi
import pytest

from fedfleet.core.cloudplan import AggregatorPlan, SitePlan, VmPlan
from fedfleet.core.stack import Operator

from .infra_harness import SSH_KEY, declare

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

OPERATOR = Operator(SSH_KEY, "198.51.100.7/32")
SITE = SitePlan(
    "hospital-us",
    "aws",
    "us-east-1",
    "10.20.0.0/16",
    (VmPlan("us-vm-1", "m6i.xlarge", 4, 16, 40), VmPlan("us-vm-2", "t3.medium", 2, 4, 20)),
)
AGG = AggregatorPlan("aws", "us-west-2", "t3.medium", 2, 4, 9443, "10.10.0.0/24")
WITH_BASTION = replace(SITE, bastion_type="t3.medium")
INSTANCE = "aws:ec2/instance:Instance"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"


def build_site(plan: SitePlan = SITE, operator: Operator = OPERATOR):
    from infra import aws
    from infra.common import SiteArgs, Tags

    site = aws.ParticipantSite("site-hospital-us", SiteArgs(plan, operator, Tags("test")))
    return pulumi.Output.all(egress=site.egress_ip, vms=site.vms, bastion=site.bastion_ip)


def build_aggregator():
    from infra import aws
    from infra.common import AggregatorArgs, Tags

    agg = aws.Aggregator(
        "aggregator", AggregatorArgs(AGG, OPERATOR, Tags("test"), ["203.0.113.9", "203.0.113.10"])
    )
    return pulumi.Output.all(
        public_ip=agg.public_ip, private_ip=agg.private_ip, port=agg.port, cloud=agg.cloud
    )


def test_site_vms_are_private_with_data_disks_and_nat_egress():
    rec, out = declare(build_site)
    instances = rec.of("aws:ec2/instance:Instance")
    assert [i.name for i in instances] == ["site-hospital-us-us-vm-1", "site-hospital-us-us-vm-2"]
    assert all(i.inputs["associatePublicIpAddress"] is False for i in instances)
    assert [i.inputs["instanceType"] for i in instances] == ["m6i.xlarge", "t3.medium"]
    assert sorted(v.inputs["size"] for v in rec.of("aws:ebs/volume:Volume")) == [20, 40]
    assert len(rec.of("aws:ec2/volumeAttachment:VolumeAttachment")) == 2
    assert len(rec.of("aws:ec2/natGateway:NatGateway")) == 1
    assert out["egress"].startswith("203.0.113.")
    assert [v["name"] for v in out["vms"]] == ["us-vm-1", "us-vm-2"]
    assert all(v["public_ip"] is None and v["private_ip"] for v in out["vms"])
    # The private route goes through the NAT, never the internet gateway.
    private_routes = next(
        r for r in rec.of("aws:ec2/routeTable:RouteTable") if r.name == "site-hospital-us-routes"
    )
    assert (
        "natGatewayId" in private_routes.inputs["routes"][0]
        and "gatewayId" not in private_routes.inputs["routes"][0]
    )


def test_site_firewall_admits_nothing_from_outside():
    rec, _ = declare(build_site)
    (firewall,) = rec.of("aws:ec2/securityGroup:SecurityGroup")
    assert [rule["cidrBlocks"] for rule in firewall.inputs["ingress"]] == [["10.20.0.0/16"]]


def test_aggregator_opens_superlink_to_participants_and_ssh_to_operator_only():
    rec, out = declare(build_aggregator)
    (firewall,) = rec.of("aws:ec2/securityGroup:SecurityGroup")
    rules = {(r["fromPort"], r["toPort"]): r["cidrBlocks"] for r in firewall.inputs["ingress"]}
    assert rules == {(9443, 9443): ["203.0.113.9/32", "203.0.113.10/32"], (22, 22): ["198.51.100.7/32"]}
    assert all("0.0.0.0/0" not in blocks for blocks in rules.values())
    (vm,) = rec.of("aws:ec2/instance:Instance")
    assert vm.inputs["associatePublicIpAddress"] is True and vm.inputs["ami"] == "ami-0123456789abcdef0"
    assert "ssh_authorized_keys" in vm.inputs["userData"] and SSH_KEY in vm.inputs["userData"]
    assert out["cloud"] == "aws" and out["port"] == 9443 and out["public_ip"]
    # The image is looked up (per region, through the provider), not hard-coded.
    assert any(token == "aws:ec2/getAmi:getAmi" for token, _ in rec.calls)


def test_everything_is_tagged():
    rec, _ = declare(build_site)
    taggable = [r for r in rec.resources if "tags" in r.inputs]
    assert len(taggable) >= 10
    for r in taggable:
        assert {k: r.inputs["tags"][k] for k in ("project", "stack", "role", "participant")} == {
            "project": "fedfleet", "stack": "test", "role": "participant", "participant": "hospital-us",
        }, r.name  # fmt: skip


def test_site_without_a_bastion_has_no_public_vm_and_no_jump_host():
    rec, out = declare(build_site)
    assert all(i.inputs["tags"]["role"] == "participant" for i in rec.of(INSTANCE))
    assert len(rec.of("aws:ec2/eip:Eip")) == 1  # the NAT's
    assert out["bastion"] is None
    assert [v["jump_host"] for v in out["vms"]] == [None, None]


def test_site_bastion_is_public_and_admits_ssh_from_the_operator_only():
    operator = Operator(SSH_KEY, "198.51.100.7/32", admin_user="ops")
    rec, out = declare(lambda: build_site(WITH_BASTION, operator))
    instances = {i.name: i.inputs for i in rec.of(INSTANCE)}
    (name,) = [n for n, i in instances.items() if i["tags"]["role"] == "bastion"]
    bastion = instances.pop(name)
    assert name == "site-hospital-us-bastion-vm" and bastion["instanceType"] == "t3.medium"
    assert bastion["associatePublicIpAddress"] is True
    assert "name: ops" in bastion["userData"] and SSH_KEY in bastion["userData"]
    assert bastion["keyName"] == instances["site-hospital-us-us-vm-1"]["keyName"]
    # Its static address is an Elastic IP on it; no data disk.
    eips = {e.name: e.inputs for e in rec.of("aws:ec2/eip:Eip")}
    assert eips["site-hospital-us-bastion-ip"]["instance"] == f"{name}-id"
    assert len(rec.of("aws:ec2/volumeAttachment:VolumeAttachment")) == len(SITE.vms)
    # In the public half of the site's range: inside what the site's VMs admit.
    subnets = {s.name: s.inputs for s in rec.of("aws:ec2/subnet:Subnet")}
    assert bastion["subnetId"] == "site-hospital-us-nat-subnet-id"
    public = ipaddress.ip_network(subnets["site-hospital-us-nat-subnet"]["cidrBlock"])
    assert public.subnet_of(ipaddress.ip_network(SITE.cidr))
    # Its own security group: TCP 22 from the operator's network, nothing else inbound.
    groups = {g.name: g.inputs for g in rec.of(SECURITY_GROUP)}
    assert bastion["vpcSecurityGroupIds"] == ["site-hospital-us-bastion-firewall-id"]
    (rule,) = groups["site-hospital-us-bastion-firewall"]["ingress"]
    assert (rule["protocol"], rule["fromPort"], rule["toPort"], rule["cidrBlocks"]) == (
        "tcp", 22, 22, ["198.51.100.7/32"],
    )  # fmt: skip
    assert [r["cidrBlocks"] for r in groups["site-hospital-us-firewall"]["ingress"]] == [[SITE.cidr]]
    assert all("0.0.0.0/0" not in r["cidrBlocks"] for g in groups.values() for r in g["ingress"])
    # The site's VMs stay private, behind the site's group; each names the bastion as its jump host.
    assert all(i["associatePublicIpAddress"] is False for i in instances.values())
    assert all(i["vpcSecurityGroupIds"] == ["site-hospital-us-firewall-id"] for i in instances.values())
    assert out["bastion"].startswith("203.0.113.")
    assert all(v["public_ip"] is None for v in out["vms"])
    assert [v["jump_host"] for v in out["vms"]] == [f"ops@{out['bastion']}"] * 2
    # Tagged like the site, with the role "bastion".
    for r in rec.resources:
        if "tags" in r.inputs and "-bastion-" in r.name:
            assert r.inputs["tags"]["role"] == "bastion" and r.inputs["tags"]["participant"] == "hospital-us"
