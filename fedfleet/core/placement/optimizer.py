"""NSGA-II (pymoo) over the discrete placement choice; the exact front for checking.

Encoding: two integers, the region (regions ordered by longitude, so that
crossover mixes neighbours) and the rank of the instance type within the region
by cost (clipped to the region's count). Objectives, both minimised: cost over
the horizon and the largest RTT to a participant; the user's limits are
inequality constraints. The chosen point minimises the weighted sum of the two
objectives, each normalised to [0, 1] over the front.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fedfleet.core.errors import FedfleetError
from fedfleet.core.placement.problem import Placement

# Broad mutation: isolated cheap regions are otherwise missed (bench/bench_plan.py).
MUTATION_PROB, MUTATION_ETA = 1.0, 1.0


class Infeasible(FedfleetError):
    """No candidate meets the limits; the message says which limit binds and how to relax it."""

    exit_code = 2

    def __init__(self, message: str, relaxations: dict[str, dict[str, float | str]] | None = None) -> None:
        super().__init__(message)
        self.relaxations = relaxations or {}


@dataclass(frozen=True)
class Verification:
    exact_front: list[int]
    share_found: float
    hypervolume_ratio: float
    enumeration_seconds: float


@dataclass(frozen=True)
class Plan:
    front: list[int]  # candidate indices on the NSGA-II front, by cost
    chosen: int
    optimizer_seconds: float
    evaluations: int
    verification: Verification | None = None


def pareto_indices(cost: np.ndarray, latency: np.ndarray, mask: np.ndarray) -> list[int]:
    """Non-dominated candidates among `mask` (one per distinct objective pair), by cost."""
    idx = np.flatnonzero(mask)
    order = idx[np.lexsort((latency[idx], cost[idx]))]
    front, best_latency, last = [], np.inf, None
    for i in order:
        pair = (cost[i], latency[i])
        if latency[i] < best_latency:
            front.append(int(i))
            best_latency = latency[i]
            last = pair
        elif pair == last:
            continue
    return front


def _region_table(placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Candidate indices per region (rows ordered by longitude, columns by cost), padded."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(placement.candidates):
        groups.setdefault((c.cloud, c.region), []).append(i)
    keys = sorted(groups, key=lambda k: (placement.catalog.regions[k].lon, k))
    sizes = np.array([len(groups[k]) for k in keys])
    table = np.full((len(keys), sizes.max()), -1, dtype=int)
    for row, key in enumerate(keys):
        members = sorted(groups[key], key=lambda i: placement.cost[i])
        table[row, : len(members)] = members
    return table, sizes


def nsga2(
    placement: Placement, *, pop_size: int = 50, generations: int = 40, seed: int = 0
) -> tuple[list[int], int]:
    """Run NSGA-II; return the feasible non-dominated candidates it found and its evaluations."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.optimize import minimize

    if not placement.candidates:
        return [], 0
    table, sizes = _region_table(placement)
    req = placement.req
    max_cost = np.inf if req.max_cost_usd is None else req.max_cost_usd
    max_rtt = np.inf if req.max_latency_ms is None else req.max_latency_ms
    seen: set[int] = set()

    class Choice(Problem):
        def __init__(self) -> None:
            super().__init__(
                n_var=2, n_obj=2, n_ieq_constr=2, xl=[0, 0], xu=[len(sizes) - 1, sizes.max() - 1], vtype=int
            )

        def _evaluate(self, x: np.ndarray, out: dict, *args: object, **kwargs: object) -> None:
            rows = np.clip(np.rint(x[:, 0]).astype(int), 0, len(sizes) - 1)
            ranks = np.minimum(np.rint(x[:, 1]).astype(int), sizes[rows] - 1)
            idx = table[rows, ranks]
            seen.update(idx.tolist())
            cost, rtt = placement.cost[idx], placement.max_rtt[idx]
            out["F"] = np.column_stack([cost, rtt])
            out["G"] = np.column_stack([cost - max_cost, rtt - max_rtt])

    algorithm = NSGA2(
        pop_size=pop_size,
        sampling=IntegerRandomSampling(),
        crossover=SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
        mutation=PM(prob=MUTATION_PROB, eta=MUTATION_ETA, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    result = minimize(Choice(), algorithm, ("n_gen", generations), seed=seed, verbose=False)
    evaluations = int(result.algorithm.evaluator.n_eval)
    found = np.zeros(len(placement.candidates), dtype=bool)
    # Every candidate the search evaluated is kept in an archive: the front is the
    # non-dominated set of that archive (the last population alone may have lost some).
    found[list(seen)] = True
    return pareto_indices(placement.cost, placement.max_rtt, found & placement.feasible), evaluations


def choose(placement: Placement, front: list[int]) -> int:
    """The front point with the lowest weighted sum of min-max normalised objectives."""
    cost, rtt = placement.cost[front], placement.max_rtt[front]
    span_c = np.ptp(cost) or 1.0
    span_r = np.ptp(rtt) or 1.0
    score = (
        placement.req.cost_weight * (cost - cost.min()) / span_c
        + placement.req.latency_weight * (rtt - rtt.min()) / span_r
    )
    best = np.flatnonzero(score == score.min())
    return front[int(best[np.argmin(cost[best])])]


def verify(placement: Placement, front: list[int]) -> Verification:
    """Enumerate every candidate: the share of the exact front found and the hypervolume ratio."""
    from pymoo.indicators.hv import HV

    started = time.perf_counter()
    exact = pareto_indices(placement.cost, placement.max_rtt, placement.feasible)
    seconds = time.perf_counter() - started
    exact_pairs = {(placement.cost[i], placement.max_rtt[i]) for i in exact}
    found_pairs = {(placement.cost[i], placement.max_rtt[i]) for i in front}
    points = lambda ids: np.column_stack([placement.cost[ids], placement.max_rtt[ids]])  # noqa: E731
    ideal, nadir = points(exact).min(axis=0), points(exact).max(axis=0)
    scale = np.where(nadir > ideal, nadir - ideal, 1.0)
    indicator = HV(ref_point=np.array([1.1, 1.1]))
    hv_exact = indicator((points(exact) - ideal) / scale)
    hv_found = indicator((points(front) - ideal) / scale) if front else 0.0
    return Verification(
        exact_front=exact,
        share_found=len(exact_pairs & found_pairs) / len(exact_pairs),
        hypervolume_ratio=float(hv_found / hv_exact) if hv_exact else 1.0,
        enumeration_seconds=seconds,
    )


def explain_infeasible(placement: Placement) -> Infeasible:
    """Which limit binds, and the cheapest and the fastest feasible relaxation."""
    req, cur = placement.req, placement.req.currency
    if not placement.candidates:
        reasons = ", ".join(f"{n} {why}" for why, n in placement.left_out.most_common())
        return Infeasible(
            f"no placement meets the limits: no candidate is left after the filters ({reasons}); "
            "loosen min vCPU/memory, clouds, regions or exclusions"
        )
    binds = []
    if not placement.cost_ok.any():
        binds.append(f"max cost {cur.show(req.max_cost_usd or 0)} binds: nothing costs that little")
    if not placement.latency_ok.any():
        binds.append(
            f"max latency {req.max_latency_ms:g} ms binds: no region is that close to every participant"
        )
    if not binds:
        binds.append("max cost and max latency bind together: each alone can be met, not both")

    def relaxation(i: int) -> dict[str, float | str]:
        return {"candidate": placement.candidates[i].label, "max_cost_usd": float(placement.cost[i]),
                "max_latency_ms": float(placement.max_rtt[i])}  # fmt: skip

    # Cheapest: keep the latency limit if any candidate meets it, else the cheapest overall.
    pool = placement.latency_ok if placement.latency_ok.any() else np.ones_like(placement.latency_ok)
    cheap = int(np.flatnonzero(pool)[np.argmin(placement.cost[pool])])
    pool = placement.cost_ok if placement.cost_ok.any() else np.ones_like(placement.cost_ok)
    fast = int(np.flatnonzero(pool)[np.argmin(placement.max_rtt[pool])])
    relaxations = {"cheapest": relaxation(cheap), "fastest": relaxation(fast)}

    def describe(r: dict[str, float | str]) -> str:
        parts = []
        if req.max_cost_usd is not None and float(r["max_cost_usd"]) > req.max_cost_usd:
            parts.append(f"max cost to {cur.show(float(r['max_cost_usd']))}")
        if req.max_latency_ms is not None and float(r["max_latency_ms"]) > req.max_latency_ms:
            parts.append(f"max latency to {float(r['max_latency_ms']):.0f} ms")
        return f"raise {' and '.join(parts)} ({r['candidate']})"

    return Infeasible(
        f"no placement meets the limits: {'; '.join(binds)}. Cheapest relaxation: "
        f"{describe(relaxations['cheapest'])}. Fastest relaxation: {describe(relaxations['fastest'])}.",
        relaxations,
    )


def plan(placement: Placement, *, check: bool = False, seed: int = 0) -> Plan:
    if not placement.feasible.any():
        raise explain_infeasible(placement)
    started = time.perf_counter()
    front, evaluations = nsga2(placement, seed=seed)
    seconds = time.perf_counter() - started
    return Plan(
        front=front,
        chosen=choose(placement, front),
        optimizer_seconds=seconds,
        evaluations=evaluations,
        verification=verify(placement, front) if check else None,
    )
