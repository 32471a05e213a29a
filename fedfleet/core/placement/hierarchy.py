"""K regional aggregators for many participants (hierarchical federated learning).

Each participant sends its update to the regional aggregator with the lowest RTT;
regional aggregators send theirs to a top aggregator (the regional one with the
lowest largest RTT to the others). A choice is a set of K regions, each on its
cheapest instance type that meets the minimum size.

    cost    = sum of the K VMs over the horizon
              + participant <-> regional traffic (both directions, catalog egress prices)
              + regional <-> top traffic (both directions)
    latency = max over participants of RTT(participant, its regional) + RTT(regional, top)

With ~100 regions, C(100, 4) ~ 3.9 million choices: no enumeration. NSGA-II is
compared with a random search of the same number of evaluations by hypervolume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfleet.core.placement.optimizer import pareto_indices
from fedfleet.core.placement.problem import Placement


@dataclass
class Hierarchy:
    placement: Placement
    regions: list[tuple[str, str]]  # one per region: its cheapest qualifying candidate
    cheapest: np.ndarray  # candidate index per region
    rtt_rp: np.ndarray  # region x participant RTT (ms)
    rtt_rr: np.ndarray  # region x region RTT (ms)
    egress_rp: np.ndarray  # USD per GB region -> participant + participant -> region
    egress_rr: np.ndarray  # USD per GB region -> region + back (nan: no catalog price)

    @classmethod
    def build(cls, placement: Placement) -> Hierarchy:
        best: dict[tuple[str, str], int] = {}
        for i, c in enumerate(placement.candidates):
            key = (c.cloud, c.region)
            if key not in best or placement.vm_usd[i] < placement.vm_usd[best[key]]:
                best[key] = i
        regions = sorted(best)
        cheapest = np.array([best[k] for k in regions])
        sites = [placement.site(*k) for k in regions]
        n = len(regions)
        rtt_rr = np.zeros((n, n))
        egress_rr = np.zeros((n, n))
        model_gb = placement.req.model_mb / 1024
        monthly = model_gb * placement.req.rounds * n * 730 / placement.req.horizon_hours
        for a in range(n):
            for b in range(a + 1, n):
                rtt_rr[a, b] = rtt_rr[b, a] = placement.rtt_model.rtt(sites[a], sites[b]).value
                there = placement.pricer.price(sites[a], sites[b], monthly)
                back = placement.pricer.price(sites[b], sites[a], monthly)
                egress_rr[a, b] = egress_rr[b, a] = (
                    np.nan if there is None or back is None else there.value + back.value
                )
        links = [placement._links_by_region[k] for k in regions]
        rtt_rp = np.array([[q.value for q in link[0]] for link in links if link])
        egress_rp = np.array([[d.value + u.value for d, u in link[1]] for link in links if link])
        return cls(placement, regions, cheapest, rtt_rp, rtt_rr, egress_rp, egress_rr)

    def evaluate(self, choices: np.ndarray) -> np.ndarray:
        """Rows of K region indices -> (cost USD, latency ms); inf where not priceable."""
        req = self.placement.req
        total_gb = req.model_mb / 1024 * req.rounds
        out = np.empty((len(choices), 2))
        for row, genes in enumerate(choices):
            picked = np.unique(genes)
            rtt = self.rtt_rp[picked]  # K x P
            home = rtt.argmin(axis=0)  # each participant's regional aggregator
            among = self.rtt_rr[np.ix_(picked, picked)]
            top = int(among.max(axis=1).argmin())
            latency = (rtt[home, np.arange(rtt.shape[1])] + among[home, top]).max()
            vm = self.placement.vm_usd[self.cheapest[picked]].sum()
            part_egress = self.egress_rp[picked][home, np.arange(rtt.shape[1])].sum() * total_gb
            up = self.egress_rr[picked[top], picked].sum() * total_gb
            cost = vm + part_egress + up
            out[row] = (cost, latency) if np.isfinite(cost) else (np.inf, np.inf)
        return out


def nsga2(h: Hierarchy, k: int, *, evaluations: int, seed: int = 0) -> np.ndarray:
    """NSGA-II over K region indices; returns the objective pairs of its archive's front."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.optimize import minimize

    archive: list[np.ndarray] = []
    n = len(h.regions)

    class Choice(Problem):
        def __init__(self) -> None:
            super().__init__(n_var=k, n_obj=2, xl=0, xu=n - 1, vtype=int)

        def _evaluate(self, x: np.ndarray, out: dict, *args: object, **kwargs: object) -> None:
            f = h.evaluate(np.clip(np.rint(x).astype(int), 0, n - 1))
            archive.append(f)
            out["F"] = f

    pop = 60
    algorithm = NSGA2(
        pop_size=pop,
        sampling=IntegerRandomSampling(),
        crossover=SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
        mutation=PM(prob=1.0 / k, eta=3.0, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    minimize(Choice(), algorithm, ("n_eval", evaluations), seed=seed, verbose=False)
    return _front(np.vstack(archive)[:evaluations])


def random_search(h: Hierarchy, k: int, *, evaluations: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    choices = np.array([rng.choice(len(h.regions), k, replace=False) for _ in range(evaluations)])
    return _front(h.evaluate(choices))


def _front(points: np.ndarray) -> np.ndarray:
    ok = np.isfinite(points).all(axis=1)
    idx = pareto_indices(points[:, 0], points[:, 1], ok)
    return points[idx]


def hypervolumes(fronts: dict[str, np.ndarray]) -> dict[str, float]:
    """Hypervolume of each front, all normalised by the union's ideal and nadir points."""
    from pymoo.indicators.hv import HV

    union = np.vstack(list(fronts.values()))
    ideal, nadir = union.min(axis=0), union.max(axis=0)
    scale = np.where(nadir > ideal, nadir - ideal, 1.0)
    indicator = HV(ref_point=np.array([1.1, 1.1]))
    return {name: float(indicator((f - ideal) / scale)) for name, f in fronts.items()}
