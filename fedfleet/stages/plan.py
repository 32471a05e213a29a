"""`fedfleet plan`: place the aggregator for a stack and write the decision into its file.

Joins the stack (participants, limits), the catalog and the optimizer; draws the
Pareto front; writes `fedfleet:aggregator` {cloud, region, instanceType} back into
the stack file with its comments kept, and only after a plan succeeded.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfleet.core.catalog import Catalog, load_catalog
from fedfleet.core.errors import ConfigError
from fedfleet.core.placement.network import Site
from fedfleet.core.placement.optimizer import Plan, plan
from fedfleet.core.placement.problem import Evaluation, Placement, Requirements
from fedfleet.core.stack import PROJECT, StackConfig, load_stack, stack_yaml
from fedfleet.core.util import atomic_write, closest


@dataclass
class PlanReport:
    stack: StackConfig
    placement: Placement
    plan: Plan
    chosen: Evaluation
    baseline: Evaluation
    written: bool = False
    plot: Path | None = None


def participant_sites(stack: StackConfig, catalog: Catalog) -> list[Site]:
    """Each participant as a point: its cloud region from the catalog, or its lat/lon."""
    sites = []
    for i, p in enumerate(stack.participants):
        loc = p.location
        if loc.cloud is None:
            sites.append(Site(p.name, None, None, float(loc.lat or 0), float(loc.lon or 0)))
            continue
        region = catalog.regions.get((loc.cloud, loc.region or ""))
        if region is None:
            known = sorted(r for c, r in catalog.regions if c == loc.cloud)
            key = f"{PROJECT}:participants[{i}].{'location.' if p.cloud == 'local' else ''}region"
            raise ConfigError(
                f"{stack.path}: {key}: {loc.region!r} is not a {loc.cloud} region in the catalog "
                f"({closest(loc.region or '', known, n=3)}); or give "
                "the site as location: {lat, lon}"
            )
        sites.append(Site(p.name, loc.cloud, loc.region, region.lat, region.lon, region.country))
    return sites


def make_plan(stack: StackConfig, req: Requirements, *, check: bool = False, seed: int = 0) -> PlanReport:
    catalog = load_catalog(req.catalog_overrides)
    placement = Placement(catalog, participant_sites(stack, catalog), req)
    result = plan(placement, check=check, seed=seed)
    baseline = placement.evaluate_outside(*placement.default_baseline())
    return PlanReport(stack, placement, result, placement.evaluation(result.chosen), baseline)


def apply_overrides(req: Requirements, overrides: Mapping[str, Any]) -> Requirements:
    """CLI flags on top of the stack's `fedfleet:placement`."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "weights" in changes:
        cost, latency = changes.pop("weights")
        changes["cost_weight"], changes["latency_weight"] = (
            cost / (cost + latency),
            latency / (cost + latency),
        )
    return dataclasses.replace(req, **changes)


def parse_weights(text: str) -> tuple[float, float]:
    """`cost=0.9,latency=0.1` (or `0.9,0.1`, or `9:1`) -> (0.9, 0.1)."""
    parts = [p.strip() for p in text.replace(":", ",").split(",") if p.strip()]
    values: dict[str, float] = {}
    try:
        if all("=" in p for p in parts):
            for p in parts:
                key, value = p.split("=", 1)
                if key.strip() not in ("cost", "latency"):
                    raise ValueError(f"unknown weight {key.strip()!r}")
                values[key.strip()] = float(value)
        elif len(parts) == 2:
            values = {"cost": float(parts[0]), "latency": float(parts[1])}
        else:
            raise ValueError("expected two weights")
    except ValueError as err:
        raise ConfigError(
            f"--weights {text!r}: {err}; write cost=0.9,latency=0.1 (or 9:1, cost first)"
        ) from err
    cost, latency = values.get("cost", 0.0), values.get("latency", 0.0)
    if cost < 0 or latency < 0 or cost + latency <= 0:
        raise ConfigError(f"--weights {text!r}: weights must be >= 0 and not both 0")
    return cost, latency


def write_decision(stack: StackConfig, chosen: Evaluation) -> bool:
    """Set fedfleet:aggregator {cloud, region, instanceType}; keep comments. True if changed."""
    yaml = stack_yaml()
    document = yaml.load(stack.path.read_text(encoding="utf-8"))
    config = document["config"]
    key = f"{PROJECT}:aggregator"
    if config.get(key) is None:
        config[key] = {}
    aggregator = config[key]
    c = chosen.candidate
    new = {"cloud": c.cloud, "region": c.region, "instanceType": c.instance_type}
    if all(aggregator.get(k) == v for k, v in new.items()):
        return False
    for k, v in new.items():
        aggregator[k] = v
    text = io.StringIO()
    yaml.dump(document, text)
    atomic_write(stack.path, text.getvalue())
    return True


def draw(report: PlanReport, path: Path) -> Path:
    """Cost against max RTT: every candidate, the front, the choice and the baseline (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, req = report.placement, report.placement.req
    cur = req.currency
    scale = cur.per_usd
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    ax.scatter(
        p.max_rtt[~p.feasible], p.cost[~p.feasible] * scale, s=8, c="#d0d0d0", label="outside the limits"
    )
    ax.scatter(
        p.max_rtt[p.feasible], p.cost[p.feasible] * scale, s=8, c="#8fb3d9", label="feasible candidates"
    )
    front = sorted(report.plan.front, key=lambda i: p.max_rtt[i])
    ax.plot(p.max_rtt[front], p.cost[front] * scale, "-o", c="#1f5fa8", ms=5, label="Pareto front (NSGA-II)")
    b = report.baseline
    ax.scatter([b.max_rtt_ms], [b.cost_usd * scale], marker="s", s=80, c="#d9822b", zorder=5,
               label=f"baseline {b.candidate.label}")  # fmt: skip
    c = report.chosen
    ax.scatter([c.max_rtt_ms], [c.cost_usd * scale], marker="*", s=260, c="#c0392b", zorder=6,
               label=f"chosen {c.candidate.label}")  # fmt: skip
    if req.max_latency_ms is not None:
        ax.axvline(req.max_latency_ms, ls="--", c="grey", lw=1)
    if req.max_cost is not None:
        ax.axhline(req.max_cost, ls="--", c="grey", lw=1)
    ax.set_xlabel("largest RTT to a participant (ms)")
    ax.set_ylabel(f"cost over {req.horizon_hours:g} h ({cur.code})")
    ax.set_title(
        f"{report.stack.name}: {len(p.participants)} participants, weights cost {req.cost_weight:.1f} "
        f": latency {req.latency_weight:.1f}"
    )
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _evaluation_dict(e: Evaluation, report: PlanReport) -> dict[str, Any]:
    c = e.candidate
    return {
        "cloud": c.cloud,
        "region": c.region,
        "instance_type": c.instance_type,
        "vcpu": c.vcpu,
        "memory_gib": c.memory_gib,
        "usd_per_hour": c.usd_per_hour,
        "price_source": c.source,
        "cost_usd": e.cost_usd,
        "vm_usd": e.vm_usd,
        "egress_usd": e.egress_usd,
        "max_rtt_ms": e.max_rtt_ms,
        "mean_rtt_ms": e.mean_rtt_ms,
        "round_seconds": e.round_seconds,
        "participants": [
            {
                "name": site.name,
                "rtt_ms": q.value,
                "rtt_estimated": q.estimated,
                "rtt_source": q.source,
                "egress_down_usd_per_gb": down.value,
                "egress_up_usd_per_gb": up.value,
                "egress_sources": [down.source, up.source],
            }
            for site, q, (down, up) in zip(report.placement.participants, e.rtt, e.egress, strict=True)
        ],
    }


def warnings(report: PlanReport) -> list[str]:
    """What a user should know before trusting the choice: flagged or missing catalog data."""
    out = []
    chosen = report.chosen
    if "WARNING" in chosen.candidate.source:
        out.append(f"the chosen price is flagged in the catalog: {chosen.candidate.source}")
    for site, q, (down, up) in zip(report.placement.participants, chosen.rtt, chosen.egress, strict=True):
        if "WARNING" in q.source or "WARNING" in down.source or "WARNING" in up.source:
            out.append(f"a flagged catalog number is used for {site.name}: see the sources in --json")
        if down.estimated or up.estimated:
            out.append(f"no egress price in the catalog for {site.name} (counted as 0)")
    estimated = [
        s.name for s, q in zip(report.placement.participants, chosen.rtt, strict=True) if q.estimated
    ]
    if estimated:
        fit = report.placement.rtt_model.fit
        out.append(
            f"RTT to {', '.join(estimated)} is estimated from distance (held-out median error "
            f"{fit.holdout_median_abs_pct:.0f}%, p90 {fit.holdout_p90_abs_pct:.0f}%)"
        )
    return out


def report_dict(report: PlanReport) -> dict[str, Any]:
    p, req, result = report.placement, report.placement.req, report.plan
    fit = p.rtt_model.fit
    out: dict[str, Any] = {
        "stack": report.stack.name,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "requirements": {
            **{
                k: v for k, v in dataclasses.asdict(req).items() if k not in ("currency", "catalog_overrides")
            },
            "currency": dataclasses.asdict(req.currency),
            "max_cost_usd": req.max_cost_usd,
            "catalog_overrides": [str(x) for x in req.catalog_overrides],
        },
        "candidates": len(p.candidates),
        "feasible": int(p.feasible.sum()),
        "left_out": dict(p.left_out),
        "unpriced_uplinks": sorted(p.unpriced),
        "front": [
            {"label": p.candidates[i].label, "cost_usd": float(p.cost[i]), "max_rtt_ms": float(p.max_rtt[i])}
            for i in result.front
        ],
        "chosen": _evaluation_dict(report.chosen, report),
        "baseline": _evaluation_dict(report.baseline, report),
        "change_vs_baseline": {
            "cost_pct": 100 * (report.chosen.cost_usd / report.baseline.cost_usd - 1),
            "round_time_pct": 100 * (report.chosen.round_seconds / report.baseline.round_seconds - 1),
            "max_rtt_pct": 100 * (report.chosen.max_rtt_ms / report.baseline.max_rtt_ms - 1),
        },
        "optimizer": {"seconds": result.optimizer_seconds, "evaluations": result.evaluations},
        "rtt_estimator": dataclasses.asdict(fit),
        "warnings": warnings(report),
        "written_to_stack": report.written,
        "plot": str(report.plot) if report.plot else None,
    }
    if result.verification:
        v = result.verification
        out["verification"] = {
            "exact_front_size": len(v.exact_front),
            "share_of_exact_front_found": v.share_found,
            "hypervolume_ratio": v.hypervolume_ratio,
            "enumeration_seconds": v.enumeration_seconds,
        }
    return out


def run_plan(
    project_dir: Path,
    stack_name: str,
    overrides: Mapping[str, Any],
    *,
    check: bool = False,
    write: bool = True,
    plot_dir: Path | None = None,
) -> PlanReport:
    stack = load_stack(project_dir, stack_name)
    report = make_plan(stack, apply_overrides(stack.placement, overrides), check=check)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = plot_dir or project_dir / "runs" / "plans"
    report.plot = draw(report, out_dir / f"{stack_name}-{stamp}.png")
    # An aggregator given by address is a machine the consortium has: the plan shows where a
    # cloud one would go, and the stack file keeps the machine.
    if write and not stack.aggregator.existing:
        report.written = write_decision(stack, report.chosen)
    (out_dir / f"{stack_name}-{stamp}.json").write_text(json.dumps(report_dict(report), indent=2) + "\n")
    return report
