"""Benchmark: the seed's evaluation of the orchestrator, 20 runs (the test makes 2).

    .venv/bin/python bench/bench_seed.py [--runs 20] [--seed 2026] [--json]

3 participants x 5 VMs (two healthy, two stopped, one undersized); each run probes every
VM, picks one per participant, starts its SuperNode through the playbooks and waits for
it to connect, then stops it. Side by side in the same runs: the seed's baseline (a VM
at random, no probe, no retry). Prints both arms' participant dropout and run success
and writes bench/results/seed-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test module holds the evaluation itself

from tests.test_evaluation import evaluate, seed_stack  # noqa: E402

RESULTS = REPO / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedfleet-seed-") as tmp:
        report = evaluate(seed_stack(Path(tmp)), args.runs, args.seed)
    report["seconds"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"seed-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for arm in ("policy", "random"):
        r = report[arm]
        print(
            f"{arm:>7}: participant dropout {r['participant_dropout']:.0%}, "
            f"runs with every participant {r['run_success']:.0%}"
        )
    print(
        f"{args.runs} runs in {report['seconds']:.0f} s; retries by the policy: {report['policy_retries']} -> {out}"
    )


if __name__ == "__main__":
    main()
