"""`fedfleet trust HOST...`: accept a host's new SSH host key after you checked it was rebuilt."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.markup import escape

from fedfleet import workflow

HELP = (
    "Accept the SSH host key a host presents now, replacing the one recorded at first contact "
    "(or pinned): for a host that was reinstalled. fedfleet refuses a changed key until then."
)


def command(
    ctx: typer.Context,
    hosts: list[str] = typer.Argument(..., help="Host names from the stack (aggregator, a VM name)."),
    stack: str = typer.Option(..., "--stack", help="Stack name: stacks/Pulumi.<stack>.yaml."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    from fedfleet.cli.app import project_dir

    results = workflow.trust(project_dir(ctx), stack, hosts)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    console = Console()
    for r in results:
        if r["error"]:
            console.print(f"[red]{escape(r['host'])}[/]: {escape(r['error'])}")
        else:
            console.print(f"[green]{escape(r['host'])}[/]: now trusted: {escape(r['fingerprint'] or '?')}")
