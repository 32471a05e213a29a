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


@dataclass(frozen=True)
class Inventory:
    stack: str
    aggregator: AggregatorHost
    participants: dict[str, tuple[VM, ...]] = field(default_factory=dict)

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
    def from_dict(cls, data: dict[str, Any]) -> Inventory:
        return cls(
            stack=data["stack"],
            aggregator=AggregatorHost(**data["aggregator"]),
            participants={name: tuple(VM(**vm) for vm in vms) for name, vms in data["participants"].items()},
        )
