"""The seed's evaluation of the orchestrator, on real playbooks and real SuperNodes.

3 participants with 5 VMs each: two active and large enough, two stopped, one below
the stack's minimum. Consecutive runs; each is what `fedfleet run` does before
training: probe every VM (playbooks/probe.yml), pick one VM per participant, start its
SuperNode (playbooks/site.yml) and wait until it has connected to the SuperLink; then
stop the SuperNodes (playbooks/stop.yml). The SuperLink runs throughout.

Side by side, in the same runs, the baseline the seed compared against: a VM picked
at random per participant, no probe, no retry. To halve the time both arms start in
the same plays; a VM both arms picked is started once and counts for both.

The test makes 2 runs; `bench/bench_seed.py` makes the seed's 20 (README figures).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest

from fedfleet.adapters import ansible
from fedfleet.adapters.flwr import tool
from fedfleet.adapters.processes import ProcessGroup
from fedfleet.core.paths import stack_paths
from fedfleet.core.selection import NoUsableVM, Rotation, candidates, random_pick
from fedfleet.core.stack import load_stack
from fedfleet.hosts import for_stack
from fedfleet.sandbox import local_config, scratch_project
from fedfleet.stages import configure, fleet, preflight, probe, provision
from fedfleet.workflow import run_horizon

from .conftest import running_processes_mentioning

pytestmark = [pytest.mark.e2e, pytest.mark.long]  # `make test-long`

RUNS = 2
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


def evaluate(project: Path, runs: int, seed: int = 2026) -> dict[str, Any]:
    """`runs` consecutive probe, pick, start, connect, stop cycles; both arms' rates."""
    stack = load_stack(project, "local")
    paths = stack_paths(stack, project)
    inventory = provision.up_local(stack, project)
    preflight.data(stack, project, stack.app)
    rng = random.Random(seed)
    policy: list[dict[str, str | None]] = []
    baseline: list[dict[str, str | None]] = []
    picked: list[dict[str, str]] = []
    retries = 0
    with ProcessGroup(paths.pidfile) as procs:
        hosts = for_stack(stack, inventory, paths, procs)
        configure.prepare_controller(
            stack,
            inventory,
            paths,
            hosts["aggregator"].reach(stack.aggregator.internal_port),
            run_horizon(stack),
        )
        launcher = configure.Configurer(
            stack, inventory, paths, hosts, flwr_bin=tool("flwr"), envvars=procs.claim("flower services"),
            progress=ansible._Silent(),
        )  # fmt: skip
        rules = fleet.Rules(stack.name, stack.orchestrator.connect_timeout, stack.app.min_participants)
        try:
            for run in range(runs):
                verdicts = probe.probe(stack, inventory, hosts, launcher.inventory_for([]), {})
                order = candidates(verdicts, Rotation(paths.rotation))
                picks = {
                    f"{p} (random)": [random_pick([vm.name for vm in inventory.participants[p]], rng)]
                    for p in order
                }
                f = fleet.Fleet(hosts, order | picks, launcher, rules, lambda *_: None)
                try:
                    f.start(with_aggregator=run == 0)
                except NoUsableVM:
                    pass  # the random arm's participants that got no SuperNode
                finally:
                    launcher.stop(f.used)
                served = f.serving
                policy.append({p: served.get(p) for p in order})
                baseline.append({p.removesuffix(" (random)"): served.get(p) for p in picks})
                picked.append({p.removesuffix(" (random)"): vms[0] for p, vms in picks.items()})
                retries += sum(len(f.roster.tried[p]) - 1 for p in order)
                probe.record_served(paths, verdicts, {p: v for p, v in policy[-1].items() if v is not None})
        finally:
            ansible.apply(ansible.STOP, launcher.inventory_for([]))

    def rates(arm: list[dict[str, str | None]]) -> dict[str, float]:
        slots = [vm for r in arm for vm in r.values()]
        return {
            "participant_dropout": sum(vm is None for vm in slots) / len(slots),
            "run_success": sum(all(vm is not None for vm in r.values()) for r in arm) / len(arm),
        }

    return {
        "runs": runs,
        "policy": rates(policy),
        "random": rates(baseline),
        "policy_retries": retries,
        "served": policy,
        "random_served": baseline,
        "random_picks": picked,
    }


def test_runs_lose_no_participant_where_random_picks_lose_many(tmp_path: Path):
    project = seed_stack(tmp_path)
    report = evaluate(project, RUNS)
    print(
        "seed evaluation:", json.dumps({k: report[k] for k in ("runs", "policy", "random", "policy_retries")})
    )
    assert report["policy"] == {"participant_dropout": 0.0, "run_success": 1.0}
    assert report["policy_retries"] == 0  # the probe already dropped every VM that could not serve
    # Round-robin: each participant alternates between its two healthy VMs.
    served = report["served"]
    for p in served[0]:
        used = [run[p] for run in served]
        assert all(str(vm).endswith(HEALTHY) for vm in used)
        assert all(a != b for a, b in itertools.pairwise(used))
    # The baseline lost a participant exactly when its pick was a stopped or undersized VM
    # (with this seed, some were: 20 runs in bench/bench_seed.py give the seed's rates).
    assert report["random"]["participant_dropout"] > 0
    for served_run, picked_run in zip(report["random_served"], report["random_picks"], strict=True):
        for p, vm in picked_run.items():
            assert served_run[p] == (vm if vm.endswith(HEALTHY) else None)
    assert running_processes_mentioning(str(project)) == []
