"""`fedfleet auth add | list | verify | remove`: cloud credentials, verified with the cloud first."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedfleet.core.credentials import CLOUDS
from fedfleet.core.errors import ConfigError, CredentialError
from fedfleet.stages import authenticate

HELP = (
    "Cloud credentials: add one (checked with the cloud's API before it is stored, outside the "
    "project, owner-only), list, verify again, remove. `fedfleet preview|up|destroy` use them."
)
ADD_HELP = (
    "Verify a credential file with its cloud (AWS STS; a GCP token exchange and project read; an Azure "
    "token and subscription read), show who it is, and only then store it."
)
FILE_HELP = (
    "aws: the access-key CSV or a credentials/config file; gcp: a service-account key JSON; "
    "azure: the JSON of `az ad sp create-for-rbac` (or with --sdk-auth)."
)
JSON_HELP = "Print JSON instead of text."

app = typer.Typer(help=HELP, no_args_is_help=True)


def _store() -> authenticate.Store:
    return authenticate.Store(authenticate.store_dir(os.environ))


def _identity_line(cloud: str, identity: dict[str, str]) -> str:
    return authenticate.who(cloud, identity)


@app.command("add", help=ADD_HELP)
def add_command(
    cloud: str = typer.Argument(..., help=f"One of {', '.join(CLOUDS)}."),
    file: Path = typer.Option(..., "--file", "-f", help=FILE_HELP),
    name: str | None = typer.Option(
        None, "--name", help="What to call it (default: the cloud and the account, project or subscription)."
    ),
    profile: str | None = typer.Option(None, "--profile", help="aws: the profile to read from an INI file."),
    subscription: str | None = typer.Option(
        None, "--subscription", help="azure: the subscription ID, for a file without one."
    ),
    yes: bool = typer.Option(False, "--yes", help="Store without asking (asked only in a terminal)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    if cloud not in CLOUDS:
        raise ConfigError(f"unknown cloud {cloud!r}: one of {', '.join(CLOUDS)}")
    status = Console(stderr=True).status(f"asking {cloud} who this is", spinner="dots")
    out = Console(stderr=as_json)

    def confirm(name: str, identity: dict[str, str]) -> bool:
        """The identity the cloud confirmed, shown before anything is stored."""
        status.stop()
        out.print(f"[green]verified[/] {escape(_identity_line(cloud, identity))}", soft_wrap=True)
        if yes or not sys.stdin.isatty():
            return True
        return typer.confirm(f"Store it as {name}?", default=True)

    try:
        with status:
            added = authenticate.add(
                _store(), cloud, file, os.environ, name=name, profile=profile, subscription=subscription,
                confirm=confirm,
            )  # fmt: skip
    except CredentialError as err:
        raise CredentialError(f"{err} Nothing was stored.", err.reason) from None
    if added["stored"] is None:
        out.print("not stored")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(added, indent=2))
        return
    out.print(
        f"stored as [bold]{escape(added['name'])}[/] (key {escape(added['masked_key_id'])}) in "
        f"{escape(str(Path(added['stored']).parent))}"
    )


@app.command("list", help="Stored credentials: name, cloud, identity, masked key id, last verified.")
def list_command(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    store = _store()
    rows = authenticate.listing(store)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = Console()
    if not rows:
        console.print(
            f"no credentials stored ({escape(str(store.root))}); add one: fedfleet auth add CLOUD --file FILE"
        )
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("name", "cloud", "identity", "key", "last verified", "result"):
        table.add_column(column, no_wrap=column in ("name", "key"))
    for r in rows:
        table.add_row(
            escape(r["name"]), r["cloud"], escape(authenticate.who(r["cloud"], r["identity"], short=True)),
            escape(r["masked_key_id"]), r["last_verified"].replace("T", " ")[:16], _result(r["last_result"]),
        )  # fmt: skip
    console.print(table)


def _result(value: str) -> str:
    return "[green]ok[/]" if value == "ok" else f"[red]{escape(value)}[/]"


@app.command("verify", help="Check stored credentials with their clouds again (all, or those named).")
def verify_command(
    names: list[str] | None = typer.Argument(None, help="Credential names (default: every stored one)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    store = _store()
    if not names and not store.names():
        raise ConfigError("no credentials stored to verify; add one: fedfleet auth add CLOUD --file FILE")
    results = authenticate.verify_stored(store, names, os.environ)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        console = Console()
        for r in results:
            if r["ok"]:
                line = (
                    f"[green]ok[/] {escape(r['name'])}: {escape(_identity_line(r['cloud'], r['identity']))}"
                )
            else:
                line = f"[red]{escape(r['last_result'])}[/] {escape(r['name'])}: {escape(r['error'])}"
            console.print(line, soft_wrap=True)
    if not all(r["ok"] for r in results):
        raise typer.Exit(CredentialError.exit_code)


@app.command("remove", help="Delete a stored credential (the key stays valid at the cloud: revoke it there).")
def remove_command(
    name: str = typer.Argument(..., help="The credential's name (`fedfleet auth list`)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    removed = _store().remove(name)
    result: dict[str, Any] = {
        "removed": name,
        "cloud": removed.credential.cloud,
        "identity": removed.meta["identity"],
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    Console().print(
        f"removed {escape(name)} ({removed.credential.cloud}); the key itself is still valid at the cloud until "
        "you delete or rotate it there"
    )
