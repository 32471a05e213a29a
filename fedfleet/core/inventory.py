"""The `inventory`: the one structure that joins provisioning to configuration.

Cloud stacks export it as the Pulumi stack output `inventory`; the local stack
builds the same structure without Pulumi. Everything downstream (Ansible
inventory, the orchestrator, `fedfleet run`) reads only this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class VM:
    name: str
    participant: str
    cloud: str
    region: str
    private_ip: str
    public_ip: str | None
    vcpu: int
    memory_gib: float
    disk_gib: int
    instance_type: str | None = None
    # Local stack only: the emulated VM's disk and its SuperNode's runtime port.
    home: str | None = None
    port: int | None = None
    # Cloud sites: "user@address" of the site's SSH bastion, through which the controller
    # reaches the private address (None: directly, or through the stack file's ssh.jumpHost).
    jump_host: str | None = None

    @property
    def address(self) -> str:
        """Where the controller reaches it (a site's VMs have private addresses only)."""
        return self.private_ip


@dataclass(frozen=True)
class AggregatorHost:
    name: str
    cloud: str
    region: str
    instance_type: str
    address: str
    port: int
    home: str | None = None
    private_ip: str | None = None
    # Where the controller reaches it over SSH when that is not `address` (where the
    # SuperNodes reach the SuperLink).
    ssh_address: str | None = None

    @property
    def admin_address(self) -> str:
        return self.ssh_address or self.address


@dataclass(frozen=True)
class Inventory:
    stack: str
    aggregator: AggregatorHost
    participants: dict[str, tuple[VM, ...]] = field(default_factory=dict)

    def vms(self) -> list[VM]:
        return [vm for vms in self.participants.values() for vm in vms]

    def vm(self, name: str) -> VM:
        for vms in self.participants.values():
            for vm in vms:
                if vm.name == name:
                    return vm
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "aggregator": asdict(self.aggregator),
            "participants": {name: [asdict(vm) for vm in vms] for name, vms in self.participants.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, partial: bool = False) -> Inventory:
        """Read an inventory; with `partial` (what Pulumi created of a mixed stack) the
        aggregator may be missing (None): the stack gives it by address."""
        agg = data["aggregator"]
        if agg is None and not partial:
            raise ValueError("it has no aggregator")
        return cls(
            stack=data["stack"],
            aggregator=None if agg is None else AggregatorHost(**agg),  # type: ignore[arg-type]
            participants={name: tuple(VM(**vm) for vm in vms) for name, vms in data["participants"].items()},
        )
