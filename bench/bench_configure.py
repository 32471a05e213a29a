"""Benchmark: `fedfleet configure` on 1 aggregator + 3 participant VMs of the local stack.

    .venv/bin/python bench/bench_configure.py [--repeat 2] [--json]

On a scratch copy of the local stack, side by side in this script:

  first        site.yml on hosts where nothing is set up: supervisors, TLS material,
               node keys made and registered, SuperLink and SuperNodes (with their
               warm workers) started
  second       site.yml again with everything running: must change nothing
  floor        Ansible's own fixed cost on the same 4 hosts and the same path
               (ansible-runner, the same ansible.cfg): a play of one `ping` each
  stop         stop.yml (SuperNodes, then the SuperLink)

Each round of the four is repeated --repeat times (medians reported). Ratios:
first/floor and second/floor. Results are printed and written to
bench/results/configure-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfleet import configure, localstack
from fedfleet.adapters import flwr as flower
from fedfleet.core.stack import load_stack
from fedfleet.runner import prepare_data
from fedfleet.sandbox import scratch_project

RESULTS = Path(__file__).resolve().parent / "results"


def floor_play(hosts: dict[str, Any]) -> float:
    """One ping per host through the same ansible-runner path (a throw-away playbook)."""
    playbook = configure.PLAYBOOKS / f"_bench_floor_{time.time_ns()}.yml"
    playbook.write_text(
        "---\n- name: Floor\n  hosts: aggregator:supernodes\n  gather_facts: false\n  tasks:\n"
        "    - name: Ping\n      ansible.builtin.ping:\n"
    )
    try:
        return configure.apply(playbook.name, hosts).seconds
    finally:
        playbook.unlink()


def one_round(directory: Path) -> dict[str, Any]:
    project = scratch_project(directory, None)
    stack = load_stack(project, "local")
    inventory = localstack.up(stack, project)
    prepare_data(stack, project, stack.app)
    configure.prepare_controller(stack, inventory, project)
    chosen = {name: vms[0] for name, vms in inventory.participants.items()}
    hosts = configure.ansible_inventory(stack, inventory, project, chosen, flwr_bin=flower.tool("flwr"))
    out: dict[str, Any] = {}
    try:
        first = configure.apply(configure.SITE, hosts)
        out["first"] = {"seconds": first.seconds, "changed": first.changed}
        second = configure.apply(configure.SITE, hosts)
        out["second"] = {"seconds": second.seconds, "changed": second.changed}
        out["floor"] = {"seconds": floor_play(hosts)}
    finally:
        stop = configure.apply(configure.STOP, hosts)
        out["stop"] = {"seconds": stop.seconds}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rounds = []
    for i in range(args.repeat):
        work = Path(tempfile.mkdtemp(prefix="fedfleet-bench-configure-"))
        try:
            rounds.append(one_round(work / "project"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"round {i + 1}/{args.repeat}: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in rounds[-1].items()),
              file=sys.stderr)  # fmt: skip
    median = {k: statistics.median(r[k]["seconds"] for r in rounds) for k in rounds[0]}
    report = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hosts": "1 aggregator + 3 participant VMs (local stack, local connection, supervisor)",
        "rounds": rounds,
        "median_seconds": median,
        "changed_second_run": [r["second"]["changed"] for r in rounds],
        "ratios": {
            "first_over_floor": median["first"] / median["floor"],
            "second_over_floor": median["second"] / median["floor"],
            "second_over_first": median["second"] / median["first"],
        },
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"configure-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'':10}{'median s':>10}{'x floor':>10}")
    for key in ("first", "second", "floor", "stop"):
        print(f"{key:10}{median[key]:10.1f}{median[key] / median['floor']:10.2f}")
    print(
        f"second run changed: {report['changed_second_run']}   → {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
    )


if __name__ == "__main__":
    main()
