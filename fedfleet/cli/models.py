"""`fedfleet models list | best | download` and `fedfleet ui`: the model registry (MLflow)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedfleet import workflow
from fedfleet.adapters import mlflow as registry_store
from fedfleet.core.errors import EnvironmentProblem
from fedfleet.core.registry import MODEL_METRICS, criteria
from fedfleet.core.util import poll

HELP = "Every run's rounds and models in the registry (MLflow): list them, pick the best, download one."
UI_HELP = "Start the MLflow UI on the registry, on 127.0.0.1 only (Ctrl-C stops it)."
STACK_HELP = "Stack name: its registry (fedfleet:registry) and experiment. Default: every stack in the project's store."
JSON_HELP = "Print JSON instead of tables."

app = typer.Typer(help=HELP, no_args_is_help=True)


def _project(ctx: typer.Context) -> Path:
    from fedfleet.cli.app import project_dir

    return project_dir(ctx)  # a sub-command's context carries the root's --project


def _cell(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if key == "accuracy" else f"{value:.3f}"


@app.command("list", help="Runs and their rounds with each round's metrics (newest run first).")
def list_command(
    ctx: typer.Context,
    stack: str | None = typer.Option(None, "--stack", help=STACK_HELP),
    run: str | None = typer.Option(None, "--run", help="One run (its ID or a unique prefix): every round."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    runs = workflow.models_list(_project(ctx), stack, run)
    if as_json:
        typer.echo(json.dumps(runs, indent=2))
        return
    console = Console()
    if not runs:
        console.print("no runs recorded" + (f" for stack {stack}" if stack else ""))
        return
    if run is None:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("run", "stack", "status", "started", "rounds", "accuracy", "F1", "loss"):
            left = column in ("run", "stack", "status", "started")
            table.add_column(
                column, justify="left" if left else "right", no_wrap=column in ("run", "started")
            )
        for r in runs:
            rounds = [x for x in r["rounds"] if x["round"] > 0]
            last = rounds[-1]["metrics"] if rounds else {}
            table.add_row(
                r["run"], r["stack"], r["status"].lower(), r["started"][5:16], str(len(rounds)),
                _cell(last, "accuracy"), _cell(last, "f1"), _cell(last, "loss"),
            )  # fmt: skip
        console.print(table)
        console.print("[dim]the last round's metrics; --run RUN for every round[/]")
        return
    for r in runs:
        console.print(
            f"[bold]run {r['run']}[/] ({r['stack']}, {r['status'].lower()}, started {r['started']})"
        )
        table = Table(box=None, header_style="bold")
        for column in ("round", *MODEL_METRICS, "model"):  # the model ID last: it may be cut
            table.add_column(column, justify="left" if column == "model" else "right")
        for x in r["rounds"]:
            table.add_row(
                str(x["round"]), *(_cell(x["metrics"], k) for k in MODEL_METRICS), x["model"] or "-"
            )
        console.print(table)


@app.command("best", help="The round whose model best meets your criteria, and why; tagged <name>@best.")
def best_command(
    ctx: typer.Context,
    stack: str = typer.Option("local", "--stack", help="Stack name: its runs are the candidates."),
    metric: str = typer.Option("accuracy", "--metric", help="Maximise this (loss: minimise)."),
    minimum: list[str] = typer.Option([], "--min", help="METRIC=NUMBER: a round must reach it (repeat)."),
    maximum: list[str] = typer.Option(
        [], "--max", help="METRIC=NUMBER: a round must not exceed it (repeat)."
    ),
    run: str | None = typer.Option(None, "--run", help="Only this run's rounds."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    wanted = criteria(metric, minimum, maximum)
    choice, out = workflow.models_best(_project(ctx), stack, run, wanted)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        console = Console()
        if choice.winner is None:
            console.print(f"[bold yellow]none qualifies[/]: {escape(out['reason'])}")
        else:
            m = choice.winner.metrics
            console.print(
                f"[bold green]best[/] {choice.winner.label}: "
                + ", ".join(f"{k} {_cell(dict(m), k)}" for k in MODEL_METRICS if k in m)
            )
            console.print(escape(out["reason"]))
            console.print(f"registered as {out['registered']['uri']}; download: {out['download']}")
    if choice.winner is None:
        raise typer.Exit(1)


@app.command(
    "download", help="A round's model: RUN (its last round), RUN:N, RUN:best, or best (the stack's)."
)
def download_command(
    ctx: typer.Context,
    spec: str = typer.Argument(..., metavar="RUN[:ROUND|best]"),
    output: Path = typer.Option(..., "-o", "--output", help="Directory to create (or an empty one)."),
    stack: str | None = typer.Option(None, "--stack", help=STACK_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    about = workflow.models_download(_project(ctx), stack, spec, output.resolve())
    if as_json:
        typer.echo(json.dumps(about, indent=2))
        return
    console = Console()
    console.print(f"[bold]run {about['run']} round {about['round']}[/] → {escape(about['directory'])}")
    for way, how in about["load"].items():
        console.print(f"  {way}: [cyan]{escape(how)}[/]")


@app.command(
    "report",
    help="A run's curves (PNG) and one self-contained HTML report: placement, VMs, failovers, curves, timings, best model.",
)
def report_command(
    ctx: typer.Context,
    run: str = typer.Argument(..., metavar="RUN", help="A run ID under runs/ (or a unique prefix)."),
    open_it: bool = typer.Option(False, "--open", help="Open the report in the default browser."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    made = workflow.models_report(_project(ctx), run)
    if as_json:
        typer.echo(json.dumps(made, indent=2))
    else:
        typer.echo(f"report of run {made['run']}: {made['report']}")
    if open_it:
        import webbrowser

        if not webbrowser.open(Path(made["report"]).as_uri()):
            typer.echo("no browser to open it here: open the file above", err=True)


def ui_command(
    ctx: typer.Context,
    stack: str | None = typer.Option(
        None, "--stack", help="Stack name: its registry. Default: the project's."
    ),
    port: int = typer.Option(5000, "--port", help="Port on 127.0.0.1."),
) -> None:
    from fedfleet.cli.app import project_dir

    project = project_dir(ctx)
    registry = workflow.registry_at(project, stack)
    store = registry.store
    if not store.local:
        typer.echo(f"the registry is {store.shown}: open its own UI there")
        return
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise EnvironmentProblem(
                f"port {port} on 127.0.0.1 is taken ({err.strerror}): pass --port with a free one"
            ) from err
    argv, env = registry_store.ui_command(store, port)
    log = registry_store.ui_log(store)
    with log.open("ab") as out:
        proc = subprocess.Popen(  # its own process group, stopped whole; in the project directory
            argv,
            env=env,
            cwd=project,
            preexec_fn=_own_group,  # noqa: PLW1509 (this command runs no threads of its own)
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    hangup = signal.signal(signal.SIGHUP, _hangup)  # a closed terminal stops it like Ctrl-C
    try:
        if (
            not poll(lambda: proc.poll() is not None or registry_store.ui_ready(url), 120.0, 0.5)
            or proc.poll() is not None
        ):
            raise EnvironmentProblem(
                f"the MLflow UI did not start on 127.0.0.1:{port} (exit status {proc.poll()}); its log: {log}"
            )
        typer.echo(f"MLflow UI on {store.shown}: {url}  (Ctrl-C stops it; its log: {log})")
        proc.wait()
    finally:
        signal.signal(signal.SIGHUP, hangup)
        _stop_group(proc)


def _hangup(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _own_group() -> None:
    """In the server's process: a group of its own, and SIGTERM when fedfleet dies (even by
    SIGKILL), so no server outlives the command."""
    import ctypes

    os.setsid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # uvicorn's workers, if any outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
