"""Registers the commands; turns fedfleet errors into a message and an exit status."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType

import click
import typer
from rich.console import Console
from rich.markup import escape

from fedfleet import __version__
from fedfleet.cli import auth as auth_cmd
from fedfleet.cli import certs as certs_cmd
from fedfleet.cli import configure as configure_cmd
from fedfleet.cli import init as init_cmd
from fedfleet.cli import models as models_cmd
from fedfleet.cli import plan as plan_cmd
from fedfleet.cli import promote as promote_cmd
from fedfleet.cli import run as run_cmd
from fedfleet.cli import stacks as stack_cmds
from fedfleet.cli import trust as trust_cmd
from fedfleet.cli import vms as vms_cmd
from fedfleet.core.errors import ConfigError, FedfleetError

HELP = "Deploy and run cross-silo federated learning across clouds (Flower, Pulumi, Ansible)."
PROJECT_HELP = "Project directory (holds Pulumi.yaml); default: the nearest one above the current directory."

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err_console = Console(stderr=True)


def find_project(start: Path) -> Path:
    for candidate in (start, *start.parents):
        if (candidate / "Pulumi.yaml").exists():
            return candidate
    raise ConfigError(
        f"no Pulumi.yaml in {start} or any parent: run fedfleet inside the project "
        "directory or pass --project PATH"
    )


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedfleet {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    project: Path | None = typer.Option(None, "--project", help=PROJECT_HELP),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    ctx.obj = project


def project_dir(ctx: typer.Context) -> Path:
    given = ctx.obj
    if given is not None:
        given = Path(given).resolve()
        if not (given / "Pulumi.yaml").exists():
            raise ConfigError(f"--project {given}: there is no Pulumi.yaml in that directory")
        return given
    return find_project(Path.cwd().resolve())


app.command("plan", help=plan_cmd.HELP)(plan_cmd.command)
app.command("run", help=run_cmd.HELP)(run_cmd.command)
app.command("preview", help=stack_cmds.PREVIEW_HELP)(stack_cmds.preview)
app.command("up", help=stack_cmds.UP_HELP)(stack_cmds.up)
app.command("destroy", help=stack_cmds.DESTROY_HELP)(stack_cmds.destroy)
app.command("outputs", help=stack_cmds.OUTPUTS_HELP)(stack_cmds.outputs)
app.command("promote", help=promote_cmd.HELP)(promote_cmd.command)
app.command("configure", help=configure_cmd.CONFIGURE_HELP)(configure_cmd.configure_command)
app.command("stop", help=configure_cmd.STOP_HELP)(configure_cmd.stop_command)
app.command("vms", help=vms_cmd.HELP)(vms_cmd.command)
app.command("trust", help=trust_cmd.HELP)(trust_cmd.command)
app.command("init", help=init_cmd.HELP)(init_cmd.command)
app.add_typer(models_cmd.app, name="models")
app.add_typer(auth_cmd.app, name="auth")
app.add_typer(certs_cmd.app, name="certs")
app.command("ui", help=models_cmd.UI_HELP)(models_cmd.ui_command)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so every started process is stopped


def main() -> None:
    # Ctrl-C and SIGTERM unwind the run so it stops what it started; set both
    # explicitly, since a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        code = app(standalone_mode=False)
    except FedfleetError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        code = 130
    except click.ClickException as err:  # usage errors, with standalone_mode=False
        err.show()
        sys.exit(err.exit_code)
    except click.Abort:
        code = 130
    if code == 130:  # typer turns KeyboardInterrupt into this exit code
        err_console.print(
            "[yellow]interrupted: what the command started was stopped (a run's summary.json "
            "names any host it could not reach, with the command that stops it later)[/]"
        )
    sys.exit(code if isinstance(code, int) else 0)
