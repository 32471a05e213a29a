"""A live view of a playbook run, built from ansible-runner's events: one line per host."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

STATUS_STYLE = {"ok": "green", "changed": "yellow", "skipped": "dim", "failed": "red", "unreachable": "red"}


class PlayProgress:
    """Per host: tasks done, how many changed, and the task running now."""

    def __init__(self, console: Console, title: str) -> None:
        self.console = console
        self.title = title
        self.started = time.monotonic()
        self.hosts: dict[str, dict[str, object]] = {}
        self.live: Live | None = None

    def __enter__(self) -> PlayProgress:
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=True)
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def _host(self, host: str) -> dict[str, object]:
        return self.hosts.setdefault(host, {"done": 0, "changed": 0, "task": "", "last": ""})

    def task(self, host: str, name: str) -> None:
        self._host(host)["task"] = name
        self._refresh()

    def result(self, host: str, name: str, status: str) -> None:
        entry = self._host(host)
        entry["done"] = int(entry["done"]) + 1  # type: ignore[call-overload]
        if status == "changed":
            entry["changed"] = int(entry["changed"]) + 1  # type: ignore[call-overload]
        entry["last"] = status
        entry["task"] = "" if status in ("failed", "unreachable") else entry["task"]
        if status in ("failed", "unreachable"):
            self.console.print(f"[red]{escape(host)}: {status}[/] {escape(name)}")
        self._refresh()

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    def _render(self) -> Table:
        table = Table(box=None, header_style="bold", title_justify="left", pad_edge=False)
        table.title = f"{self.title}  {time.monotonic() - self.started:.0f}s"
        for column in ("host", "tasks", "changed", "now"):
            table.add_column(column, justify="right" if column in ("tasks", "changed") else "left")
        for host, entry in sorted(self.hosts.items()):
            style = STATUS_STYLE.get(str(entry["last"]), "")
            table.add_row(
                escape(host), str(entry["done"]), str(entry["changed"]), f"[{style}]{escape(str(entry['task']))}[/]"
                if style else escape(str(entry["task"])),
            )  # fmt: skip
        return table
