"""`fedfleet certs status | rotate`: the stack's certificate authority and SuperLink certificate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedfleet import workflow

HELP = "The stack's TLS certificates: when they expire, and a new CA before the current one does."
STACK_HELP = "Stack name: stacks/Pulumi.<stack>.yaml."
JSON_HELP = "Print JSON instead of text."

app = typer.Typer(help=HELP, no_args_is_help=True)


def _project(ctx: typer.Context) -> Path:
    from fedfleet.cli.app import project_dir

    return project_dir(ctx)


@app.command(
    "status", help="The CAs hosts trust, the SuperLink's certificate, and whether they outlast a run."
)
def status_command(
    ctx: typer.Context,
    stack: str = typer.Option("local", "--stack", help=STACK_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    out = workflow.certs_status(_project(ctx), stack)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    console = Console()
    if not out["cas"]:
        console.print(
            f"stack {escape(stack)} has no CA yet: the first `fedfleet run` or `configure` makes one"
        )
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("certificate", "expires (UTC)", "days left", "SHA-256"):
        table.add_column(column, no_wrap=True)
    for ca in out["cas"]:
        role = "CA" if ca["current"] else "previous CA"
        table.add_row(
            role, ca["not_after"][:16].replace("T", " "), _days(ca["days_left"]), ca["sha256"][:23] + "…"
        )
    link = out["superlink"]
    if link:
        table.add_row(
            "SuperLink" + ("" if link["issued_by_current_ca"] else " (old CA)"),
            link["not_after"][:16].replace("T", " "), _days(link["days_left"]), link["sha256"][:23] + "…",
        )  # fmt: skip
    console.print(table)
    if len(out["cas"]) > 1:
        console.print(
            "the previous CA stays trusted by every host until it expires (hosts reconfigured since trust both)"
        )
    if link:
        console.print(f"SuperLink names: {escape(', '.join(link['names']))}")
    days = out["run_horizon_days"]
    horizon = f"{days:g} days" if days >= 2 else f"{days * 24:.1f} h"
    if out["ca_outlasts_a_run"]:
        console.print(f"a run of this stack may take up to {horizon}: the CA outlasts it")
    else:
        console.print(
            f"[red]the CA expires before a run of this stack could end ({horizon})[/]: "
            f"fedfleet certs rotate --stack {escape(stack)}"
        )
    if not out["ca_key_private"]:
        console.print(
            f"[red]the CA key is missing or readable by others[/] ({escape(out['directory'])}/ca.key)"
        )


def _days(days: float) -> str:
    return f"[red]{days:g}[/]" if days < 30 else f"{days:g}"


@app.command(
    "rotate",
    help="Make a new CA (the previous one stays trusted until it expires) and re-issue the SuperLink's certificate.",
)
def rotate_command(
    ctx: typer.Context,
    stack: str = typer.Option("local", "--stack", help=STACK_HELP),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    drop_previous: bool = typer.Option(
        False,
        "--drop-previous",
        help="Trust only the new CA from the next configure on (after a leak of the old key).",
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    if not yes and not sys.stdin.isatty():
        Console(stderr=True).print("not rotated: pass --yes (there is no terminal to ask in)")
        raise typer.Exit(1)
    if not yes and not typer.confirm(
        f"Make a new CA for stack {stack}? Every host gets it at its next configure or run.", default=False
    ):
        raise typer.Exit(1)
    out = workflow.certs_rotate(_project(ctx), stack, keep_previous=not drop_previous)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    console = Console()
    ca = out["cas"][0]
    console.print(
        f"new CA for stack {escape(stack)}, valid until {ca['not_after'][:10]} (SHA-256 {ca['sha256'][:23]}…)"
    )
    if len(out["cas"]) > 1:
        console.print(f"the previous CA stays in the trust bundle until {out['cas'][1]['not_after'][:10]}")
    console.print(
        "the SuperLink's certificate was re-issued; hosts get the new bundle and certificate at the next "
        f"`fedfleet run` or `fedfleet configure --stack {escape(stack)}`"
        if out["superlink"]
        else "the SuperLink's certificate is issued at the next run or configure"
    )
