"""Probe a stack's participant VMs and say which would serve (`fedfleet vms`).

The probe is `playbooks/probe.yml`, the same on local and SSH hosts: a VM that does
not answer within `fedfleet:orchestrator.probeTimeoutSeconds` is inactive, the others
report their vCPUs, memory and the free disk under their fedfleet directory. On the
local stack the VMs share this machine, so their sizes are the stack file's (the
emulation) and a VM marked `state: stopped` fails its probe. The policy itself is
`selection.py`; `choose` applies it for `fedfleet run` and `fedfleet configure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedfleet import configure, localstack
from fedfleet.adapters import flwr as flower
from fedfleet.core.inventory import VM, Inventory
from fedfleet.core.selection import Minimums, NoUsableVM, Probe, Rotation, Verdict, assess, candidates
from fedfleet.core.stack import StackConfig, load_stack


def rotation_path(stack: StackConfig, project_dir: Path) -> Path:
    return configure.controller_paths(stack, project_dir).root / "rotation.json"


def _free_disk_gib(facts: dict[str, Any], home: str) -> float | None:
    """Free space of the mount that holds `home` (the longest mount point above it)."""
    best = None
    for mount in facts.get("ansible_mounts") or []:
        point = str(mount.get("mount", ""))
        if (home == point or home.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) > len(best["mount"])
        ):
            best = mount
    return None if best is None else float(best.get("size_available", 0)) / 2**30


def probe(stack: StackConfig, inventory: Inventory, project_dir: Path) -> dict[str, list[Verdict]]:
    """Every participant VM's verdict, in the stack's order, from one parallel probe."""
    hosts = configure.ansible_inventory(stack, inventory, project_dir, {}, flwr_bin=flower.tool("flwr"))
    result = configure.apply(configure.PROBE, hosts, check=False)
    failed = {p.host: p.message for p in result.problems}
    need = Minimums(
        stack.orchestrator.min_vcpu, stack.orchestrator.min_memory_gib, stack.orchestrator.min_free_disk_gib
    )
    out: dict[str, list[Verdict]] = {}
    for participant in stack.participants:
        verdicts = []
        for vm, spec in zip(inventory.participants[participant.name], participant.vms, strict=True):
            if vm.name in failed or vm.name not in result.facts:
                found = Probe(vm.name, participant.name, False, error=failed.get(vm.name, "no answer"))
            else:
                facts = result.facts[vm.name]
                home = str(vm.home or configure.REMOTE_HOME)
                vcpu, memory = facts.get("ansible_processor_vcpus"), facts.get("ansible_memtotal_mb")
                if stack.is_local:  # emulated VMs on one machine: their sizes are the stack file's
                    vcpu, memory = spec.vcpu, spec.memory_gib * 1024
                found = Probe(
                    vm.name,
                    participant.name,
                    True,
                    int(vcpu) if vcpu is not None else None,
                    float(memory) / 1024 if memory is not None else None,
                    _free_disk_gib(facts, home),
                )
            verdicts.append(assess(found, need))
        out[participant.name] = verdicts
    return out


def vms_report(project_dir: Path, stack_name: str) -> dict[str, Any]:
    """The table behind `fedfleet vms`: each VM's probe, resources and whether it would serve."""
    stack = load_stack(project_dir, stack_name)
    if stack.is_local:
        with localstack.locked(localstack.paths(stack, project_dir)):
            inventory = localstack.up(stack, project_dir, with_network=False)
    else:
        inventory = configure._saved_inventory(stack, project_dir)
    verdicts = probe(stack, inventory, project_dir)
    rotation = Rotation(rotation_path(stack, project_dir))
    rows = []
    for participant, found in verdicts.items():
        usable = {v.probe.vm for v in found if v.usable}
        order = [vm for vm in rotation.order(participant, [v.probe.vm for v in found]) if vm in usable]
        for v in found:
            p = v.probe
            rows.append(
                {
                    "participant": participant,
                    "vm": p.vm,
                    "reachable": p.reachable,
                    "vcpu": p.vcpu,
                    "memory_gib": p.memory_gib,
                    "free_disk_gib": None if p.free_disk_gib is None else round(p.free_disk_gib, 1),
                    "usable": v.usable,
                    "pick": (order.index(p.vm) + 1) if p.vm in order else None,
                    "why_not": v.reason or None,
                }
            )
    o = stack.orchestrator
    return {
        "stack": stack.name,
        "minimums": {
            "vcpu": o.min_vcpu,
            "memory_gib": o.min_memory_gib,
            "free_disk_gib": o.min_free_disk_gib,
        },
        "vms": rows,
    }


def choose(
    stack: StackConfig, inventory: Inventory, project_dir: Path, *, advance: bool
) -> tuple[dict[str, VM], dict[str, list[str]], dict[str, list[Verdict]]]:
    """Probe, then per participant the VM that serves and the failover order after it.

    Raises NoUsableVM (naming each VM's reason) before anything is started. With
    `advance`, the rotation moves past the chosen VMs, so the next run starts after them."""
    verdicts = probe(stack, inventory, project_dir)
    rotation = Rotation(rotation_path(stack, project_dir))
    try:
        order = candidates(verdicts, rotation)
    except NoUsableVM as err:
        raise NoUsableVM(
            f"{err}\nNo process was started. Start or resize those VMs, or lower "
            f"fedfleet:orchestrator in {stack.path} (`fedfleet vms --stack {stack.name}` shows every VM)"
        ) from None
    chosen = {participant: inventory.vm(vms[0]) for participant, vms in order.items()}
    if advance:
        record_served(stack, project_dir, verdicts, {p: vm.name for p, vm in chosen.items()})
    return chosen, order, verdicts


def record_served(
    stack: StackConfig, project_dir: Path, verdicts: dict[str, list[Verdict]], served: dict[str, str]
) -> None:
    """Move each participant's rotation past the VM that served it (the next run starts after it)."""
    rotation = Rotation(rotation_path(stack, project_dir))
    for participant, vm in served.items():
        rotation.served(participant, [v.probe.vm for v in verdicts[participant]], vm)
    rotation.save()
