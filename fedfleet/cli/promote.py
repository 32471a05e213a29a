"""`fedfleet promote --from dev --to prod`: GitOps promotion of a stack's training config."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.syntax import Syntax

from fedfleet.stages import promote as promotion

HELP = (
    "Copy the promotable part of one stack's config (fedfleet:app; the placement's limits, "
    "weights and sizes) into another, keeping the target's environment (clouds, regions, VMs, "
    "CIDRs, operator, provider keys, secrets). Shows the diff; writes with --yes."
)


def command(
    ctx: typer.Context,
    source: str = typer.Option(..., "--from", help="Stack to promote from (e.g. dev)."),
    target: str = typer.Option(..., "--to", help="Stack to promote to (e.g. prod)."),
    yes: bool = typer.Option(False, "--yes", help="Write without asking."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the diff only."),
) -> None:
    from fedfleet.cli.app import project_dir

    project = project_dir(ctx)
    result = promotion.plan_promotion(project, source, target)
    console = Console()
    if not result.changed:
        console.print(f"stacks/Pulumi.{target}.yaml already matches {source}: nothing to promote")
        return
    console.print(Syntax(result.diff, "diff", theme="ansi_dark", background_color="default"))
    if dry_run:
        return
    if not yes:
        if not sys.stdin.isatty():
            console.print("[yellow]not written: pass --yes to write (or run it in a terminal to confirm)[/]")
            raise typer.Exit(1)
        if not typer.confirm(f"Write this into stacks/Pulumi.{target}.yaml?", default=False):
            raise typer.Exit(1)
    promotion.write(project, result)
    console.print(f"wrote stacks/Pulumi.{target}.yaml; commit it to start the {target} pipeline")
