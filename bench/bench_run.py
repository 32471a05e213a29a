"""Benchmark: a 3-participant local run against the same app under Flower's simulation engine.

    .venv/bin/python bench/bench_run.py [--rounds 3] [--variants] [--json]

Both runs use the demo data, the same run config, on this machine, one after the
other in this script:

  deployment   `fedfleet run` on a scratch copy of the local stack: real
               flower-superlink (TLS, node auth) and one flower-supernode per
               participant, each with its warm worker
  simulation   `flwr run fl/` against `flower-superlink --simulation` (Ray): the
               same FAB, three virtual SuperNodes reading the same partitions

Per round: the round's wall time (ServerApp's round-start to the saved model),
the slowest site's compute (train + evaluate-on-receive, measured in the
ClientApp) and the rest (overhead). With --variants, two more deployment runs
show what fedfleet's own cuts are worth: evaluation as a separate Flower phase
(Flower's usual flow) and no warm workers (torch imported per message).
Results are printed and written to bench/results/run-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from fedfleet_app.settings import AppSettings

from fedfleet.adapters import flwr as flower
from fedfleet.adapters.processes import ProcessGroup
from fedfleet.core.records import RunState
from fedfleet.sandbox import REPO, free_ports, local_config, scratch_project


def deployment(workdir: Path, rounds: int, app: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
    config = local_config()
    config["fedfleet:app"].update(app)
    config["fedfleet:local"].update(local)
    project = scratch_project(workdir, config)
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedfleet",
            "--project",
            str(project),
            "run",
            "--rounds",
            str(rounds),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"fedfleet run failed ({done.returncode}):\n{done.stderr}")
    summary = json.loads(done.stdout)
    events = (project / "runs" / summary["run_id"] / "events.jsonl").read_text().splitlines()
    return {
        "wall_seconds": wall,
        "timings": summary["timings"],
        **per_round(events, rounds),
        "accuracy": summary["rounds"][-1]["metrics"]["accuracy"],
        "data_root": str(project / ".fedfleet" / "local" / "sites"),
        "participants": [p["name"] for p in summary["participants"]],
    }


def simulation(workdir: Path, rounds: int, data_root: str, participants: list[str]) -> dict[str, Any]:
    """The same app and data under the simulation engine, driven through `flwr run`."""
    workdir.mkdir(parents=True, exist_ok=True)
    sim_data = workdir / "partitions"
    sim_data.mkdir(exist_ok=True)
    for index, name in enumerate(participants):  # partition-id i reads participant i's data
        (sim_data / str(index)).symlink_to(Path(data_root) / name / "data")
    (port,) = free_ports(1)
    home = workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        f"options.num-supernodes = {len(participants)}\n"
    )
    out = workdir / "out"
    settings = AppSettings(
        num_server_rounds=rounds,
        min_participants=len(participants),
        output_dir=str(out),
        simulation_data_root=str(sim_data),
    )
    run_config = flower.write_run_config(workdir / "run_config.toml", settings.to_run_config())
    started = time.monotonic()
    with ProcessGroup() as procs:
        superlink = procs.start(
            "simulation superlink",
            [
                flower.tool("flower-superlink"),
                "--simulation",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(workdir / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
            flower.flower_env(workdir / "superlink-home"),
            workdir / "superlink.log",
        )
        deadline = time.monotonic() + 60
        while not healthy(f"http://127.0.0.1:{port}/health"):
            if superlink.exit_code() is not None or time.monotonic() > deadline:
                raise SystemExit(f"simulation superlink did not start:\n{superlink.log_tail()}")
            time.sleep(0.2)
        submit = subprocess.run(
            [
                flower.tool("flwr"),
                "run",
                str(REPO / "fl"),
                "sim",
                "--format",
                "json",
                "--run-config",
                str(run_config),
            ],
            env=flower.flower_env(home),
            capture_output=True,
            text=True,
            check=False,
        )
        if '"success": true' not in submit.stdout:
            raise SystemExit(f"flwr run (simulation) failed:\n{submit.stdout}{submit.stderr}")
        events_file = out / "events.jsonl"
        deadline = time.monotonic() + 600
        while True:
            lines = events_file.read_text().splitlines() if events_file.exists() else []
            kinds = {json.loads(line)["event"] for line in lines}
            if "finished" in kinds or "failed" in kinds:
                break
            if time.monotonic() > deadline:
                raise SystemExit("simulation did not finish in 600 s")
            time.sleep(0.2)
    wall = time.monotonic() - started
    if "failed" in kinds:
        raise SystemExit(f"simulation run failed: {lines[-1]}")
    return {"wall_seconds": wall, **per_round(lines, rounds)}


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def per_round(lines: list[str], rounds: int) -> dict[str, Any]:
    state = RunState(rounds)
    events = [json.loads(line) for line in lines if line.strip()]
    for event in events:
        state.apply(event)
    trained = [r for r in state.rounds_list() if r["round"] > 0]
    first_start = min(e["time"] for e in events if e["event"] == "round-start")
    started = next(e["time"] for e in events if e["event"] == "started")
    return {
        "phase_breakdown_median_seconds": breakdown(events),
        "serverapp_to_first_round_seconds": first_start - started,
        "rounds_seconds": sum(r["seconds"] for r in trained),
        "round_seconds": [round(r["seconds"], 2) for r in trained],
        "round_mean_seconds": statistics.mean(r["seconds"] for r in trained),
        "client_compute_mean_seconds": statistics.mean(r["client_compute_seconds"] for r in trained),
        "overhead_mean_seconds": statistics.mean(r["overhead_seconds"] for r in trained),
    }


def breakdown(events: list[dict[str, Any]]) -> dict[str, float]:
    """Where a Flower phase's time goes, from the ServerApp's and ClientApps' clocks.

    push            the ServerApp pushes the messages (and their arrays) to the SuperLink
    dispatch        messages pushed -> ClientApp process started (SuperNode poll, spawn)
    clientapp_start process started -> handler entered (Python + Flower imports, pulls)
    compute         handler entered -> handler returned (worker round trip included)
    return          the last handler returned -> its reply reached the ServerApp
    """
    parts: dict[str, list[float]] = {
        "push": [],
        "dispatch": [],
        "clientapp_start": [],
        "compute": [],
        "return": [],
    }
    kind = "train"
    for i, event in enumerate(events):
        if event["event"] in ("round-start", "evaluate-start"):
            kind = "train" if event["event"] == "round-start" else "evaluate"
        if event["event"] != "phase" or not event["arrivals"]:
            continue
        wanted = "train-done" if kind == "train" else "evaluated"
        sites = next(e["sites"] for e in events[i + 1 :] if e["event"] == wanted)
        parts["push"].append(event["pushed"] - event["started"])
        for site in sites:
            parts["dispatch"].append(site["process-started"] - event["pushed"])
            parts["clientapp_start"].append(site["handler-started"] - site["process-started"])
            parts["compute"].append(site["handler-finished"] - site["handler-started"])
        parts["return"].append(max(event["arrivals"]) - max(s["handler-finished"] for s in sites))
    return {k: round(statistics.median(v), 2) for k, v in parts.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", action="store_true", help="also run Flower's usual flow and no workers")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "participants": 3,
        "machine": f"{os.cpu_count()} cores",
    }
    with tempfile.TemporaryDirectory(prefix="fedfleet-bench-") as tmp:
        root = Path(tmp)
        runs = {"deployment": deployment(root / "deployment", args.rounds, {}, {})}
        base = runs["deployment"]
        runs["simulation"] = simulation(
            root / "simulation", args.rounds, base["data_root"], base["participants"]
        )
        if args.variants:
            runs["deployment, evaluation as a separate phase"] = deployment(
                root / "separate", args.rounds, {"evaluation": "separate"}, {}
            )
            runs["deployment, no warm workers"] = deployment(
                root / "noworkers", args.rounds, {}, {"warmWorkers": False}
            )
    for run in runs.values():
        run.pop("data_root", None)
        run.pop("participants", None)
    sim = runs["simulation"]
    results["runs"] = runs
    results["ratios"] = {
        "deployment_over_simulation_wall": base["wall_seconds"] / sim["wall_seconds"],
        "deployment_over_simulation_round": base["round_mean_seconds"] / sim["round_mean_seconds"],
    }
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"run-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.rounds} rounds, 3 participants, {results['machine']}  (written to {out.relative_to(REPO)})")
    header = f"{'run':46} {'wall s':>7} {'rounds s':>8} {'s/round':>8} {'compute':>8} {'other':>7}"
    print(header)
    for name, run in runs.items():
        print(
            f"{name:46} {run['wall_seconds']:7.1f} {run['rounds_seconds']:8.1f} "
            f"{run['round_mean_seconds']:8.2f} {run['client_compute_mean_seconds']:8.2f} "
            f"{run['overhead_mean_seconds']:7.2f}"
        )
    print(
        "median seconds per Flower phase: "
        + ", ".join(
            f"{name} " + " / ".join(f"{k} {v}" for k, v in run["phase_breakdown_median_seconds"].items())
            for name, run in runs.items()
            if name in ("deployment", "simulation")
        )
    )
    r = results["ratios"]
    print(
        f"deployment / simulation: wall x{r['deployment_over_simulation_wall']:.2f}, "
        f"per round x{r['deployment_over_simulation_round']:.2f}"
    )


if __name__ == "__main__":
    main()
