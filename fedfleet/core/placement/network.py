"""Distances, round-trip times, egress prices and the round-time estimate.

Pure logic over the catalog (numpy for the fit). Every RTT and price comes back
with the source it was taken from, or says that it is an estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedfleet.core.catalog import Catalog, Egress

EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius

# Continent of each country in the catalog's regions.csv (for Azure's and GCP's
# continent-based egress rules and for Australia/China destination prices).
CONTINENT = {
    "United States": "north-america", "Canada": "north-america", "Mexico": "north-america",
    "Brazil": "south-america", "Chile": "south-america",
    "Austria": "europe", "Belgium": "europe", "Denmark": "europe", "Finland": "europe",
    "France": "europe", "Germany": "europe", "Ireland": "europe", "Italy": "europe",
    "Netherlands": "europe", "Norway": "europe", "Poland": "europe", "Spain": "europe",
    "Sweden": "europe", "Switzerland": "europe", "United Kingdom": "europe",
    "China": "asia", "Hong Kong": "asia", "India": "asia", "Indonesia": "asia", "Japan": "asia",
    "Malaysia": "asia", "Singapore": "asia", "South Korea": "asia", "Taiwan": "asia",
    "Thailand": "asia",
    "Australia": "oceania", "New Zealand": "oceania",
    "Bahrain": "middle-east", "Israel": "middle-east", "Qatar": "middle-east",
    "Saudi Arabia": "middle-east", "United Arab Emirates": "middle-east",
    "South Africa": "africa",
}  # fmt: skip

# Round-time model constants (see round_time()).
TCP_WINDOW_BYTES = 6 * 1024 * 1024  # Linux default net.ipv4.tcp_rmem maximum (6 MiB)
LINK_BITS_PER_S = 1e9  # assumed per-flow bandwidth ceiling: 1 Gbit/s
# Weighted averaging of model updates on the aggregator, numpy, one core: 0.85-0.89
# GB/s measured by bench/bench_plan.py on this 2-core machine (2026-11-22).
AGGREGATION_BYTES_PER_S = 0.87e9


@dataclass(frozen=True)
class Site:
    """A participant or a candidate aggregator: a cloud region, or a point (private DC)."""

    name: str
    cloud: str | None
    region: str | None
    lat: float
    lon: float
    country: str | None = None

    @property
    def key(self) -> tuple[str, str] | None:
        return (self.cloud, self.region) if self.cloud and self.region else None

    @property
    def continent(self) -> str | None:
        return CONTINENT.get(self.country or "")


@dataclass(frozen=True)
class Quote:
    value: float
    source: str
    estimated: bool = False


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


@dataclass(frozen=True)
class RttFit:
    """RTT = intercept + slope * great-circle km, least squares on measured pairs."""

    intercept_ms: float
    slope_ms_per_km: float
    fitted_pairs: int
    holdout_pairs: int
    holdout_mae_ms: float
    holdout_median_abs_pct: float
    holdout_p90_abs_pct: float

    def predict(self, km: float) -> float:
        return self.intercept_ms + self.slope_ms_per_km * km


class RttModel:
    """Measured RTTs where the catalog has them, a distance fit everywhere else."""

    def __init__(self, catalog: Catalog, holdout: float = 0.2, seed: int = 0) -> None:
        self.catalog = catalog
        pairs: dict[frozenset[tuple[str, str]], float] = {}
        for a, b in catalog.rtts:
            key = frozenset((a, b))
            if key in pairs or a == b or a not in catalog.regions or b not in catalog.regions:
                continue
            measured = catalog.measured_rtt(a, b)
            if measured is not None:
                pairs[key] = measured.rtt_ms
        keys = sorted(pairs, key=sorted)
        km = np.array([self._km_regions(*sorted(k)) for k in keys])
        ms = np.array([pairs[k] for k in keys])
        order = np.random.default_rng(seed).permutation(len(keys))
        cut = int(len(keys) * (1 - holdout))
        fit_idx, test_idx = order[:cut], order[cut:]
        slope, intercept = np.polyfit(km[fit_idx], ms[fit_idx], 1)
        predicted = intercept + slope * km[test_idx]
        err = np.abs(predicted - ms[test_idx])
        pct = err / np.maximum(ms[test_idx], 1.0) * 100
        self.fit = RttFit(
            intercept_ms=float(intercept),
            slope_ms_per_km=float(slope),
            fitted_pairs=len(fit_idx),
            holdout_pairs=len(test_idx),
            holdout_mae_ms=float(err.mean()),
            holdout_median_abs_pct=float(np.median(pct)),
            holdout_p90_abs_pct=float(np.percentile(pct, 90)),
        )

    def _km_regions(self, a: tuple[str, str], b: tuple[str, str]) -> float:
        ra, rb = self.catalog.regions[a], self.catalog.regions[b]
        return great_circle_km(ra.lat, ra.lon, rb.lat, rb.lon)

    def rtt(self, x: Site, y: Site) -> Quote:
        if x.key and y.key:
            measured = self.catalog.measured_rtt(x.key, y.key)
            if measured is not None:
                return Quote(measured.rtt_ms, measured.source)
        km = great_circle_km(x.lat, x.lon, y.lat, y.lon)
        return Quote(
            max(self.fit.predict(km), 0.1),
            f"estimated from {km:.0f} km great-circle distance (fit on {self.fit.fitted_pairs} "
            f"measured pairs, held-out median error {self.fit.holdout_median_abs_pct:.0f}%)",
            estimated=True,
        )


def _gcp_continent(region: str) -> str:
    prefix = region.split("-", maxsplit=1)[0]
    return {"us": "north-america", "northamerica": "north-america"}.get(prefix, prefix)


GCP_SAME_CONTINENT = {
    "north-america": (
        "gcp region us-*/northamerica-*",
        "gcp region us-*/northamerica-* (same continent prefix)",
    ),
    "europe": ("gcp region europe-*", "gcp region europe-*"),
    "asia": ("gcp region asia-*", "gcp region asia-*"),
    "southamerica": ("gcp region southamerica-*", "gcp region southamerica-*"),
    "australia": ("gcp region australia-*", "gcp region australia-*"),
}


class EgressPricer:
    """USD per GB leaving `src` for `dst`, by the catalog's rules for `src`'s cloud.

    Returns None where the catalog has no rule for the pair: such candidates are
    left out of a plan rather than priced by a guess.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def _row(self, cloud: str, src: str, dst: str) -> Egress | None:
        return self.catalog.egress.get((cloud, src, dst))

    def price(self, src: Site, dst: Site, monthly_gb: float) -> Quote | None:
        if src.cloud is None:
            return Quote(0.0, "private site: its outbound traffic is its own ISP's, not in the catalog")
        if src.key == dst.key:
            if src.cloud == "gcp":
                row = self._row("gcp", "gcp zone", "other zone, same region")
                return Quote(row.usd_per_gb, row.source) if row else None
            return Quote(0.0, f"same {src.cloud} region: the catalog has no intra-region rate")
        row = getattr(self, f"_{src.cloud}")(src, dst, monthly_gb)
        return Quote(row.usd_per_gb, row.source) if row else None

    def _aws(self, src: Site, dst: Site, monthly_gb: float) -> Egress | None:
        if dst.cloud == "aws":
            return self._row("aws", f"aws:{src.region}", f"aws:{dst.region}")
        return self._row("aws", f"aws:{src.region}", "internet")

    def _gcp(self, src: Site, dst: Site, monthly_gb: float) -> Egress | None:
        region = src.region or ""
        if dst.cloud == "gcp":
            a, b = _gcp_continent(region), _gcp_continent(dst.region or "")
            if a == b:
                scopes = GCP_SAME_CONTINENT.get(a)
                return self._row("gcp", *scopes) if scopes else None
            special = any(r.startswith(("asia-southeast2", "australia-")) for r in (region, dst.region or ""))
            if special:
                return self._row(
                    "gcp",
                    "gcp region (inter-continent, src or dst asia-southeast2-* or australia-*)",
                    "gcp region",
                )
            return self._row("gcp", "gcp region (other inter-continent)", "gcp region")
        if dst.cloud is not None:  # another cloud, premium tier
            to_au = dst.country == "Australia"
            if region.startswith(("asia-southeast2", "asia-northeast1", "asia-northeast2")):
                group = "gcp asia-southeast2/asia-northeast1/asia-northeast2 (premium)"
            elif region.startswith(("asia-southeast1", "australia-")):
                return self._row(
                    "gcp", "gcp asia-southeast1 or australia-* (premium)", "aws/azure/other cloud"
                )
            elif region.startswith("asia-northeast3"):
                group = "gcp asia-northeast3 (premium)"
            else:
                group = "gcp other regions (premium)"
            dest = "aws/azure/other cloud in Australia" if to_au else "aws/azure/other cloud (non-Australia)"
            return self._row("gcp", group, dest)
        tier = (
            "0-1 TB/month"
            if monthly_gb <= 1024
            else "1-10 TB/month"
            if monthly_gb <= 10240
            else ">10 TB/month"
        )
        return self._row(
            "gcp", f"gcp:{region}", f"internet (worldwide excl. China & Australia, premium tier) [{tier}]"
        )

    def _azure(self, src: Site, dst: Site, monthly_gb: float) -> Egress | None:
        continent = src.continent
        if continent in ("north-america", "europe"):
            group = "azure North America / Europe"
        elif continent == "south-america":
            group = "azure South America"
        elif continent is not None:
            group = "azure Asia / Oceania / Middle East / Africa"
        else:
            return None
        if dst.cloud == "azure":
            same = dst.continent == continent
            return self._row("azure", group, f"azure region, {'same' if same else 'other'} continent")
        return self._row("azure", group, "internet or other cloud")


def round_time(rtt_ms: np.ndarray, model_bytes: float, participants: int) -> np.ndarray:
    """Estimated seconds of one round's communication and aggregation (vectorised).

    For each participant p (RTT r_p in seconds):
        throughput_p = min(LINK_BITS_PER_S / 8, TCP_WINDOW_BYTES / r_p)   (window-limited TCP)
        transfer_p   = 2 * (r_p + model_bytes / throughput_p)             (model down, update up)
    round = max_p transfer_p + participants * model_bytes / AGGREGATION_BYTES_PER_S
    `rtt_ms` has one row per candidate, one column per participant.
    Client training time is left out: it does not depend on where the aggregator is.
    """
    r = np.maximum(np.asarray(rtt_ms, dtype=float), 0.1) / 1000.0
    throughput = np.minimum(LINK_BITS_PER_S / 8, TCP_WINDOW_BYTES / r)
    transfer = 2 * (r + model_bytes / throughput)
    return transfer.max(axis=-1) + participants * model_bytes / AGGREGATION_BYTES_PER_S
