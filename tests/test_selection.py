"""The VM selection policy: probe verdicts, round-robin that persists, failover order."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedfleet.core.selection import Minimums, NoUsableVM, Probe, Rotation, assess, candidates, random_pick

NEED = Minimums(vcpu=2, memory_gib=4, free_disk_gib=5)


def probe(
    vm: str, participant: str = "p", *, up: bool = True, vcpu: int = 4, mem: float = 8, disk: float = 50
):
    return Probe(vm, participant, up, vcpu if up else None, mem if up else None, disk if up else None,
                 "" if up else "ssh: connect to host: No route to host")  # fmt: skip


def test_assess_gives_the_reason_a_vm_cannot_serve():
    assert assess(probe("a"), NEED).usable
    down = assess(probe("b", up=False), NEED)
    assert not down.usable and down.reason == "inactive: ssh: connect to host: No route to host"
    small = assess(probe("c", vcpu=1, mem=2), NEED)
    assert small.reason == "below the minimum: 1 vCPU < 2, 2 GiB memory < 4"
    full = assess(probe("d", disk=0.5), NEED)
    assert full.reason == "below the minimum: 0.5 GiB free disk < 5"


def test_rotation_persists_and_skips_unusable_vms(tmp_path: Path):
    state = tmp_path / "rotation.json"
    found = [assess(p, NEED) for p in (probe("v1"), probe("v2", up=False), probe("v3"), probe("v4", vcpu=1))]
    served = []
    for _ in range(4):
        rotation = Rotation(state)  # a new run reads the position the last one saved
        order = candidates({"p": found}, rotation)["p"]
        served.append(order[0])
        rotation.served("p", [v.probe.vm for v in found], order[0])
        rotation.save()
    assert served == ["v1", "v3", "v1", "v3"]
    # The failover order is the rest of the circle, unusable VMs left out.
    assert candidates({"p": found}, Rotation(state))["p"] == ["v1", "v3"]


def test_a_participant_without_a_usable_vm_names_each_reason(tmp_path: Path):
    found = {
        "ok": [assess(probe("o1", "ok"), NEED)],
        "stranded": [
            assess(probe("s1", "stranded", up=False), NEED),
            assess(probe("s2", "stranded", mem=1), NEED),
        ],
    }
    with pytest.raises(NoUsableVM) as err:
        candidates(found, Rotation(tmp_path / "r.json"))
    message = str(err.value)
    assert "participant 'stranded' has no usable VM" in message
    assert "s1: inactive: ssh: connect to host: No route to host" in message
    assert "s2: below the minimum: 1 GiB memory < 4" in message
    assert "'ok'" not in message


def test_a_corrupt_rotation_file_starts_over(tmp_path: Path):
    state = tmp_path / "rotation.json"
    state.write_text("{not json")
    assert Rotation(state).order("p", ["a", "b"]) == ["a", "b"]


def test_random_pick_is_the_unfiltered_baseline():
    rng = random.Random(0)
    picks = {random_pick(["a", "b", "c"], rng) for _ in range(50)}
    assert picks == {"a", "b", "c"}
