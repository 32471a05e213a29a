"""The multi-cloud catalog: regions, on-demand prices, measured RTTs, egress prices.

Every number keeps the source it was copied from (`data/README.md` has the
provenance of the shipped tables). Users add or override entries from CSV files
with the same columns as a shipped table; the kind of a file is told by its
header, and an override's `source` defaults to "<file> row <n>".

Pure logic: the csv module and dataclasses only.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from fedfleet.core.errors import ConfigError

DATA = Path(__file__).parent / "data"
CLOUDS = ("aws", "gcp", "azure")

# Per-cloud RTT datasets are preferred for pairs within one cloud; Skyplane's
# cross-cloud pings (2022) only where the clouds differ, and only PREMIUM-tier
# GCP ends (STANDARD-tier paths are often much slower, see data/README.md).
INTRA_CLOUD_DATASETS = ("MicrosoftDocs/azure-docs", "oaustegard/", "ubc-cirrus-lab/caribou")
CROSS_CLOUD_DATASET = "skyplane-project/skyplane"
PREMIUM_ONLY = "tiers PREMIUM->PREMIUM"


@dataclass(frozen=True)
class Region:
    cloud: str
    region: str
    display_name: str
    country: str
    lat: float
    lon: float
    source: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.cloud, self.region)


@dataclass(frozen=True)
class Price:
    cloud: str
    region: str
    instance_type: str
    vcpu: int
    memory_gib: float
    usd_per_hour: float
    source: str

    @property
    def label(self) -> str:
        return f"{self.cloud}:{self.region}:{self.instance_type}"


@dataclass(frozen=True)
class Rtt:
    a: tuple[str, str]
    b: tuple[str, str]
    rtt_ms: float
    source: str
    user: bool = False


@dataclass(frozen=True)
class Egress:
    cloud: str
    from_scope: str
    to_scope: str
    usd_per_gb: float
    source: str


@dataclass
class Catalog:
    regions: dict[tuple[str, str], Region] = field(default_factory=dict)
    prices: dict[tuple[str, str, str], Price] = field(default_factory=dict)
    rtts: dict[tuple[tuple[str, str], tuple[str, str]], list[Rtt]] = field(default_factory=dict)
    egress: dict[tuple[str, str, str], Egress] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def add_rtt(self, entry: Rtt) -> None:
        self.rtts.setdefault((entry.a, entry.b), []).append(entry)

    def measured_rtt(self, a: tuple[str, str], b: tuple[str, str]) -> Rtt | None:
        """The catalog's RTT between two cloud regions, by the dataset rules above.

        A user's measurement wins; then the preferred dataset for the pair; both
        directions count (a->b and b->a are averaged when both exist).
        """
        found = self.rtts.get((a, b), []) + self.rtts.get((b, a), [])
        if not found:
            return None
        user = [r for r in found if r.user]
        if user:
            return user[-1]
        if a[0] == b[0]:
            chosen = [r for r in found if r.source.startswith(INTRA_CLOUD_DATASETS)]
        else:
            chosen = [
                r for r in found if r.source.startswith(CROSS_CLOUD_DATASET) and PREMIUM_ONLY in r.source
            ]
        if not chosen:
            return None
        if len(chosen) == 1:
            return chosen[0]
        mean = sum(r.rtt_ms for r in chosen) / len(chosen)
        return Rtt(a, b, mean, f"mean of {len(chosen)} directed measurements: {chosen[0].source}")

    def instance_types(self) -> set[tuple[str, str]]:
        return {(p.cloud, p.instance_type) for p in self.prices.values()}


class _Table:
    """Reads one CSV file of a known kind, naming file and row in every error."""

    KINDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "regions": ("cloud", "region", "display_name", "country", "lat", "lon"),
        "prices": ("cloud", "region", "instance_type", "vcpu", "memory_gib", "usd_per_hour"),
        "rtt": ("cloud_a", "region_a", "cloud_b", "region_b", "rtt_ms"),
        "egress": ("cloud", "from_scope", "to_scope", "usd_per_gb"),
    }

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                self.header = tuple(reader.fieldnames or ())
                self.rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise ConfigError(f"{path}: cannot be read as CSV: {err}") from err
        kinds = [k for k, cols in self.KINDS.items() if set(cols) <= set(self.header)]
        if len(kinds) != 1:
            expected = "; ".join(f"{k}: {', '.join(c)}" for k, c in self.KINDS.items())
            raise ConfigError(
                f"{path}: the header ({', '.join(self.header) or 'empty'}) matches no catalog "
                f"table. A file needs the columns of one of them (plus an optional source): {expected}"
            )
        self.kind = kinds[0]

    def records(self) -> Iterable[tuple[int, dict[str, str]]]:
        yield from enumerate(self.rows, start=2)

    def fail(self, number: int, column: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path} row {number}, column {column}: {problem}")

    def text(self, number: int, row: dict[str, str], column: str) -> str:
        value = (row.get(column) or "").strip()
        if not value:
            raise self.fail(number, column, "is empty")
        return value

    def cloud(self, number: int, row: dict[str, str], column: str = "cloud") -> str:
        value = self.text(number, row, column)
        if value not in CLOUDS:
            raise self.fail(number, column, f"{value!r} is not one of {', '.join(CLOUDS)}")
        return value

    def number(self, number: int, row: dict[str, str], column: str, low: float, high: float) -> float:
        raw = self.text(number, row, column)
        try:
            value = float(raw)
        except ValueError as err:
            raise self.fail(number, column, f"{raw!r} is not a number") from err
        if not (math.isfinite(value) and low <= value <= high):
            raise self.fail(number, column, f"{value:g} is outside {low:g}..{high:g}")
        return value

    def source(self, row: dict[str, str], number: int, user: bool) -> str:
        given = (row.get("source") or "").strip()
        if given:
            return given
        if user:
            return f"{self.path} row {number}"
        raise self.fail(number, "source", "is empty: every shipped number needs its source")


def _load(catalog: Catalog, path: Path, user: bool) -> None:
    table = _Table(path)
    catalog.files.append(str(path))
    for n, row in table.records():
        src = table.source(row, n, user)
        if table.kind == "regions":
            region = Region(
                table.cloud(n, row),
                table.text(n, row, "region"),
                table.text(n, row, "display_name"),
                table.text(n, row, "country"),
                table.number(n, row, "lat", -90, 90),
                table.number(n, row, "lon", -180, 180),
                src,
            )
            catalog.regions[region.key] = region
        elif table.kind == "prices":
            vcpu = table.number(n, row, "vcpu", 1, 1024)
            if not vcpu.is_integer():
                raise table.fail(n, "vcpu", f"{vcpu:g} is not a whole number")
            price = Price(
                table.cloud(n, row),
                table.text(n, row, "region"),
                table.text(n, row, "instance_type"),
                int(vcpu),
                table.number(n, row, "memory_gib", 0.1, 65536),
                table.number(n, row, "usd_per_hour", 0, 10_000),
                src,
            )
            catalog.prices[(price.cloud, price.region, price.instance_type)] = price
        elif table.kind == "rtt":
            a = (table.cloud(n, row, "cloud_a"), table.text(n, row, "region_a"))
            b = (table.cloud(n, row, "cloud_b"), table.text(n, row, "region_b"))
            catalog.add_rtt(Rtt(a, b, table.number(n, row, "rtt_ms", 0, 5000), src, user))
        else:
            egress = Egress(
                table.cloud(n, row),
                table.text(n, row, "from_scope"),
                table.text(n, row, "to_scope"),
                table.number(n, row, "usd_per_gb", 0, 100),
                src,
            )
            catalog.egress[(egress.cloud, egress.from_scope, egress.to_scope)] = egress


def load_catalog(overrides: Sequence[Path] = ()) -> Catalog:
    """The shipped catalog, then each override file on top (later files win)."""
    catalog = Catalog()
    for name in ("regions.csv", "instance_prices.csv", "rtt_ms.csv", "egress.csv"):
        _load(catalog, DATA / name, user=False)
    for path in overrides:
        if not Path(path).exists():
            raise ConfigError(f"catalog override {path} does not exist")
        _load(catalog, Path(path), user=True)
    return catalog
