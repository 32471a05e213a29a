"""AWS components under Pulumi's mocks: resources, firewall rules, private VMs, tags, outputs."""

from __future__ import annotations

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


def build_site():
    from infra import aws
    from infra.common import SiteArgs, Tags

    site = aws.ParticipantSite("site-hospital-us", SiteArgs(SITE, OPERATOR, Tags("test")))
    return pulumi.Output.all(egress=site.egress_ip, vms=site.vms)


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
