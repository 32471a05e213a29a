"""Provision: the stack's hosts exist, and their `inventory` says where they are.

One inventory structure for every kind of stack (`core.inventory`):

- local: `up` creates each emulated VM's disk (a directory) and, in namespaces mode, its
  network namespace; idempotent (certificates, node keys and the SuperLink's database
  persist between runs, so SuperNodes stay registered).
- hosts: nothing to create; the inventory is the stack file's addresses, checked.
- cloud: Pulumi's Automation API runs the program in infra/ (`pulumi up`); its
  `inventory` output is saved, and hosts the stack gives by address are added to it.

Before anything runs, a cloud stack is validated into its InfraPlan; Pulumi gets the
credentials of the clouds it uses (verified by the authenticate stage) through the
environment of its own processes only.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfleet.adapters import netns, pulumi
from fedfleet.core.catalog import load_catalog
from fedfleet.core.cloudplan import InfraPlan, infra_plan
from fedfleet.core.errors import ConfigError, EnvironmentProblem
from fedfleet.core.inventory import VM, AggregatorHost, Inventory
from fedfleet.core.network import Network, plan, tag_for
from fedfleet.core.paths import StackPaths, stack_paths
from fedfleet.core.stack import PROJECT, StackConfig, load_stack
from fedfleet.core.util import atomic_write


@dataclass(frozen=True)
class Target:
    project: Path
    stack: StackConfig
    plan: InfraPlan | None  # None: nothing for Pulumi to create (local or hosts stack)

    @property
    def clouds(self) -> set[str]:
        return {cloud for cloud, _ in self.plan.locations} if self.plan else set()


def target(project: Path, name: str) -> Target:
    """Validate the stack (and, for a cloud stack, its whole infrastructure plan)."""
    stack = load_stack(project, name)
    if not stack.provisioned:
        return Target(project, stack, None)
    return Target(project, stack, infra_plan(stack, load_catalog(stack.placement.catalog_overrides)))


# -- the local stack ---------------------------------------------------------------------


def network(stack: StackConfig, project_dir: Path) -> Network | None:
    """The emulated VMs' network namespaces and bridge (namespaces mode), or None."""
    return plan(stack, stack_paths(stack, project_dir).root)


def up_local(stack: StackConfig, project_dir: Path, *, with_network: bool = True) -> Inventory:
    """Create (or reuse) the emulated VMs' disks and network; return the inventory (the same
    addresses without `with_network`, for commands that start nothing)."""
    assert stack.local is not None
    paths = stack_paths(stack, project_dir)
    net = network(stack, project_dir)
    if net is not None and with_network:
        netns.ensure(net)
    participants: dict[str, tuple[VM, ...]] = {}
    for participant in stack.participants:
        vms = []
        for spec in participant.vms:
            home = paths.vm_home(spec.name)
            home.mkdir(parents=True, exist_ok=True)
            assert spec.vcpu is not None and spec.memory_gib is not None and spec.disk_gib is not None
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
    paths.aggregator.mkdir(parents=True, exist_ok=True)
    inventory = Inventory(
        stack=stack.name,
        aggregator=AggregatorHost(
            name="aggregator",
            cloud="local",  # emulated here; the planned placement is in stack.aggregator
            region="local",
            instance_type="local",
            address=net.gateway if net else stack.local.host,
            port=stack.aggregator.port,
            home=str(paths.aggregator),
        ),
        participants=participants,
    )
    _save(paths, inventory)
    return inventory


def down_network(stack: StackConfig, project_dir: Path) -> list[str]:
    """Delete the VMs' namespaces and bridge, if this stack root has any (after its services
    stopped; whatever the stack file says now)."""
    return netns.remove(tag_for(stack_paths(stack, project_dir).root))


def remove_local(stack: StackConfig, project_dir: Path) -> Path:
    """Delete the local stack's state directory (VM disks, keys, certificates, database)."""
    root = stack_paths(stack, project_dir).root
    if root.exists():
        shutil.rmtree(root)
    return root


# -- real hosts --------------------------------------------------------------------------


def own_hosts(stack: StackConfig, created: Inventory | None = None) -> Inventory:
    """The inventory with the hosts the stack gives by address, over what Pulumi `created`
    (whose aggregator is None when the stack gives the aggregator by address)."""
    agg = stack.aggregator
    if agg.existing:
        assert agg.host is not None and agg.host.address is not None
        aggregator = AggregatorHost(
            name="aggregator",
            cloud=agg.cloud or "onprem",
            region=agg.region or "onprem",
            instance_type=agg.instance_type or "own",
            address=agg.superlink_address or agg.host.address,
            port=agg.port,
            ssh_address=agg.host.address,
        )
    elif created is not None and created.aggregator is not None:  # type: ignore[redundant-expr]
        aggregator = created.aggregator
    else:
        raise ConfigError(
            f"stack {stack.name!r} has no aggregator yet: `fedfleet up --stack {stack.name}` creates it"
        )
    participants: dict[str, tuple[VM, ...]] = {}
    for p in stack.participants:
        if not p.existing:
            if created is None or p.name not in created.participants:
                raise ConfigError(
                    f"participant {p.name!r} of stack {stack.name!r} has no VMs yet: `fedfleet up "
                    f"--stack {stack.name}` creates them"
                )
            participants[p.name] = created.participants[p.name]
            continue
        participants[p.name] = tuple(
            VM(
                name=vm.name,
                participant=p.name,
                cloud=p.cloud,
                region=p.region,
                private_ip=vm.host.address,
                public_ip=None,
                vcpu=0,  # probed
                memory_gib=0,
                disk_gib=0,
            )
            for vm in p.vms
            if vm.host is not None and vm.host.address is not None
        )
    return Inventory(stack=stack.name, aggregator=aggregator, participants=participants)


def check_key_files(stack: StackConfig, project_dir: Path) -> None:
    """Every SSH key file the stack names exists and is private (ssh refuses it otherwise)."""
    seen: set[Path] = set()
    for name in ["aggregator", *(vm.name for p in stack.participants for vm in p.vms)]:
        ssh = stack.host(name).ssh
        if ssh.key_file is None:
            continue
        path = key_path(project_dir, ssh.key_file)
        if path in seen:
            continue
        seen.add(path)
        if not path.is_file():
            raise ConfigError(
                f"{stack.path}: the SSH key file {ssh.key_file} ({path}), used for {name}, does not exist on "
                "this machine; set ssh.keyFile to the private key the hosts accept"
            )
        if path.stat().st_mode & 0o077:
            raise ConfigError(
                f"{stack.path}: the SSH key file {path} can be read by others and ssh refuses it: `chmod 600 {path}`"
            )


def key_path(project_dir: Path, setting: str) -> Path:
    path = Path(setting).expanduser()
    return path if path.is_absolute() else project_dir / path


# -- every kind --------------------------------------------------------------------------


def _save(paths: StackPaths, inventory: Inventory) -> None:
    atomic_write(paths.inventory, json.dumps(inventory.to_dict(), indent=2) + "\n")


def saved_inventory(stack: StackConfig, project_dir: Path) -> Inventory:
    """The inventory of a stack that is up: the local stack's, a hosts stack's (its file), or
    what `fedfleet up` saved for a cloud stack, with the stack's own hosts."""
    paths = stack_paths(stack, project_dir)
    if stack.kind == "hosts":
        return own_hosts(stack)
    try:
        data = json.loads(paths.inventory.read_text())
    except FileNotFoundError:
        if stack.is_local:
            raise EnvironmentProblem(
                f"local stack {stack.name!r} is not up: run `fedfleet up --stack {stack.name}`"
            ) from None
        raise ConfigError(
            f"stack {stack.name!r} has no inventory yet ({paths.inventory}): provision it first with "
            f"`fedfleet up --stack {stack.name}` (or `fedfleet outputs --stack {stack.name}` for a "
            "stack that is already up); both need the Pulumi CLI and cloud credentials"
        ) from None
    try:
        inventory = Inventory.from_dict(data)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{paths.inventory} is not a fedfleet inventory ({err}); run `fedfleet outputs --stack {stack.name}`"
        ) from err
    return inventory if stack.is_local else own_hosts(stack, inventory)


def preview(t: Target, echo: Callable[[str], None], credentials: Mapping[str, str]) -> dict[str, Any]:
    if t.stack.is_local:
        local = stack_paths(t.stack, t.project)
        vms = [vm.name for p in t.stack.participants for vm in p.vms]
        echo(
            f"local stack {t.stack.name}: would create {local.root} with the aggregator and {len(vms)} VMs: {', '.join(vms)}"
        )
        return {"stack": t.stack.name, "local": True, "root": str(local.root), "vms": vms}
    if t.plan is None:
        echo(f"stack {t.stack.name}: every host is given by address; nothing to create")
        return {"stack": t.stack.name, "hosts": True, "change_summary": {}}
    summary = pulumi.preview(pulumi.workspace_stack(t.project, t.stack.name, credentials), echo)
    return {"stack": t.stack.name, "change_summary": summary}


def up(t: Target, echo: Callable[[str], None], credentials: Mapping[str, str]) -> Inventory:
    """Local: the emulated VMs. Hosts: the stack file's hosts, checked. Cloud: `pulumi up`."""
    paths = stack_paths(t.stack, t.project)
    if t.stack.is_local:
        inventory = up_local(t.stack, t.project)
        echo(f"local stack {t.stack.name}: {len(inventory.vms())} VMs ready")
        return inventory
    check_key_files(t.stack, t.project)
    if t.plan is None:
        inventory = own_hosts(t.stack)
        echo(
            f"stack {t.stack.name}: {len(inventory.vms())} VMs and the aggregator, given by address (no Pulumi)"
        )
    else:
        created = pulumi.up(pulumi.workspace_stack(t.project, t.stack.name, credentials), echo)
        inventory = own_hosts(t.stack, _created(created))
    _save(paths, inventory)
    return inventory


def outputs(t: Target, credentials: Mapping[str, str]) -> Inventory:
    if t.stack.is_local or t.plan is None:
        return saved_inventory(t.stack, t.project)
    created = pulumi.outputs(pulumi.workspace_stack(t.project, t.stack.name, credentials))
    if created is None:
        raise EnvironmentProblem(
            f"stack {t.stack.name!r} has no outputs yet: run `fedfleet up --stack {t.stack.name}`"
        )
    inventory = own_hosts(t.stack, _created(created))
    _save(stack_paths(t.stack, t.project), inventory)
    return inventory


def destroy_cloud(t: Target, echo: Callable[[str], None], credentials: Mapping[str, str]) -> None:
    """`pulumi destroy` (what the stack gives by address is never touched)."""
    if t.plan is None:
        echo(
            f"stack {t.stack.name}: every host is given by address; fedfleet created none, so it deletes none"
        )
    else:
        pulumi.destroy(pulumi.workspace_stack(t.project, t.stack.name, credentials), echo)
    stack_paths(t.stack, t.project).inventory.unlink(missing_ok=True)


def _created(data: dict[str, Any]) -> Inventory:
    """Pulumi's `inventory` output (its aggregator is None when the stack gives it by address)."""
    try:
        return Inventory.from_dict(data, partial=True)
    except (ValueError, KeyError, TypeError) as err:
        raise EnvironmentProblem(
            f"the Pulumi program's `inventory` output is not a fedfleet inventory ({err}); is infra/ "
            f"from this version of fedfleet? ({PROJECT})"
        ) from err
