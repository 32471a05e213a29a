"""Benchmark: what recording every round in the model registry (MLflow) adds to a round.

    .venv/bin/python bench/bench_registry.py [--pairs 2] [--rounds 4] [--json]

The local demo run (`fedfleet run`, 3 participants, real Flower processes) side by side
in this script, with recording on (the default: every round's metrics and model into the
project's MLflow store, on the controller's recording thread) and off
(`fedfleet:registry.record: false`), in ABBA order so that drift on the machine cancels
out. Per run: the mean round wall time (from the ServerApp's events), the whole run's
time, and the seconds the recording thread spent. Written to bench/results/registry-<ts>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfleet.sandbox import REPO, local_config, scratch_project


def one_run(workdir: Path, rounds: int, record: bool) -> dict[str, Any]:
    config = local_config()
    config["fedfleet:registry"] = {"record": record}
    project = scratch_project(workdir, config)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "fedfleet", "--project", str(project), "run", "--rounds", str(rounds), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    rounds_s = [r["seconds"] for r in summary["rounds"] if r["round"] > 0 and r["seconds"] is not None]
    registry = summary.get("registry") or {}
    return {
        "record": record,
        "round_mean_seconds": statistics.fmean(rounds_s),
        "rounds_seconds": rounds_s,
        "total_seconds": wall,
        "record_seconds": registry.get("record_seconds"),
        "models_recorded": registry.get("models_recorded"),
        "registry_errors": registry.get("errors"),
        "accuracy": summary["rounds"][-1]["metrics"].get("accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="pairs of runs (on/off), in ABBA order")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    order = []
    for i in range(args.pairs):
        order += [True, False] if i % 2 == 0 else [False, True]
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedfleet-bench-registry-") as tmp:
        for i, record in enumerate(order):
            result = one_run(Path(tmp) / f"run-{i}", args.rounds, record)
            runs.append(result)
            print(
                f"run {i + 1}/{len(order)} recording {'on ' if record else 'off'}: "
                f"{result['round_mean_seconds']:.2f} s/round, {result['total_seconds']:.1f} s total",
                file=sys.stderr,
            )
    on = [r for r in runs if r["record"]]
    off = [r for r in runs if not r["record"]]
    on_round = statistics.fmean(r["round_mean_seconds"] for r in on)
    off_round = statistics.fmean(r["round_mean_seconds"] for r in off)
    out = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "pairs": args.pairs,
        "round_seconds_on": on_round,
        "round_seconds_off": off_round,
        "added_per_round_seconds": on_round - off_round,
        "ratio_on_off": on_round / off_round,
        "total_seconds_on": statistics.fmean(r["total_seconds"] for r in on),
        "total_seconds_off": statistics.fmean(r["total_seconds"] for r in off),
        "record_seconds_per_run": statistics.fmean(r["record_seconds"] for r in on),
        "runs": runs,
    }
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"registry-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"round: {on_round:.2f} s recording, {off_round:.2f} s not ({on_round / off_round:.3f}x, "
        f"{on_round - off_round:+.3f} s per round); the recording thread: "
        f"{out['record_seconds_per_run']:.2f} s per run of {args.rounds} rounds (+ round 0); "
        f"whole run {out['total_seconds_on']:.1f} s vs {out['total_seconds_off']:.1f} s. {path}"
    )


if __name__ == "__main__":
    main()
