"""`fedfleet plan`: choose where the aggregator runs (NSGA-II over the catalog)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedfleet.stages import plan as planner

HELP = (
    "Place the aggregator: cloud, region and instance type by cost and latency to the "
    "participants, within the stack's limits (fedfleet:placement). Prints the Pareto front "
    "and the choice, draws it, and writes the choice into the stack file."
)


def command(
    ctx: typer.Context,
    stack: str = typer.Option("local", "--stack", help="Stack name: stacks/Pulumi.<stack>.yaml."),
    weights: str | None = typer.Option(None, "--weights", help="cost=0.9,latency=0.1 (or 9:1)."),
    max_cost: float | None = typer.Option(None, "--max-cost", help="In the stack's currency."),
    max_latency: float | None = typer.Option(None, "--max-latency", help="Largest RTT to a participant, ms."),
    min_vcpu: int | None = typer.Option(None, "--min-vcpu", min=1),
    min_memory: float | None = typer.Option(None, "--min-memory", help="GiB."),
    clouds: str | None = typer.Option(None, "--clouds", help="Comma-separated: aws,gcp,azure."),
    regions: str | None = typer.Option(
        None, "--regions", help="Allow only these: comma-separated cloud:region."
    ),
    exclude: str | None = typer.Option(None, "--exclude", help="Comma-separated cloud[:region[:type]]."),
    horizon: float | None = typer.Option(None, "--horizon-hours", help="Period the cost covers."),
    verify: bool = typer.Option(False, "--verify", help="Also enumerate every candidate and compare."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Do not write the choice into the stack file."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    from fedfleet.cli.app import project_dir

    overrides = {
        "weights": planner.parse_weights(weights) if weights else None,
        "max_cost": max_cost,
        "max_latency_ms": max_latency,
        "min_vcpu": min_vcpu,
        "min_memory_gib": min_memory,
        "clouds": _split(clouds),
        "regions": _split(regions),
        "exclude": _split(exclude),
        "horizon_hours": horizon,
    }
    project = project_dir(ctx)
    report = planner.run_plan(project, stack, overrides, check=verify, write=not dry_run)
    data = planner.report_dict(report)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    show(Console(), report, data, project)


def _split(text: str | None) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in text.split(",") if part.strip()) if text else None


def show(console: Console, report: planner.PlanReport, data: dict, project: Path) -> None:
    p, req = report.placement, report.placement.req
    cur = req.currency
    table = Table(
        title=f"Pareto front ({len(report.plan.front)} of {len(p.candidates)} candidates)", box=None
    )
    for col in (
        "",
        "cloud:region:type",
        f"cost/{req.horizon_hours:g} h",
        "$/hour",
        "max RTT",
        "mean RTT",
        "round s",
    ):
        table.add_column(col, justify="right" if col not in ("", "cloud:region:type") else "left")
    for i in report.plan.front:
        c = p.candidates[i]
        table.add_row(
            "★" if i == report.plan.chosen else "",
            c.label,
            cur.show(p.cost[i]),
            f"{c.usd_per_hour:.4f}",
            f"{p.max_rtt[i]:.0f} ms",
            f"{p.mean_rtt[i]:.0f} ms",
            f"{p.round_seconds[i]:.2f}",
        )
    console.print(table)
    ch, b = report.chosen, report.baseline
    console.print(
        f"[bold]chosen[/] {ch.candidate.label} ({ch.candidate.vcpu} vCPU, {ch.candidate.memory_gib:g} GiB): "
        f"${ch.candidate.usd_per_hour:.4f}/h, {cur.show(ch.cost_usd)} over {req.horizon_hours:g} h "
        f"(VM {cur.show(ch.vm_usd)} + egress {cur.show(ch.egress_usd)}), estimated round "
        f"{ch.round_seconds:.2f} s"
    )
    for site, q in zip(p.participants, ch.rtt, strict=True):
        console.print(f"  RTT to {site.name}: {q.value:.0f} ms{' (estimated)' if q.estimated else ''}")
    change = data["change_vs_baseline"]
    console.print(
        f"baseline {b.candidate.label}: {cur.show(b.cost_usd)}, max RTT {b.max_rtt_ms:.0f} ms, round "
        f"{b.round_seconds:.2f} s → cost {change['cost_pct']:+.0f}%, round time {change['round_time_pct']:+.0f}%"
    )
    console.print(
        f"optimizer {report.plan.optimizer_seconds:.2f} s, {report.plan.evaluations} evaluations; "
        f"weights cost {req.cost_weight:.2f} : latency {req.latency_weight:.2f}"
    )
    if "verification" in data:
        v = data["verification"]
        console.print(
            f"verify: exact front {v['exact_front_size']} points, found {v['share_of_exact_front_found']:.0%}, "
            f"hypervolume ratio {v['hypervolume_ratio']:.3f} (enumeration {v['enumeration_seconds'] * 1000:.0f} ms)"
        )
    for warning in data["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    plot = report.plot.relative_to(project) if report.plot else None
    console.print(f"plot: {plot}")
    if report.written:
        console.print(f"wrote fedfleet:aggregator to {report.stack.path.relative_to(project)}")
    elif report.stack.aggregator.existing:
        console.print(
            "stack file unchanged: fedfleet:aggregator has an address (a machine you have); "
            "remove address to run the aggregator where the plan places it"
        )
    else:
        console.print("stack file unchanged")
