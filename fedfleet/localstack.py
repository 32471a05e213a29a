"""The local stack: VMs emulated as directories on this machine.

`up` is the local counterpart of `pulumi up`: it creates each VM's disk (a
directory with its own FLWR_HOME and SuperNode key), the aggregator's disk (CA,
SuperLink certificate, database) and returns the same `Inventory` a cloud stack
exports. It is idempotent: keys, certificates and the SuperLink database persist
between runs, so SuperNodes stay registered.

Layout under the stack root (`fedfleet:local.root`, default `.fedfleet/<stack>`):

    aggregator/   certs/  superlink.db  registered.json  flwr-home/  runs/<run-id>/
    operator/     flwr-home/config.toml      (the `flwr` CLI's connection)
    vms/<vm>/     flwr-home/  node_key  node_key.pub
    sites/<participant>/data/                (default data paths, relative to the root)
    lock  pids.json
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import EnvironmentProblem
from .inventory import VM, AggregatorHost, Inventory
from .pki import NodeKey, ServerTLS, ensure_node_key, ensure_server_tls
from .stack import StackConfig


@dataclass(frozen=True)
class LocalPaths:
    root: Path

    @property
    def aggregator(self) -> Path:
        return self.root / "aggregator"

    @property
    def certs(self) -> Path:
        return self.aggregator / "certs"

    @property
    def database(self) -> Path:
        return self.aggregator / "superlink.db"

    @property
    def registered(self) -> Path:
        return self.aggregator / "registered.json"

    @property
    def operator_home(self) -> Path:
        return self.root / "operator" / "flwr-home"

    @property
    def pidfile(self) -> Path:
        return self.root / "pids.json"

    def vm_home(self, vm: str) -> Path:
        return self.root / "vms" / vm

    def node_key(self, vm: str) -> NodeKey:
        home = self.vm_home(vm)
        return NodeKey(home / "node_key", home / "node_key.pub")

    def server_output(self, run_id: str) -> Path:
        return self.aggregator / "runs" / run_id


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


def up(stack: StackConfig, project_dir: Path) -> Inventory:
    """Create (or reuse) the emulated VMs' disks and keys; return the inventory."""
    local = paths(stack, project_dir)
    if not local.database.exists():
        local.registered.unlink(missing_ok=True)  # a new database knows no SuperNodes
    ensure_server_tls(local.certs, [stack.local.host, "localhost"], stack.name)
    participants: dict[str, tuple[VM, ...]] = {}
    for participant in stack.participants:
        vms = []
        for spec in participant.vms:
            home = local.vm_home(spec.name)
            (home / "flwr-home").mkdir(parents=True, exist_ok=True)
            ensure_node_key(home, f"fedfleet-{stack.name}-{spec.name}")
            vms.append(
                VM(
                    name=spec.name,
                    participant=participant.name,
                    cloud=participant.cloud,
                    region=participant.region,
                    private_ip=stack.local.host,
                    public_ip=None,
                    vcpu=spec.vcpu,
                    memory_gib=spec.memory_gib,
                    disk_gib=spec.disk_gib,
                    home=str(home),
                    port=spec.port,
                )
            )
        participants[participant.name] = tuple(vms)
    (local.aggregator / "flwr-home").mkdir(parents=True, exist_ok=True)
    inventory = Inventory(
        stack=stack.name,
        aggregator=AggregatorHost(
            name="aggregator",
            cloud="local",  # emulated here; the planned placement is in stack.aggregator
            region="local",
            instance_type="local",
            address=stack.local.host,
            port=stack.aggregator.port,
            home=str(local.aggregator),
        ),
        participants=participants,
    )
    (local.root / "inventory.json").write_text(json.dumps(inventory.to_dict(), indent=2) + "\n")
    return inventory


def server_tls(stack: StackConfig, project_dir: Path) -> ServerTLS:
    certs = paths(stack, project_dir).certs
    return ServerTLS(certs / "ca.crt", certs / "superlink.crt", certs / "superlink.key")


def registered(local: LocalPaths) -> dict[str, int]:
    try:
        data = json.loads(local.registered.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def remember_registration(local: LocalPaths, vm: str, node_id: int | None) -> None:
    known = registered(local)
    known[vm] = node_id if node_id is not None else known.get(vm, 0)
    local.registered.write_text(json.dumps(known, indent=2) + "\n")
