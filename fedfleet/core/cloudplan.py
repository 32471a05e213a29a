"""What a cloud stack provisions, decided before any resource is declared.

Pure logic: the validated stack plus the catalog give one frozen plan — the
aggregator where `fedfleet plan` put it, one private site per participant with
its CIDR, each VM's instance type (given, or the catalog's cheapest type in
that region with at least the VM's vCPU and memory) and the site's SSH bastion
(the catalog's cheapest type in that region, unless the participant says
`bastion: false`). Every error names the stack file and key. The Pulumi program
(infra/) only turns this plan into resources.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fedfleet.core.catalog import Catalog, Price
from fedfleet.core.errors import ConfigError
from fedfleet.core.stack import PROJECT, Operator, StackConfig, VMSpec
from fedfleet.core.util import closest

DEFAULT_SITE_CIDR = "10.{n}.0.0/16"  # participant i gets 10.(20 + i).0.0/16
# Resource names are "site-<participant>-<vm>-<suffix>" plus Pulumi's 8-character
# auto-name suffix; each cloud caps names (GCP 63, Azure VM names 64, AWS tags 256).
# A site's bastion is "site-<participant>-bastion-vm" (and on GCP "-ip", "-ssh"): no
# longer than a VM's names, so the VMs' check covers it.
AUTONAME_SUFFIX = 8
MAX_NAME = {"gcp": 63, "azure": 64, "aws": 255}


@dataclass(frozen=True)
class VmPlan:
    name: str
    instance_type: str
    vcpu: int
    memory_gib: float
    disk_gib: int


@dataclass(frozen=True)
class SitePlan:
    participant: str
    cloud: str
    region: str
    cidr: str
    vms: tuple[VmPlan, ...]
    # The instance type of the site's SSH bastion (the controller's way to the VMs' private
    # addresses); None: no bastion (the operator reaches them through a VPN or a jump host).
    bastion_type: str | None = None


@dataclass(frozen=True)
class AggregatorPlan:
    cloud: str
    region: str
    instance_type: str
    vcpu: int
    memory_gib: float
    port: int
    cidr: str


@dataclass(frozen=True)
class InfraPlan:
    """What Pulumi creates. Hosts the stack gives by address are not in it: a mixed stack
    (e.g. a cloud aggregator for on-premises participants) plans only the cloud part."""

    stack: str
    operator: Operator
    aggregator: AggregatorPlan | None  # None: the aggregator is a machine given by address
    sites: tuple[SitePlan, ...]
    # Public ranges the participants with machines of their own connect from: admitted to
    # the SuperLink port beside the cloud sites' NAT addresses.
    own_sources: tuple[str, ...] = ()

    @property
    def locations(self) -> list[tuple[str, str]]:
        """Every (cloud, region) the stack touches: one explicit provider each."""
        seen = [(self.aggregator.cloud, self.aggregator.region)] if self.aggregator else []
        seen += [(s.cloud, s.region) for s in self.sites]
        return list(dict.fromkeys(seen))


def infra_plan(stack: StackConfig, catalog: Catalog) -> InfraPlan:
    where = f"{stack.path}: {PROJECT}:"
    if stack.is_local:
        raise ConfigError(
            f"{stack.path}: is a local stack (it has {PROJECT}:local): its VMs are emulated by "
            "`fedfleet up --stack local`, not provisioned with Pulumi"
        )
    if stack.kind == "hosts":
        raise ConfigError(
            f"{stack.path}: every host of stack {stack.name!r} is given by address: there is "
            "nothing for Pulumi to create (`fedfleet up` only checks and prints its inventory)"
        )
    agg = stack.aggregator
    if agg.existing:
        return _plan_sites(stack, catalog, None)
    if not agg.placed:
        raise ConfigError(
            f"{where}aggregator: has no cloud, region and instanceType yet; run "
            f"`fedfleet plan --stack {stack.name}` to place it (it writes them into the file)"
        )
    assert agg.cloud and agg.region and agg.instance_type
    price = catalog.prices.get((agg.cloud, agg.region, agg.instance_type))
    if price is None:
        regions = sorted({r for c, r, _ in catalog.prices if c == agg.cloud})
        if agg.region not in regions:
            raise ConfigError(
                f"{where}aggregator.region: {agg.region!r} is not an {agg.cloud} region in the catalog ({closest(agg.region, regions, n=3)})"
            )
        types = sorted(t for c, r, t in catalog.prices if (c, r) == (agg.cloud, agg.region))
        raise ConfigError(
            f"{where}aggregator.instanceType: {agg.instance_type!r} is not priced in {agg.cloud} "
            f"{agg.region} ({closest(agg.instance_type, types, n=3)})"
        )
    return _plan_sites(
        stack,
        catalog,
        AggregatorPlan(
            agg.cloud, agg.region, agg.instance_type, price.vcpu, price.memory_gib, agg.port, agg.cidr
        ),
    )


def _plan_sites(stack: StackConfig, catalog: Catalog, aggregator: AggregatorPlan | None) -> InfraPlan:
    where = f"{stack.path}: {PROJECT}:"
    agg = stack.aggregator
    if stack.operator is None:
        raise ConfigError(
            f"{where}operator: is required for a cloud stack: {{sshPublicKey: <contents of your "
            "~/.ssh/id_ed25519.pub>, cidr: <the network you administer from, e.g. 203.0.113.7/32>}"
        )
    networks = {f"{PROJECT}:aggregator.cidr": ipaddress.ip_network(agg.cidr)}
    sites = []
    for i, p in enumerate(stack.participants):
        if p.existing:
            continue
        key = f"{PROJECT}:participants[{i}]"
        regions = sorted({r for c, r, _ in catalog.prices if c == p.cloud})
        if p.region not in regions:
            raise ConfigError(
                f"{stack.path}: {key}.region: {p.region!r} is not a {p.cloud} region in the catalog ({closest(p.region, regions, n=3)})"
            )
        cidr = p.cidr or DEFAULT_SITE_CIDR.format(n=20 + i)
        net = ipaddress.ip_network(cidr)
        for other, existing in networks.items():
            if net.overlaps(existing):
                raise ConfigError(
                    f"{stack.path}: {key}.cidr: {cidr} overlaps {other} ({existing}); give each site its own range"
                )
        networks[f"{key}.cidr"] = net
        vms = []
        for j, vm in enumerate(p.vms):
            vms.append(_vm(catalog, p.cloud, p.region, vm, f"{stack.path}: {key}.vms[{j}]"))
            longest = len(f"site-{p.name}-{vm.name}-data-attach") + AUTONAME_SUFFIX
            if longest > MAX_NAME[p.cloud]:
                raise ConfigError(
                    f"{stack.path}: {key}.vms[{j}].name: resource names built from participant "
                    f"{p.name!r} and VM {vm.name!r} reach {longest} characters, over {p.cloud}'s "
                    f"{MAX_NAME[p.cloud]}; shorten the participant or VM name"
                )
        bastion = _cheapest(catalog, p.cloud, p.region) if p.bastion else None
        sites.append(SitePlan(p.name, p.cloud, p.region, cidr, tuple(vms), bastion))
    return InfraPlan(
        stack=stack.name,
        operator=stack.operator,
        aggregator=aggregator,
        sites=tuple(sites),
        own_sources=tuple(p.egress_cidr for p in stack.participants if p.existing and p.egress_cidr),
    )


def _vm(catalog: Catalog, cloud: str, region: str, vm: VMSpec, where: str) -> VmPlan:
    # VMs to create always have a size (only hosts given by address have none).
    assert vm.vcpu is not None and vm.memory_gib is not None and vm.disk_gib is not None
    priced = [p for (c, r, _), p in catalog.prices.items() if (c, r) == (cloud, region)]
    if vm.instance_type:
        match = next((p for p in priced if p.instance_type == vm.instance_type), None)
        if match is None:
            raise ConfigError(
                f"{where}.instanceType: {vm.instance_type!r} is not priced in {cloud} {region} ({closest(vm.instance_type, sorted(p.instance_type for p in priced), n=3)})"
            )
        if match.vcpu < vm.vcpu or match.memory_gib < vm.memory_gib:
            raise ConfigError(
                f"{where}.instanceType: {vm.instance_type} has {match.vcpu} vCPU / {match.memory_gib:g} GiB, less than the VM's vcpu {vm.vcpu} / memoryGib {vm.memory_gib:g}"
            )
        return VmPlan(vm.name, match.instance_type, match.vcpu, match.memory_gib, vm.disk_gib)
    fits = [p for p in priced if p.vcpu >= vm.vcpu and p.memory_gib >= vm.memory_gib]
    if not fits:
        raise ConfigError(
            f"{where}: no instance type in {cloud} {region} has {vm.vcpu} vCPU and {vm.memory_gib:g} GiB in the catalog; lower the size or set instanceType"
        )
    best = min(fits, key=_price_order)
    return VmPlan(vm.name, best.instance_type, best.vcpu, best.memory_gib, vm.disk_gib)


def _cheapest(catalog: Catalog, cloud: str, region: str) -> str:
    """The catalog's cheapest instance type in (cloud, region): enough for a bastion, which only
    forwards SSH (the region is known to be in the catalog)."""
    priced = [p for (c, r, _), p in catalog.prices.items() if (c, r) == (cloud, region)]
    return min(priced, key=_price_order).instance_type


def _price_order(p: Price) -> tuple[float, int, float, str]:
    """Cheapest first; ties to the smaller, then by name (the same plan on every run)."""
    return (p.usd_per_hour, p.vcpu, p.memory_gib, p.instance_type)
