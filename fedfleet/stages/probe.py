"""Probe: every participant VM answers or not, and what it really has (`fedfleet vms`).

The probe is `playbooks/probe.yml`, the same on local and SSH hosts: a VM whose SSH
connection could not be opened, or that does not answer the play within
`fedfleet:orchestrator.probeTimeoutSeconds`, is inactive; the others report their
vCPUs, memory and the free disk under their fedfleet directory, read from the host.
On the local stack the VMs share this machine, so their sizes are the stack file's
(the emulation) and a VM marked `state: stopped` fails its probe. The policy itself
is `core.selection`; `choose` applies it for `fedfleet run` and `fedfleet configure`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedfleet.adapters import ansible
from fedfleet.core.inventory import VM, Inventory
from fedfleet.core.paths import StackPaths
from fedfleet.core.selection import NoUsableVM, Probe, Rotation, Verdict, assess, candidates
from fedfleet.core.stack import StackConfig
from fedfleet.hosts.base import Host


def free_disk_gib(facts: dict[str, Any], home: str) -> float | None:
    """Free space of the mount that holds `home` (the longest mount point above it)."""
    best = None
    for mount in facts.get("ansible_mounts") or []:
        point = str(mount.get("mount", ""))
        if (home == point or home.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) > len(best["mount"])
        ):
            best = mount
    return None if best is None else float(best.get("size_available", 0)) / 2**30


def probe(
    stack: StackConfig,
    inventory: Inventory,
    hosts: Mapping[str, Host],
    ansible_inventory: dict[str, Any],
    unreachable: Mapping[str, str],
) -> dict[str, list[Verdict]]:
    """Every participant VM's verdict, in the stack's order, from one parallel probe of the
    VMs that could be connected to (`unreachable`: the others, with why)."""
    reachable = [vm.name for vm in inventory.vms() if vm.name not in unreachable]
    failed: dict[str, str] = dict(unreachable)
    facts: dict[str, dict[str, Any]] = {}
    if reachable:
        result = ansible.apply(ansible.PROBE, ansible_inventory, limit=",".join(reachable), check=False)
        failed |= {p.host: p.message for p in result.problems}
        facts = result.facts
    need = stack.orchestrator.minimums
    out: dict[str, list[Verdict]] = {}
    for participant in stack.participants:
        verdicts = []
        for vm, spec in zip(inventory.participants[participant.name], participant.vms, strict=True):
            if vm.name in failed or vm.name not in facts:
                found = Probe(vm.name, participant.name, False, error=failed.get(vm.name, "no answer"))
            else:
                seen = facts[vm.name]
                vcpu, memory = seen.get("ansible_processor_vcpus"), seen.get("ansible_memtotal_mb")
                if stack.is_local:  # emulated VMs on one machine: their sizes are the stack file's
                    vcpu, memory = spec.vcpu, (spec.memory_gib or 0) * 1024
                found = Probe(
                    vm.name,
                    participant.name,
                    True,
                    int(vcpu) if vcpu is not None else None,
                    float(memory) / 1024 if memory is not None else None,
                    free_disk_gib(seen, hosts[vm.name].home),
                )
            verdicts.append(assess(found, need))
        out[participant.name] = verdicts
    return out


def report(stack: StackConfig, paths: StackPaths, verdicts: dict[str, list[Verdict]]) -> dict[str, Any]:
    """The table behind `fedfleet vms`: each VM's probe, resources and whether it would serve."""
    rotation = Rotation(paths.rotation)
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
    return {
        "stack": stack.name,
        "minimums": dataclasses.asdict(stack.orchestrator.minimums),
        "vms": rows,
    }


def choose(
    stack: StackConfig,
    inventory: Inventory,
    paths: StackPaths,
    verdicts: dict[str, list[Verdict]],
    *,
    advance: bool,
) -> tuple[dict[str, VM], dict[str, list[str]]]:
    """Per participant the VM that serves and the failover order after it.

    Raises NoUsableVM (naming each VM's reason) before anything is started. With
    `advance`, the rotation moves past the chosen VMs, so the next run starts after them."""
    rotation = Rotation(paths.rotation)
    try:
        order = candidates(verdicts, rotation)
    except NoUsableVM as err:
        raise NoUsableVM(
            f"{err}\nNo process was started. Start or resize those VMs, or lower "
            f"fedfleet:orchestrator in {stack.path} (`fedfleet vms --stack {stack.name}` shows every VM)"
        ) from None
    chosen = {participant: inventory.vm(vms[0]) for participant, vms in order.items()}
    if advance:
        record_served(paths, verdicts, {p: vm.name for p, vm in chosen.items()})
    return chosen, order


def record_served(paths: StackPaths, verdicts: dict[str, list[Verdict]], served: Mapping[str, str]) -> None:
    """Move each participant's rotation past the VM that served it (the next run starts after it)."""
    rotation = Rotation(paths.rotation)
    for participant, vm in served.items():
        rotation.served(participant, [v.probe.vm for v in verdicts[participant]], vm)
    rotation.save()
