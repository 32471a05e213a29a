"""The local stack's emulated network, planned (`fedfleet:local.network: namespaces`).

Pure: names and addresses only; `fedfleet.adapters.netns` makes them with `ip`. Each
emulated VM gets its own network namespace, joined to this machine by a veth pair on a
private bridge: the bridge holds the subnet's first address (the SuperLink listens there),
the VMs the next ones, in stack-file order. Names carry a tag made from the stack's root
directory, so two local stacks never share a namespace or bridge; interface names stay
within Linux's 15 characters.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from fedfleet.core.stack import StackConfig

VM_INTERFACE = "eth0"


def bridge_name(tag: str) -> str:
    return f"ffb{tag}"


@dataclass(frozen=True)
class Network:
    tag: str
    gateway: str  # the bridge's address: where the SuperLink listens
    prefixlen: int
    vms: dict[str, str]  # vm -> its address

    @property
    def bridge(self) -> str:
        return bridge_name(self.tag)

    def namespace(self, vm: str) -> str:
        return f"ff{self.tag}-{vm}"

    def host_interface(self, vm: str) -> str:
        """The bridge's end of the VM's veth pair (named from the VM, not its position)."""
        return f"ffv{hashlib.sha256(f'{self.tag}/{vm}'.encode()).hexdigest()[:8]}"


def tag_for(root: Path) -> str:
    return hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:5]


def plan(stack: StackConfig, root: Path) -> Network | None:
    """The network of a local stack in namespaces mode (None in loopback mode)."""
    if stack.local is None or stack.local.network != "namespaces":
        return None
    tag = tag_for(root)
    subnet = ipaddress.ip_network(stack.local.subnet)
    hosts = subnet.hosts()
    gateway = str(next(hosts))
    names = [vm.name for p in stack.participants for vm in p.vms]
    return Network(tag, gateway, subnet.prefixlen, {vm: str(next(hosts)) for vm in names})
