"""Benchmark of the placement optimizer: `.venv/bin/python bench/bench_plan.py [--json]`.

1. Single aggregator, full catalog, 3 / 10 / 50 participants (a seeded mix of
   cloud regions and private data centres), 5 seeds each: NSGA-II time, its
   evaluations, the share of the exact Pareto front it found and the hypervolume
   ratio; the peer is enumeration of every candidate (time to build the objective
   table, then to take its exact front).
2. K regional aggregators (hierarchical), 50 and 200 participants, K = 3, 4, 5:
   NSGA-II against a random search with the same number of evaluations
   (hypervolume over the union of both fronts; higher is better).
3. The aggregation rate behind the round-time estimate (numpy weighted average).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time

import numpy as np

from fedfleet.core.catalog import load_catalog
from fedfleet.core.placement import hierarchy
from fedfleet.core.placement.network import Site
from fedfleet.core.placement.optimizer import nsga2, pareto_indices, verify
from fedfleet.core.placement.problem import Placement, Requirements
from fedfleet.sandbox import REPO


def participants(catalog, count: int, seed: int) -> list[Site]:
    rng = np.random.default_rng(seed)
    keys = sorted(catalog.regions)
    sites = []
    for i in range(count):
        if i % 4 == 3:  # every fourth participant is a private data centre
            sites.append(
                Site(f"dc{i}", None, None, float(rng.uniform(-35, 60)), float(rng.uniform(-120, 150)))
            )
        else:
            cloud, region = keys[rng.integers(len(keys))]
            r = catalog.regions[(cloud, region)]
            sites.append(Site(f"p{i}", cloud, region, r.lat, r.lon, r.country))
    return sites


def single(catalog, seeds: int) -> list[dict]:
    rows = []
    started = time.perf_counter()
    import pymoo.algorithms.moo.nsga2  # noqa: F401 (import cost, reported apart)

    import_seconds = time.perf_counter() - started
    case = [
        Site(
            f"{c}:{r}",
            c,
            r,
            catalog.regions[(c, r)].lat,
            catalog.regions[(c, r)].lon,
            catalog.regions[(c, r)].country,
        )
        for c, r in (("aws", "us-east-1"), ("gcp", "asia-northeast3"), ("azure", "westeurope"))
    ]
    scenarios = [
        ("3, case study, min 4 vCPU / 16 GiB, <= 250 ms", lambda seed: case,
         Requirements(min_vcpu=4, min_memory_gib=16, max_latency_ms=250, model_mb=26)),
        ("3", lambda seed: participants(catalog, 3, seed), Requirements()),
        ("10", lambda seed: participants(catalog, 10, seed), Requirements()),
        ("50", lambda seed: participants(catalog, 50, seed), Requirements()),
    ]  # fmt: skip
    for name, make_sites, req in scenarios:
        times, shares, hvs, evals, builds, enums, fronts = [], [], [], [], [], [], []
        for seed in range(seeds):
            t = time.perf_counter()
            placement = Placement(catalog, make_sites(seed), req)
            builds.append(time.perf_counter() - t)
            t = time.perf_counter()
            front, evaluations = nsga2(placement, seed=seed)
            times.append(time.perf_counter() - t)
            check = verify(placement, front)
            t = time.perf_counter()
            pareto_indices(placement.cost, placement.max_rtt, placement.feasible)
            enums.append(time.perf_counter() - t)
            shares.append(check.share_found)
            hvs.append(check.hypervolume_ratio)
            evals.append(evaluations)
            fronts.append(len(check.exact_front))
        rows.append(
            {
                "participants": name,
                "candidates": len(placement.candidates),
                "exact_front_sizes": fronts,
                "nsga2_seconds_median": statistics.median(times),
                "nsga2_seconds_max": max(times),
                "nsga2_evaluations_median": statistics.median(evals),
                "share_of_exact_front_min": min(shares),
                "hypervolume_ratio_min": min(hvs),
                "objective_table_seconds_median": statistics.median(builds),
                "enumeration_front_seconds_median": statistics.median(enums),
            }
        )
    return [{"pymoo_import_seconds": import_seconds}, *rows]


def regional(catalog, seeds: int, evaluations: int) -> list[dict]:
    rows = []
    for count in (50, 200):
        for k in (3, 4, 5):
            hv_n, hv_r, t_n = [], [], []
            for seed in range(seeds):
                h = hierarchy.Hierarchy.build(
                    Placement(catalog, participants(catalog, count, 100 + seed), Requirements())
                )
                t = time.perf_counter()
                front_n = hierarchy.nsga2(h, k, evaluations=evaluations, seed=seed)
                t_n.append(time.perf_counter() - t)
                front_r = hierarchy.random_search(h, k, evaluations=evaluations, seed=seed)
                hv = hierarchy.hypervolumes({"nsga2": front_n, "random": front_r})
                hv_n.append(hv["nsga2"])
                hv_r.append(hv["random"])
            rows.append(
                {
                    "participants": count,
                    "aggregators": k,
                    "regions": len(h.regions),
                    "evaluations": evaluations,
                    "nsga2_hypervolume_median": statistics.median(hv_n),
                    "random_hypervolume_median": statistics.median(hv_r),
                    "nsga2_better_in": sum(a > b for a, b in zip(hv_n, hv_r, strict=True)),
                    "seeds": seeds,
                    "nsga2_seconds_median": statistics.median(t_n),
                }
            )
    return rows


def aggregation_rate(model_mb: float = 26.0, participants_: int = 3) -> float:
    """Bytes of updates averaged per second: numpy weighted sum of float32 vectors."""
    vectors = [
        np.random.default_rng(i).random(int(model_mb * 1e6 / 4), dtype=np.float32)
        for i in range(participants_)
    ]
    weights = np.full(participants_, 1 / participants_)
    best = np.inf
    for _ in range(5):
        t = time.perf_counter()
        total = vectors[0] * weights[0]
        for w, v in zip(weights[1:], vectors[1:], strict=True):
            total += v * w
        best = min(best, time.perf_counter() - t)
    return participants_ * model_mb * 1e6 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--evaluations", type=int, default=3000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    catalog = load_catalog()
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "single": single(catalog, args.seeds),
        "regional": regional(catalog, args.seeds, args.evaluations),
        "aggregation_bytes_per_second": aggregation_rate(),
    }
    out = REPO / "bench" / "results" / f"plan-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"pymoo import {result['single'][0]['pymoo_import_seconds']:.2f} s (once per process)")
    print(
        f"{'participants':>46} {'candidates':>10} {'NSGA-II s':>9} {'evals':>6} {'front found':>11} {'HV ratio':>8}   peer: table s, exact front ms"
    )
    for r in result["single"][1:]:
        print(
            f"{r['participants']:>46} {r['candidates']:10} {r['nsga2_seconds_median']:9.2f} "
            f"{r['nsga2_evaluations_median']:6.0f} {r['share_of_exact_front_min']:11.0%} "
            f"{r['hypervolume_ratio_min']:8.3f}   {r['objective_table_seconds_median']:.2f} s, "
            f"{r['enumeration_front_seconds_median'] * 1000:.1f} ms"
        )
    print(f"regional aggregators, {args.evaluations} evaluations each, hypervolume (higher is better):")
    for r in result["regional"]:
        print(
            f"  {r['participants']:4} participants, K={r['aggregators']}: NSGA-II {r['nsga2_hypervolume_median']:.3f}"
            f" vs random {r['random_hypervolume_median']:.3f} (NSGA-II better in {r['nsga2_better_in']}/{r['seeds']})"
        )
    print(f"aggregation: {result['aggregation_bytes_per_second'] / 1e9:.2f} GB/s")
    print(f"written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
