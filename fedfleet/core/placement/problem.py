"""The placement problem: every (cloud, region, instance type) the catalog can price,
scored by cost over the horizon and by round-trip time to the participants.

Pure logic: numpy arrays over the candidates, built once; the optimizer and the
exhaustive check read the same arrays.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedfleet.core.catalog import CLOUDS, Catalog, Price
from fedfleet.core.errors import ConfigError
from fedfleet.core.placement.network import EgressPricer, Quote, RttModel, Site, round_time
from fedfleet.core.util import closest

HOURS_PER_MONTH = 730.0
# "General-purpose 4 vCPU / 16 GiB" per cloud: the default baseline's instance type.
GENERAL_PURPOSE_4_16 = {"aws": "m6i.xlarge", "gcp": "n2-standard-4", "azure": "Standard_D4s_v5"}


@dataclass(frozen=True)
class Currency:
    code: str = "USD"
    per_usd: float = 1.0

    def show(self, usd: float) -> str:
        if self.code == "USD":
            return f"${usd:,.2f}"
        return f"{usd * self.per_usd:,.0f} {self.code}"


@dataclass(frozen=True)
class Requirements:
    """The user's limits. `max_cost` is in `currency` (USD unless stated)."""

    horizon_hours: float = HOURS_PER_MONTH
    rounds: int = 100
    model_mb: float = 26.0
    max_cost: float | None = None
    max_latency_ms: float | None = None
    cost_weight: float = 0.5
    latency_weight: float = 0.5
    min_vcpu: int = 2
    min_memory_gib: float = 4.0
    clouds: tuple[str, ...] = CLOUDS
    regions: tuple[str, ...] = ()  # allow-list of "cloud:region" (empty: all)
    exclude: tuple[str, ...] = ()  # "cloud", "cloud:region" or "cloud:region:type", * wildcards
    currency: Currency = field(default_factory=Currency)
    baseline: tuple[str, str, str] | None = None  # (cloud, region, type); default: see Placement
    catalog_overrides: tuple[Path, ...] = ()

    @property
    def max_cost_usd(self) -> float | None:
        return None if self.max_cost is None else self.max_cost / self.currency.per_usd


@dataclass
class Evaluation:
    """One candidate's figures with the source of each RTT and price."""

    candidate: Price
    cost_usd: float
    vm_usd: float
    egress_usd: float
    max_rtt_ms: float
    mean_rtt_ms: float
    round_seconds: float
    rtt: list[Quote]
    egress: list[tuple[Quote, Quote]]


class Placement:
    """Candidates, their objective arrays, and what was left out and why."""

    def __init__(self, catalog: Catalog, participants: Sequence[Site], req: Requirements) -> None:
        if not participants:
            raise ConfigError("placement needs at least one participant")
        self.catalog, self.participants, self.req = catalog, list(participants), req
        self.rtt_model = RttModel(catalog)
        self.pricer = EgressPricer(catalog)
        self._check_names()
        self.left_out: Counter[str] = Counter()
        self.unpriced: set[str] = set()  # participant uplinks without a catalog price
        model_gb = req.model_mb / 1024
        total_gb = model_gb * req.rounds  # per participant and direction, over the horizon
        monthly_gb = total_gb * len(self.participants) * HOURS_PER_MONTH / req.horizon_hours
        per_region: dict[tuple[str, str], tuple[list[Quote], list[tuple[Quote, Quote]]] | None] = {}
        candidates, rtts, egress_usd = [], [], []
        for price in sorted(catalog.prices.values(), key=lambda p: (p.cloud, p.region, p.usd_per_hour)):
            reason = self._filter(
                price.cloud, price.region, price.instance_type, price.vcpu, price.memory_gib
            )
            if reason:
                self.left_out[reason] += 1
                continue
            key = (price.cloud, price.region)
            if key not in per_region:
                per_region[key] = self._links(key, monthly_gb)
            links = per_region[key]
            if links is None:
                self.left_out["no egress price in the catalog from this region"] += 1
                continue
            candidates.append(price)
            rtts.append([q.value for q in links[0]])
            egress_usd.append(sum(down.value + up.value for down, up in links[1]) * total_gb)
        self.candidates = candidates
        self._links_by_region = per_region
        self.rtt_ms = np.array(rtts, dtype=float).reshape(len(candidates), len(self.participants))
        self.vm_usd = np.array([c.usd_per_hour for c in candidates]) * req.horizon_hours
        self.egress_usd = np.array(egress_usd, dtype=float)
        self.cost = self.vm_usd + self.egress_usd
        self.max_rtt = self.rtt_ms.max(axis=1) if candidates else np.zeros(0)
        self.mean_rtt = self.rtt_ms.mean(axis=1) if candidates else np.zeros(0)
        self.round_seconds = round_time(self.rtt_ms, req.model_mb * 1e6, len(self.participants))
        limit_cost = np.inf if req.max_cost_usd is None else req.max_cost_usd
        limit_rtt = np.inf if req.max_latency_ms is None else req.max_latency_ms
        self.cost_ok = self.cost <= limit_cost
        self.latency_ok = self.max_rtt <= limit_rtt
        self.feasible = self.cost_ok & self.latency_ok

    # -- candidate filtering ---------------------------------------------------------

    def _check_names(self) -> None:
        """Allow-list and exclusion entries must name regions and types the catalog knows."""
        known_regions = {f"{c}:{r}" for c, r in self.catalog.regions} | {
            f"{p.cloud}:{p.region}" for p in self.catalog.prices.values()
        }
        known_types = {f"{c}:{t}" for c, t in self.catalog.instance_types()}
        for cloud in self.req.clouds:
            if cloud not in CLOUDS:
                raise ConfigError(f"placement clouds: {cloud!r} is not one of {', '.join(CLOUDS)}")
        for entry in self.req.regions:
            if entry not in known_regions:
                raise ConfigError(
                    f"placement regions: {entry!r} is not a region in the catalog "
                    f"({closest(entry, sorted(known_regions), n=3)}); write it as cloud:region"
                )
        for entry in self.req.exclude:
            parts = entry.split(":")
            if any(ch in entry for ch in "*?[") or len(parts) == 1:
                if len(parts) == 1 and entry not in CLOUDS:
                    raise ConfigError(
                        f"placement exclude: {entry!r} is not a cloud ({', '.join(CLOUDS)}); "
                        "write cloud, cloud:region or cloud:region:instance-type"
                    )
                continue
            if len(parts) >= 2 and f"{parts[0]}:{parts[1]}" not in known_regions:
                raise ConfigError(
                    f"placement exclude: {entry!r}: no region {parts[0]}:{parts[1]} in the catalog "
                    f"({closest(f'{parts[0]}:{parts[1]}', sorted(known_regions), n=3)})"
                )
            if len(parts) == 3 and f"{parts[0]}:{parts[2]}" not in known_types:
                raise ConfigError(
                    f"placement exclude: {entry!r}: no instance type {parts[2]} on {parts[0]} in the "
                    f"catalog ({closest(parts[2], sorted(t for c, t in self.catalog.instance_types() if c == parts[0]), n=3)})"
                )

    def _filter(self, cloud: str, region: str, itype: str, vcpu: int, memory: float) -> str | None:
        req = self.req
        if cloud not in req.clouds:
            return f"cloud not allowed ({cloud})"
        if req.regions and f"{cloud}:{region}" not in req.regions:
            return "region not in the allowed regions"
        label = f"{cloud}:{region}:{itype}"
        for pattern in req.exclude:
            if (
                fnmatch.fnmatchcase(label, pattern)
                or fnmatch.fnmatchcase(f"{cloud}:{region}", pattern)
                or pattern == cloud
            ):
                return f"excluded by {pattern!r}"
        if vcpu < req.min_vcpu:
            return f"fewer than {req.min_vcpu} vCPU"
        if memory < req.min_memory_gib:
            return f"less than {req.min_memory_gib:g} GiB memory"
        if (cloud, region) not in self.catalog.regions:
            return "region has no coordinates in the catalog"
        return None

    def _links(
        self, key: tuple[str, str], monthly_gb: float
    ) -> tuple[list[Quote], list[tuple[Quote, Quote]]] | None:
        site = self.site(*key)
        rtts = [self.rtt_model.rtt(site, p) for p in self.participants]
        egress = []
        for p in self.participants:
            down = self.pricer.price(site, p, monthly_gb)
            if down is None:  # the candidate's own outbound price is unknown: leave it out
                return None
            up = self.pricer.price(p, site, monthly_gb)
            if up is None:  # the participant's: the same gap for many candidates, say so
                up = Quote(0.0, f"no catalog price for {p.name} -> {site.name}: counted as 0", estimated=True)
                self.unpriced.add(f"{p.name} -> {site.cloud}")
            egress.append((down, up))
        return rtts, egress

    def site(self, cloud: str, region: str) -> Site:
        r = self.catalog.regions[(cloud, region)]
        return Site(f"{cloud}:{region}", cloud, region, r.lat, r.lon, r.country)

    # -- reporting -------------------------------------------------------------------

    def evaluation(self, index: int) -> Evaluation:
        c = self.candidates[index]
        links = self._links_by_region[(c.cloud, c.region)]
        assert links is not None
        return Evaluation(
            candidate=c,
            cost_usd=float(self.cost[index]),
            vm_usd=float(self.vm_usd[index]),
            egress_usd=float(self.egress_usd[index]),
            max_rtt_ms=float(self.max_rtt[index]),
            mean_rtt_ms=float(self.mean_rtt[index]),
            round_seconds=float(self.round_seconds[index]),
            rtt=links[0],
            egress=links[1],
        )

    def index_of(self, cloud: str, region: str, instance_type: str) -> int | None:
        for i, c in enumerate(self.candidates):
            if (c.cloud, c.region, c.instance_type) == (cloud, region, instance_type):
                return i
        return None

    def evaluate_outside(self, cloud: str, region: str, instance_type: str) -> Evaluation:
        """Figures for any priced (cloud, region, type), filters and limits ignored (the baseline)."""
        price = self.catalog.prices.get((cloud, region, instance_type))
        if price is None:
            types = sorted(t for (c, r, t) in self.catalog.prices if (c, r) == (cloud, region))
            raise ConfigError(
                f"baseline {cloud}:{region}:{instance_type} has no price in the catalog "
                f"({closest(instance_type, types, n=3) if types else 'no prices for that region'})"
            )
        model_gb = self.req.model_mb / 1024
        total_gb = model_gb * self.req.rounds
        monthly_gb = total_gb * len(self.participants) * HOURS_PER_MONTH / self.req.horizon_hours
        links = self._links((cloud, region), monthly_gb)
        if links is None:
            raise ConfigError(
                f"baseline {cloud}:{region}: no egress price in the catalog for some participant"
            )
        rtt = np.array([q.value for q in links[0]])
        vm = price.usd_per_hour * self.req.horizon_hours
        egress = sum(d.value + u.value for d, u in links[1]) * total_gb
        return Evaluation(
            candidate=price,
            cost_usd=vm + egress,
            vm_usd=vm,
            egress_usd=egress,
            max_rtt_ms=float(rtt.max()),
            mean_rtt_ms=float(rtt.mean()),
            round_seconds=float(round_time(rtt[None, :], self.req.model_mb * 1e6, len(self.participants))[0]),
            rtt=links[0],
            egress=links[1],
        )

    def default_baseline(self) -> tuple[str, str, str]:
        """The first participant's region (or the nearest cloud region) on a 4 vCPU / 16 GiB type."""
        if self.req.baseline:
            return self.req.baseline
        first = self.participants[0]
        if first.key and first.key in self.catalog.regions:
            cloud, region = first.key
        else:
            nearest = min(
                (
                    k
                    for k in self.catalog.regions
                    if (k[0], k[1], GENERAL_PURPOSE_4_16[k[0]]) in self.catalog.prices
                ),
                key=lambda k: self.rtt_model.rtt(self.site(*k), first).value,
            )
            cloud, region = nearest
        return (cloud, region, GENERAL_PURPOSE_4_16[cloud])
