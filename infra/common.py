"""What every cloud's components share: tags, cloud-init, component inputs and outputs.

Every cloud implements two ComponentResources with the same output names, so
nothing downstream (the `inventory` output, Ansible, the runner) branches on
the cloud:

    Aggregator(name, AggregatorArgs, opts)   outputs: public_ip, private_ip, port, cloud, region, instance_type
    ParticipantSite(name, SiteArgs, opts)    outputs: egress_ip, bastion_ip (None without a bastion),
                                             vms (list of VM dicts, see vm_record)

A site's VMs have private addresses only. Unless the participant says `bastion: false`,
the site has an SSH bastion: a small VM in the site's network with a static public
address, SSH admitted only from the operator's network, and the same admin user and
key. The site's firewall admits everything from inside the site's range, the
bastion's address included; each VM's record names the bastion as its `jump_host`.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

import pulumi

from fedfleet.core.cloudplan import AggregatorPlan, SitePlan, VmPlan
from fedfleet.core.stack import Operator

PROJECT = "fedfleet"
SSH_PORT = 22


@dataclass(frozen=True)
class Tags:
    stack: str

    def of(self, role: str, participant: str | None = None, **extra: str) -> dict[str, str]:
        """project, stack, role and participant on every resource (labels on GCP)."""
        tags = {"project": PROJECT, "stack": self.stack, "role": role, **extra}
        if participant:
            tags["participant"] = participant
        return tags


@dataclass(frozen=True)
class AggregatorArgs:
    plan: AggregatorPlan
    operator: Operator
    tags: Tags
    # Public egress addresses of the participant sites (their NAT IPs): the only
    # sources admitted to the SuperLink port.
    participant_sources: pulumi.Input[list[str]] = field(default_factory=list)


@dataclass(frozen=True)
class SiteArgs:
    plan: SitePlan
    operator: Operator
    tags: Tags


def cloud_init(operator: Operator) -> str:
    """#cloud-config that readies a VM for Ansible: Python 3 and an admin user with the operator's key."""
    return textwrap.dedent(
        f"""\
        #cloud-config
        users:
          - name: {operator.admin_user}
            groups: [sudo]
            shell: /bin/bash
            sudo: "ALL=(ALL) NOPASSWD:ALL"
            lock_passwd: true
            ssh_authorized_keys:
              - {operator.ssh_public_key}
        ssh_pwauth: false
        disable_root: true
        package_update: true
        packages: [python3, python3-venv, python3-apt]
        """
    )


def jump_host(operator: Operator, bastion_ip: pulumi.Output[Any] | None) -> pulumi.Output[str | None] | None:
    """How the controller reaches a site's VMs through its bastion: "<admin user>@<public address>"."""
    if bastion_ip is None:
        return None
    return bastion_ip.apply(lambda ip: None if ip is None else f"{operator.admin_user}@{ip}")


def vm_record(
    vm: VmPlan,
    participant: str,
    cloud: str,
    region: str,
    private_ip: Any,
    public_ip: Any = None,
    jump: Any = None,
) -> dict[str, Any]:
    """One VM of the `inventory` output (the keys of fedfleet.inventory.VM); `jump` from jump_host."""
    return {
        "name": vm.name,
        "participant": participant,
        "private_ip": private_ip,
        "public_ip": public_ip,
        "vcpu": vm.vcpu,
        "memory_gib": vm.memory_gib,
        "disk_gib": vm.disk_gib,
        "instance_type": vm.instance_type,
        "cloud": cloud,
        "region": region,
        "jump_host": jump,
    }


def host_cidrs(addresses: list[str]) -> list[str]:
    """Single-address CIDRs for firewall rules (x.x.x.x -> x.x.x.x/32)."""
    return [a if "/" in a else f"{a}/32" for a in addresses if a]


class AggregatorComponent(pulumi.ComponentResource):
    """The outputs every cloud's aggregator publishes, under the same names."""

    def publish(self, cloud: str, plan: AggregatorPlan, public_ip: Any, private_ip: Any) -> None:
        self.public_ip = pulumi.Output.from_input(public_ip)
        self.private_ip = pulumi.Output.from_input(private_ip)
        self.port = pulumi.Output.from_input(plan.port)
        self.cloud = pulumi.Output.from_input(cloud)
        self.region = pulumi.Output.from_input(plan.region)
        self.instance_type = pulumi.Output.from_input(plan.instance_type)
        self.register_outputs(
            {"public_ip": self.public_ip, "private_ip": self.private_ip, "port": self.port,
             "cloud": self.cloud, "region": self.region, "instance_type": self.instance_type}
        )  # fmt: skip


class SiteComponent(pulumi.ComponentResource):
    """The outputs every cloud's participant site publishes, under the same names."""

    def publish(self, egress_ip: Any, bastion_ip: Any, records: list[dict[str, Any]]) -> None:
        self.egress_ip = pulumi.Output.from_input(egress_ip)
        self.bastion_ip = pulumi.Output.from_input(bastion_ip)
        self.vms = pulumi.Output.all(*records)
        self.register_outputs({"egress_ip": self.egress_ip, "bastion_ip": self.bastion_ip, "vms": self.vms})
