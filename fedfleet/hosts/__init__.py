"""The kinds of host: the local stack's emulated ones, and real ones over SSH.

`for_stack` gives every host of a stack's inventory as a `Host`; which kind each is
depends only on the stack, so nothing downstream asks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from fedfleet.adapters.processes import ProcessGroup
from fedfleet.adapters.ssh import Endpoint, parse_jump, pin_host_key
from fedfleet.core.inventory import Inventory
from fedfleet.core.network import plan
from fedfleet.core.paths import StackPaths, known_hosts
from fedfleet.core.stack import StackConfig
from fedfleet.hosts.base import Host
from fedfleet.hosts.local import LocalHost
from fedfleet.hosts.ssh import SSHHost


class Hosts(Mapping[str, Host]):
    """A stack's hosts by inventory name ("aggregator", then every participant VM)."""

    def __init__(self, hosts: dict[str, Host]) -> None:
        self._hosts = hosts

    def __getitem__(self, name: str) -> Host:
        return self._hosts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._hosts)

    def __len__(self) -> int:
        return len(self._hosts)

    def connect(self, names: Iterable[str]) -> dict[str, str]:
        """Open the connections of `names` at once; the hosts that failed, with why. Keys
        pinned in the stack file are recorded first, one host after another: pinning
        rewrites the known-hosts file, which the connections append to."""
        wanted = [n for n in dict.fromkeys(names) if n in self._hosts]
        for name in wanted:
            host = self._hosts[name]
            if isinstance(host, SSHHost):
                pin_host_key(host.ep)
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(wanted)))) as pool:
            results = dict(zip(wanted, pool.map(lambda n: self._hosts[n].connect(), wanted), strict=True))
        return {name: why for name, why in results.items() if why}

    def close(self) -> None:
        """Close every connection, all at once (a host still reconnecting takes seconds)."""
        hosts = list(self._hosts.values())
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(hosts)))) as pool:
            list(pool.map(lambda host: host.close(), hosts))


def endpoint(
    stack: StackConfig, paths: StackPaths, name: str, label: str, address: str, jump_host: str | None = None
) -> Endpoint:
    """How the controller reaches host `name` of a stack of real hosts. `jump_host` is the
    inventory's ("user@address" of a cloud site's bastion); an ssh.jumpHost in the stack
    file wins over it."""
    spec = stack.host(name).ssh
    key = None if spec.key_file is None else Path(spec.key_file).expanduser()
    if key is not None and not key.is_absolute():
        key = paths.project / key
    ep = Endpoint(
        name=name,
        label=label,
        address=address,
        user=spec.user,
        port=spec.port,
        key_file=key,
        known_hosts=known_hosts(stack, paths.project, spec.known_hosts),
        connect_timeout=spec.connect_timeout,
        host_key=spec.host_key,
        trust_command=f"fedfleet trust {name} --stack {stack.name}",
    )
    jump = spec.jump_host or jump_host
    if jump:
        ep = replace(ep, jump=parse_jump(jump, ep))
    return ep


def for_stack(stack: StackConfig, inventory: Inventory, paths: StackPaths, procs: ProcessGroup) -> Hosts:
    """Every host of the inventory, as the kind of host the stack has."""
    labels = {"aggregator": "aggregator"} | {
        vm.name: f"{vm.name} ({vm.participant})" for vm in inventory.vms()
    }
    hosts: dict[str, Host] = {}
    if stack.is_local:
        net = plan(stack, paths.root)
        agg = inventory.aggregator
        hosts["aggregator"] = LocalHost(
            "aggregator", "aggregator", Path(agg.home or paths.aggregator), agg.address
        )
        for vm in inventory.vms():
            home = Path(vm.home or paths.vm_home(vm.name))
            hosts[vm.name] = LocalHost(vm.name, labels[vm.name], home, vm.address, own_link=net is not None)
        return Hosts(hosts)
    logs = paths.root / "ssh"
    addresses = {"aggregator": inventory.aggregator.admin_address} | {
        vm.name: vm.address for vm in inventory.vms()
    }
    jumps = {vm.name: vm.jump_host for vm in inventory.vms()}
    for name, address in addresses.items():
        ep = endpoint(stack, paths, name, labels[name], address, jumps.get(name))
        hosts[name] = SSHHost(name, labels[name], ep, stack.host(name), procs, logs)
    return Hosts(hosts)
