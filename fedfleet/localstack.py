"""The local stack: VMs emulated as directories on this machine.

`up` is the local counterpart of `pulumi up`: it creates each VM's disk (a
directory the Ansible roles then fill), the stack's TLS material on the
controller side, and returns the same `Inventory` a cloud stack exports. It is
idempotent: certificates, node keys and the SuperLink database persist between
runs, so SuperNodes stay registered.

Layout under the stack root (`fedfleet:local.root`, default `.fedfleet/<stack>`):

    pki/          ca.crt ca.key superlink.crt superlink.key node-keys/<vm>.pub  (controller)
    operator/     flwr-home/config.toml      (the operator's `flwr` CLI connection)
    aggregator/   superlink/ supervisor/ log/ runs/<run-id>/      (the aggregator's disk)
    vms/<vm>/     supernode/ supervisor/ log/                     (each VM's disk)
    sites/<participant>/data/                (default data paths, relative to the root)
    lock  pids.json  inventory.json

With `fedfleet:local.network: namespaces` the VMs also get their own network namespaces
on a private bridge (`localnet`); `up` creates them, `down_network` removes them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedfleet.adapters import netns as localnet
from fedfleet.adapters.pki import ServerTLS
from fedfleet.core.errors import EnvironmentProblem
from fedfleet.core.inventory import VM, AggregatorHost, Inventory
from fedfleet.core.stack import StackConfig


@dataclass(frozen=True)
class LocalPaths:
    root: Path

    @property
    def aggregator(self) -> Path:
        return self.root / "aggregator"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def operator_home(self) -> Path:
        return self.root / "operator" / "flwr-home"

    @property
    def pidfile(self) -> Path:
        return self.root / "pids.json"

    def vm_home(self, vm: str) -> Path:
        return self.root / "vms" / vm

    def server_output(self, run_id: str) -> Path:
        return self.aggregator / "runs" / run_id


# Linux limits a Unix socket path to 107 bytes.
MAX_SOCKET_PATH = 100


def socket_path(home: Path, name: str) -> Path:
    """`<home>/<name>.sock`, or a socket in a private 0700 directory when that path is too long."""
    path = home / f"{name}.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    private = Path("/tmp") / f"fedfleet-{os.getuid()}"  # noqa: S108 (0700, checked below)
    private.mkdir(mode=0o700, exist_ok=True)
    if private.stat().st_uid != os.getuid() or private.stat().st_mode & 0o077:
        raise EnvironmentProblem(f"{private} must be a 0700 directory owned by this user")
    return private / f"{hashlib.sha256(str(home).encode()).hexdigest()[:16]}-{name}.sock"


def paths(stack: StackConfig, project_dir: Path) -> LocalPaths:
    root = Path(stack.local.root.format(stack=stack.name))
    return LocalPaths(root if root.is_absolute() else project_dir / root)


def data_path(stack: StackConfig, project_dir: Path, participant: str) -> Path:
    path = Path(stack.participant(participant).data_path)
    return path if path.is_absolute() else paths(stack, project_dir).root / path


@contextmanager
def locked(local: LocalPaths) -> Iterator[None]:
    """Only one fedfleet command at a time may drive a local stack."""
    local.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(local.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise EnvironmentProblem(
                f"the local stack at {local.root} is in use by pid {holder}; wait for that "
                "fedfleet command to finish (or stop it) and try again"
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def up(stack: StackConfig, project_dir: Path, *, with_network: bool = True) -> Inventory:
    """Create (or reuse) the emulated VMs' disks and network; return the inventory (the same
    addresses without `with_network`, for commands that start nothing)."""
    local = paths(stack, project_dir)
    assert stack.local is not None
    net = network(stack, project_dir)
    if net is not None and with_network:
        localnet.ensure(net)
    participants: dict[str, tuple[VM, ...]] = {}
    for participant in stack.participants:
        vms = []
        for spec in participant.vms:
            home = local.vm_home(spec.name)
            home.mkdir(parents=True, exist_ok=True)
            vms.append(
                VM(
                    name=spec.name,
                    participant=participant.name,
                    cloud=participant.cloud,
                    region=participant.region,
                    private_ip=net.vms[spec.name] if net else stack.local.host,
                    public_ip=None,
                    vcpu=spec.vcpu,
                    memory_gib=spec.memory_gib,
                    disk_gib=spec.disk_gib,
                    home=str(home),
                    port=spec.port,
                )
            )
        participants[participant.name] = tuple(vms)
    local.aggregator.mkdir(parents=True, exist_ok=True)
    inventory = Inventory(
        stack=stack.name,
        aggregator=AggregatorHost(
            name="aggregator",
            cloud="local",  # emulated here; the planned placement is in stack.aggregator
            region="local",
            instance_type="local",
            address=net.gateway if net else stack.local.host,
            port=stack.aggregator.port,
            home=str(local.aggregator),
        ),
        participants=participants,
    )
    (local.root / "inventory.json").write_text(json.dumps(inventory.to_dict(), indent=2) + "\n")
    return inventory


def network(stack: StackConfig, project_dir: Path) -> localnet.Network | None:
    """The VMs' network namespaces and bridge (`fedfleet:local.network: namespaces`), or None."""
    return localnet.plan(stack, paths(stack, project_dir).root)


def down_network(stack: StackConfig, project_dir: Path) -> list[str]:
    """Delete the VMs' namespaces and bridge, if this stack root has any (after its services
    stopped; whatever the stack file says now)."""
    return localnet.remove(localnet.tag_for(paths(stack, project_dir).root))


def server_tls(stack: StackConfig, project_dir: Path) -> ServerTLS:
    pki = paths(stack, project_dir).pki
    return ServerTLS(pki / "ca.crt", pki / "superlink.crt", pki / "superlink.key")
