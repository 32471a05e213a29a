"""Which VM serves each participant: filter by probe, rotate round-robin, fail over in order.

Pure logic (no Ansible, no Flower): probes come in as data, the choice goes out as
data. The seed's orchestrator measured that picking a participant's VM at random
lost 60% of participants, while dropping inactive or undersized VMs, assigning
round-robin and retrying on the next VM lost none; this module is that policy.

- `assess` turns a probe into a verdict with the reason a VM cannot serve.
- `Rotation` is a circular queue per participant whose position persists between
  runs (a JSON file), so consecutive runs rotate across the healthy VMs.
- `candidates` orders a participant's usable VMs from the queue's position: the
  first is tried, the rest are the failover order.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedfleet.core.errors import EnvironmentProblem
from fedfleet.core.util import atomic_write


@dataclass(frozen=True)
class Minimums:
    """What a participant VM needs to serve (from the stack)."""

    vcpu: int = 1
    memory_gib: float = 1.0
    free_disk_gib: float = 1.0


@dataclass(frozen=True)
class Probe:
    """What a probe found on one VM (None: not measured, e.g. unreachable)."""

    vm: str
    participant: str
    reachable: bool
    vcpu: int | None = None
    memory_gib: float | None = None
    free_disk_gib: float | None = None
    error: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Verdict:
    probe: Probe
    reason: str = ""  # empty: usable

    @property
    def usable(self) -> bool:
        return not self.reason


def assess(probe: Probe, need: Minimums) -> Verdict:
    """Usable, or the first reason it is not (inactive first, then each resource)."""
    if not probe.reachable:
        return Verdict(probe, f"inactive: {probe.error or 'did not answer the probe'}")
    short = []
    if probe.vcpu is None or probe.vcpu < need.vcpu:
        short.append(f"{probe.vcpu if probe.vcpu is not None else '?'} vCPU < {need.vcpu}")
    if probe.memory_gib is None or probe.memory_gib < need.memory_gib:
        have = f"{probe.memory_gib:g}" if probe.memory_gib is not None else "?"
        short.append(f"{have} GiB memory < {need.memory_gib:g}")
    if probe.free_disk_gib is None or probe.free_disk_gib < need.free_disk_gib:
        have = f"{probe.free_disk_gib:.1f}" if probe.free_disk_gib is not None else "?"
        short.append(f"{have} GiB free disk < {need.free_disk_gib:g}")
    return Verdict(probe, "below the minimum: " + ", ".join(short)) if short else Verdict(probe)


class NoUsableVM(EnvironmentProblem):
    """A participant has no VM that can serve; the message gives each VM's reason."""


class Rotation:
    """A circular queue per participant; its position survives between runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            data = json.loads(path.read_text())
            positions = data.get("positions", {}) if isinstance(data, dict) else {}
        except (OSError, ValueError):
            positions = {}
        self.positions: dict[str, int] = {str(k): int(v) for k, v in positions.items() if isinstance(v, int)}

    def order(self, participant: str, vms: Sequence[str]) -> list[str]:
        """`vms` (in the stack's order) starting at the participant's position."""
        if not vms:
            return []
        start = self.positions.get(participant, 0) % len(vms)
        return [*vms[start:], *vms[:start]]

    def served(self, participant: str, vms: Sequence[str], vm: str) -> None:
        """`vm` served this run: the next run starts after it."""
        self.positions[participant] = (list(vms).index(vm) + 1) % len(vms)

    def save(self) -> None:
        atomic_write(
            self.path, json.dumps({"positions": dict(sorted(self.positions.items()))}, indent=2) + "\n"
        )


def candidates(verdicts: Mapping[str, Sequence[Verdict]], rotation: Rotation) -> dict[str, list[str]]:
    """Per participant, its usable VMs in the order to try them (the first serves).

    The rotation runs over all of a participant's VMs in the stack's order, so a VM
    that is down this time keeps its place in the circle for later runs."""
    out: dict[str, list[str]] = {}
    stranded = []
    for participant, found in verdicts.items():
        names = [v.probe.vm for v in found]
        usable = {v.probe.vm for v in found if v.usable}
        out[participant] = [vm for vm in rotation.order(participant, names) if vm in usable]
        if not out[participant]:
            reasons = "; ".join(f"{v.probe.vm}: {v.reason}" for v in found) or "it has no VMs"
            stranded.append(f"participant {participant!r} has no usable VM ({reasons})")
    if stranded:
        raise NoUsableVM("\n".join(stranded))
    return out


def random_pick(vms: Iterable[str], rng: random.Random) -> str:
    """The baseline the seed compared against: any VM, no probe, no retry."""
    return rng.choice(list(vms))
