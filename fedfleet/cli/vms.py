"""`fedfleet vms`: every participant VM with its probe, resources, and whether it would serve."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedfleet import workflow

HELP = (
    "Probe every participant VM of a stack (in parallel, each within "
    "fedfleet:orchestrator.probeTimeoutSeconds) and show its resources and whether it would "
    "serve its participant, in which order, or why not."
)


def command(
    ctx: typer.Context,
    stack: str = typer.Option("local", "--stack", help="Stack name: stacks/Pulumi.<stack>.yaml."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    from fedfleet.cli.app import project_dir

    console = Console(stderr=True)
    with console.status("probing the participant VMs (playbooks/probe.yml)"):
        report = workflow.vms_report(project_dir(ctx), stack)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    m = report["minimums"]
    table = Table(box=None, header_style="bold", title_justify="left")
    table.title = f"stack {report['stack']}: a VM serves with ≥{m['vcpu']} vCPU, ≥{m['memory_gib']:g} GiB, ≥{m['free_disk_gib']:g} GiB free"
    for column in ("participant", "vm", "probe", "vCPU", "GiB", "free GiB", "pick", "why not"):
        table.add_column(column, justify="right" if column in ("vCPU", "GiB", "free GiB", "pick") else "left")
    for r in report["vms"]:
        table.add_row(
            escape(r["participant"]), escape(r["vm"]),
            "[green]up[/]" if r["reachable"] else "[red]down[/]",
            str(r["vcpu"] if r["vcpu"] is not None else "-"),
            f"{r['memory_gib']:g}" if r["memory_gib"] is not None else "-",
            f"{r['free_disk_gib']:.1f}" if r["free_disk_gib"] is not None else "-",
            ("[bold]serves[/]" if r["pick"] == 1 else f"next {r['pick']}") if r["pick"] else "-",
            escape(r["why_not"] or ""),
        )  # fmt: skip
    Console().print(table)
