"""Azure: the aggregator and a participant site, each in its own resource group.

The provider is explicit per region; every resource also names its `location`.
Each component gets its own virtual network with one subnet. Subnets are private
(`default_outbound_access=False`): outbound goes through the aggregator's public
IP or the site's NAT gateway, never Azure's implicit default outbound address.

Inbound is decided by one network security group per component. Azure's default
NSG rules admit the whole virtual network (and peered ones) and Azure's load
balancer, so each NSG ends with an explicit Deny-all at the lowest priority: the
rules above it are the only way in.

A site's bastion sits in the site's subnet, so the site's "within the site" rule
admits its SSH to the VMs. Azure applies both the subnet's NSG and the NIC's to
inbound traffic: the bastion's NIC has an NSG of its own (SSH from the operator,
deny the rest) and the site's NSG admits SSH from the operator to the bastion only
(its application security group), nothing else from outside.

Image: Canonical's Ubuntu 24.04 LTS (Gen2) marketplace image, version "latest".
Azure resolves "latest" in the VM's region when the VM is created, so every
region gets its newest published image without a version pinned here (a newer
image later does not replace running VMs). azure-native has no invoke that looks
up a marketplace image version, so nothing is looked up at preview.

VMs are Trusted Launch (secure boot and vTPM, like GCP's Shielded VM), have no
managed identity (no cloud API credentials on the VM) and disks on Standard SSD,
which every VM size takes and Azure encrypts at rest with platform keys.
"""

from __future__ import annotations

import base64

import pulumi
import pulumi_azure_native as azure_native
from pulumi_azure_native import compute, network, resources

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

UBUNTU = compute.ImageReferenceArgs(
    publisher="Canonical", offer="ubuntu-24_04-lts", sku="server", version="latest"
)
DISK_SKU = "StandardSSD_LRS"
DATA_LUN = 0  # the data disk shows up as /dev/disk/azure/scsi1/lun0
# NSG priorities: 100 is the highest a rule may have, 4096 the lowest.
FIRST_PRIORITY = 100
DENY_PRIORITY = 4096


def _group(
    name: str, region: str, tags: dict[str, str], child: pulumi.ResourceOptions
) -> resources.ResourceGroup:
    return resources.ResourceGroup(f"{name}-rg", location=region, tags=tags, opts=child)


def _network(
    name: str,
    region: str,
    cidr: str,
    group: resources.ResourceGroup,
    tags: dict[str, str],
    child: pulumi.ResourceOptions,
    nat: network.NatGateway | None = None,
    firewall: network.NetworkSecurityGroup | None = None,
) -> tuple[network.VirtualNetwork, network.Subnet]:
    """The component's virtual network and its one private subnet (a standalone Subnet resource,
    so the network has no inline `subnets`: azure-native keeps standalone subnets on updates)."""
    vnet = network.VirtualNetwork(
        f"{name}-vnet",
        resource_group_name=group.name,
        location=region,
        address_space=network.AddressSpaceArgs(address_prefixes=[cidr]),
        tags=tags,
        opts=child,
    )
    subnet = network.Subnet(
        f"{name}-subnet",
        resource_group_name=group.name,
        virtual_network_name=vnet.name,
        address_prefix=cidr,
        default_outbound_access=False,
        nat_gateway=network.SubResourceArgs(id=nat.id) if nat else None,
        network_security_group=network.NetworkSecurityGroupArgs(id=firewall.id) if firewall else None,
        opts=child,
    )
    return vnet, subnet


def _public_ip(
    name: str,
    region: str,
    group: resources.ResourceGroup,
    tags: dict[str, str],
    child: pulumi.ResourceOptions,
) -> network.PublicIPAddress:
    """A Standard, static IPv4 address: allocated at creation, closed to inbound unless an NSG allows it."""
    return network.PublicIPAddress(
        name,
        resource_group_name=group.name,
        location=region,
        sku=network.PublicIPAddressSkuArgs(name="Standard", tier="Regional"),
        public_ip_allocation_method="Static",
        public_ip_address_version="IPv4",
        tags=tags,
        opts=child,
    )


def _allow(
    name: str, priority: int, protocol: str, port: str, sources: list[str], description: str
) -> network.SecurityRuleArgs:
    return network.SecurityRuleArgs(
        name=name,
        description=description,
        direction="Inbound",
        access="Allow",
        priority=priority,
        protocol=protocol,
        source_address_prefixes=sources,
        source_port_range="*",
        destination_address_prefix="*",
        destination_port_range=port,
    )


DENY_ALL_INBOUND = network.SecurityRuleArgs(
    name="deny-all-inbound",
    description="everything the rules above do not admit, including Azure's default VirtualNetwork allow",
    direction="Inbound",
    access="Deny",
    priority=DENY_PRIORITY,
    protocol="*",
    source_address_prefix="*",
    source_port_range="*",
    destination_address_prefix="*",
    destination_port_range="*",
)


def _ssh_from_operator(priority: int, operator_cidr: str) -> network.SecurityRuleArgs:
    return _allow(
        "ssh-from-operator", priority, "Tcp", str(SSH_PORT), [operator_cidr], "SSH from the operator"
    )


def aggregator_rules(port: int, sources: list[str], operator_cidr: str) -> list[network.SecurityRuleArgs]:
    """SuperLink from the participants' egress addresses (no rule when there are none: Azure rejects
    a rule without sources), SSH from the operator, then deny the rest."""
    rules = []
    if sources:
        rules.append(
            _allow("superlink-from-participants", FIRST_PRIORITY, "Tcp", str(port), sources,
                   "Flower SuperLink (Fleet API) from participant sites")
        )  # fmt: skip
    rules.append(_ssh_from_operator(FIRST_PRIORITY + 10, operator_cidr))
    return [*rules, DENY_ALL_INBOUND]


def bastion_rules(operator_cidr: str) -> list[network.SecurityRuleArgs]:
    """The bastion's NIC: SSH from the operator, then deny the rest."""
    return [_ssh_from_operator(FIRST_PRIORITY, operator_cidr), DENY_ALL_INBOUND]


def site_rules(
    cidr: str, operator_cidr: str, bastion: network.ApplicationSecurityGroup | None
) -> list[network.SecurityRuleArgs]:
    """The site's subnet: everything from inside the site; SSH from the operator to the bastion
    (its application security group), when the site has one; then deny the rest."""
    rules = [_allow("within-site", FIRST_PRIORITY, "*", "*", [cidr], "within the site")]
    if bastion is not None:
        rules.append(
            network.SecurityRuleArgs(
                name="ssh-to-bastion-from-operator",
                description="SSH from the operator to the site's bastion",
                direction="Inbound",
                access="Allow",
                priority=FIRST_PRIORITY + 10,
                protocol="Tcp",
                source_address_prefixes=[operator_cidr],
                source_port_range="*",
                destination_application_security_groups=[network.ApplicationSecurityGroupArgs(id=bastion.id)],
                destination_port_range=str(SSH_PORT),
            )
        )
    return [*rules, DENY_ALL_INBOUND]


def _vm(
    name: str,
    computer_name: str,
    size: str,
    region: str,
    group: resources.ResourceGroup,
    nic: network.NetworkInterface,
    operator: Operator,
    tags: dict[str, str],
    child: pulumi.ResourceOptions,
    data_disks: list[compute.DataDiskArgs] | None = None,
) -> compute.VirtualMachine:
    """An Ubuntu VM that only takes the operator's SSH key; cloud-init readies it for Ansible."""
    return compute.VirtualMachine(
        name,
        resource_group_name=group.name,
        location=region,
        hardware_profile=compute.HardwareProfileArgs(vm_size=size),
        os_profile=compute.OSProfileArgs(
            computer_name=computer_name,
            admin_username=operator.admin_user,
            custom_data=base64.b64encode(cloud_init(operator).encode()).decode(),
            linux_configuration=compute.LinuxConfigurationArgs(
                disable_password_authentication=True,
                provision_vm_agent=True,
                ssh=compute.SshConfigurationArgs(
                    public_keys=[
                        compute.SshPublicKeyArgs(
                            path=f"/home/{operator.admin_user}/.ssh/authorized_keys",
                            key_data=operator.ssh_public_key,
                        )
                    ]
                ),
            ),
        ),
        storage_profile=compute.StorageProfileArgs(
            image_reference=UBUNTU,
            os_disk=compute.OSDiskArgs(
                create_option="FromImage",
                delete_option="Delete",
                managed_disk=compute.ManagedDiskParametersArgs(storage_account_type=DISK_SKU),
            ),
            data_disks=data_disks,
        ),
        network_profile=compute.NetworkProfileArgs(
            network_interfaces=[compute.NetworkInterfaceReferenceArgs(id=nic.id, primary=True)]
        ),
        security_profile=compute.SecurityProfileArgs(
            security_type="TrustedLaunch",
            uefi_settings=compute.UefiSettingsArgs(secure_boot_enabled=True, v_tpm_enabled=True),
        ),
        diagnostics_profile=compute.DiagnosticsProfileArgs(
            boot_diagnostics=compute.BootDiagnosticsArgs(enabled=True)  # managed storage: no account
        ),
        tags=tags,
        opts=child,
    )


def _private_ip(nic: network.NetworkInterface) -> pulumi.Output[str | None]:
    return nic.ip_configurations.apply(lambda configs: configs[0].private_ip_address if configs else None)


def _public_vm(
    name: str,
    computer_name: str,
    size: str,
    region: str,
    group: resources.ResourceGroup,
    subnet: network.Subnet,
    rules: pulumi.Input[list[network.SecurityRuleArgs]],
    operator: Operator,
    tags: dict[str, str],
    child: pulumi.ResourceOptions,
    asg: network.ApplicationSecurityGroup | None = None,
) -> tuple[network.PublicIPAddress, network.NetworkInterface]:
    """A VM with a static public address, its NIC behind an NSG of `rules` (and in `asg`)."""
    firewall = network.NetworkSecurityGroup(
        f"{name}-firewall",
        resource_group_name=group.name,
        location=region,
        security_rules=rules,
        tags=tags,
        opts=child,
    )
    address = _public_ip(f"{name}-ip", region, group, tags, child)
    nic = network.NetworkInterface(
        f"{name}-nic",
        resource_group_name=group.name,
        location=region,
        ip_configurations=[
            network.NetworkInterfaceIPConfigurationArgs(
                name="primary",
                primary=True,
                subnet=network.SubnetArgs(id=subnet.id),
                private_ip_allocation_method="Dynamic",
                public_ip_address=network.PublicIPAddressArgs(id=address.id),
                application_security_groups=None
                if asg is None
                else [network.ApplicationSecurityGroupArgs(id=asg.id)],
            )
        ],
        network_security_group=network.NetworkSecurityGroupArgs(id=firewall.id),
        tags=tags,
        opts=child,
    )
    _vm(f"{name}-vm", computer_name, size, region, group, nic, operator, tags, child)
    return address, nic


class Aggregator(AggregatorComponent):
    """A public VM for the SuperLink: its port open only to the participants, SSH only to the operator."""

    def __init__(self, name: str, args: AggregatorArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("fedfleet:azure:Aggregator", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=opts.provider if opts else None)
        plan, tags = args.plan, args.tags.of("aggregator")
        group = _group(name, plan.region, tags, child)
        _, subnet = _network(name, plan.region, plan.cidr, group, tags, child)
        sources = pulumi.Output.from_input(args.participant_sources).apply(host_cidrs)
        rules = sources.apply(lambda cidrs: aggregator_rules(plan.port, cidrs, args.operator.cidr))
        address, nic = _public_vm(
            name, name, plan.instance_type, plan.region, group, subnet, rules, args.operator, tags, child
        )
        self.publish("azure", plan, address.ip_address, _private_ip(nic))


class ParticipantSite(SiteComponent):
    """A private network (no inbound from the internet, outbound through a NAT gateway), its VMs,
    and its SSH bastion (SSH only from the operator)."""

    def __init__(self, name: str, args: SiteArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("fedfleet:azure:ParticipantSite", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=opts.provider if opts else None)
        plan = args.plan
        tags = args.tags.of("participant", plan.participant)
        group = _group(name, plan.region, tags, child)
        # Outbound through the NAT gateway on one static address: the site's egress IP, which
        # the aggregator's NSG admits.
        egress_ip = _public_ip(f"{name}-nat-ip", plan.region, group, tags, child)
        nat = network.NatGateway(
            f"{name}-nat",
            resource_group_name=group.name,
            location=plan.region,
            sku=network.NatGatewaySkuArgs(name="Standard"),
            public_ip_addresses=[network.SubResourceArgs(id=egress_ip.id)],
            tags=tags,
            opts=child,
        )
        bastion_tags = args.tags.of("bastion", plan.participant)
        # The bastion's application security group: the only destination of the operator's SSH
        # through the site's NSG.
        bastion_group = (
            None
            if plan.bastion_type is None
            else network.ApplicationSecurityGroup(
                f"{name}-bastion-asg", resource_group_name=group.name, location=plan.region, tags=bastion_tags,
                opts=child,
            )
        )  # fmt: skip
        firewall = network.NetworkSecurityGroup(
            f"{name}-firewall",
            resource_group_name=group.name,
            location=plan.region,
            security_rules=site_rules(plan.cidr, args.operator.cidr, bastion_group),
            tags=tags,
            opts=child,
        )
        _, subnet = _network(name, plan.region, plan.cidr, group, tags, child, nat=nat, firewall=firewall)
        bastion_ip = None
        if plan.bastion_type is not None:
            address, _ = _public_vm(
                f"{name}-bastion", f"{plan.participant}-bastion", plan.bastion_type, plan.region, group, subnet,
                bastion_rules(args.operator.cidr), args.operator, bastion_tags, child, asg=bastion_group,
            )  # fmt: skip
            bastion_ip = address.ip_address
        jump = jump_host(args.operator, bastion_ip)
        records = []
        for vm_plan in plan.vms:
            vm_name = f"{name}-{vm_plan.name}"
            vm_tags = {**tags, "vm": vm_plan.name}
            nic = network.NetworkInterface(
                f"{vm_name}-nic",
                resource_group_name=group.name,
                location=plan.region,
                ip_configurations=[
                    network.NetworkInterfaceIPConfigurationArgs(
                        name="primary",
                        primary=True,
                        subnet=network.SubnetArgs(id=subnet.id),
                        private_ip_allocation_method="Dynamic",
                    )
                ],
                tags=vm_tags,
                opts=child,
            )
            # A disk of its own, not created by the VM: it survives a VM replacement.
            disk = compute.Disk(
                f"{vm_name}-data",
                resource_group_name=group.name,
                location=plan.region,
                creation_data=compute.CreationDataArgs(create_option="Empty"),
                disk_size_gb=vm_plan.disk_gib,
                sku=compute.DiskSkuArgs(name=DISK_SKU),
                tags=vm_tags,
                opts=child,
            )
            data = compute.DataDiskArgs(
                lun=DATA_LUN,
                create_option="Attach",
                delete_option="Detach",
                managed_disk=compute.ManagedDiskParametersArgs(id=disk.id),
            )
            _vm(vm_name, vm_plan.name, vm_plan.instance_type, plan.region, group, nic, args.operator,
                vm_tags, child, data_disks=[data])  # fmt: skip
            records.append(
                vm_record(vm_plan, plan.participant, "azure", plan.region, _private_ip(nic), jump=jump)
            )
        self.publish(egress_ip.ip_address, bastion_ip, records)


def provider(region: str, accounts: Accounts) -> pulumi.ProviderResource:
    """Credentials from the environment (az login or ARM_* variables); the subscription too,
    unless the stack sets azure-native:subscriptionId."""
    return azure_native.Provider(
        f"azure-{region}", location=region, subscription_id=accounts.azure_subscription_id
    )
