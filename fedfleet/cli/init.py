"""`fedfleet init NAME`: a new stack file, commented, from flags or a few questions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from fedfleet import workflow
from fedfleet.core import flowerapp
from fedfleet.core.errors import ConfigError
from fedfleet.core.init import KINDS, InitSpec, Site
from fedfleet.sandbox import free_ports

HELP = (
    "Write a new stack file (stacks/Pulumi.NAME.yaml), commented, for your participants, their "
    "locations, data, machines and model; validated before it is written. Then: "
    "`fedfleet run --stack NAME`. Without --participant, on a terminal, it asks."
)
PARTICIPANT_HELP = (
    "A participant as NAME@LOCATION, LOCATION cloud:region (aws:us-east-1) or lat,lon "
    "(48.14,11.58); repeat for each (at least two)."
)


def _sites(participants: list[str], vms: list[str]) -> tuple[Site, ...]:
    addresses: dict[str, list[str]] = {}
    for entry in vms:
        name, sep, address = entry.partition("=")
        if not sep or not address:
            raise ConfigError(f"--vm {entry!r} must be PARTICIPANT=ADDRESS")
        addresses.setdefault(name, []).append(address)
    sites = []
    for entry in participants:
        name, sep, location = entry.partition("@")
        if not sep or not location:
            raise ConfigError(f"--participant {entry!r} must be NAME@LOCATION, e.g. hospital-a@aws:us-east-1")
        sites.append(Site(name, location, tuple(addresses.pop(name, []))))
    if addresses:
        raise ConfigError(f"--vm names participants not given with --participant: {', '.join(addresses)}")
    return tuple(sites)


def _ask(kind: str) -> tuple[str, list[str], list[str], str]:
    """The essentials, asked on a terminal: kind, participants, their machines, aggregator."""
    kind = typer.prompt(f"Kind of stack ({', '.join(KINDS)})", default=kind)
    participants, vms = [], []
    typer.echo("Participants, one per line as NAME@LOCATION (cloud:region or lat,lon); empty line to end:")
    while line := typer.prompt("participant", default="", show_default=False).strip():
        participants.append(line)
        if kind == "hosts":
            name = line.partition("@")[0]
            for address in typer.prompt(f"  {name}'s machines (addresses, comma-separated)").split(","):
                vms.append(f"{name}={address.strip()}")
    aggregator = typer.prompt("Aggregator address (SSH)") if kind == "hosts" else ""
    return kind, participants, vms, aggregator


def command(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The stack's name: stacks/Pulumi.NAME.yaml."),
    kind: str = typer.Option(
        "local", "--kind", help="local (emulated here), hosts (yours, over SSH) or cloud."
    ),
    participant: list[str] = typer.Option([], "--participant", "-p", help=PARTICIPANT_HELP),
    vm: list[str] = typer.Option([], "--vm", help="hosts: a machine of a participant, PARTICIPANT=ADDRESS."),
    aggregator: str = typer.Option("", "--aggregator", help="hosts: the aggregator's address."),
    vms: int = typer.Option(2, "--vms", min=1, max=20, help="local, cloud: VMs per participant."),
    rounds: int | None = typer.Option(
        None, "--rounds", min=1, help="Training rounds (default 3; with --app: the app's own unless given)."
    ),
    data_path: str = typer.Option(
        "",
        "--data-path",
        help="Your own data: local, a folder with a sub-folder per participant; else its path on each machine.",
    ),
    classes: str = typer.Option("", "--classes", help="Your own data's class names, comma-separated."),
    image_size: int = typer.Option(64, "--image-size", min=2, max=1024, help="Images are resized to this."),
    channels: int = typer.Option(1, "--channels", help="1 (grayscale) or 3 (RGB)."),
    model: str = typer.Option(
        "", "--model", help="Your network, path/to/file.py:function (default: the built-in CNN)."
    ),
    app: str = typer.Option(
        "", "--app", help="A Flower app of your own to deploy instead of the built-in one (its directory)."
    ),
    ssh_user: str = typer.Option("fedfleet", "--ssh-user", help="hosts: the user fedfleet logs in as."),
    key_file: str = typer.Option("~/.ssh/fedfleet_ed25519", "--key-file", help="hosts: the private key."),
    operator_key: Path | None = typer.Option(None, "--operator-key", help="cloud: your SSH public key file."),
    operator_cidr: str = typer.Option("", "--operator-cidr", help="cloud: the network you administer from."),
    force: bool = typer.Option(False, "--force", help="Replace an existing stack file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    from fedfleet.cli.app import project_dir

    project = project_dir(ctx)
    if not participant and sys.stdin.isatty():
        kind, participant, vm, asked = _ask(kind)
        aggregator = aggregator or asked
    sites = _sites(participant, vm)
    own_data = bool(data_path or classes)
    if own_data and kind == "local" and data_path:
        data_path = (
            str((Path.cwd() / data_path).resolve()) if not Path(data_path).is_absolute() else data_path
        )
    public_key = ""
    if operator_key is not None:
        try:
            public_key = operator_key.expanduser().read_text().strip()
        except OSError as err:
            raise ConfigError(f"--operator-key {operator_key}: cannot read it ({err.strerror})") from err
    app_rounds = True
    if app:
        app = str((Path.cwd() / app).resolve()) if not Path(app).is_absolute() else app
        loaded = flowerapp.load(Path(app), "--app")
        # The app's own number of rounds stands unless --rounds overrides it.
        app_rounds = rounds is not None
        if app_rounds and loaded.rounds_key is None:
            raise ConfigError(
                f"--rounds: {loaded.pyproject} [tool.flwr.app.config] has no num-server-rounds; "
                "leave --rounds out and set the app's own key under app.config in the stack file"
            )
    ports = free_ports(2 + vms * len(sites)) if kind == "local" else []
    spec = InitSpec(
        name=name,
        kind=kind,
        sites=sites,
        vms=vms,
        rounds=rounds or 3,
        demo=kind == "local" and not own_data,
        data_path=data_path,
        classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
        image_size=image_size,
        channels=channels,
        model=model,
        app=app,
        app_rounds=app_rounds,
        aggregator=aggregator,
        ssh_user=ssh_user,
        key_file=key_file,
        operator_key=public_key,
        operator_cidr=operator_cidr,
        ports=tuple(ports[:-1]),
        internal_port=ports[-1] if ports else None,
    )
    path = workflow.init_stack(project, spec, force=force)
    if as_json:
        typer.echo(json.dumps({"stack": name, "kind": kind, "path": str(path)}, indent=2))
        return
    console = Console()
    console.print(f"wrote [bold]{escape(str(path))}[/] ({kind}, {len(sites)} participants); read it, then:")
    steps = {
        "local": [f"fedfleet run --stack {name}"],
        "hosts": [
            f"fedfleet up --stack {name}",
            f"fedfleet vms --stack {name}",
            f"fedfleet run --stack {name}",
        ],
        "cloud": [
            f"fedfleet plan --stack {name}",
            f"fedfleet up --stack {name}",
            f"fedfleet run --stack {name}",
        ],
    }[kind]
    for step in steps:
        console.print(f"  {escape(step)}")
