"""`fedfleet configure | stop`: the Ansible playbooks on a stack's hosts, with a live view."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from fedfleet import workflow
from fedfleet.adapters import ansible
from fedfleet.cli.progress import PlayProgress

STACK_HELP = "Stack name: stacks/Pulumi.<stack>.yaml."
LIMIT_HELP = "Only these hosts (an Ansible pattern: a VM name, aggregator, a group)."
JSON_HELP = "Print the per-host result as JSON."
CONFIGURE_HELP = (
    "Install and start Flower on the stack's hosts with the Ansible playbooks: the SuperLink on "
    "the aggregator, a SuperNode on one VM per participant. A second run changes nothing."
)
STOP_HELP = "Stop Flower on the stack's hosts (SuperNodes first, then the SuperLink)."


def _apply(ctx: typer.Context, stack: str, playbook: str, limit: str | None, as_json: bool) -> None:
    from fedfleet.cli.app import project_dir

    console = Console(stderr=True)
    with PlayProgress(console, f"ansible-playbook {playbook} --stack {stack}") as progress:
        report = workflow.configure_stack(
            project_dir(ctx), stack, playbook=playbook, limit=limit, progress=progress
        )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for host, stats in sorted(report["hosts"].items()):
        console.print(
            f"{host:>16}  ok {stats.get('ok', 0):3}  changed {stats.get('changed', 0):3}  "
            f"skipped {stats.get('skipped', 0):3}"
        )
    console.print(
        f"[bold green]{playbook}[/] on {len(report['hosts'])} hosts in {report['seconds']:.1f} s, "
        f"{report['changed']} changes"
    )


def configure_command(
    ctx: typer.Context,
    stack: str = typer.Option("local", "--stack", help=STACK_HELP),
    limit: str | None = typer.Option(None, "--limit", help=LIMIT_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    _apply(ctx, stack, ansible.SITE, limit, as_json)


def stop_command(
    ctx: typer.Context,
    stack: str = typer.Option("local", "--stack", help=STACK_HELP),
    limit: str | None = typer.Option(None, "--limit", help=LIMIT_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    _apply(ctx, stack, ansible.STOP, limit, as_json)
