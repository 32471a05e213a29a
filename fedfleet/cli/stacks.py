"""`fedfleet preview | up | destroy | outputs`: provision a stack (Pulumi, or local VMs)."""

from __future__ import annotations

import json
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedfleet import workflow
from fedfleet.core.inventory import Inventory
from fedfleet.stages import provision as deploy

STACK_HELP = "Stack name: stacks/Pulumi.<stack>.yaml."
PREVIEW_HELP = (
    "Show what `up` would create or change (pulumi preview; the local stack: its VM directories). "
    "A cloud stack's credentials are verified with each cloud first (`fedfleet auth`)."
)
UP_HELP = (
    "Create or update the stack's VMs (pulumi up; the local stack: emulated VMs) and print its inventory."
)
DESTROY_HELP = "Delete the stack's VMs and networks (pulumi destroy; the local stack: its state directory)."
OUTPUTS_HELP = "Print the stack's inventory: the aggregator and every participant's VMs."


def _echo_to_stderr(line: str) -> None:
    print(line.rstrip("\n"), file=sys.stderr)


def _show(inventory: Inventory, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(inventory.to_dict(), indent=2))
        return
    console = Console()
    a = inventory.aggregator
    console.print(f"[bold]aggregator[/] {a.cloud}:{a.region} {a.instance_type} at {a.address}:{a.port}")
    table = Table(box=None, header_style="bold")
    for column in ("participant", "vm", "cloud:region", "private", "public", "vCPU", "GiB", "disk"):
        table.add_column(column)
    for participant, vms in inventory.participants.items():
        for vm in vms:
            table.add_row(
                participant, vm.name, f"{vm.cloud}:{vm.region}", escape(str(vm.private_ip)),
                str(vm.public_ip or "-"), str(vm.vcpu), f"{vm.memory_gib:g}", f"{vm.disk_gib} GiB",
            )  # fmt: skip
    console.print(table)


def preview(
    ctx: typer.Context,
    stack: str = typer.Option("local", "--stack", help=STACK_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    from fedfleet.cli.app import project_dir

    summary = workflow.preview(deploy.target(project_dir(ctx), stack), _echo_to_stderr, os.environ)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))


def up(
    ctx: typer.Context,
    stack: str = typer.Option("local", "--stack", help=STACK_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the inventory as JSON."),
) -> None:
    from fedfleet.cli.app import project_dir

    _show(workflow.up(deploy.target(project_dir(ctx), stack), _echo_to_stderr, os.environ), as_json)


def destroy(
    ctx: typer.Context,
    stack: str = typer.Option(..., "--stack", help=STACK_HELP),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
) -> None:
    from fedfleet.cli.app import project_dir

    t = deploy.target(project_dir(ctx), stack)
    if not yes and not typer.confirm(f"Destroy every resource of stack {stack!r}?", default=False):
        raise typer.Exit(1)
    workflow.destroy(t, _echo_to_stderr, os.environ)


def outputs(
    ctx: typer.Context,
    stack: str = typer.Option("local", "--stack", help=STACK_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the inventory as JSON."),
) -> None:
    from fedfleet.cli.app import project_dir

    _show(deploy.outputs(deploy.target(project_dir(ctx), stack), {}), as_json)
