"""Benchmark: the same demo on the local stack and over SSH, side by side in one script.

    .venv/bin/python bench/bench_ssh.py [--rounds 3] [--json]

3 participants (one VM each) and an aggregator, the same run config and data:

  local   the embedded local stack (emulated hosts, local connection, supervisors)
  ssh     the SSH lab (tests/sshlab.py): each host a network namespace with its own sshd,
          fedfleet in a controller namespace reaching them only over SSH (needs root)

For each: `fedfleet configure` on fresh hosts against Ansible's own floor on the same
hosts and connection (a play of one `ping` per host), then `fedfleet run`: wall time,
seconds per round, and the CPU the controller spends while the rounds run (the fedfleet
process, its SSH connections and the agents on the hosts: the watch and the event feed),
as a share of one core. Ratios ssh/local. Written to bench/results/ssh-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedfleet_app.data import write_demo  # noqa: E402

from fedfleet.sandbox import local_config, scratch_project  # noqa: E402
from tests.sshlab import Lab, host_entry, why_skip  # noqa: E402

RESULTS = REPO / "bench" / "results"
PARTICIPANTS = {"hospital-us": "us", "hospital-asia": "asia", "hospital-eu": "eu"}
CLOCK = os.sysconf("SC_CLK_TCK")


def floor(project: Path, stack_name: str) -> float:
    """Seconds of a one-`ping`-per-host play through fedfleet's own path (connections, inventory)."""
    from fedfleet import workflow
    from fedfleet.adapters import ansible
    from fedfleet.core.stack import load_stack

    stack = load_stack(project, stack_name)
    playbook = ansible.PLAYBOOKS / f"_bench_floor_{time.time_ns()}.yml"
    playbook.write_text(
        "---\n- name: Floor\n  hosts: aggregator:supernodes\n  gather_facts: false\n  tasks:\n"
        "    - name: Ping\n      ansible.builtin.ping:\n"
    )
    try:
        with workflow.session(stack, project, with_network=False) as s:
            serving = [vms[0].name for vms in s.inventory.participants.values()]
            return ansible.apply(playbook.name, s.ansible_inventory(serving)).seconds
    finally:
        playbook.unlink()


def cpu_seconds(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime of the process itself
    return total / CLOCK


def watched(root: int, extra: set[int]) -> set[int]:
    """The fedfleet process, its ssh children (connections, agents' sessions) and `extra`."""
    found = {root} | extra
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if int(stat[1]) == root and cmd.endswith(b"ssh"):
            found.add(int(entry.name))
    return found


def agents(lab: Lab | None) -> set[int]:
    """The fedfleet agents running on the lab's hosts (their Python started by ssh)."""
    if lab is None:
        return set()
    out = set()
    for host in lab.hosts:
        for pid in lab.pids(host):
            try:
                if b"fedfleet-agent" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.add(pid)
            except OSError:
                continue
    return out


def run_and_measure(argv: list[str], events_glob: Path, lab: Lab | None) -> dict[str, Any]:
    """`fedfleet run`, with the CPU of the watching side sampled from the first round's start
    to the last round's end."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mark: tuple[float, float] | None = None
    pids: set[int] = set()
    seen_runs = set(events_glob.parent.glob("*/events.jsonl")) if events_glob.parent.exists() else set()
    while proc.poll() is None:
        files = [p for p in events_glob.parent.glob("*/events.jsonl") if p not in seen_runs]
        text = files[0].read_text() if files else ""
        if mark is None and '"round-start"' in text:
            pids = watched(proc.pid, agents(lab))
            mark = (time.monotonic(), cpu_seconds(pids))
        if mark is not None and '"finished"' in text:
            pids = watched(proc.pid, agents(lab)) | pids
            share = (cpu_seconds(pids) - mark[1]) / (time.monotonic() - mark[0])
            break
        time.sleep(0.05)
    else:
        share = float("nan")
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"fedfleet run failed: {err[-3000:]}")
    summary = json.loads(out)
    return {
        "wall_seconds": time.monotonic() - started,
        "round_seconds": summary["timings"]["round_mean_seconds"],
        "training_seconds": summary["timings"]["training_seconds"],
        "accuracy": summary["rounds"][-1]["metrics"]["accuracy"],
        "watch_cpu_share": share,
    }


def local_part(work: Path, rounds: int) -> dict[str, Any]:
    config = local_config(vms_per_participant=1)
    project = scratch_project(work / "local", config)
    fedfleet = [sys.executable, "-m", "fedfleet", "--project", str(project)]
    done = subprocess.run([*fedfleet, "configure", "--json"], capture_output=True, text=True, check=True)
    configured = json.loads(done.stdout)["seconds"]
    ping = floor(project, "local")
    subprocess.run([*fedfleet, "stop"], capture_output=True, check=True)
    runs = project / ".fedfleet" / "local" / "aggregator" / "runs" / "x"
    measured = run_and_measure([*fedfleet, "run", "--rounds", str(rounds), "--json"], runs, None)
    return {"configure_seconds": configured, "floor_seconds": ping, **measured}


def ssh_part(work: Path, rounds: int) -> dict[str, Any]:
    lab = Lab(work / "lab", {})
    lab.hosts = {
        name: f"{lab.subnet}.{11 + i}" for i, name in enumerate(["agg", "us-vm-1", "asia-vm-1", "eu-vm-1"])
    }
    data = [work / "lab" / "data" / p for p in PARTICIPANTS]
    write_demo(data, iid=False, alpha=1.0, seed=42, test_fraction=0.2)  # as the local stack's demo
    local_app = local_config()["fedfleet:app"]
    config = {
        "fedfleet:ssh": {"user": "root", "keyFile": str(lab.key), "connectTimeoutSeconds": 5},
        "fedfleet:aggregator": {"port": 9443, **host_entry(lab, "agg")},
        "fedfleet:participants": [
            {
                "name": p,
                "location": shipped["location"],
                "dataPath": str(path),
                "vms": [{"name": f"{short}-vm-1", **host_entry(lab, f"{short}-vm-1")}],
            }
            for (p, short), path, shipped in zip(
                PARTICIPANTS.items(), data, local_config()["fedfleet:participants"], strict=True
            )
        ],
        "fedfleet:app": {**local_app, "classes": [str(c) for c in range(10)], "image-size": 8, "channels": 1},
    }
    project = scratch_project(work / "ssh", config, stack="lab")
    lab.start()
    try:
        configured = json.loads(lab.fedfleet(project, "configure", "--stack", "lab", "--json").stdout)[
            "seconds"
        ]
        done = subprocess.run(
            lab.in_ctl(sys.executable, str(Path(__file__).resolve()), "floor", str(project), "lab"),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        ping = float(done.stdout.strip().splitlines()[-1])
        lab.fedfleet(project, "stop", "--stack", "lab")
        argv = lab.in_ctl(
            sys.executable, "-m", "fedfleet", "--project", str(project), "run", "--stack", "lab",
            "--rounds", str(rounds), "--json",
        )  # fmt: skip
        measured = run_and_measure(argv, lab.home("agg") / "runs" / "x", lab)
    finally:
        lab.stop()
    return {"configure_seconds": configured, "floor_seconds": ping, **measured}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "floor":  # inside the lab's controller namespace
        print(floor(Path(sys.argv[2]), sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if why := why_skip():
        raise SystemExit(f"the SSH lab cannot run here: {why}")
    with tempfile.TemporaryDirectory(prefix="fedfleet-bench-ssh-") as tmp:
        local = local_part(Path(tmp), args.rounds)
        ssh = ssh_part(Path(tmp), args.rounds)
    report = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "hosts": "1 aggregator + 3 participant VMs",
        "local": local,
        "ssh": ssh,
        "ratios": {
            "round_seconds_ssh_over_local": ssh["round_seconds"] / local["round_seconds"],
            "wall_ssh_over_local": ssh["wall_seconds"] / local["wall_seconds"],
            "configure_over_floor_local": local["configure_seconds"] / local["floor_seconds"],
            "configure_over_floor_ssh": ssh["configure_seconds"] / ssh["floor_seconds"],
        },
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"ssh-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'':24}{'local':>10}{'ssh':>10}{'ssh/local':>11}")
    for key, fmt in (
        ("wall_seconds", "{:10.1f}"),
        ("round_seconds", "{:10.1f}"),
        ("configure_seconds", "{:10.1f}"),
        ("floor_seconds", "{:10.1f}"),
        ("watch_cpu_share", "{:10.1%}"),
        ("accuracy", "{:10.1%}"),
    ):
        ratio = ssh[key] / local[key] if local[key] else float("nan")
        print(f"{key:24}{fmt.format(local[key])}{fmt.format(ssh[key])}{ratio:11.2f}")
    print(f"→ {path}")


if __name__ == "__main__":
    main()
