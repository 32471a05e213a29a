"""AWS: the aggregator and a participant site, in the region of an explicit provider.

A site's range is split in two: its VMs' private subnet and a public subnet for the NAT
gateway and the site's bastion (so the bastion's address is inside the site's range,
which the site's security group admits).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pulumi
import pulumi_aws as aws

from fedfleet.core.stack import Operator

from .common import (
    SSH_PORT,
    AggregatorArgs,
    AggregatorComponent,
    SiteArgs,
    SiteComponent,
    cloud_init,
    host_cidrs,
    jump_host,
    vm_record,
)
from .config import Accounts

# Canonical's owner id and Ubuntu 24.04 LTS image names: looked up per region.
UBUNTU_OWNER = "099720109477"
UBUNTU_NAME = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
ANYWHERE = "0.0.0.0/0"


def _ubuntu(opts: pulumi.ResourceOptions) -> pulumi.Output[str]:
    image = aws.ec2.get_ami_output(
        most_recent=True,
        owners=[UBUNTU_OWNER],
        filters=[
            aws.ec2.GetAmiFilterArgs(name="name", values=[UBUNTU_NAME]),
            aws.ec2.GetAmiFilterArgs(name="virtualization-type", values=["hvm"]),
        ],
        opts=pulumi.InvokeOutputOptions(provider=opts.provider, parent=opts.parent),
    )
    return image.id


def _network(name: str, cidr: str, tags: dict[str, str], child: pulumi.ResourceOptions) -> aws.ec2.Vpc:
    return aws.ec2.Vpc(f"{name}-vpc", cidr_block=cidr, enable_dns_hostnames=True, tags=tags, opts=child)


def _ssh_from(operator: Operator) -> aws.ec2.SecurityGroupIngressArgs:
    return aws.ec2.SecurityGroupIngressArgs(
        protocol="tcp", from_port=SSH_PORT, to_port=SSH_PORT, cidr_blocks=[operator.cidr],
        description="SSH from the operator",
    )  # fmt: skip


def _public_vm(
    name: str,
    instance_type: str,
    subnet: aws.ec2.Subnet,
    firewall: aws.ec2.SecurityGroup,
    key: aws.ec2.KeyPair,
    image: pulumi.Input[str],
    operator: Operator,
    tags: dict[str, str],
    child: pulumi.ResourceOptions,
) -> tuple[aws.ec2.Instance, aws.ec2.Eip]:
    """A VM in a public subnet behind `firewall`, with a static public address (an Elastic IP)."""
    vm = aws.ec2.Instance(
        f"{name}-vm",
        ami=image,
        instance_type=instance_type,
        subnet_id=subnet.id,
        vpc_security_group_ids=[firewall.id],
        associate_public_ip_address=True,
        key_name=key.key_name,
        user_data=cloud_init(operator),
        metadata_options=aws.ec2.InstanceMetadataOptionsArgs(http_tokens="required"),
        tags={**tags, "Name": f"{name}-vm"},
        opts=child,
    )
    address = aws.ec2.Eip(f"{name}-ip", domain="vpc", instance=vm.id, tags=tags, opts=child)
    return vm, address


def _firewall(
    name: str,
    vpc: aws.ec2.Vpc,
    description: str,
    ingress: pulumi.Input[list[aws.ec2.SecurityGroupIngressArgs]],
    tags: dict[str, str],
    child: pulumi.ResourceOptions,
) -> aws.ec2.SecurityGroup:
    """A security group admitting only `ingress`, everything outbound."""
    return aws.ec2.SecurityGroup(
        f"{name}-firewall",
        vpc_id=vpc.id,
        description=description,
        ingress=ingress,
        egress=[
            aws.ec2.SecurityGroupEgressArgs(protocol="-1", from_port=0, to_port=0, cidr_blocks=[ANYWHERE])
        ],
        tags=tags,
        opts=child,
    )


class Aggregator(AggregatorComponent):
    """A public VM for the SuperLink: its port open only to the participants, SSH only to the operator."""

    def __init__(self, name: str, args: AggregatorArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("fedfleet:aws:Aggregator", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=opts.provider if opts else None)
        plan, tags = args.plan, args.tags.of("aggregator")
        vpc = _network(name, plan.cidr, tags, child)
        gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=tags, opts=child)
        subnet = aws.ec2.Subnet(f"{name}-subnet", vpc_id=vpc.id, cidr_block=plan.cidr, tags=tags, opts=child)
        routes = aws.ec2.RouteTable(
            f"{name}-routes",
            vpc_id=vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block=ANYWHERE, gateway_id=gateway.id)],
            tags=tags,
            opts=child,
        )
        aws.ec2.RouteTableAssociation(
            f"{name}-routes-assoc", subnet_id=subnet.id, route_table_id=routes.id, opts=child
        )
        firewall = _firewall(
            name,
            vpc,
            "fedfleet aggregator: SuperLink from participants, SSH from the operator",
            pulumi.Output.from_input(args.participant_sources).apply(
                lambda sources: [
                    aws.ec2.SecurityGroupIngressArgs(
                        protocol="tcp", from_port=plan.port, to_port=plan.port, cidr_blocks=host_cidrs(sources),
                        description="Flower SuperLink (Fleet API) from participant sites",
                    ),
                    _ssh_from(args.operator),
                ]
            ),
            tags,
            child,
        )  # fmt: skip
        key = aws.ec2.KeyPair(f"{name}-key", public_key=args.operator.ssh_public_key, tags=tags, opts=child)
        vm, address = _public_vm(
            name, plan.instance_type, subnet, firewall, key, _ubuntu(child), args.operator, tags, child
        )
        self.publish("aws", plan, address.public_ip, vm.private_ip)


class ParticipantSite(SiteComponent):
    """A private network (no inbound from the internet, outbound through NAT), its VMs, and
    its SSH bastion in the public subnet (SSH only from the operator)."""

    def __init__(self, name: str, args: SiteArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("fedfleet:aws:ParticipantSite", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=opts.provider if opts else None)
        plan = args.plan
        tags = args.tags.of("participant", plan.participant)
        vpc = _network(name, plan.cidr, tags, child)
        private_cidr, public_cidr = list(_halves(plan.cidr))
        gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=tags, opts=child)
        public = aws.ec2.Subnet(
            f"{name}-nat-subnet", vpc_id=vpc.id, cidr_block=public_cidr, tags=tags, opts=child
        )
        private = aws.ec2.Subnet(
            f"{name}-subnet", vpc_id=vpc.id, cidr_block=private_cidr, tags=tags, opts=child
        )
        public_routes = aws.ec2.RouteTable(
            f"{name}-nat-routes", vpc_id=vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block=ANYWHERE, gateway_id=gateway.id)], tags=tags, opts=child,
        )  # fmt: skip
        aws.ec2.RouteTableAssociation(
            f"{name}-nat-routes-assoc", subnet_id=public.id, route_table_id=public_routes.id, opts=child
        )
        egress_ip = aws.ec2.Eip(f"{name}-nat-ip", domain="vpc", tags=tags, opts=child)
        nat = aws.ec2.NatGateway(
            f"{name}-nat", allocation_id=egress_ip.id, subnet_id=public.id, tags=tags, opts=child
        )
        private_routes = aws.ec2.RouteTable(
            f"{name}-routes", vpc_id=vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block=ANYWHERE, nat_gateway_id=nat.id)], tags=tags, opts=child,
        )  # fmt: skip
        aws.ec2.RouteTableAssociation(
            f"{name}-routes-assoc", subnet_id=private.id, route_table_id=private_routes.id, opts=child
        )
        # Inside the site: its VMs and the bastion (in the public half of the range).
        firewall = _firewall(
            name, vpc, "fedfleet participant site: inbound only from inside the site",
            [aws.ec2.SecurityGroupIngressArgs(protocol="-1", from_port=0, to_port=0, cidr_blocks=[plan.cidr],
                                              description="within the site")],
            tags, child,
        )  # fmt: skip
        key = aws.ec2.KeyPair(f"{name}-key", public_key=args.operator.ssh_public_key, tags=tags, opts=child)
        image = _ubuntu(child)
        bastion_ip = None
        if plan.bastion_type is not None:
            bastion_tags = args.tags.of("bastion", plan.participant)
            bastion_firewall = _firewall(
                f"{name}-bastion", vpc, "fedfleet site bastion: SSH from the operator",
                [_ssh_from(args.operator)], bastion_tags, child,
            )  # fmt: skip
            _, address = _public_vm(
                f"{name}-bastion", plan.bastion_type, public, bastion_firewall, key, image, args.operator,
                bastion_tags, child,
            )  # fmt: skip
            bastion_ip = address.public_ip
        jump = jump_host(args.operator, bastion_ip)
        records = []
        for vm_plan in plan.vms:
            vm_tags = {**tags, "Name": vm_plan.name, "vm": vm_plan.name}
            vm = aws.ec2.Instance(
                f"{name}-{vm_plan.name}",
                ami=image,
                instance_type=vm_plan.instance_type,
                subnet_id=private.id,
                vpc_security_group_ids=[firewall.id],
                associate_public_ip_address=False,
                key_name=key.key_name,
                user_data=cloud_init(args.operator),
                metadata_options=aws.ec2.InstanceMetadataOptionsArgs(http_tokens="required"),
                tags=vm_tags,
                opts=child,
            )
            disk = aws.ebs.Volume(
                f"{name}-{vm_plan.name}-data",
                availability_zone=vm.availability_zone,
                size=vm_plan.disk_gib,
                type="gp3",
                encrypted=True,
                tags=vm_tags,
                opts=child,
            )
            aws.ec2.VolumeAttachment(f"{name}-{vm_plan.name}-data-attach", device_name="/dev/sdf",
                                     volume_id=disk.id, instance_id=vm.id, opts=child)  # fmt: skip
            records.append(vm_record(vm_plan, plan.participant, "aws", plan.region, vm.private_ip, jump=jump))
        self.publish(egress_ip.public_ip, bastion_ip, records)


def _halves(cidr: str) -> Iterator[str]:
    """The VMs' subnet and the public subnet (the NAT gateway, the bastion): the two halves of
    the site's range."""
    return (str(n) for n in ipaddress.ip_network(cidr).subnets(prefixlen_diff=1))


def provider(region: str, accounts: Accounts) -> pulumi.ProviderResource:
    return aws.Provider(f"aws-{region}", region=region)
