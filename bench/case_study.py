"""The seed's case study, replayed on the catalog: `.venv/bin/python bench/case_study.py`.

Three hospitals (aws us-east-1, gcp asia-northeast3, azure westeurope), a 26 MB
model, 100 rounds over 30 days, max latency 250 ms, max cost 85,000 KRW at an
assumed 1,450 KRW per USD (stacks/Pulumi.prod.yaml). Weights cost:latency
1:9, 5:5 and 9:1. Baseline: the aggregator in the first participant's region on a
general-purpose 4 vCPU / 16 GiB type (aws us-east-1 m6i.xlarge).

Two settings: (a) the seed's limits with a 2 vCPU / 4 GiB minimum, so the
optimizer also picks the size; (b) the baseline's size (4 vCPU / 16 GiB minimum)
and no cost limit, so only the place changes. Round time is the estimate of
fedfleet.placement.network.round_time (communication and aggregation; client
training is the same wherever the aggregator is).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

from fedfleet.core.stack import load_stack
from fedfleet.sandbox import REPO
from fedfleet.stages.plan import make_plan

SEED = {"1:9": "cost -19%, training 7% faster", "5:5": "(not reported)", "9:1": "cost -41%"}
WEIGHTS = {"1:9": (0.1, 0.9), "5:5": (0.5, 0.5), "9:1": (0.9, 0.1)}


def main() -> None:
    stack = load_stack(REPO, "prod")
    settings = {
        "a) seed limits, min 2 vCPU / 4 GiB": stack.placement,
        "b) baseline's size (min 4 vCPU / 16 GiB), no cost limit": dataclasses.replace(
            stack.placement, min_vcpu=4, min_memory_gib=16, max_cost=None
        ),
    }
    results = []
    for setting, req in settings.items():
        print(setting)
        print(
            f"  {'cost:latency':12} {'chosen':34} {'cost KRW':>10} {'Δcost':>7} {'max RTT':>8} {'round s':>8} {'Δround':>7}   seed"
        )
        for name, (wc, wl) in WEIGHTS.items():
            report = make_plan(stack, dataclasses.replace(req, cost_weight=wc, latency_weight=wl))
            c, b = report.chosen, report.baseline
            row = {
                "setting": setting,
                "weights": name,
                "chosen": c.candidate.label,
                "cost_usd": c.cost_usd,
                "cost_krw": c.cost_usd * req.currency.per_usd,
                "max_rtt_ms": c.max_rtt_ms,
                "round_seconds": c.round_seconds,
                "baseline": b.candidate.label,
                "baseline_cost_usd": b.cost_usd,
                "baseline_round_seconds": b.round_seconds,
                "cost_change_pct": 100 * (c.cost_usd / b.cost_usd - 1),
                "round_time_change_pct": 100 * (c.round_seconds / b.round_seconds - 1),
                "seed_reported": SEED[name],
            }
            results.append(row)
            print(
                f"  {name:12} {row['chosen']:34} {row['cost_krw']:10,.0f} {row['cost_change_pct']:+6.0f}% "
                f"{c.max_rtt_ms:6.0f}ms {c.round_seconds:8.2f} {row['round_time_change_pct']:+6.0f}%   {SEED[name]}"
            )
        print(
            f"  baseline {b.candidate.label}: {b.cost_usd * req.currency.per_usd:,.0f} KRW, max RTT "
            f"{b.max_rtt_ms:.0f} ms, round {b.round_seconds:.2f} s"
        )
    out = REPO / "bench" / "results" / f"case-study-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
