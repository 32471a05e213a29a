"""The seed's evaluation of the orchestrator, on real playbooks and real SuperNodes.

3 participants with 5 VMs each: two active and large enough, two stopped, one below
the stack's minimum. 20 consecutive runs. Each run is what `fedfleet run` does before
training: probe every VM (playbooks/probe.yml), pick one VM per participant, start its
SuperNode (playbooks/site.yml) and wait until it has connected to the SuperLink; then
stop the SuperNodes (playbooks/stop.yml). The SuperLink runs throughout.

Side by side, in the same runs, the baseline the seed compared against: a VM picked
at random per participant, no probe, no retry. To halve the test's time both arms
start in the same plays; a VM both arms picked is started once and counts for both.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from fedfleet import configure, localstack
from fedfleet.adapters.processes import ProcessGroup
from fedfleet.core.selection import NoUsableVM, Rotation, candidates, random_pick
from fedfleet.core.stack import load_stack
from fedfleet.runner import prepare_data
from fedfleet.sandbox import local_config, scratch_project
from fedfleet.stages import probe as orchestrator
from fedfleet.stages.fleet import Fleet

from .conftest import running_processes_mentioning

pytestmark = pytest.mark.e2e

RUNS = 20
HEALTHY = ("-1", "-5")


def seed_stack(tmp_path: Path) -> Path:
    config = local_config(vms_per_participant=5)
    for participant in config["fedfleet:participants"]:
        vms = participant["vms"]
        vms[1]["state"] = "stopped"
        vms[2]["state"] = "stopped"
        vms[3]["vcpu"], vms[3]["memoryGib"] = 1, 1  # below the minimum
        # vms[0] and vms[4] (-1 and -5) are active and large enough
    config["fedfleet:local"]["warmWorkers"] = False  # no training here: the SuperNode alone
    config["fedfleet:orchestrator"] = {"minVcpu": 2, "minMemoryGib": 4, "connectTimeoutSeconds": 30}
    return scratch_project(tmp_path / "p", config)


def test_twenty_runs_lose_no_participant_where_random_picks_lose_most(tmp_path: Path):
    project = seed_stack(tmp_path)
    stack = load_stack(project, "local")
    local = localstack.paths(stack, project)
    inventory = localstack.up(stack, project)
    prepare_data(stack, project, stack.app)
    configure.prepare_controller(stack, inventory, project)
    rng = random.Random(2026)
    policy: list[dict[str, str | None]] = []
    baseline: list[dict[str, str | None]] = []
    retries = 0
    try:
        with ProcessGroup(local.pidfile) as procs:
            marker = procs.claim("flower services")
            for run in range(RUNS):
                verdicts = orchestrator.probe(stack, inventory, project)
                order = candidates(verdicts, Rotation(orchestrator.rotation_path(stack, project)))
                picks = {
                    f"{p} (random)": [random_pick([vm.name for vm in inventory.participants[p]], rng)]
                    for p in order
                }
                fleet = Fleet(
                    stack, inventory, project, order | picks,
                    envvars=marker, progress=configure._Silent(), say=lambda *_: None,
                )  # fmt: skip
                try:
                    fleet.start(with_aggregator=run == 0)
                except NoUsableVM:
                    pass  # the random arm's participants that got no SuperNode
                finally:
                    configure.apply(configure.STOP, fleet.hosts(), limit=",".join(fleet.used), envvars=marker)
                served = {p: vm.name for p, vm in fleet.serving.items()}
                policy.append({p: served.get(p) for p in order})
                baseline.append({p.removesuffix(" (random)"): served.get(p) for p in picks})
                retries += sum(len(fleet.tried[p]) - 1 for p in order)
                orchestrator.record_served(
                    stack, project, verdicts, {p: v for p, v in policy[-1].items() if v is not None}
                )
    finally:
        configure.apply(
            configure.STOP, configure.ansible_inventory(stack, inventory, project, {}, flwr_bin="flwr")
        )

    def rates(runs: list[dict[str, str | None]]) -> dict[str, float]:
        slots = [vm for run in runs for vm in run.values()]
        return {
            "participant_dropout": sum(vm is None for vm in slots) / len(slots),
            "run_success": sum(all(vm is not None for vm in run.values()) for run in runs) / len(runs),
        }

    report = {"runs": RUNS, "policy": rates(policy), "random": rates(baseline), "policy_retries": retries}
    print("seed evaluation:", json.dumps(report))
    assert report["policy"] == {"participant_dropout": 0.0, "run_success": 1.0}
    assert retries == 0  # the probe already dropped every VM that could not serve
    # Round-robin: each participant alternates between its two healthy VMs.
    for p in policy[0]:
        used = [run[p] for run in policy]
        assert all(str(vm).endswith(HEALTHY) for vm in used)
        assert all(a != b for a, b in itertools.pairwise(used))
    # The baseline lost participants on stopped and undersized VMs, and only there.
    assert report["random"]["participant_dropout"] > 0.3
    for run in baseline:
        assert all(vm is None or vm.endswith(HEALTHY) for vm in run.values())
    assert running_processes_mentioning(str(project)) == []
