"""The local stack's emulated network, made and removed with iproute2
(`fedfleet:local.network: namespaces`; the plan is `fedfleet.core.network`).

A VM's supervisor runs inside its
namespace (the `flower_common_netns` variable), so its SuperNode reaches the SuperLink
only over that link, and the link can fail alone: `ip -n <namespace> link set eth0 down`
cuts it as a real network fault would. Needs root and iproute2 (`ip`).

A subnet already on another interface is refused.

Exposure: the bridge's address is this machine's own, and Linux answers for its own
addresses on every interface, so a machine on the same LAN that routes the subnet to
this one could reach the SuperLink (TLS and node authentication still hold; Flower's
Control API, on the same port, has none). The mode is for rehearsing faults on a
machine you control, not for serving.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from fedfleet.adapters.processes import terminate
from fedfleet.core.errors import EnvironmentProblem
from fedfleet.core.network import VM_INTERFACE, Network, bridge_name
from fedfleet.core.stack import PROJECT

NETNS_DIR = Path("/run/netns")


def why_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise EnvironmentProblem(
            f"`ip {' '.join(args)}` failed: {done.stderr.strip()}. {PROJECT}:local.network: namespaces "
            "needs root and iproute2; set it to loopback to emulate the VMs on this machine's loopback"
        )
    return done


def _exists(link: str, namespace: str | None = None) -> bool:
    where = ("-n", namespace) if namespace else ()
    return _ip(*where, "link", "show", link, check=False).returncode == 0


def ensure(net: Network) -> None:
    """Create what is missing of the bridge, the namespaces and their links; bring every
    link up (a link cut in an earlier run comes back). Idempotent."""
    why = why_unavailable()
    if why:
        raise EnvironmentProblem(
            f"{PROJECT}:local.network is namespaces, but {why}. Run fedfleet as root, or set "
            f"{PROJECT}:local.network to loopback"
        )
    _check_subnet_free(net)
    if not _exists(net.bridge):
        _ip("link", "add", net.bridge, "type", "bridge")
    gateway = f"{net.gateway}/{net.prefixlen}"
    if gateway not in _ip("-o", "addr", "show", "dev", net.bridge).stdout:
        _ip("addr", "add", gateway, "dev", net.bridge)
    _ip("link", "set", net.bridge, "up")
    for vm, address in net.vms.items():
        ns = net.namespace(vm)
        if not (NETNS_DIR / ns).exists():
            _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        outside = net.host_interface(vm)
        if not _exists(VM_INTERFACE, ns):
            if _exists(outside):  # half made by an interrupted run
                _ip("link", "del", outside)
            _ip("link", "add", outside, "type", "veth", "peer", "name", VM_INTERFACE, "netns", ns)
        _ip("link", "set", outside, "master", net.bridge, "up")
        inside = f"{address}/{net.prefixlen}"
        if inside not in _ip("-n", ns, "-o", "addr", "show", "dev", VM_INTERFACE).stdout:
            _ip("-n", ns, "addr", "add", inside, "dev", VM_INTERFACE)
        _ip("-n", ns, "link", "set", VM_INTERFACE, "up")


def _check_subnet_free(net: Network) -> None:
    """Refuse a subnet another interface (another stack's bridge, a LAN) already has."""
    subnet = ipaddress.ip_network(f"{net.gateway}/{net.prefixlen}", strict=False)
    listed = json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]")
    for link in listed:
        if link.get("ifname") == net.bridge:
            continue
        for addr in link.get("addr_info", []):
            address = ipaddress.ip_interface(f"{addr['local']}/{addr['prefixlen']}")
            if address.network.overlaps(subnet):
                raise EnvironmentProblem(
                    f"{PROJECT}:local.subnet {subnet} overlaps {address} on {link['ifname']} (another "
                    "local stack's bridge, or a network this machine is on); choose a free private "
                    "network for fedfleet:local.subnet"
                )


def _bridge_present(tag: str) -> bool:
    return Path("/sys/class/net", bridge_name(tag)).exists()


def remove(tag: str, stop_timeout: float = 10.0) -> list[str]:
    """Stop whatever still runs in the namespaces tagged `tag`, then delete them and the
    bridge (also what a stack file no longer lists); the namespaces that were there.
    Raise if any is left."""
    present = namespaces_left([tag])
    if not present and not _bridge_present(tag):
        return []
    pids: set[int] = set()
    for ns in present:
        listed = _ip("netns", "pids", ns, check=False)
        pids |= {int(p) for p in listed.stdout.split()}
    terminate(pids, stop_timeout)
    for ns in present:
        _ip("netns", "del", ns, check=False)  # its veth pair goes with it
    if _bridge_present(tag):
        _ip("link", "del", bridge_name(tag), check=False)
    left = namespaces_left([tag]) + ([bridge_name(tag)] if _bridge_present(tag) else [])
    if left:
        raise EnvironmentProblem(
            f"could not remove the local stack's network: {', '.join(left)} remain. Remove them as "
            "root (`ip netns del <name>`, `ip link del <bridge>`)"
        )
    return present


def set_link(net: Network, vm: str, up: bool) -> None:
    """Cut (or restore) a VM's network link, as a fault would."""
    _ip("-n", net.namespace(vm), "link", "set", VM_INTERFACE, "up" if up else "down")


def namespaces_left(tags: Sequence[str]) -> list[str]:
    """Namespaces whose name carries one of `tags` (tests: nothing left behind)."""
    if not NETNS_DIR.exists():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if any(p.name.startswith(f"ff{t}-") for t in tags))
