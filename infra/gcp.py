"""GCP: the aggregator and a participant site, in the region of an explicit provider.

Each component gets its own VPC network (no auto subnets, so none of the
`default` network's open rules). GCP denies all ingress and allows all egress
unless a firewall rule says otherwise, so the rules below are the only way in.

A site's bastion sits in the site's own subnet (so the site's rule "everything from
inside the site's range" admits its SSH to the VMs), with an external address and a
rule of its own: SSH from the operator's network, nothing else.

VMs go in zone `<region>-b`: every GCP region has a `b` zone (some, like
us-east1 and europe-west1, have no `a`). Simple and predictable; a machine type
missing from that zone fails at `pulumi up` with GCP's own message.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from fedfleet.core.cloudplan import VmPlan
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

# Canonical's Ubuntu 24.04 LTS image family: the newest image is looked up, never pinned.
UBUNTU_PROJECT = "ubuntu-os-cloud"
UBUNTU_FAMILY = "ubuntu-2404-lts-amd64"
ZONE_SUFFIX = "b"
AGGREGATOR_TAG = "fedfleet-aggregator"  # network tags: what the firewall rules target
SITE_TAG = "fedfleet-site"
BASTION_TAG = "fedfleet-bastion"
# Machine series that take only Hyperdisk (no pd-* disks); the catalog prices n4.
HYPERDISK_ONLY = ("n4", "n4d", "n4a", "c4", "c4a", "c4d", "h4d", "m4", "x4", "a4")


def zone(region: str) -> str:
    return f"{region}-{ZONE_SUFFIX}"


def disk_type(machine_type: str) -> str:
    """The balanced persistent disk the machine series supports (boot and data disks)."""
    return "hyperdisk-balanced" if machine_type.split("-", maxsplit=1)[0] in HYPERDISK_ONLY else "pd-balanced"


def _ubuntu(opts: pulumi.ResourceOptions) -> pulumi.Output[str]:
    image = gcp.compute.get_image_output(
        family=UBUNTU_FAMILY,
        project=UBUNTU_PROJECT,
        opts=pulumi.InvokeOutputOptions(provider=opts.provider, parent=opts.parent),
    )
    return image.self_link


def _metadata(operator: Operator) -> dict[str, str]:
    """cloud-init creates the admin user; `ssh-keys` is the same key for GCE's guest agent.

    Project-wide SSH keys are blocked: only the operator's key reaches these VMs.
    """
    return {
        "user-data": cloud_init(operator),
        "ssh-keys": f"{operator.admin_user}:{operator.ssh_public_key}",
        "block-project-ssh-keys": "TRUE",
    }


def _network(
    name: str, region: str, cidr: str, child: pulumi.ResourceOptions
) -> tuple[gcp.compute.Network, gcp.compute.Subnetwork]:
    network = gcp.compute.Network(f"{name}-network", auto_create_subnetworks=False, opts=child)
    subnet = gcp.compute.Subnetwork(
        f"{name}-subnet",
        network=network.id,
        region=region,
        ip_cidr_range=cidr,
        private_ip_google_access=True,
        opts=child,
    )
    return network, subnet


def _instance(
    name: str,
    machine_type: str,
    region: str,
    image: pulumi.Input[str],
    network_interface: gcp.compute.InstanceNetworkInterfaceArgs,
    operator: Operator,
    labels: dict[str, str],
    tag: str,
    child: pulumi.ResourceOptions,
    attached_disks: list[gcp.compute.InstanceAttachedDiskArgs] | None = None,
) -> gcp.compute.Instance:
    """A Shielded VM with no service account (no cloud API credentials on the VM)."""
    return gcp.compute.Instance(
        name,
        machine_type=machine_type,
        zone=zone(region),
        boot_disk=gcp.compute.InstanceBootDiskArgs(
            initialize_params=gcp.compute.InstanceBootDiskInitializeParamsArgs(
                image=image, type=disk_type(machine_type), labels=labels
            ),
        ),
        attached_disks=attached_disks,
        network_interfaces=[network_interface],
        metadata=_metadata(operator),
        shielded_instance_config=gcp.compute.InstanceShieldedInstanceConfigArgs(
            enable_secure_boot=True, enable_vtpm=True, enable_integrity_monitoring=True
        ),
        allow_stopping_for_update=True,
        tags=[tag],
        labels=labels,
        opts=child,
    )


def _public_vm(
    name: str,
    role: str,
    machine_type: str,
    region: str,
    network: gcp.compute.Network,
    subnet: gcp.compute.Subnetwork,
    image: pulumi.Input[str],
    operator: Operator,
    labels: dict[str, str],
    tag: str,
    child: pulumi.ResourceOptions,
) -> tuple[gcp.compute.Instance, gcp.compute.Address]:
    """A VM with a static external address, and a rule admitting SSH to it (its network tag)
    from the operator's network only."""
    gcp.compute.Firewall(
        f"{name}-ssh",
        network=network.id,
        description=f"fedfleet {role}: SSH from the operator",
        direction="INGRESS",
        allows=[gcp.compute.FirewallAllowArgs(protocol="tcp", ports=[str(SSH_PORT)])],
        source_ranges=[operator.cidr],
        target_tags=[tag],
        opts=child,
    )
    address = gcp.compute.Address(
        f"{name}-ip", region=region, address_type="EXTERNAL", labels=labels, opts=child
    )
    vm = _instance(
        f"{name}-vm",
        machine_type,
        region,
        image,
        gcp.compute.InstanceNetworkInterfaceArgs(
            subnetwork=subnet.id,
            nic_type="GVNIC",
            access_configs=[gcp.compute.InstanceNetworkInterfaceAccessConfigArgs(nat_ip=address.address)],
        ),
        operator,
        labels,
        tag,
        child,
    )
    return vm, address


class Aggregator(AggregatorComponent):
    """A public VM for the SuperLink: its port open only to the participants, SSH only to the operator."""

    def __init__(self, name: str, args: AggregatorArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("fedfleet:gcp:Aggregator", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=opts.provider if opts else None)
        plan, labels = args.plan, args.tags.of("aggregator")
        network, subnet = _network(name, plan.region, plan.cidr, child)
        # GCP reads an ingress rule without sources as "from anywhere" or rejects it: with
        # no participant addresses the rule is disabled and names only the aggregator's subnet.
        sources = pulumi.Output.from_input(args.participant_sources).apply(host_cidrs)
        gcp.compute.Firewall(
            f"{name}-superlink",
            network=network.id,
            description="fedfleet aggregator: Flower SuperLink (Fleet API) from participant sites",
            direction="INGRESS",
            allows=[gcp.compute.FirewallAllowArgs(protocol="tcp", ports=[str(plan.port)])],
            source_ranges=sources.apply(lambda cidrs: cidrs or [plan.cidr]),
            disabled=sources.apply(lambda cidrs: not cidrs),
            target_tags=[AGGREGATOR_TAG],
            opts=child,
        )
        vm, address = _public_vm(
            name, "aggregator", plan.instance_type, plan.region, network, subnet, _ubuntu(child),
            args.operator, labels, AGGREGATOR_TAG, child,
        )  # fmt: skip
        self.publish("gcp", plan, address.address, vm.network_interfaces[0].network_ip)


class ParticipantSite(SiteComponent):
    """A private network (no inbound from the internet, outbound through Cloud NAT), its VMs,
    and its SSH bastion (SSH only from the operator)."""

    def __init__(self, name: str, args: SiteArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("fedfleet:gcp:ParticipantSite", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=opts.provider if opts else None)
        plan = args.plan
        labels = args.tags.of("participant", plan.participant)
        network, subnet = _network(name, plan.region, plan.cidr, child)
        # Outbound through Cloud NAT on one reserved address: the site's egress IP, which
        # the aggregator's firewall admits.
        egress_ip = gcp.compute.Address(
            f"{name}-nat-ip", region=plan.region, address_type="EXTERNAL", labels=labels, opts=child
        )
        router = gcp.compute.Router(f"{name}-router", network=network.id, region=plan.region, opts=child)
        gcp.compute.RouterNat(
            f"{name}-nat",
            router=router.name,
            region=plan.region,
            nat_ip_allocate_option="MANUAL_ONLY",
            nat_ips=[egress_ip.self_link],
            source_subnetwork_ip_ranges_to_nat="LIST_OF_SUBNETWORKS",
            subnetworks=[
                gcp.compute.RouterNatSubnetworkArgs(
                    name=subnet.id, source_ip_ranges_to_nats=["ALL_IP_RANGES"]
                )
            ],
            log_config=gcp.compute.RouterNatLogConfigArgs(enable=True, filter="ERRORS_ONLY"),
            opts=child,
        )
        gcp.compute.Firewall(
            f"{name}-firewall",
            network=network.id,
            description="fedfleet participant site: inbound only from inside the site",
            direction="INGRESS",
            allows=[gcp.compute.FirewallAllowArgs(protocol="all")],
            source_ranges=[plan.cidr],
            target_tags=[SITE_TAG],
            opts=child,
        )
        image = _ubuntu(child)
        bastion_ip = None
        if plan.bastion_type is not None:
            _, address = _public_vm(
                f"{name}-bastion", "site bastion", plan.bastion_type, plan.region, network, subnet, image,
                args.operator, args.tags.of("bastion", plan.participant), BASTION_TAG, child,
            )  # fmt: skip
            bastion_ip = address.address
        jump = jump_host(args.operator, bastion_ip)
        records = []
        for vm_plan in plan.vms:
            vm = _site_vm(f"{name}-{vm_plan.name}", vm_plan, plan.region, subnet, image, args.operator,
                          {**labels, "vm": vm_plan.name}, child)  # fmt: skip
            records.append(
                vm_record(vm_plan, plan.participant, "gcp", plan.region, vm.network_interfaces[0].network_ip,
                          jump=jump)
            )  # fmt: skip
        self.publish(egress_ip.address, bastion_ip, records)


def _site_vm(
    name: str,
    vm_plan: VmPlan,
    region: str,
    subnet: gcp.compute.Subnetwork,
    image: pulumi.Output[str],
    operator: Operator,
    labels: dict[str, str],
    child: pulumi.ResourceOptions,
) -> gcp.compute.Instance:
    """A VM without an external address (no access config) and its data disk (encrypted at rest by GCP)."""
    disk = gcp.compute.Disk(
        f"{name}-data",
        zone=zone(region),
        size=vm_plan.disk_gib,
        type=disk_type(vm_plan.instance_type),
        labels=labels,
        opts=child,
    )
    return _instance(
        name,
        vm_plan.instance_type,
        region,
        image,
        gcp.compute.InstanceNetworkInterfaceArgs(subnetwork=subnet.id, nic_type="GVNIC"),
        operator,
        labels,
        SITE_TAG,
        child,
        attached_disks=[gcp.compute.InstanceAttachedDiskArgs(source=disk.self_link, device_name="data")],
    )


def provider(region: str, accounts: Accounts) -> pulumi.ProviderResource:
    return gcp.Provider(f"gcp-{region}", project=accounts.gcp_project, region=region)
