"""`fedfleet run`: one-shot federated run with a live per-round display."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedfleet import workflow
from fedfleet.cli.progress import PlayProgress
from fedfleet.core.records import RunState

HELP = (
    "Run one federated training on a stack (default: the embedded local stack): start the "
    "SuperLink and a SuperNode per participant, train, save every round's model, stop everything."
)
STACK_HELP = "Stack name: stacks/Pulumi.<stack>.yaml."
ROUNDS_HELP = "Number of rounds (default: the stack's fedfleet:app num-server-rounds, or the app's)."
APP_HELP = (
    "A Flower app of your own to run instead of the stack's (a directory with its pyproject.toml "
    "and [tool.flwr.app]), deployed unchanged: as fedfleet:app.path in the stack file."
)
JSON_HELP = "Print the run's summary.json to stdout instead of the live display."
RESUME_HELP = (
    "Continue RUN (a run ID under runs/) from its last committed round: after its runner, aggregator or "
    "SuperLink died, on the same or other VMs; the stack's app settings must be those it started with."
)


class LiveDisplay:
    """Stage lines, then a table that fills in round by round."""

    def __init__(self, console: Console, rounds: int | None) -> None:
        self.console = console
        self.rounds = rounds
        self.started = time.monotonic()
        self.live: Live | None = None
        self.state: RunState | None = None
        self.play: PlayProgress | None = None

    def task(self, host: str, name: str) -> None:
        if self.play is not None:
            self.play.task(host, name)

    def result(self, host: str, name: str, status: str) -> None:
        if self.play is not None:
            self.play.result(host, name, status)

    def stage(self, name: str, detail: str = "") -> None:
        if self.play is not None:
            self.play.__exit__()
            self.play = None
        if name == "training":
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
            return
        if name == "stopping" and self.live is not None:
            self._stop_live()
        self.console.print(
            f"[dim]{time.monotonic() - self.started:6.1f}s[/] [bold]{name}[/] {escape(detail)}"
        )
        if name == "configure":
            self.play = PlayProgress(self.console, "ansible-playbook site.yml").__enter__()

    def update(self, state: RunState) -> None:
        self.state = state
        if self.live is not None:
            self.live.update(self._render())

    def _render(self) -> Group:
        state = self.state
        planned = state.rounds_planned if state else self.rounds or 0
        table = Table(title=None, box=None, header_style="bold", pad_edge=False)
        source = _metric_source(state)
        columns = _metric_columns(state, source)
        for column in ("round", *(label for _, label in columns), "seconds"):
            table.add_column(column, justify="right")
        if state is not None:
            for number in sorted(state.rounds):
                record = state.rounds[number]
                m = getattr(record, source)
                seconds = record.seconds
                table.add_row(
                    str(number),
                    *(_cell(name, m) for name, _ in columns),
                    f"{seconds:.1f}" if seconds is not None else ("…" if number else "-"),
                )
        done = state.completed_rounds if state else 0
        width = 30
        filled = int(width * done / planned) if planned else 0
        bar = Text(f"rounds {done}/{planned} ", style="bold")
        bar.append("█" * filled, style="green")
        bar.append("░" * (width - filled), style="dim")
        bar.append(f"  {time.monotonic() - self.started:.0f}s")
        return Group(bar, table)

    def _stop_live(self) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()
            self.live = None
            if not self.console.is_terminal:
                self.console.line()  # Live leaves its last line open when not on a terminal

    def close(self) -> None:
        if self.play is not None:
            self.play.__exit__()
            self.play = None
        self._stop_live()


BUILT_IN = (
    ("loss", "loss"),
    ("accuracy", "accuracy"),
    ("f1", "F1"),
    ("precision", "precision"),
    ("recall", "recall"),
)


def _metric_source(state: RunState | None) -> str:
    """Which metrics the table shows: the evaluation's (the built-in app's always), else a
    foreign app's server-side evaluation, else its training metrics."""
    rounds = state.rounds.values() if state else []
    if any(r.evaluation for r in rounds) or not any(r.server or r.train for r in rounds):
        return "evaluation"
    return "server" if any(r.server for r in rounds) else "train"


def _metric_columns(state: RunState | None, source: str) -> tuple[tuple[str, str], ...]:
    """The built-in app's five metrics, or the first five a foreign app reports."""
    if state is None:
        return BUILT_IN
    seen: dict[str, None] = {}
    for record in state.rounds.values():
        for name in getattr(record, source):
            seen[name] = None
    if not seen or set(seen) <= {name for name, _ in BUILT_IN}:
        return BUILT_IN
    return tuple((name, name) for name in list(seen)[:5])


def _cell(name: str, metrics: dict[str, float]) -> str:
    if name not in metrics:
        return "…"
    value = metrics[name]
    return f"{value:.1%}" if name == "accuracy" else f"{value:.3f}" if abs(value) < 1000 else f"{value:.3g}"


def command(
    ctx: typer.Context,
    stack: str = typer.Option("local", "--stack", help=STACK_HELP),
    rounds: int | None = typer.Option(None, "--rounds", min=1, help=ROUNDS_HELP),
    app: Path | None = typer.Option(None, "--app", help=APP_HELP),
    resume: str | None = typer.Option(None, "--resume", metavar="RUN", help=RESUME_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    from fedfleet.cli.app import project_dir

    project = project_dir(ctx)
    console = Console(stderr=as_json)
    display = None if as_json else LiveDisplay(console, rounds)
    try:
        summary = workflow.run(project, stack, rounds=rounds, observer=display, app=app, resume=resume)
    finally:
        if display is not None:
            display.close()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_result(console, summary)


def _print_result(console: Console, summary: dict[str, Any]) -> None:
    run_dir = Path("runs") / summary["run_id"]
    best = summary.get("best_round")
    t = summary["timings"]
    console.print(
        f"[bold green]completed[/] {summary['rounds_completed']} rounds in "
        f"{t['total_seconds']:.1f} s (training {t['training_seconds']:.1f} s, "
        f"{t['round_mean_seconds'] or 0:.1f} s per round)"
    )
    app = summary.get("app")
    if app is not None:
        reported = [r["metrics"] or r.get("server_metrics") for r in summary["rounds"]]
        last: dict[str, float] = next((m for m in reversed(reported) if m), {})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
        console.print(
            f"app {app['app']} {app['version']}: " + (f"last round {shown}" if shown else app.get("note", ""))
        )
        if (run_dir / "output").is_dir():
            console.print(f"the ServerApp's files: {run_dir / 'output'}")
        console.print(f"the ServerApp's log: {run_dir / 'serverapp.log'}")
    elif best:
        m = best["metrics"]
        console.print(
            f"best round {best['round']}: accuracy {m['accuracy']:.1%}, F1 {m['f1']:.3f}, "
            f"loss {m['loss']:.3f} → {run_dir / best['model']}"
        )
    orchestration = summary.get("orchestration") or {}
    later: dict[str, list[str]] = {}
    for event in orchestration.get("failovers", []):
        if event["replacement"]:
            later.setdefault(event["participant"], []).append(event["replacement"])
    served = ", ".join(
        f"{p['name']} on {' then '.join([p['vm'], *later.get(p['name'], [])])}"
        for p in summary["participants"]
    )
    console.print(f"served by: {served}")
    for participant, attempts in orchestration.get("tried", {}).items():
        for attempt in attempts:
            if attempt["error"]:
                reason = attempt["error"].splitlines()[0]
                console.print(f"[yellow]skipped[/] {attempt['vm']} ({participant}): {escape(reason)}")
    for event in orchestration.get("failovers", []):
        took = event["replacement_seconds"]
        console.print(
            f"[yellow]failover[/] {event['lost_vm']} ({event['participant']}) lost: "
            f"{escape(event['why'].splitlines()[0])} → "
            + (f"{event['replacement']} online {took:.1f} s later" if event["replacement"] else "no VM left")
        )
    for r in summary["rounds"]:
        for update in r.get("rejected", []):
            who = update.get("participant") or f"node {update.get('node')}"
            console.print(
                f"[yellow]rejected[/] round {r['round']}: {escape(str(who))}'s update: {escape(update['reason'])}"
            )
        if r.get("privacy") and r["round"] == summary["rounds"][-1]["round"]:
            p = r["privacy"]
            console.print(
                f"differential privacy ({p['mode']}): noise multiplier {p['noise_multiplier']:g}, clipping norm "
                f"{p['clipping_norm']:.4g}, noise std {p['noise_stddev']:.4g} in the last round (every round in summary.json)"
            )
    console.print(f"summary: {run_dir / 'summary.json'}")
